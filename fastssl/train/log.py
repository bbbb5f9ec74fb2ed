"""What a run writes as it goes (rank 0): ``config.json``, ``log.jsonl``, the progress bar, TensorBoard.

``log.jsonl`` is strict JSON, one object per line: a non-finite number is written as the string
``"nan"``, ``"inf"`` or ``"-inf"`` (the trainer then stops). Its rows:

* a step, every ``--log-freq`` iterations of an epoch: ``{"epoch", "step", "loss", "lr", ...}``; ``step`` is
  the iteration's index over the whole run (0-based), unique across stops and resumes;
* an epoch, once it is complete: ``{"epoch", "epoch_loss", "skipped_images", "epoch_time_s"}``, its mean
  over all its steps even when the run stopped and resumed within it (the sums travel in the checkpoint);
* an evaluation after epoch ``e`` (1-based, as "after e epochs"): ``{"epoch": e, "knn_top1", ...}``;
* an event: ``{"event": "resume" | "extend_epochs" | "change_world_size", "at_step", ...}``.

Rows written after the checkpoint a run resumes from are moved to ``log.superseded.jsonl``
(:func:`~fastssl.train.run_folder.rewind_log`), so a step or an epoch is logged once.
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .. import distributed
from .config import RunConfig
from .errors import DataError

if TYPE_CHECKING:
    from .nonfinite import NonFiniteGuard

__all__ = ["UNREADABLE_BATCHES_LIMIT", "EpochMeter", "Logger", "json_row", "read_scalars", "write_atomically"]

# A run fails after this many batches in a row without one readable image (on every rank): a folder of
# unreadable files is an error, not a run of skipped steps that ends looking like a success.
UNREADABLE_BATCHES_LIMIT = 20


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # "nan", "inf", "-inf"
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def json_row(record: dict) -> str:
    """One strict-JSON line (no NaN / Infinity tokens: non-finite numbers become strings)."""
    return json.dumps(_finite(record), allow_nan=False)


def write_atomically(path: Path, text: str) -> None:
    """``text`` into ``path`` through a temporary file and a rename: never half written."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class Logger:
    """Rank 0 only: ``config.json``, ``log.jsonl`` (appended), optional TensorBoard. A context manager:
    the files are closed however the run ends."""

    def __init__(self, out: Path, cfg: RunConfig, main: bool):
        self.main, self.cfg, self.tb = main, cfg, None
        if not main:
            return
        out.mkdir(parents=True, exist_ok=True)
        write_atomically(out / "config.json", json.dumps(cfg.to_dict(), indent=2, sort_keys=True) + "\n")
        self.file = open(out / "log.jsonl", "a")  # noqa: SIM115 - open for the whole run
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # checked importable by the config

            self.tb = SummaryWriter(out / "tensorboard")

    def __enter__(self) -> Logger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def say(self, text: str) -> None:
        if self.main:
            print(text, flush=True)

    def announce(self, notes: list[str], events: list[dict]) -> None:
        """Say what happened at start (a stale lock, leftovers, a resume and its overrides); log the events."""
        for note in notes:
            if note:
                self.say(note)
        for event in events:
            self.write(event)

    def print_config(self, method: str, device: torch.device, world: int, niter: int, base_lr: float,
                     scaling: str | None = None) -> None:
        """The run's first lines; ``scaling`` says how the lr was scaled (default: the linear rule)."""
        if not self.main:
            return
        scaling = scaling or f"by batch {self.cfg.batch_size_per_gpu * world}/256"
        print(f"fastssl {method} training on {device} x {world} process(es), {niter} iterations per epoch, "
              f"lr {base_lr:.3g} after scaling {scaling}", flush=True)
        values = self.cfg.to_dict()
        width = max(map(len, values))
        for k in sorted(values):
            print(f"  {k:<{width}}  {values[k]}")
        sys.stdout.flush()

    def write(self, record: dict) -> None:
        if not self.main:
            return
        self.file.write(json_row(record) + "\n")
        self.file.flush()
        if self.tb is not None and "step" in record:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k not in ("step", "epoch") and math.isfinite(v):
                    self.tb.add_scalar(k, v, record["step"])

    def close(self) -> None:
        if self.main and not self.file.closed:
            self.file.close()
            if self.tb is not None:
                self.tb.close()


def read_scalars(values: Mapping[str, Any]) -> dict[str, Any]:
    """``values`` with every tensor among them read to the host in one transfer (the one wait for the device):
    a 0-dim tensor as a float, a larger one as a list of floats (float64: exact for fp32 values and for
    integers below 2**53); other values as they are."""
    tensors = {k: v.detach().reshape(-1).to(torch.float64) for k, v in values.items() if isinstance(v, torch.Tensor)}
    host = torch.cat(list(tensors.values())).tolist() if tensors else []
    out, pos = {}, 0
    for k, v in values.items():
        if k in tensors:
            n = tensors[k].numel()
            out[k] = host[pos] if v.dim() == 0 else host[pos:pos + n]
            pos += n
        else:
            out[k] = v
    return out


