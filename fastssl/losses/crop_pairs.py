r"""The DINO family's soft cross-entropy over every (student crop, teacher crop) pair, fused.

DINO (Caron et al. 2021), DINOv2 (Oquab et al. 2023) and DINOv3 (Siméoni et al. 2025) all
score each student crop's ``log_softmax(s / tau_s)`` against each teacher crop's
probabilities q: a loop or an einsum over the pairs, with an fp32 log-softmax of every
student crop (and, in DINO's loop, its B x K products) kept for autograd. Because each q
sums to one the sum over pairs has a closed form (``fastssl.kernels.dino``):

    sum_{pairs (s, t)} -<q_t, log_softmax(z_s)> = sum_s [ n_s * logsumexp(z_s) - <Q_s, z_s> ]

with ``Q_s`` the sum of the q_t that crop s is scored against and ``n_s = sum(Q_s)``. The
Triton kernels stream the logits once per pass and keep 3 floats per student row; the
teacher's probabilities come as a tensor, or are recomputed on the fly from its logits and
:class:`~fastssl.losses.targets.TeacherTargets` (softmax centering or Sinkhorn-Knopp).
iBOT's masked-patch loss is the case of one crop each, with per-row weights.

Layers: the kernels (``fastssl.kernels.dino``), the ``fastssl::dino_ce_forward`` /
``_backward`` custom ops with autograd and fake implementations, the PyTorch path of the
same closed form, and the functional :func:`dino_cross_entropy`.
"""

from __future__ import annotations

import math

import torch

from .._backend import resolve_backend
from .targets import TeacherTargets

__all__ = ["dino_cross_entropy"]


# ----------------------------------------------------------------------------- PyTorch path

def _teacher_probs_torch(teacher):
    return teacher.probs() if isinstance(teacher, TeacherTargets) else teacher.detach().float()


def _dino_ce_torch(student, teacher, weights, n_s, n_t, n_diag, student_temp, scale):
    """The closed form in plain PyTorch, fp32 math; autograd gives the gradient. ``student``:
    ``[S * B, K]``; ``teacher``: :class:`TeacherTargets` or probabilities, ``T * B`` rows."""
    K = student.shape[1]
    B = student.shape[0] // n_s
    # Elementwise products, not matmuls: exact under autocast and with TF32 enabled.
    with torch.autocast(student.device.type, enabled=False):
        logp = torch.log_softmax(student.float().view(n_s, B, K) / student_temp, dim=-1)
        with torch.no_grad():
            q = _teacher_probs_torch(teacher).view(n_t, B, K)
            q_sum = q.sum(dim=0)
        # <Q_s, logp_s> with Q_s = sum(q) - q_s for the diagonal crops s < D
        dots = (logp * q_sum).sum(dim=-1)
        if n_diag:
            dots = torch.cat([dots[:n_diag] - (logp[:n_diag] * q[:n_diag]).sum(dim=-1), dots[n_diag:]])
        if weights is not None:
            dots = dots * weights.float()
        # Scaled before the sum: rows whose logits span most of fp32's range would overflow it.
        return -(dots * scale).sum()


# ----------------------------------------------------------------------------- Triton path (custom ops)

@torch.library.custom_op("fastssl::dino_ce_forward", mutates_args=())
def _forward_op(student: torch.Tensor, teacher: torch.Tensor, center: torch.Tensor | None,
                offset: torch.Tensor | None, teacher_stats: torch.Tensor | None, weights: torch.Tensor | None,
                n_student: int, n_teacher: int, n_diag: int, student_temp: float, teacher_temp: float, scale: float
                ) -> tuple[torch.Tensor, torch.Tensor]:
    from ..kernels.dino import pair_forward

    return pair_forward(student, teacher, center, offset, teacher_stats, weights, n_student, n_teacher, n_diag,
                        student_temp, teacher_temp, scale)


@_forward_op.register_fake
def _(student, teacher, center, offset, teacher_stats, weights, n_student, n_teacher, n_diag, student_temp,
      teacher_temp, scale):
    return student.new_empty((), dtype=torch.float32), student.new_empty(3, student.shape[0], dtype=torch.float32)


