"""Checkpoints: written atomically, read without unpickling code, checked against the run.

A checkpoint is a plain dict of tensors and Python values (``torch.load(weights_only=True)``
reads it, so a checkpoint file cannot run code): the models, optimiser, grad scaler and loss
states, where the run stands (``epoch``, ``step`` within it, and what ``resume.py`` adds: the
iterations over the run, per epoch, the processes, the interrupted epoch's sums), every rank's
RNG states and the full config. It is written to a temporary file in the same folder, flushed, then renamed over the
old one, so a crash (or pre-emption) mid-write leaves the previous checkpoint intact.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import tempfile
import warnings
from pathlib import Path
from typing import cast

import numpy as np
import torch
import torch.distributed as dist

from .errors import CheckpointError

__all__ = ["CheckpointError", "StopSignal", "check_state_dict", "load_checkpoint", "load_pretrained", "rng_state",
           "rng_states", "save_checkpoint", "set_rng_state", "set_rng_states"]


def save_checkpoint(state: dict, path: str | os.PathLike) -> Path:
    """Write ``state`` to ``path`` atomically (temporary file, fsync, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    """A checkpoint dict, read with ``weights_only=True``.

    ``argparse.Namespace`` is allowed as well (a plain attribute bag), so the authors'
    checkpoints, which store their ``args``, load; nothing else can be unpickled.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise CheckpointError(f"cannot read checkpoint {str(path)!r} (safe loading, weights_only=True): "
                              f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
    if not isinstance(state, dict):
        raise CheckpointError(f"{str(path)!r} holds a {type(state).__name__}, not a checkpoint dict")
    return state


# ----------------------------------------------------------------------------- compatibility checks

def check_state_dict(module: torch.nn.Module, state: dict, what: str, path) -> None:
    """Raise :class:`CheckpointError` on missing / unexpected keys or shape mismatches, before loading."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)}, model {tuple(own[k].shape)}"
              for k in own if k in state and hasattr(state[k], "shape") and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = []
        for title, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)):
            if items:
                parts.append(f"{title} ({len(items)}): " + ", ".join(items[:6]) + (" ..." if len(items) > 6 else ""))
        raise CheckpointError(f"the {what} of checkpoint {str(path)!r} does not fit this model (another "
                              "architecture or head?):\n  " + "\n  ".join(parts))


def load_pretrained(model: torch.nn.Module, path, which: str = "teacher") -> str:
    """Load a checkpoint's ``which`` network (``"teacher"`` / ``"student"``) into a
    :class:`~fastssl.train.models.MultiCropModel`, or into its backbone alone when the file holds
    only a backbone. Reads this trainer's checkpoints and the DINO authors' (full checkpoints with
    ``student`` / ``teacher``, ``module.`` prefixes, and their backbone-only releases). Returns
    what was loaded ("model" or "backbone")."""
    state = load_checkpoint(path)
    if which in state and isinstance(state[which], dict):
        state = state[which]
    elif "student" in state or "teacher" in state:
        raise CheckpointError(f"checkpoint {str(path)!r} has no {which!r} entry (keys: {sorted(state)})")
    state = {k.removeprefix("module.").replace("_orig_mod.", ""): v for k, v in state.items()}  # DDP, compile
    if any(k.startswith("backbone.") for k in state):
        if not any(k.startswith("head.") for k in state):
            state = {k.removeprefix("backbone."): v for k, v in state.items()}
        else:
            check_state_dict(model, state, which, path)
            model.load_state_dict(state)
            return "model"
    backbone = model.get_submodule("backbone") if hasattr(model, "backbone") else model
    check_state_dict(backbone, state, f"{which} backbone", path)
    backbone.load_state_dict(state)
    return "backbone"


# ----------------------------------------------------------------------------- RNG states

def rng_state(device: torch.device) -> dict:
    """Every RNG a step draws from, as tensors and plain values (loadable with weights_only)."""
    np_state = cast(tuple, np.random.get_state(legacy=True))  # (kind, keys, pos, has_gauss, cached)
    state: dict = {"torch": torch.get_rng_state(), "python": random.getstate(),
                   "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *map(_plain, np_state[2:]))}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def rng_states(device: torch.device) -> dict | list[dict]:
    """:func:`rng_state` of this process, or of every rank (rank order) in a process group: each rank
    draws its own drop-path masks, so each resumes from its own state. A collective: every rank calls it."""
    state = rng_state(device)
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return state
    states: list[dict] = [{}] * dist.get_world_size()
    dist.all_gather_object(states, state)
    return states


def set_rng_states(saved: dict | list[dict], device: torch.device) -> None:
    """Restore what :func:`rng_states` saved: this rank's entry of a per-rank list. A rank the
    checkpoint has no state of (a single-process checkpoint, or a run resumed on more ranks) keeps
    the seed it started from (seed + rank), rather than take another rank's and draw what it draws."""
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    if isinstance(saved, dict):
        saved = [saved]
    if rank < len(saved):
        set_rng_state(saved[rank], device)


def _plain(x):
    return x.item() if hasattr(x, "item") else x


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_to_tuple(state["python"]))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _to_tuple(x):
    return tuple(_to_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


# ----------------------------------------------------------------------------- pre-emption

class StopSignal:
    """Catch SIGTERM and SIGINT (cluster pre-emption, Ctrl-C) while training: the loop saves a
    checkpoint after the current step and exits cleanly. A second Ctrl-C stops at once."""

    def __init__(self):
        self.received: int | None = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave the signals alone
                warnings.warn("not in the main thread: SIGTERM/SIGINT will not save a checkpoint", stacklevel=2)
        return self

    def _handle(self, signum, frame):
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signum

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False

    def __bool__(self) -> bool:
        return self.received is not None