class EpochMeter:
    """One epoch's progress bar (rank 0), step rows and sums. ``state()`` is saved in a mid-epoch
    checkpoint and given back as ``saved`` on resume, so the epoch's row covers all its steps.

    The steps' values stay on the device: the meter reads them once per ``--log-freq`` iterations (the
    logged step's values, with ``guard``'s flags, in one transfer), and the epoch's loss sum at its end or
    for a checkpoint; each of these reads raises if ``guard`` saw a non-finite loss since the last one."""

    def __init__(self, log: Logger, epoch: int, epochs: int, niter: int, first: int, device: torch.device, *,
                 offset: int = 0, saved: dict | None = None, guard: NonFiniteGuard | None = None):
        self.log, self.epoch, self.niter, self.device, self.offset = log, epoch, niter, device, offset
        self.guard = guard
        saved = saved or {}
        # float64 on the device: the same sum of the fp32 losses as Python floats would make
        self.loss_sum = torch.full((), float(saved.get("loss_sum", 0.0)), dtype=torch.float64, device=device)
        self.steps: int = saved.get("steps", 0)
        self.skipped: int = saved.get("skipped", 0)
        self.unreadable_in_a_row: int = saved.get("unreadable_in_a_row", 0)
        self.time_before: float = saved.get("time_s", 0.0)
        self.t0 = self.t_log = time.perf_counter()
        self.images_since_log = 0
        self.bar = None
        if log.main and log.cfg.progress:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=niter, initial=first, desc=f"epoch {epoch + 1}/{epochs}", dynamic_ncols=True,
                                leave=True, file=sys.stdout)
            except ImportError:
                pass

    def _read(self, values: Mapping[str, Any]) -> dict[str, Any]:
        """``values`` and the guard's flags in one read; the values once written, :meth:`check` raises."""
        return read_scalars({**values, **(self.guard.tensors() if self.guard is not None else {})})

    def _check(self, read: Mapping[str, Any]) -> None:
        if self.guard is not None:
            self.guard.check(read)

    def state(self) -> dict:
        """The sums so far, for a mid-epoch checkpoint (a read; raises if a loss was not finite)."""
        read = self._read({"loss_sum": self.loss_sum})
        self._check(read)
        return {"loss_sum": read["loss_sum"], "steps": self.steps, "skipped": self.skipped,
                "unreadable_in_a_row": self.unreadable_in_a_row,
                "time_s": self.time_before + time.perf_counter() - self.t0}

    def skip(self, skipped: int, i: int) -> None:
        """Iteration ``i`` had no readable image (on some rank; decided alike on every rank)."""
        self.skipped += skipped
        self.unreadable_in_a_row += 1
        if self.unreadable_in_a_row >= UNREADABLE_BATCHES_LIMIT:
            raise DataError(f"{UNREADABLE_BATCHES_LIMIT} batches in a row without one readable image (epoch "
                            f"{self.epoch + 1}, iterations {i + 2 - UNREADABLE_BATCHES_LIMIT}-{i + 1}): check "
                            "the data folder (see the warnings above)")

    def update(self, loss: torch.Tensor, images: int, skipped: int, *, i: int, it: int,
               **values: float | torch.Tensor) -> None:
        """Iteration ``i`` of the epoch (``it`` over the run) trained on ``images`` images; ``loss`` and any of
        ``values`` may be 0-dim tensors on the device (read only on a logged iteration)."""
        self.loss_sum += loss.detach().to(torch.float64)
        self.steps += 1
        self.skipped += skipped
        self.unreadable_in_a_row = 0
        self.images_since_log += images * distributed.world_size()
        if self.bar is not None:
            self.bar.update(1)
        if (i + 1) % self.log.cfg.log_freq == 0:
            read = self._read({"loss": loss, **values})
            now = time.perf_counter()
            rate = self.images_since_log / max(now - self.t_log, 1e-9)
            self.t_log, self.images_since_log = now, 0
            mem = torch.cuda.max_memory_allocated(self.device) / 2**30 if self.device.type == "cuda" else 0.0
            logged = {k: read[k] for k in ("loss", *values)}
            self.log.write({"epoch": self.epoch, "step": self.offset + it, **logged, "images_per_s": rate,
                            "skipped_images": self.skipped, "gpu_mem_gb": mem})
            if self.bar is not None:
                self.bar.set_postfix(loss=f"{logged['loss']:.4f}", lr=f"{logged['lr']:.2e}", img_s=f"{rate:.0f}",
                                     mem=f"{mem:.1f}G", refresh=False)
            self._check(read)  # after the row: a non-finite loss is logged (as a string), then the run stops

    def close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def close(self) -> float:
        """The epoch is complete: its row, and its mean loss (a read; raises if a loss was not finite). An
        epoch without one trained step fails."""
        self.close_bar()
        if self.steps == 0:
            raise DataError(f"epoch {self.epoch + 1}: none of its {self.niter} batches had a readable image; check "
                            "the data folder (see the warnings above)")
        read = self._read({"loss_sum": self.loss_sum})
        self._check(read)
        mean = read["loss_sum"] / self.steps
        self.log.write({"epoch": self.epoch, "epoch_loss": mean, "skipped_images": self.skipped,
                        "epoch_time_s": self.time_before + time.perf_counter() - self.t0})
        return mean
