"""What every training run of ``fastssl-train`` needs around its loop, whatever the method.

Joining and leaving the process group under torchrun, the optimiser's parameter split and
gradient clipping, mixed precision, the seeds, and decisions every rank takes together (a stop,
an error) from host flags, without reading anything from the device. Logging is in ``log.py``,
the run folder in ``run_folder.py``, resuming in ``resume.py``.
"""

from __future__ import annotations

import math
import os
import random
from collections.abc import Callable
from typing import TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from .. import distributed
from .config import RunConfig
from .errors import ConfigError, DataError, RunError, UserError
from .optim import step_unless

T = TypeVar("T")
R = TypeVar("R", bound=RunConfig)

__all__ = ["any_rank", "backward_and_step", "clip_gradients_", "in_process_group", "iterations_per_epoch",
           "mixed_precision", "param_groups", "print_stop", "raise_on_every_rank", "resolve_precision", "seed_all",
           "setup_distributed", "step_seed", "strip_prefix", "teardown_distributed", "version"]


# ----------------------------------------------------------------------------- processes

def setup_distributed(cfg: RunConfig) -> tuple[torch.device, int, int]:
    """``(device, rank, world_size)``; under torchrun (``WORLD_SIZE`` set) joins the process group:
    NCCL on GPUs, gloo on CPU. :func:`teardown_distributed` leaves it."""
    cuda = cfg.device in ("auto", "cuda") and torch.cuda.is_available()
    if cfg.device == "cuda" and not cuda:
        raise ConfigError("--device cuda was asked for but torch sees no GPU")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not distributed.is_initialized():
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group(cfg.dist_backend or ("nccl" if cuda else "gloo"))
        _joined.append(True)
    rank = dist.get_rank() if distributed.is_initialized() else 0
    world = distributed.world_size()
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    return device, rank, world


def teardown_distributed(ok: bool) -> None:
    """Leave the process group this run joined. After a clean run every rank first waits for the
    others (rank 0 may still be writing its checkpoint): a process that exits while a peer still
    talks to it makes gloo abort that peer."""
    if distributed.is_initialized() and _joined:
        if ok:
            dist.barrier()
        dist.destroy_process_group()
        _joined.clear()


_joined: list[bool] = []  # set when setup_distributed joined the group (not when the caller had)


def in_process_group(cfg: RunConfig, train: Callable[[torch.device, int, int], T]) -> T:
    """``train(device, rank, world_size)`` inside the process group (under torchrun), left afterwards."""
    device, rank, world = setup_distributed(cfg)
    ok = False
    try:
        result = train(device, rank, world)
        ok = True
        return result
    finally:
        teardown_distributed(ok)


# ----------------------------------------------------------------------------- optimisation

