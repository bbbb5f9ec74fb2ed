"""What the DINOv2 / DINOv3 loss modules share: the teacher's center and its asynchronous
update, softmax-centered and Sinkhorn-Knopp targets, as the authors' modules keep them.

The authors' ``update_center`` (``reduce_center_update``) sums this batch's teacher rows and
starts an asynchronous all-reduce; the next ``softmax_center_teacher`` call (or
``apply_center_update``) waits for it and moves the center by an EMA. The base class here
does the same, and adds :meth:`CenteredTeacherLoss.teacher_targets`: the fused form, which
keeps the targets as logits and O(rows + K) statistics (:class:`TeacherTargets`).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .. import distributed
from .._backend import BACKENDS
from .ibot import ibot_loss, ibot_loss_dense
from .targets import TeacherTargets, sinkhorn_knopp, softmax_center

__all__ = ["CenteredTeacherLoss", "ClsTokenLossBase", "PatchTokenLossBase"]

CENTERINGS = ("sinkhorn_knopp", "softmax")


class CenteredTeacherLoss(nn.Module):
    """Base of the DINOv2 / DINOv3 ``DINOLoss`` and ``iBOTPatchLoss``: a ``center`` buffer of
    ``center_shape`` (its only state, so the authors' ``dino_loss.center`` and
    ``ibot_patch_loss.center`` checkpoint entries load), filled with ``initial_center``
    (DINOv2: 0; DINOv3: NaN until ``init_weights()``), and the teacher-side methods.

    Subclasses say how a batch of teacher outputs makes its center (:meth:`_batch_center`).
    """

    def __init__(self, name: str, out_dim: int, center_shape: tuple, initial_center: float, student_temp: float,
                 center_momentum: float, group, backend: str):
        super().__init__()
        if not isinstance(out_dim, int) or isinstance(out_dim, bool) or out_dim < 1:
            raise ValueError(f"{name}: out_dim must be a positive integer, got {out_dim!r}")
        if not (student_temp > 0 and math.isfinite(student_temp)):
            raise ValueError(f"{name}: student_temp must be a positive number, got {student_temp!r}")
        if not 0.0 <= center_momentum <= 1.0:
            raise ValueError(f"{name}: center_momentum must lie in [0, 1], got {center_momentum!r}")
        if backend not in BACKENDS:
            raise ValueError(f"{name}: backend must be one of {BACKENDS}, got {backend!r}")
        self._name = name
        self.student_temp = float(student_temp)
        self.center_momentum = float(center_momentum)
        self.group = group
        self.backend = backend
        self.register_buffer("center", torch.full(center_shape, initial_center))
        self.updated = True
        self.reduce_handle = None
        self.len_teacher_output = None
        self.async_batch_center = None

    # ------------------------------------------------------------------------- center

    def _world_size(self) -> int:
        return dist.get_world_size(self.group) if distributed.is_initialized() else 1

    def _batch_center(self, teacher_output: torch.Tensor) -> tuple[torch.Tensor, int]:
        """This batch's center sum over this process and the count it is divided by (times the
        world size) once all-reduced."""
        raise NotImplementedError

    @torch.no_grad()
    def reduce_center_update(self, teacher_output: torch.Tensor) -> None:
        """Start this batch's center update: its sum here, all-reduced asynchronously; applied by
        the next :meth:`apply_center_update` (the authors' name for :meth:`update_center`)."""
        batch, count = self._batch_center(teacher_output)
        self._queue_center(batch, count)

    def update_center(self, teacher_output: torch.Tensor) -> None:
        self.reduce_center_update(teacher_output)

    def _queue_center(self, batch: torch.Tensor, count: int) -> None:
        self.updated = False
        self.len_teacher_output = count
        self.async_batch_center = batch
        self.reduce_handle = None
        if distributed.is_initialized():
            self.reduce_handle = dist.all_reduce(self.async_batch_center, async_op=True, group=self.group)

    @torch.no_grad()
    def apply_center_update(self) -> None:
        """Wait for the queued all-reduce and move the center: ``center * m + mean * (1 - m)``."""
        if self.updated:
            return
        if self.reduce_handle is not None:
            self.reduce_handle.wait()
        mean = self.async_batch_center / (self.len_teacher_output * self._world_size())
        m = self.center_momentum
        # A new tensor, as the authors: a loss computed from the old center may still need it.
        self.center = self.center * m + mean.view_as(self.center) * (1 - m)
        self.updated = True
        self.reduce_handle = None

    # ------------------------------------------------------------------------- teacher targets

    def _softmax_center_probs(self, teacher_output: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        return F.softmax((teacher_output - self.center) / teacher_temp, dim=-1)

    def _sinkhorn_probs(self, teacher_output: torch.Tensor, teacher_temp: float, n_iterations: int) -> torch.Tensor:
        return sinkhorn_knopp(teacher_output, teacher_temp, n_iterations, group=self.group,
                              backend=self.backend).probs()

    @torch.no_grad()
    def teacher_targets(self, teacher_output: torch.Tensor, teacher_temp: float, *,
                        centering: str = "sinkhorn_knopp", n_iterations: int = 3,
                        update_centers: bool = True) -> TeacherTargets:
        """The teacher's targets in fused form, for this module's ``forward`` in place of the
        probabilities: logits and O(rows + K) statistics, never a ``[rows, K]`` matrix.

        ``centering="sinkhorn_knopp"`` (DINOv3 always; DINOv2's ``train.centering``):
        Sinkhorn-Knopp over the rows of every process of the group, as
        ``sinkhorn_knopp_teacher``. ``centering="softmax"``: the pending center update is
        applied first (``update_centers``), the targets use the center, and this batch's center
        update is queued from the same pass over the logits: the authors'
        ``softmax_center_teacher`` followed by ``update_center`` (its batch center computed in
        fp32, where theirs sums in the logits' dtype).
        """
        if centering not in CENTERINGS:
            raise ValueError(f"{self._name}.teacher_targets: centering must be one of {CENTERINGS}, got {centering!r}")
        if centering == "sinkhorn_knopp":
            return sinkhorn_knopp(teacher_output, teacher_temp, n_iterations, group=self.group, backend=self.backend)
        if update_centers:
            self.apply_center_update()
        targets = softmax_center(teacher_output, self.center, teacher_temp, backend=self.backend)
        rows = targets.stats.shape[1]
        self._queue_center(*self._center_from_mean(targets.batch_mean, rows, teacher_output))
        return targets

    def _center_from_mean(self, mean: torch.Tensor, rows: int, teacher_output: torch.Tensor
                          ) -> tuple[torch.Tensor, int]:
        """:meth:`_batch_center` from the column mean of this process's ``rows`` rows."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return (f"out_dim={self.center.shape[-1]}, student_temp={self.student_temp}, "
                f"center_momentum={self.center_momentum}, backend={self.backend!r}")


class ClsTokenLossBase(CenteredTeacherLoss):
    """The CLS-token DINO loss's center: this batch's rows summed, over their count."""

    def _batch_center(self, teacher_output):
        if teacher_output.dim() != 2:
            raise ValueError(f"{self._name}.update_center: teacher_output must be [rows, K], got "
                             f"{tuple(teacher_output.shape)}")
        return torch.sum(teacher_output, dim=0, keepdim=True), len(teacher_output)

    def _center_from_mean(self, mean, rows, teacher_output):
        return mean.view(1, -1) * rows, rows


class PatchTokenLossBase(CenteredTeacherLoss):
    """The iBOT patch loss's center: the mean over patches of each leading index, summed, over
    their count (the authors pass the masked rows as ``[1, n, K]``, or all patches as
    ``[B, N, K]``); and the loss itself, shared by DINOv2 and DINOv3."""

    def _batch_center(self, teacher_output):
        if teacher_output.dim() != 3:
            raise ValueError(f"{self._name}.update_center: teacher_patch_tokens must be [1, n, K] (the masked "
                             f"rows) or [B, N, K], got {tuple(teacher_output.shape)}")
        return torch.sum(teacher_output.mean(1), dim=0, keepdim=True), len(teacher_output)

    def _center_from_mean(self, mean, rows, teacher_output):
        lead = len(teacher_output) if teacher_output.dim() == 3 else 1
        return mean.view(1, -1) * lead, lead

    def forward(self, student_patch_tokens: torch.Tensor, teacher_patch_tokens, student_masks_flat: torch.Tensor
                ) -> torch.Tensor:
        """Every patch: ``[B, N, K]`` student logits and teacher probabilities (or targets over the
        ``B * N`` rows), ``[B, N]`` boolean masks; each image's mean over its masked patches,
        averaged over images. See :func:`fastssl.functional.ibot_loss_dense`."""
        return ibot_loss_dense(student_patch_tokens, teacher_patch_tokens, student_masks_flat,
                               student_temp=self.student_temp, backend=self.backend)

    def forward_masked(self, student_patch_tokens_masked: torch.Tensor, teacher_patch_tokens_masked,
                       student_masks_flat: torch.Tensor, n_masked_patches: int | None = None,
                       masks_weight: torch.Tensor | None = None) -> torch.Tensor:
        """The masked patches only: ``[n, K]`` student logits and teacher probabilities (or
        targets over the ``n`` rows). See :func:`fastssl.functional.ibot_loss`."""
        return ibot_loss(student_patch_tokens_masked, teacher_patch_tokens_masked, student_masks_flat,
                         n_masked_patches=n_masked_patches, masks_weight=masks_weight,
                         student_temp=self.student_temp, backend=self.backend)
