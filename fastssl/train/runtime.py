"""What every training run of ``fastssl-train`` needs around its loop, whatever the method.

Joining and leaving the process group under torchrun, the optimiser's parameter split and
gradient clipping, the per-iteration seeds, a stop that every rank agrees on, and rank 0's
logging (``log.jsonl``, the progress bar, TensorBoard).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import nn

from .. import distributed
from . import checkpoint as ckpt

T = TypeVar("T")

__all__ = ["EpochMeter", "Logger", "any_rank", "backward_and_step", "clip_gradients_", "in_process_group",
           "mixed_precision", "param_groups", "plain_config", "print_stop", "resume_run", "setup_distributed",
           "should_stop", "step_seed", "strip_prefix", "teardown_distributed", "version"]


# ----------------------------------------------------------------------------- processes

def setup_distributed(cfg: dict) -> tuple[torch.device, int, int]:
    """``(device, rank, world_size)``; under torchrun (``WORLD_SIZE`` set) joins the process group:
    NCCL on GPUs, gloo on CPU. :func:`teardown_distributed` leaves it."""
    cuda = cfg["device"] in ("auto", "cuda") and torch.cuda.is_available()
    if cfg["device"] == "cuda" and not cuda:
        raise RuntimeError("--device cuda was asked for but torch sees no GPU")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not distributed.is_initialized():
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group(cfg["dist_backend"] or ("nccl" if cuda else "gloo"))
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


def in_process_group(cfg: dict, train: Callable[[torch.device, int, int], T]) -> T:
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
    decay, no_decay = [], []
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
    grads = [p.grad for p in params]
    if not grads:
        return
    scales = torch.clamp(clip / (torch.stack(torch._foreach_norm(grads)).float() + 1e-6), max=1.0)
    torch._foreach_mul_(grads, list(scales.unbind()))  # one scale per gradient, no host sync


def mixed_precision(cfg: dict, device: torch.device) -> tuple[torch.dtype | None, torch.amp.GradScaler | None]:
    """``(autocast dtype or None, grad scaler or None)`` of ``--precision`` (auto: bf16 on GPUs, fp32 on CPU).

    Writes the resolved precision back into ``cfg``: the printed and saved config says what ran, and a
    bf16 checkpoint resumed on a CPU with ``auto`` is a config mismatch, not a silent switch to fp32."""
    if cfg["precision"] == "auto":
        cfg["precision"] = "bf16" if device.type == "cuda" else "fp32"
    precision = cfg["precision"]
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return amp_dtype, (torch.amp.GradScaler(device.type) if precision == "fp16" else None)


def backward_and_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None,
                      before_step: Callable[[], None] | None = None) -> None:
    """Backward (scaled under fp16), ``before_step()`` on the true gradients (clipping, freezing), step."""
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
    else:
        loss.backward()
    if before_step is not None:
        before_step()
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()


def resume_run(cfg: dict, out: Path, device: torch.device, modules: dict[str, nn.Module],
               optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None, niter: int,
               main: bool) -> tuple[int, int]:
    """Load this run folder's checkpoint (or ``--resume``'s) when there is one: the config must match,
    then every module of ``modules`` (checkpoint key -> module), the optimiser, the scaler and the RNG
    states. Returns ``(epoch, step within it)`` to start from (``(0, 0)`` for a new run)."""
    start_epoch, start_step = 0, 0
    resume = Path(cfg["resume"]) if cfg["resume"] else out / "checkpoint.pth"
    if cfg["resume"] and not resume.is_file():
        raise ckpt.CheckpointError(f"--resume {str(resume)!r}: no such checkpoint")
    if resume.is_file():
        state = ckpt.load_checkpoint(resume)
        ckpt.check_config(state.get("config", {}), cfg, resume)
        for what, module in modules.items():
            ckpt.check_state_dict(module, strip_prefix(state[what]), what, resume)
            module.load_state_dict(strip_prefix(state[what]))
        optimizer.load_state_dict(state["optimizer"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        start_epoch, start_step = state["epoch"], state["step"]
        ckpt.set_rng_states(state["rng"], device)
        if main:
            print(f"resumed from {resume}: epoch {start_epoch}, step {start_step} of {niter}", flush=True)
    done = start_epoch * niter + start_step
    if cfg["stop_after_steps"] is not None and done >= cfg["stop_after_steps"]:
        raise ValueError(f"the checkpoint is already at iteration {done}, not before --stop-after-steps "
                         f"{cfg['stop_after_steps']}: raise it or drop it to go on")
    return start_epoch, start_step


# ----------------------------------------------------------------------------- config and seeds

def plain_config(cfg: dict) -> dict:
    """The config as JSON-able plain values (paths as strings, tuples as lists), as it is saved."""
    return {k: (str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v) for k, v in cfg.items()}


def strip_prefix(state: dict) -> dict:
    """A state dict without DDP's ``module.`` prefixes."""
    return {k.removeprefix("module."): v for k, v in state.items()}


