"""A non-finite loss found without a host read: the step is skipped on the device, the run stops at the next read.

The authors' loops read the loss every step and stop before the step (``if not math.isfinite(loss.item()):
sys.exit(1)``); that read waits for the GPU. Here the loss stays on the device. :class:`NonFiniteGuard` turns
each step's loss into a flag (every rank's loss gathered by one collective on the device, so all ranks
skip alike), and the step honours it there: the optimiser's step (``found_inf``, see
:func:`~fastssl.train.optim.step_unless`), the teacher's EMA (momentum 1) and the buffers the forward moved
(the loss's centers, BatchNorm statistics) keep their values. The flag stays set, so every later step is
skipped too and the run still holds the state before the first non-finite loss when the trainer reads the
flag with the values it logs: once per log interval, at an epoch's end and before any checkpoint. That read
raises :class:`~fastssl.train.errors.TrainingError` naming the iteration and the value; nothing is saved.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.distributed as dist
from torch import nn

from .errors import TrainingError

__all__ = ["NonFiniteGuard"]


class NonFiniteGuard:
    """The device-side state of a run's non-finite losses (one per run, on every rank).

    Args:
        device, rank, world: where the run's steps run.
        niter: iterations per epoch (to name the epoch and iteration of a global iteration index).
        modules: the modules whose buffers a skipped step must leave as they were (student, teacher, loss).
        hint: what to try, appended to the error.
    """

    def __init__(self, device: torch.device, rank: int, world: int, niter: int, modules: Sequence[nn.Module],
                 hint: str):
        self.device, self.rank, self.world, self.niter, self.hint = device, rank, world, niter, hint
        self.modules = list(modules)
        self.diverged = torch.zeros((), dtype=torch.bool, device=device)  # sticky: set at the first bad loss
        self.first_it = torch.full((), -1, dtype=torch.int64, device=device)
        self.first_losses = torch.zeros(world, dtype=torch.float64, device=device)  # every rank's loss then
        self._held: list[tuple[nn.Module, str, torch.Tensor]] = []

    # ------------------------------------------------------------------------- in the step

    def hold(self) -> None:
        """Before the forward: copies of the buffers it may move (a few small tensors in these models)."""
        self._held = [(m, name, b.detach().clone()) for m in self.modules for name, b in m.named_buffers()]

    def observe(self, loss: torch.Tensor, it: int) -> torch.Tensor:
        """The step's flag (0-dim bool on the device): this or an earlier step had a non-finite loss on some
        rank. A collective under DDP: every rank calls it at every step it trains."""
        losses = loss.detach().double().view(1)
        if self.world > 1:  # each rank's loss in its own slot, summed over the ranks on the device
            gathered = torch.zeros(self.world, dtype=torch.float64, device=self.device)
            gathered[self.rank] = losses[0]
            dist.all_reduce(gathered)
            losses = gathered
        bad = ~torch.isfinite(losses).all()
        first = bad & ~self.diverged
        self.first_it = torch.where(first, it, self.first_it)
        self.first_losses = torch.where(first, losses, self.first_losses)
        self.diverged = self.diverged | bad
        return self.diverged

    def momentum(self, m: float) -> torch.Tensor:
        """The teacher's EMA momentum on the device: ``m``, or 1 (the teacher as it was) in a skipped step.
        float64, so that the EMA rounds ``m`` and ``1 - m`` as it does a float momentum."""
        return torch.full((), m, dtype=torch.float64, device=self.device).masked_fill_(self.diverged, 1.0)

    def release(self) -> None:
        """After the step: the held buffers back where the step is skipped (a select on the device)."""
        for module, name, old in self._held:
            now = module.get_buffer(name)  # the loss modules replace their centers by new tensors
            now.copy_(torch.where(self.diverged, old, now))
        self._held = []

    # ------------------------------------------------------------------------- at a read

    def tensors(self) -> dict[str, torch.Tensor]:
        """What a read takes along with the logged values (see :func:`~fastssl.train.log.read_scalars`)."""
        return {"_diverged": self.diverged, "_first_it": self.first_it, "_first_losses": self.first_losses}

    def check(self, read: Mapping[str, float | list[float]]) -> None:
        """Raise, on every rank alike, if a read of :meth:`tensors` says a loss was not finite."""
        if not read["_diverged"]:
            return
        it = int(read["_first_it"])  # type: ignore[arg-type]
        losses = read["_first_losses"]
        assert isinstance(losses, list)
        bad = [f"{v} on rank {r}" for r, v in enumerate(losses) if not math.isfinite(v)]
        raise TrainingError(f"the loss is not finite ({', '.join(bad)}) at epoch {it // self.niter + 1}, iteration "
                            f"{it % self.niter}: stopped without saving (that step and the ones after it up to "
                            f"this check were skipped: the last checkpoint holds the state before); {self.hint}")
