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
"""

from __future__ import annotations

import torch

__all__ = ["Lars"]


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
    """

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
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
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
                    if "momentum_buffer" not in state:
                        state["momentum_buffer"] = d.clone()
                    else:
                        state["momentum_buffer"].mul_(mom).add_(d)
                    bufs.append(state["momentum_buffer"])
                if group["nesterov"]:
                    torch._foreach_add_(steps, bufs, alpha=mom)
                else:
                    steps = bufs
            torch._foreach_add_(params, steps)
        return loss