def step_seed(seed: int, rank: int, it: int) -> int:
    """The augmentation seed of one iteration on one rank: a resumed run draws the same crops."""
    return (seed * 1_000_003 + rank * 7_919 + it * 104_729) % (2**63 - 1)


def any_rank(*flags: bool) -> list[bool]:
    """Each flag OR-ed over the ranks: decisions that skip collectives (DDP's all-reduce, the loss's
    all-gather) must be the same on every rank, else the others wait forever."""
    if distributed.world_size() <= 1:
        return [bool(f) for f in flags]
    t = torch.tensor([float(f) for f in flags], device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t)
    return [bool(v) for v in (t > 0).tolist()]


def should_stop(signal_received, cfg: dict, steps_done: int) -> bool:
    """A signal arrived or ``--stop-after-steps`` is reached, on any rank: all stop together."""
    stop = bool(signal_received) or (cfg["stop_after_steps"] is not None and steps_done >= cfg["stop_after_steps"])
    return any_rank(stop)[0]  # every rank stops at the same step (one of them got the signal)


def version() -> str:
    from .. import __version__

    return __version__


def print_stop(signal_received, cfg: dict, steps_done: int, epochs_done: int, path) -> None:
    """Say why a run stopped early and how to go on."""
    why = f"signal {signal_received.received}" if signal_received else f"--stop-after-steps {cfg['stop_after_steps']}"
    print(f"stopped by {why} after iteration {steps_done} ({epochs_done} epochs done): checkpoint {path}; rerun "
          "the same command to resume", flush=True)


# ----------------------------------------------------------------------------- logging


class Logger:
    """Rank 0 only: ``log.jsonl`` (one JSON object per logging step), the config, optional TensorBoard."""

    def __init__(self, out: Path, cfg: dict, main: bool):
        self.main, self.cfg, self.tb = main, cfg, None
        if not main:
            return
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        self.file = open(out / "log.jsonl", "a")  # noqa: SIM115 - open for the whole run
        if cfg["tensorboard"]:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise ImportError("--tensorboard needs the tensorboard package: pip install tensorboard") from e
            self.tb = SummaryWriter(out / "tensorboard")

    def print_config(self, method, device, world, niter, base_lr) -> None:
        print(f"fastssl {method} training on {device} x {world} process(es), {niter} iterations per epoch, "
              f"lr {base_lr:.3g} after scaling by batch {self.cfg['batch_size_per_gpu'] * world}/256", flush=True)
        width = max(map(len, self.cfg))
        for k in sorted(self.cfg):
            print(f"  {k:<{width}}  {self.cfg[k]}")
        sys.stdout.flush()

    def write(self, record: dict) -> None:
        if not self.main:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None and "step" in record:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k not in ("step", "epoch"):
                    self.tb.add_scalar(k, v, record["step"])

    def close(self) -> None:
        if self.main:
            self.file.close()
            if self.tb is not None:
                self.tb.close()


class EpochMeter:
    """The progress bar of one epoch (rank 0) and the logged metrics."""

    def __init__(self, log: Logger, epoch: int, epochs: int, niter: int, first: int, device: torch.device):
        self.log, self.epoch, self.device = log, epoch, device
        self.losses, self.images, self.skipped, self.n = 0.0, 0, 0, 0
        self.t0 = self.t_log = time.perf_counter()
        self.images_since_log = 0
        self.bar = None
        if log.main and log.cfg["progress"]:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=niter, initial=first, desc=f"epoch {epoch + 1}/{epochs}", dynamic_ncols=True,
                                leave=True, file=sys.stdout)
            except ImportError:
                pass

    def skip(self, skipped: int) -> None:
        self.skipped += skipped

    def update(self, loss: float, images: int, skipped: int, *, step: int, **values) -> None:
        self.losses += loss
        self.n += 1
        self.images += images
        self.images_since_log += images * distributed.world_size()
        self.skipped += skipped
        if self.bar is not None:
            self.bar.update(1)
        if self.n % self.log.cfg["log_freq"] == 0:
            now = time.perf_counter()
            rate = self.images_since_log / max(now - self.t_log, 1e-9)
            self.t_log, self.images_since_log = now, 0
            mem = torch.cuda.max_memory_allocated(self.device) / 2**30 if self.device.type == "cuda" else 0.0
            record = {"epoch": self.epoch, "step": step, "loss": loss, **values, "images_per_s": rate,
                      "skipped_images": self.skipped, "gpu_mem_gb": mem}
            self.log.write(record)
            if self.bar is not None:
                self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{values['lr']:.2e}", img_s=f"{rate:.0f}",
                                     mem=f"{mem:.1f}G", refresh=False)

    def close(self) -> float:
        if self.bar is not None:
            self.bar.close()
        mean = self.losses / self.n if self.n else math.nan
        self.log.write({"epoch": self.epoch, "epoch_loss": mean, "skipped_images": self.skipped,
                        "epoch_time_s": time.perf_counter() - self.t0})
        return mean

