"""Where a run starts: from scratch, or from the checkpoint it resumes, checked against this run first.

The checkpoint (``OUTPUT_DIR/checkpoint.pth``, or ``--resume``; with ``--fsdp`` the sharded folder
``OUTPUT_DIR/checkpoint``, its plain values only, see ``fsdp.py``) is read and checked before any model is
built: its config must equal this run's, except the options that do not change the training (marked
``resumable`` in the config classes). A finished run is said to be complete, and nothing is written.
Two deliberate overrides, each said in the output and logged as an event row:

``--extend-epochs``: a larger ``--epochs`` than the checkpoint's. The run goes on from where it stands (a
finished run included) as if it had been started with the new ``--epochs``: every per-iteration schedule
(learning rate, weight decay, teacher momentum; DINO's teacher temperature, per epoch) is recomputed over
the new length, so where the run resumes it jumps from the old schedule's value to the new one's. Weights,
optimiser, loss state and RNG states are kept.

``--change-world-size``: another number of processes (and, to keep the global batch, another
``--batch-size-per-gpu``). Kept: the epoch, the weights, the optimiser's and the loss's states, the
position in the epoch counted in images (an epoch's image order depends only on the seed and the epoch,
so the new ranks go on with the images the old ones had not reached; when those done are not a whole
number of new global batches, the step rounds down and fewer than one global batch of images is seen
twice), and each rank's RNG state where the checkpoint has one (a new rank starts from the seed plus its
rank). Recomputed: the learning rate, scaled by the new global batch (the linear scaling rule), and every
per-iteration schedule over the new iterations per epoch. The logged step goes on counting iterations.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .checkpoint import check_state_dict, load_checkpoint, set_rng_states
from .config import RunConfig, differences
from .errors import CheckpointError, ConfigError, RunError
from .runtime import strip_prefix

__all__ = ["Start", "plan_start", "position", "restore"]


@dataclass
class Start:
    """Where this invocation starts: iteration ``step`` of epoch ``epoch``, ``niter`` iterations per epoch."""

    niter: int
    epoch: int = 0
    step: int = 0
    offset: int = 0  # the logged step of iteration (e, i) is offset + e * niter + i (0 unless the world changed)
    state: dict | None = None  # the checkpoint resumed from
    path: Path | None = None
    complete: bool = False  # a finished run: nothing to train
    notes: list[str] = field(default_factory=list)  # what to say at start
    events: list[dict] = field(default_factory=list)  # the log rows of the overrides

    @property
    def steps_done(self) -> int:
        """Iterations the run has done before this invocation (the logged step it starts at)."""
        return self.offset + self.epoch * self.niter + self.step

    def complete_message(self, out: Path) -> str:
        return (f"{out}: the run is complete ({self.epoch} epochs, {self.path}); nothing to train. To train it "
                "longer: --epochs N --extend-epochs")

    @property
    def meter(self) -> dict | None:
        """The sums of the epoch the checkpoint interrupted (see :class:`~fastssl.train.log.EpochMeter`)."""
        if self.state is None or not self.step:
            return None
        return self.state.get("epoch_meter")


def _method(command: str | None) -> str | None:
    return "dino" if command == "demo" else command


def plan_start(cfg: RunConfig, out: Path, *, world: int, niter: int, n_images: int) -> Start:
    """Read and check the checkpoint this run resumes (if any) and say where the run starts."""
    from .fsdp import SHARDED_NAME, read_plain
    from .sharded_checkpoint import is_sharded_checkpoint

    # --fsdp: the sharded folder OUTPUT_DIR/checkpoint; else the file OUTPUT_DIR/checkpoint.pth.
    sharded = bool(getattr(cfg, "fsdp", False))
    single, folder = out / "checkpoint.pth", out / SHARDED_NAME
    path = Path(cfg.resume) if cfg.resume is not None else folder if sharded else single
    exists = is_sharded_checkpoint(path) if sharded else path.is_file()
    if cfg.resume is not None and not exists:
        if sharded and path.is_file():
            raise CheckpointError(f"--resume {path} is a single-file checkpoint: a run with --fsdp resumes a sharded "
                                  "checkpoint folder (an --fsdp run's OUTPUT_DIR/checkpoint)")
        if not sharded and is_sharded_checkpoint(path):
            raise CheckpointError(f"--resume {path} is a sharded checkpoint (an --fsdp run's): resume it with --fsdp")
        raise CheckpointError(f"--resume {path}: no such checkpoint")
    if not exists:
        if cfg.resume is None and sharded and single.is_file():
            raise CheckpointError(f"{single} was written by a run without --fsdp: resume it without --fsdp, or give "
                                  "a new --output-dir")
        if cfg.resume is None and not sharded and is_sharded_checkpoint(folder):
            raise CheckpointError(f"{folder} is the sharded checkpoint of an --fsdp run: resume it with --fsdp, or "
                                  "give a new --output-dir")
        _refuse_foreign_config(out / "config.json")
        return Start(niter)
    state = read_plain(path) if sharded else load_checkpoint(path)
    saved = state.get("config")
    if not isinstance(saved, dict) or not all(k in state for k in ("epoch", "step", "rng")):
        raise CheckpointError(f"{path} is not a checkpoint of fastssl-train (it has no config, epoch, step or RNG "
                              "states) and cannot be resumed; give a new --output-dir")
    if _method(saved.get("command")) not in (None, cfg.command):
        raise CheckpointError(f"{path} was written by fastssl-train {saved['command']}, not {cfg.command}: give a new "
                              "--output-dir")

    # What may differ: the options that do not change the training, and what an override allows.
    saved_world = state.get("world_size") or (len(state["rng"]) if isinstance(state["rng"], list) else 1)
    saved_batch = saved.get("batch_size_per_gpu", cfg.batch_size_per_gpu)
    saved_epochs = saved.get("epochs", cfg.epochs)
    allowed = []
    if cfg.extend_epochs and saved_epochs != cfg.epochs:
        if cfg.epochs < saved_epochs:
            raise ConfigError(f"--extend-epochs lengthens a run: --epochs {cfg.epochs} is fewer than the checkpoint's "
                              f"{saved_epochs}")
        allowed.append("epochs")
    regrouped = saved_world != world or saved_batch != cfg.batch_size_per_gpu
    if regrouped and cfg.change_world_size:
        allowed.append("batch_size_per_gpu")
    elif saved_world != world:
        raise CheckpointError(
            f"{path} was written by a run on {saved_world} process(es), this one has {world}: the global batch, the "
            "learning rate and the iterations per epoch would change. To resume anyway add --change-world-size "
            "(what it keeps: fastssl-train dino --help, README's Training section)")
    diffs = differences(saved, cfg, allowed=allowed)
    if diffs:
        hints = {"epochs": " (to train a run longer, add --extend-epochs)",
                 "batch_size_per_gpu": " (with another number of processes: --change-world-size)"}
        lines = [d + next((h for k, h in hints.items() if d.startswith(f"{k}:")), "") for d in diffs]
        raise CheckpointError(f"{path} was written by a run with another configuration; resume with the same "
                              "settings (or start a new --output-dir):\n  " + "\n  ".join(lines))

    epoch, step = int(state["epoch"]), int(state["step"])
    saved_niter = int(state.get("niter") or -(-n_images // saved_world) // saved_batch)
    steps_done = int(state.get("global_step", epoch * saved_niter + step))
    start = Start(niter, epoch, step, state=state, path=path)
    start.notes.append(f"resuming {path}: epoch {epoch + 1}, iteration {step} of {saved_niter} (iteration "
                       f"{steps_done} of the run)")
    start.events.append({"event": "resume", "at_step": steps_done, "epoch": epoch, "checkpoint": str(path),
                         "world_size": world})
    if not regrouped and saved_niter != niter:
        raise CheckpointError(f"{path}: the data has changed since the checkpoint ({saved_niter} iterations per epoch "
                              f"then, {niter} now); resume on the same images, or start a new --output-dir")
    if regrouped:
        seen = step * saved_batch * saved_world  # images of this epoch the run has trained on
        start.step = min(seen // (cfg.batch_size_per_gpu * world), niter - 1) if step else 0
        start.notes.append(
            f"--change-world-size: {saved_world} -> {world} process(es), {saved_batch} -> {cfg.batch_size_per_gpu} "
            f"images each (global batch {saved_batch * saved_world} -> {cfg.batch_size_per_gpu * world}, the lr "
            f"scaled by it); {saved_niter} -> {niter} iterations per epoch, the schedules recomputed per "
            f"iteration; epoch {epoch + 1} goes on at iteration {start.step} ({seen} of its images done, "
            f"{seen - start.step * cfg.batch_size_per_gpu * world} seen again); weights, optimiser, loss state "
            f"kept, RNG states of ranks below {min(world, saved_world)} kept")
        start.events.append({"event": "change_world_size", "at_step": steps_done, "epoch": epoch,
                             "from_world_size": saved_world, "to_world_size": world,
                             "from_batch_size_per_gpu": saved_batch, "to_batch_size_per_gpu": cfg.batch_size_per_gpu,
                             "from_niter": saved_niter, "to_niter": niter, "from_step": step, "to_step": start.step})
    if "epochs" in allowed:
        start.notes.append(f"--extend-epochs: {saved_epochs} -> {cfg.epochs} epochs; the per-iteration schedules are "
                           f"recomputed over {cfg.epochs} epochs and take their new values from here")
        start.events.append({"event": "extend_epochs", "at_step": steps_done, "epoch": epoch,
                             "from_epochs": saved_epochs, "to_epochs": cfg.epochs})
    start.offset = steps_done - (epoch * niter + start.step)
    start.complete = epoch >= cfg.epochs
    return start


def _refuse_foreign_config(path: Path) -> None:
    """A new run writes ``config.json``: one that fastssl-train did not write is the user's, never replaced."""
    if not path.is_file():
        return
    try:
        ours = "command" in json.loads(path.read_text())
    except (ValueError, TypeError, OSError):
        ours = False
    if not ours:
        raise RunError(f"{path.parent} holds a config.json that fastssl-train did not write; give another "
                       "--output-dir (nothing was changed)")


