r"""The DINO loss: the cross-entropy between the centred, sharpened teacher and the
student over every pair of crops, fused.

Caron et al. 2021, "Emerging Properties in Self-Supervised Vision Transformers",
https://arxiv.org/abs/2104.14294. Same numbers as ``DINOLoss`` of the authors'
main_dino.py, through the closed form (exact because teacher probabilities sum
to one; z = s / tau_s, Q_vb the sum of the teacher probabilities of the crops
that student crop v is scored against, n(v) their number, P = 2 * ncrops - 2):

    loss = 1 / (P B) * sum_{v, b} [ n(v) * logsumexp(z_vb) - <Q_vb, z_vb> ]

It is the DINO family's crop-pair cross-entropy (:mod:`fastssl.losses.crop_pairs`) with
softmax-centered teacher targets (:mod:`fastssl.losses.targets`), 2 teacher crops and the
diagonal left out; this module adds the authors' checks, the functional
:func:`dino_loss` and the :class:`DinoLoss` module.
"""

from __future__ import annotations

import operator

import numpy as np
import torch
from torch import nn

from .. import distributed
from .._backend import BACKENDS, resolve_backend
from .._compile import compiled_when_possible
from .crop_pairs import dino_cross_entropy
from .targets import softmax_center

__all__ = ["DinoLoss", "dino_loss"]


# ----------------------------------------------------------------------------- checks