@torch.library.custom_op("fastssl::dino_ce_backward", mutates_args=())
def _backward_op(grad_loss: torch.Tensor, student: torch.Tensor, teacher: torch.Tensor, center: torch.Tensor | None,
                 offset: torch.Tensor | None, teacher_stats: torch.Tensor | None, student_stats: torch.Tensor,
                 weights: torch.Tensor | None, n_student: int, n_teacher: int, n_diag: int, student_temp: float,
                 teacher_temp: float, scale: float) -> torch.Tensor:
    from ..kernels.dino import pair_backward

    return pair_backward(grad_loss, student, teacher, center, offset, teacher_stats, student_stats, weights,
                         n_student, n_teacher, n_diag, student_temp, teacher_temp, scale)


@_backward_op.register_fake
def _(grad_loss, student, teacher, center, offset, teacher_stats, student_stats, weights, n_student, n_teacher,
      n_diag, student_temp, teacher_temp, scale):
    return torch.empty_like(student, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    student, teacher, center, offset, teacher_stats, weights, *args = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(student, teacher, center, offset, teacher_stats, output[1], weights)
    ctx.args = args


def _backward(ctx, grad_loss, _grad_stats):
    student, teacher, center, offset, teacher_stats, student_stats, weights = ctx.saved_tensors
    grad = None
    if ctx.needs_input_grad[0]:
        grad = _backward_op(grad_loss, student, teacher, center, offset, teacher_stats, student_stats, weights,
                            *ctx.args)
    # No gradient to the teacher (the authors' targets are made under no_grad), nor to weights.
    return grad, None, None, None, None, None, None, None, None, None, None, None


torch.library.register_autograd("fastssl::dino_ce_forward", _backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- checks

def _crops(op: str, name: str, x: torch.Tensor) -> torch.Tensor:
    """``[crops, B, K]`` from a 3-D tensor, or one crop from a 2-D one."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(f"{op}: {name} must be a floating-point tensor, got dtype {x.dtype}")
    if x.dim() == 2:
        return x.unsqueeze(0)
    if x.dim() != 3:
        raise ValueError(f"{op}: {name} must be [crops, B, K] (or [B, K], one crop), got shape {tuple(x.shape)}")
    return x


def _check(op, student, teacher, weights, ignore_diagonal, student_temp):
    """Validate; return ``(student [S, B, K], teacher logits or probs [T, B, K], S, T, D)``."""
    student = _crops(op, "student_logits", student)
    S, B, K = student.shape
    if K == 0:
        raise ValueError(f"{op}: student_logits {tuple(student.shape)} have no class (K = 0)")
    if isinstance(teacher, TeacherTargets):
        x = teacher.logits
        what = "teacher targets' logits"
        if x.shape[-1] != K:
            raise ValueError(f"{op}: student_logits {tuple(student.shape)} have K={K} classes but the {what} "
                             f"{tuple(x.shape)} have {x.shape[-1]}")
        rows = x.numel() // K
        if (rows % B if B else rows) or x.dim() == 3 and x.shape[1] != B:
            raise ValueError(f"{op}: the {what} {tuple(x.shape)} are not [T, B, K] or [T * B, K] rows for "
                             f"B={B} (from student_logits {tuple(student.shape)})")
        x = x.reshape(rows // B if B else 1, B, K)
    else:
        x = _crops(op, "teacher_probs", teacher)
        if x.shape[1:] != (B, K):
            raise ValueError(f"{op}: teacher_probs {tuple(x.shape)} must be [T, B, K] with B={B}, K={K} as "
                             f"student_logits {tuple(student.shape)}")
    T = x.shape[0]
    if not (student.device == x.device):
        raise ValueError(f"{op}: student_logits are on {student.device} but the teacher on {x.device}")
    D = min(S, T) if ignore_diagonal else 0
    if S * T - D == 0:
        raise ValueError(f"{op}: with ignore_diagonal, {S} student crop and {T} teacher crop leave no pair to score")
    if weights is not None:
        if not isinstance(weights, torch.Tensor) or weights.shape != (B,):
            shape = tuple(weights.shape) if isinstance(weights, torch.Tensor) else type(weights).__name__
            raise ValueError(f"{op}: weights must be a [B] tensor with B={B}, got {shape}")
        if weights.device != student.device:
            raise ValueError(f"{op}: weights are on {weights.device} but student_logits on {student.device}")
    if not (student_temp > 0 and math.isfinite(student_temp)):
        raise ValueError(f"{op}: student_temp must be a positive number, got {student_temp!r}")
    return student, x, S, T, D


# ----------------------------------------------------------------------------- functional API

def dino_cross_entropy(student_logits: torch.Tensor, teacher: torch.Tensor | TeacherTargets, *,
                       student_temp: float = 0.1, ignore_diagonal: bool = False, weights: torch.Tensor | None = None,
                       scale: float | None = None, backend: str = "auto") -> torch.Tensor:
    """Soft cross-entropy of every student crop against every teacher crop, fused.

    ``-scale * sum_{pairs (s, t), b} w_b <q_tb, log_softmax(student_logits[s, b] / student_temp)>``

    Args:
        student_logits: ``[S, B, K]`` (S crops of B samples; ``[B, K]`` is one crop), any
            float dtype; the gradient comes back in it.
        teacher: ``[T, B, K]`` teacher probabilities (each row summing to one, as the
            authors' ``teacher_probs``), or :class:`TeacherTargets` over ``T * B`` rows (from
            :func:`~fastssl.functional.sinkhorn_knopp` or
            :func:`~fastssl.functional.softmax_center`), recomputed on the fly. No gradient
            flows to the teacher.
        student_temp: the student temperature.
        ignore_diagonal: leave out the pairs s == t for s, t < min(S, T) (DINOv3's global
            crops; DINO's "a crop does not predict itself").
        weights: ``[B]`` per-sample weights (iBOT: 1 / masked patches of the image), or None.
        scale: the factor on the sum; default ``1 / (pairs * B)``, the mean over pairs and
            samples (DINOv3's ``DINOLoss``). DINOv2's sum over pairs of batch means is
            ``1 / B``.
        backend: ``"auto"``, ``"torch"`` or ``"triton"``.

    Returns:
        The float32 scalar loss (fp32 math whatever the inputs' dtype).

    >>> import torch
    >>> from fastssl.functional import dino_cross_entropy, sinkhorn_knopp
    >>> student = torch.randn(8, 4, 1000, requires_grad=True)   # 8 local crops of 4 images
    >>> targets = sinkhorn_knopp(torch.randn(2 * 4, 1000), teacher_temp=0.07)  # 2 global crops
    >>> loss = dino_cross_entropy(student, targets)
    >>> loss.backward()
    """
    student, x, S, T, D = _check("dino_cross_entropy", student_logits, teacher, weights, ignore_diagonal,
                                 float(student_temp))
    B, K = student.shape[1], student.shape[2]
    if B == 0:  # no sample (iBOT without a masked patch): the empty sum, still part of the graph
        return student.float().sum() * 0.0
    student_temp = float(student_temp)
    scale = 1.0 / ((S * T - D) * B) if scale is None else float(scale)
    z = student.reshape(S * B, K)
    backend = resolve_backend(backend, z.device, "dino_cross_entropy")
    if isinstance(teacher, TeacherTargets):
        rows, center, offset, stats, temp = (x.reshape(T * B, K), teacher.center, teacher.offset, teacher.stats,
                                             teacher.teacher_temp)
    else:
        rows, center, offset, stats, temp = x.detach().reshape(T * B, K), None, None, None, 1.0
    if backend == "torch":
        return _dino_ce_torch(z, teacher if stats is not None else rows, weights, S, T, D, student_temp, scale)
    if weights is not None:
        weights = weights.detach().float()
    loss, _ = _forward_op(z, rows, center, offset, stats, weights, S, T, D, student_temp, temp, scale)
    return loss