def param_groups(model: nn.Module) -> list[dict]:
    """The authors' split: weight decay on weights, none on biases and norms (1-D parameters)."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if name.endswith(".bias") or p.ndim == 1 else decay).append(p)
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]


def clip_gradients_(model: nn.Module, clip: float, mode: str) -> None:
    """``per_param`` (the authors' ``clip_gradients``): each parameter's gradient rescaled to norm at
    most ``clip``; ``global``: all gradients together (``clip_grad_norm_``)."""
    params = [p for p in model.parameters() if p.grad is not None]
    if mode == "global":
        torch.nn.utils.clip_grad_norm_(params, clip)
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    scales = torch.clamp(clip / (torch.stack(torch._foreach_norm(grads)).float() + 1e-6), max=1.0)
    torch._foreach_mul_(grads, list(scales.unbind()))  # one scale per gradient, no host sync


def resolve_precision(cfg: R, device: torch.device) -> R:
    """``cfg`` with ``--precision auto`` resolved (bf16 on GPUs, fp32 on CPU): the printed and saved config
    says what ran, and a bf16 checkpoint resumed on a CPU with ``auto`` is a config mismatch, not a silent
    switch to fp32."""
    if cfg.precision != "auto":
        return cfg
    return cfg.replace(precision="bf16" if device.type == "cuda" else "fp32")


def mixed_precision(cfg: RunConfig, device: torch.device) -> tuple[torch.dtype | None, torch.amp.GradScaler | None]:
    """``(autocast dtype or None, grad scaler or None)`` of a resolved ``--precision``."""
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision)
    return amp_dtype, (torch.amp.GradScaler(device.type) if cfg.precision == "fp16" else None)


def backward_and_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None,
                      before_step: Callable[[], None] | None = None, skip: torch.Tensor | None = None) -> None:
    """Backward (scaled under fp16), ``before_step()`` on the true gradients (clipping, freezing), step; where
    the 0-dim bool ``skip`` (on the device) is set, the step leaves the parameters and the optimiser's state
    as they were (``optimizer`` must skip on the device, see :func:`~fastssl.train.optim.step_unless`), with
    no host read."""
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        if skip is not None:  # a skipped step's gradients made non-finite: the scaler's own check skips it
            loss = loss * torch.where(skip, math.nan, 1.0)  # x 1.0 elsewhere: the same gradients
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
    else:
        loss.backward()
    if before_step is not None:
        before_step()
    if scaler is not None:
        # found_inf goes to the optimiser, which skips on the device (an optimiser without that contract
        # would have GradScaler read found_inf on the host); update() backs the scale off, as on an overflow.
        scaler.step(optimizer)
        scaler.update()
    elif skip is not None:
        step_unless(optimizer, skip)
    else:
        optimizer.step()


# ----------------------------------------------------------------------------- data, seeds, decisions together

def iterations_per_epoch(n_images: int, batch: int, world: int) -> int:
    """Each rank's steps in an epoch: its share of the images (padded as ``DistributedSampler``), full
    batches only (``drop_last``, as the authors)."""
    niter = -(-n_images // world) // batch
    if niter < 1:
        raise DataError(f"{n_images} training images cannot fill one batch of {batch} per process x {world} "
                        "(--batch-size-per-gpu)")
    return niter


def seed_all(seed: int) -> None:
    """Seed torch's, Python's and numpy's global RNGs (the checkpoint keeps all three)."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


def strip_prefix(state: dict) -> dict:
    """A state dict without DDP's ``module.`` prefixes."""
    return {k.removeprefix("module."): v for k, v in state.items()}


def step_seed(seed: int, rank: int, it: int) -> int:
    """The augmentation seed of one iteration on one rank: a resumed run draws the same crops."""
    return (seed * 1_000_003 + rank * 7_919 + it * 104_729) % (2**63 - 1)


def any_rank(*flags: bool) -> list[bool]:
    """Each host flag OR-ed over the ranks: decisions that skip collectives (DDP's all-reduce, the loss's
    all-gather) or stop the run must be the same on every rank, else the others wait forever. The flags
    travel as a CPU tensor through a gloo group (the default group when it is gloo): no device read."""
    if distributed.world_size() <= 1:
        return [bool(f) for f in flags]
    t = torch.tensor([int(bool(f)) for f in flags], dtype=torch.int32)
    dist.all_reduce(t, group=_host_group())
    return [v > 0 for v in t.numpy().tolist()]  # .numpy(): host memory (it refuses a device tensor)


def _host_group():
    """A gloo group over every rank for host flags: None (the default group) when that is gloo, else one
    made once per default group (a collective: every rank reaches it at the same call of any_rank)."""
    if dist.get_backend() == "gloo":
        return None
    world = dist.group.WORLD
    if not _HOST_GROUP or _HOST_GROUP[0] is not world:
        _HOST_GROUP[:] = [world, dist.new_group(backend="gloo")]
    return _HOST_GROUP[1]


_HOST_GROUP: list = []  # [the default group it was made in, the gloo group]


def raise_on_every_rank(error: UserError | None) -> None:
    """Raise ``error`` here and an error on every other rank too (a collective): a rank that went on
    alone would wait forever at the next collective."""
    if distributed.world_size() <= 1:
        if error is not None:
            raise error
        return
    errors: list = [None] * distributed.world_size()
    dist.all_gather_object(errors, None if error is None else str(error))
    if error is not None:
        raise error
    failed = [(rank, e) for rank, e in enumerate(errors) if e is not None]
    if failed:
        raise RunError(f"stopped with rank {failed[0][0]}, which failed: {failed[0][1]}")


def version() -> str:
    from .. import __version__

    return __version__


def print_stop(signal_received, cfg: RunConfig, steps_run: int, steps_done: int, epochs_done: int, path) -> None:
    """Say why a run stopped early and how to go on."""
    why = f"signal {signal_received.received}" if signal_received else f"--stop-after-steps {cfg.stop_after_steps}"
    print(f"stopped by {why} after {steps_run} iteration(s) of this run (iteration {steps_done} of the run, "
          f"{epochs_done} epoch(s) complete): checkpoint {path}; rerun the same command to go on", flush=True)