def _check_inputs(student: torch.Tensor, teacher: torch.Tensor, center: torch.Tensor, ncrops: int,
                  student_temp: float, teacher_temp: float) -> int:
    """Validate shapes, dtypes and devices; return the per-crop batch size B."""
    for name, x in (("student_output", student), ("teacher_output", teacher), ("center", center)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"dino_loss: {name} must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise ValueError(f"dino_loss: {name} must be a floating-point tensor, got dtype {x.dtype}")
    if ncrops < 2:
        raise ValueError(f"dino_loss: ncrops must be at least 2 (the two global crops), got {ncrops}")
    if not student_temp > 0 or not teacher_temp > 0:
        raise ValueError(f"dino_loss: temperatures must be positive, got student_temp={student_temp}, "
                         f"teacher_temp={teacher_temp}")
    if student.dim() != 2 or teacher.dim() != 2:
        raise ValueError(f"dino_loss: expected 2-D logits, got student_output {tuple(student.shape)} and "
                         f"teacher_output {tuple(teacher.shape)}")
    rows, K = student.shape
    if rows == 0 or rows % ncrops:
        raise ValueError(f"dino_loss: student_output has {rows} rows, which is not a positive multiple of "
                         f"ncrops={ncrops} (expected [ncrops * B, K], crop-major)")
    B = rows // ncrops
    if teacher.shape[0] != 2 * B:
        raise ValueError(f"dino_loss: teacher_output has {teacher.shape[0]} rows but student_output "
                         f"{tuple(student.shape)} with ncrops={ncrops} means B={B}, so 2*B={2 * B} teacher "
                         "rows (the 2 global crops) were expected")
    if teacher.shape[1] != K:
        raise ValueError(f"dino_loss: student_output has K={K} columns but teacher_output "
                         f"{tuple(teacher.shape)} has {teacher.shape[1]}")
    if center.numel() != K or center.dim() > 2:
        raise ValueError(f"dino_loss: center must hold K={K} values ([1, K] or [K]), got {tuple(center.shape)}")
    if not (student.device == teacher.device == center.device):
        raise ValueError(f"dino_loss: tensors are on different devices: student_output on {student.device}, "
                         f"teacher_output on {teacher.device}, center on {center.device}")
    return B


# ----------------------------------------------------------------------------- PyTorch path

class _ClosedForm(torch.autograd.Function):
    """``scale * sum_v [n(v) * lse(z_v) - <Q_v, z_v>]`` over rows of scaled logits ``z``, written as
    ``n * log(L) - <Q, z - M>`` (no cancellation for huge logits), the softmax kept for the
    backward: one exponential an element in all, where autograd through a log-softmax takes two
    (on a CPU the exponentials are most of the time)."""

    @staticmethod
    def forward(ctx, z, Q, n, scale):
        m = z.amax(dim=-1, keepdim=True)
        e = torch.exp(z - m)
        total = e.sum(dim=-1, keepdim=True)
        loss = ((n * torch.log(total)).sum() - (Q * (z - m)).sum()) * scale
        ctx.save_for_backward(e / total, Q, n)
        ctx.scale = scale
        return loss

    @staticmethod
    def backward(ctx, grad):
        p, Q, n = ctx.saved_tensors
        return (n * p - Q) * (grad * ctx.scale), None, None, None


def _dino_loss_torch(student, teacher, center, ncrops, student_temp, teacher_temp):
    """The closed form in plain PyTorch, teacher and student in one function (so that a compile
    fuses them), fp32 math. Student crop v is scored against Q_v: the other global crop's
    probabilities for the 2 global crops, the sum of both for the local ones."""
    B, K = teacher.shape[0] // 2, student.shape[1]
    # Elementwise products, not matmuls: exact under autocast and with TF32 enabled.
    with torch.autocast(student.device.type, enabled=False):
        z = student.float().view(ncrops, B, K) / student_temp
        t = teacher.float()
        q = torch.softmax((t - center.float().view(1, K)) / teacher_temp, dim=-1).view(2, B, K)
        # Scaled before the sum: rows near fp32's largest values must not overflow it.
        batch_center = (t * (1.0 / t.shape[0])).sum(dim=0, keepdim=True)
        Q = torch.cat([q.flip(0), (q[0] + q[1]).expand(ncrops - 2, B, K)])
        n = torch.cat([z.new_ones(2, 1, 1), z.new_full((ncrops - 2, 1, 1), 2.0)])
        loss = _ClosedForm.apply(z, Q, n, 1.0 / ((2 * ncrops - 2) * B))
    return loss, batch_center


# Compiled once per shape where torch.compile works (fastssl._compile): eager, the closed form makes
# ~10 passes over the [ncrops * B, K] logits, which the compile fuses; DinoLoss's shapes stay fixed
# over a run (the trainer drops the last partial batch).
_torch_path = compiled_when_possible(_dino_loss_torch)


# ----------------------------------------------------------------------------- functional API

def dino_loss(student_output: torch.Tensor, teacher_output: torch.Tensor, center: torch.Tensor, ncrops: int,
              teacher_temp: float, student_temp: float = 0.1, *, backend: str = "auto"
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """DINO cross-entropy over all (teacher crop, student crop) pairs, fused.

    Args:
        student_output: ``[ncrops * B, K]`` student logits, crop-major (the 2 global
            crops first, then the local crops). fp32, fp16 or bf16.
        teacher_output: ``[2 * B, K]`` teacher logits of the 2 global crops; no
            gradient flows to it.
        center: ``[1, K]`` (or ``[K]``) running center subtracted from the teacher.
        ncrops: number of student crops (2 global + local ones), at least 2.
        teacher_temp, student_temp: the softmax temperatures.
        backend: ``"auto"`` (Triton kernels on CUDA, PyTorch elsewhere), ``"torch"``
            or ``"triton"``.

    Returns:
        ``(loss, batch_center)``: the float32 scalar loss, mean over the
        ``2 * ncrops - 2`` pairs of the batch-mean cross-entropy, and the float32
        ``[1, K]`` mean of this process's teacher rows (not all-reduced), from
        which :class:`DinoLoss` updates its center. Math is fp32 whatever the
        input dtype; the gradient comes back in the student's dtype.
    """
    ncrops = operator.index(ncrops)
    teacher_temp, student_temp = float(teacher_temp), float(student_temp)
    B = _check_inputs(student_output, teacher_output, center, ncrops, student_temp, teacher_temp)
    backend = resolve_backend(backend, student_output.device, "dino_loss")
    if backend == "torch":
        return _torch_path(student_output, teacher_output.detach(), center.detach(), ncrops, student_temp,
                           teacher_temp)
    targets = softmax_center(teacher_output, center, teacher_temp, backend=backend)
    # Student crop v against teacher crop i != v: the 2 global crops are the diagonal.
    loss = dino_cross_entropy(student_output.view(ncrops, B, -1), targets, student_temp=student_temp,
                              ignore_diagonal=True, backend=backend)
    return loss, targets.batch_mean.view(1, -1)


# ----------------------------------------------------------------------------- module

class DinoLoss(nn.Module):
    """Drop-in for the authors' ``DINOLoss`` (main_dino.py), fused.

    ``forward(student_output, teacher_output, epoch)`` returns the scalar loss and
    then updates the center, ``center = center * m + mean(teacher rows, all ranks) * (1 - m)``,
    from the raw teacher logits (all-reduced when ``torch.distributed`` is
    initialised). The teacher temperature follows the authors' schedule, linear
    from ``warmup_teacher_temp`` to ``teacher_temp`` over ``warmup_teacher_temp_epochs``,
    then constant; ``teacher_temp=`` overrides it per call (per-iteration schedules,
    as in DINOv2). The state dict holds exactly ``center`` ``[1, out_dim]``, so the
    ``dino_loss`` entry of the authors' checkpoints loads.

    Shapes: ``student_output`` ``[ncrops * B, out_dim]`` crop-major,
    ``teacher_output`` ``[2 * B, out_dim]``. See :func:`dino_loss`.
    """

    def __init__(self, out_dim: int, ncrops: int, warmup_teacher_temp: float, teacher_temp: float,
                 warmup_teacher_temp_epochs: int, nepochs: int, student_temp: float = 0.1,
                 center_momentum: float = 0.9, *, backend: str = "auto"):
        super().__init__()
        if out_dim < 1:
            raise ValueError(f"DinoLoss: out_dim must be positive, got {out_dim}")
        if ncrops < 2:
            raise ValueError(f"DinoLoss: ncrops must be at least 2 (the two global crops), got {ncrops}")
        if not 0 <= warmup_teacher_temp_epochs <= nepochs:
            raise ValueError(f"DinoLoss: warmup_teacher_temp_epochs={warmup_teacher_temp_epochs} must lie in "
                             f"[0, nepochs={nepochs}]")
        if not 0.0 <= center_momentum <= 1.0:
            raise ValueError(f"DinoLoss: center_momentum must lie in [0, 1], got {center_momentum}")
        if backend not in BACKENDS:
            raise ValueError(f"DinoLoss: backend must be one of {BACKENDS}, got {backend!r}")
        self.out_dim = out_dim
        self.ncrops = ncrops
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.backend = backend
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.teacher_temp_schedule = np.concatenate((
            np.linspace(warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs),
            np.ones(nepochs - warmup_teacher_temp_epochs) * teacher_temp,
        ))
        self._schedule = [float(x) for x in self.teacher_temp_schedule]  # plain floats: traceable

    def teacher_temp_at(self, epoch: int) -> float:
        """The scheduled teacher temperature of ``epoch`` (an error past the schedule)."""
        epoch = operator.index(epoch)
        if not 0 <= epoch < len(self._schedule):
            raise ValueError(f"DinoLoss: epoch {epoch} is outside the teacher temperature schedule, "
                             f"which covers epochs 0..{len(self._schedule) - 1} (nepochs={len(self._schedule)})")
        return self._schedule[epoch]

    def forward(self, student_output: torch.Tensor, teacher_output: torch.Tensor, epoch: int | None = None,
                *, teacher_temp: float | None = None) -> torch.Tensor:
        if teacher_temp is None:
            if epoch is None:
                raise ValueError("DinoLoss: pass the epoch (for the scheduled teacher temperature) or teacher_temp=")
            teacher_temp = self.teacher_temp_at(epoch)
        if student_output.dim() == 2 and student_output.shape[1] != self.out_dim:
            raise ValueError(f"DinoLoss: student_output has K={student_output.shape[1]} columns but "
                             f"out_dim={self.out_dim}")
        if student_output.device != self.center.device:
            raise ValueError(f"DinoLoss: inputs are on {student_output.device} but the center is on "
                             f"{self.center.device}; move the loss with .to(device)")
        loss, batch_center = dino_loss(student_output, teacher_output, self.center, self.ncrops, teacher_temp,
                                       self.student_temp, backend=self.backend)
        self.update_center(batch_center, teacher_output.shape[0])
        return loss

    @torch.no_grad()
    def update_center(self, batch_center: torch.Tensor, rows: int) -> None:
        """EMA of the center from this process's mean of ``rows`` teacher rows.

        As the authors: the all-reduced sum of the teacher rows over this process's row count
        times the world size (the global mean when every rank has the same batch).
        """
        batch_center = batch_center.detach().float()
        if distributed.world_size() > 1:
            batch_center = batch_center * rows
            torch.distributed.all_reduce(batch_center)
            batch_center = batch_center / (rows * distributed.world_size())
        m = self.center_momentum
        # A new tensor, as the authors do, not an in-place update: the backward of this
        # step's loss still reads the center it was computed with.
        self.center = self.center * m + batch_center.view_as(self.center) * (1 - m)

    def extra_repr(self) -> str:
        return (f"out_dim={self.out_dim}, ncrops={self.ncrops}, student_temp={self.student_temp}, "
                f"center_momentum={self.center_momentum}, backend={self.backend!r}")