def position(start: Start, epoch: int, step: int, world: int, meter: dict | None = None) -> dict:
    """The checkpoint entries of where a run stands: at iteration ``step`` of epoch ``epoch``."""
    return {"epoch": epoch, "step": step, "global_step": start.offset + epoch * start.niter + step,
            "niter": start.niter, "world_size": world, "epoch_meter": meter}


def restore(start: Start, modules: dict[str, nn.Module], optimizer: torch.optim.Optimizer,
            scaler: torch.amp.GradScaler | None, device: torch.device) -> None:
    """Load the checkpoint's states: every module of ``modules`` (checkpoint key -> module, checked before
    loading), the optimiser, the grad scaler, this rank's RNG states."""
    state = start.state
    if state is None:
        return
    for what, module in modules.items():
        weights = strip_prefix(state[what])
        check_state_dict(module, weights, what, start.path)
        module.load_state_dict(weights)
    # The checkpoint's state and hyperparameters, this build's implementation (fused: a run saved unfused
    # resumes fused, which the trainers need to skip a step on the device).
    saved = state["optimizer"]
    groups = [{**g, **{k: now[k] for k in ("fused", "foreach") if k in now}}
              for g, now in zip(saved["param_groups"], optimizer.param_groups, strict=False)]
    optimizer.load_state_dict({**saved, "param_groups": groups})
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    set_rng_states(state["rng"], device)
