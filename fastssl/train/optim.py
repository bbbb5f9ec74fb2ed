"""LARS over momentum SGD, as the PAWS authors train (suncet ``src/lars.py`` wrapping ``src/sgd.py``).

For each parameter ``p`` with gradient ``g`` of a group not marked ``lars_exclude``::

    ratio = trust * |p| / (|g| + wd * |p| + eps)       (1 and wd = 0 when |p| or |g| is 0)
    d     = ratio * (g + wd * p)

and for an excluded group (no adaptation; the trainer's biases and norms, with wd = 0) ``d = g + wd * p``. Then
the authors' SGD, whose momentum buffer holds learning-rate-scaled steps (not torch's)::

    buf = momentum * buf - lr * d          (buf = -lr * d on the first step)
    p  += buf                              (nesterov: p += -lr * d + momentum * buf)

With a constant learning rate this is torch's SGD; with the per-iteration schedule the two
differ, and this is the one PAWS's recipes were tuned with. Each group's update is a handful of
``torch._foreach_*`` calls, and the ``|p| != 0`` tests of the authors' loop are tensor ops, so
a step does not wait on the GPU.

A step skipped on the device: every optimiser of the trainers takes GradScaler's contract for optimisers
that handle infinities themselves (``_step_supports_amp_scaling``): a ``found_inf`` attribute, a 0-dim float
on the device, set to 1 skips the step inside it, with no host read, and leaves parameters and state as
they were. :class:`Lars` does it here, torch's fused SGD / Adam / AdamW in their kernels (on CPU tensors
too). :func:`step_unless` steps an optimiser unless a device flag is set.
"""

from __future__ import annotations

import torch

__all__ = ["Lars", "skips_on_device", "step_unless"]


class Lars(torch.optim.Optimizer):
    """LARS-adapted momentum SGD (the PAWS authors' optimiser).

    Args:
        params: parameters or groups; a group with ``lars_exclude=True`` gets no trust ratio and
            plain SGD's weight decay, its own or the default (the PAWS trainer gives its biases and
            norms 0, as the authors).
        lr, momentum, weight_decay, nesterov: as SGD's (see the module docstring for the
            momentum form).
        trust_coefficient: LARS's ``trust`` (the authors: 0.001).
        eps: added to the ratio's denominator.

    With a ``found_inf`` attribute set (GradScaler sets it, :func:`step_unless` too), a step where it is
    1 changes nothing (a step that would create the momentum buffers creates them at 0: the next step
    starts them afresh); a ``grad_scale`` attribute divides the gradients first. No host read either way.
    """

    _step_supports_amp_scaling = True  # GradScaler passes found_inf / grad_scale instead of reading them

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0, nesterov: bool = False,
                 trust_coefficient: float = 0.001, eps: float = 1e-8):
        if lr < 0 or momentum < 0 or weight_decay < 0 or trust_coefficient <= 0 or eps < 0:
            raise ValueError(f"Lars: lr={lr}, momentum={momentum}, weight_decay={weight_decay} must be >= 0, "
                             f"trust_coefficient={trust_coefficient} > 0, eps={eps} >= 0")
        if nesterov and momentum == 0:
            raise ValueError("Lars: nesterov needs momentum > 0")
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov,
                        trust_coefficient=trust_coefficient, eps=eps, lars_exclude=False)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        found_inf, grad_scale = getattr(self, "found_inf", None), getattr(self, "grad_scale", None)
        skip = None if found_inf is None else found_inf.to(torch.bool).view(())
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            if grad_scale is not None:  # GradScaler's contract: unscale here (in place, as its unscale_)
                torch._foreach_div_(grads, grad_scale)
            wd, lr, mom = group["weight_decay"], group["lr"], group["momentum"]
            if group["lars_exclude"]:
                steps = torch._foreach_add(grads, params, alpha=wd) if wd else [g.clone() for g in grads]
            else:  # every parameter's ratio at once, as vectors of norms
                p_norms = torch.stack(torch._foreach_norm(params)).float()
                g_norms = torch.stack(torch._foreach_norm(grads)).float()
                ok = (p_norms > 0) & (g_norms > 0)
                ratio = torch.where(ok, group["trust_coefficient"] * p_norms / (g_norms + p_norms * wd + group["eps"]),
                                    1.0)
                decay = torch.where(ok, ratio * wd, 0.0)
                steps = torch._foreach_mul(grads, list(ratio.unbind()))  # 0-dim: each keeps its dtype
                torch._foreach_add_(steps, torch._foreach_mul(params, list(decay.unbind())))
            torch._foreach_mul_(steps, -lr)
            if mom:
                bufs = []
                for p, d in zip(params, steps, strict=True):
                    state = self.state[p]
                    buf = state.get("momentum_buffer")
                    if buf is None:
                        buf = state["momentum_buffer"] = d.clone() if skip is None else torch.where(skip, 0.0, d)
                    elif skip is None:
                        buf.mul_(mom).add_(d)
                    else:  # the same two roundings, kept only where the step is not skipped
                        buf.copy_(torch.where(skip, buf, buf * mom + d))
                    bufs.append(buf)
                if group["nesterov"]:
                    torch._foreach_add_(steps, bufs, alpha=mom)
                else:
                    steps = bufs
            if skip is None:
                torch._foreach_add_(params, steps)
            else:
                for p, d in zip(params, steps, strict=True):
                    p.copy_(torch.where(skip, p, p + d))
        return loss


def skips_on_device(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``found_inf`` skips ``optimizer``'s step on the device: :class:`Lars`, torch's SGD / Adam /
    AdamW with ``fused=True``."""
    if isinstance(optimizer, Lars):
        return True
    return isinstance(optimizer, (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW)) and \
        all(g.get("fused") for g in optimizer.param_groups)


def step_unless(optimizer: torch.optim.Optimizer, skip: torch.Tensor) -> None:
    """``optimizer.step()``, skipped on the device where the 0-dim bool ``skip`` is set: parameters and
    optimiser state keep their values (for torch's fused Adam / AdamW also the step count), and the host
    reads nothing. A skipped first step of torch's fused SGD leaves its momentum buffers uninitialised
    (``empty_like``): the trainers skip every step after a first skipped one and never save that state."""
    if not skips_on_device(optimizer):
        raise TypeError(f"step_unless: {type(optimizer).__name__} cannot skip a step on the device; use Lars "
                        "or torch's SGD / Adam / AdamW with fused=True")
    optimizer.found_inf = skip.to(torch.float32)  # type: ignore[attr-defined]  # the kernels skip where it is 1
    try:
        optimizer.step()
    finally:
        del optimizer.found_inf  # type: ignore[attr-defined]
