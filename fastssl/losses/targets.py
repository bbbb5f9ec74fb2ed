r"""The teacher's targets of the DINO family, kept as logits and O(rows + K) statistics.

DINO, DINOv2 and DINOv3 turn the teacher's logits x (``[R, K]``: R rows, K prototypes)
into probabilities in one of two ways:

* softmax centering (Caron et al. 2021): ``q_r = softmax((x_r - center) / tau)``;
* Sinkhorn-Knopp (Caron et al. 2020, used by DINOv2 and always by DINOv3): the authors
  rescale the K x R matrix ``exp(x / tau)`` alternately over samples and over classes,
  3 times, as ``Q = diag(u) exp(x / tau)^T diag(v)``. Their last step normalises each
  sample, so ``q_r = softmax(x_r / tau + ln u)``: only the K-vector u matters.

Either way ``q_r = 2^(y_r - M_r) / L_r`` with ``y = (x - c) * log2(e) / tau + a``, a center
c or a per-class offset a = log2(u), and each row's max M and sum L of 2^(y - M).
:class:`TeacherTargets` holds exactly that: the logits (not copied), c or a (K floats)
and (M, L) (2 floats a row). The fused losses recompute each probability from it where
they need it, so no ``[R, K]`` probability matrix is ever built; ``TeacherTargets.probs()``
builds one for code that wants it.

Sinkhorn-Knopp here runs in the log domain: a = -log2 sum over rows of 2^(y + b) and
b = -log2 sum over classes of 2^(y + a), alternately (n column passes, n - 1 row passes
between them), each a streaming log-sum-exp with its own running max. So no finite
input overflows or underflows: the authors' ``exp(x / tau)`` in fp32 is inf (then NaN)
once x / tau > 88.7, and a prototype whose logits all lie ~90 below the others' becomes
a row of zeros (then 0 / 0). Where the authors' result is finite it is the same up to
fp32 rounding; elsewhere it is the float64 evaluation of their formula. Their sample
count (``B``, or iBOT's ``n_masked_patches_tensor``) and first global sum are constants
that the last normalisation removes; they change nothing and are not needed.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.distributed as dist

from .. import distributed
from .._backend import resolve_backend

__all__ = ["TeacherTargets", "sinkhorn_knopp", "softmax_center"]

LOG2E = 1.4426950408889634
FLT_MAX = torch.finfo(torch.float32).max


class TeacherTargets(NamedTuple):
    """Teacher probabilities ``q = softmax((logits - center) / teacher_temp + offset * ln 2)``
    per row, kept as the logits and O(rows + K) statistics (see the module docstring).

    Made by :func:`softmax_center` or :func:`sinkhorn_knopp`; taken by the fused losses
    wherever the authors take teacher probabilities.
    """

    logits: torch.Tensor               # [..., K], the teacher logits as given (no gradient flows to them)
    teacher_temp: float
    center: torch.Tensor | None        # [K] fp32 (softmax centering), a copy of the center used
    offset: torch.Tensor | None        # [K] fp32, log2 of Sinkhorn-Knopp's class scaling u
    stats: torch.Tensor                # [2, R] fp32: each row's max M and sum L of 2^(y - M)
    batch_mean: torch.Tensor | None    # [K] fp32: the column means of this process's logits (softmax centering)

    @property
    def num_classes(self) -> int:
        return self.logits.shape[-1]

    def probs(self) -> torch.Tensor:
        """The probabilities, materialised: float32, the logits' shape."""
        K = self.num_classes
        y = _y_torch(self.logits.detach().reshape(-1, K), self.center, self.offset, self.teacher_temp)
        q = torch.exp2(y - self.stats[0, :, None]) / self.stats[1, :, None]
        return q.view(self.logits.shape)


# ----------------------------------------------------------------------------- PyTorch path

def _y_torch(x, center, offset, teacher_temp):
    """y = (x - center) * log2(e) / tau + offset in fp32, in the kernels' order of operations."""
    y = x.float()
    if center is not None:
        y = y - center
    y = y * (LOG2E / teacher_temp)
    if offset is not None:
        y = y + offset
    return y


def _row_stats_torch(x, center, offset, teacher_temp, with_mean):
    y = _y_torch(x, center, offset, teacher_temp)
    m = y.amax(dim=1)
    # A row of -inf logits has sum 0, not 2^(-inf - -inf) = NaN.
    l = torch.exp2(y - torch.where(m == float("-inf"), 0.0, m)[:, None]).sum(dim=1)
    # Scaled before the sum, as the kernel: rows near fp32's largest values must not overflow it.
    mean = (x.float() * (1.0 / x.shape[0])).sum(dim=0) if with_mean else x.new_empty(0, dtype=torch.float32)
    return torch.stack([m, l]), mean


def _col_lse_torch(x, row_offset, teacher_temp):
    y = x.float() * (LOG2E / teacher_temp)
    if row_offset is not None:
        y = y + row_offset[:, None]
    # From -FLT_MAX, as the kernel: a column of -inf keeps sum 0.
    m = y.amax(dim=0).clamp_min(-FLT_MAX)
    return m, torch.exp2(y - m).sum(dim=0)


# ----------------------------------------------------------------------------- Triton path (custom ops)

@torch.library.custom_op("fastssl::teacher_row_stats", mutates_args=())
def _row_stats_op(x: torch.Tensor, center: torch.Tensor | None, offset: torch.Tensor | None, teacher_temp: float,
                  with_mean: bool) -> tuple[torch.Tensor, torch.Tensor]:
    from ..kernels.dino import teacher_row_stats

    return teacher_row_stats(x, center, offset, teacher_temp, with_mean)


@_row_stats_op.register_fake
def _(x, center, offset, teacher_temp, with_mean):
    return (x.new_empty(2, x.shape[0], dtype=torch.float32),
            x.new_empty(x.shape[1] if with_mean else 0, dtype=torch.float32))


@torch.library.custom_op("fastssl::teacher_col_lse", mutates_args=())
def _col_lse_op(x: torch.Tensor, row_offset: torch.Tensor | None, teacher_temp: float
                ) -> tuple[torch.Tensor, torch.Tensor]:
    from ..kernels.dino import teacher_col_lse

    return teacher_col_lse(x, row_offset, teacher_temp)


@_col_lse_op.register_fake
def _(x, row_offset, teacher_temp):
    return x.new_empty(x.shape[1], dtype=torch.float32), x.new_empty(x.shape[1], dtype=torch.float32)


def _row_stats(x, center, offset, teacher_temp, with_mean, backend):
    if x.shape[0] == 0:
        return x.new_empty(2, 0, dtype=torch.float32), x.new_zeros(x.shape[1] if with_mean else 0,
                                                                   dtype=torch.float32)
    if backend == "torch":
        return _row_stats_torch(x, center, offset, teacher_temp, with_mean)
    return _row_stats_op(x, center, offset, teacher_temp, with_mean)


def _col_lse(x, row_offset, teacher_temp, backend):
    if x.shape[0] == 0:  # a process without rows still joins the all-reduce, adding nothing
        return (x.new_full((x.shape[1],), -FLT_MAX, dtype=torch.float32),
                x.new_zeros(x.shape[1], dtype=torch.float32))
    if backend == "torch":
        return _col_lse_torch(x, row_offset, teacher_temp)
    return _col_lse_op(x, row_offset, teacher_temp)


# ----------------------------------------------------------------------------- checks

def _check_logits(op: str, x: torch.Tensor, teacher_temp: float) -> torch.Tensor:
    """The logits as ``[R, K]`` rows (a view where possible)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: teacher_output must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(f"{op}: teacher_output must be a floating-point tensor, got dtype {x.dtype}")
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"{op}: teacher_output must be [..., K] logits with K >= 1, got shape {tuple(x.shape)}")
    if not (isinstance(teacher_temp, (int, float)) and teacher_temp > 0 and math.isfinite(teacher_temp)):
        raise ValueError(f"{op}: teacher_temp must be a positive number, got {teacher_temp!r}")
    return x.detach().reshape(-1, x.shape[-1])


# ----------------------------------------------------------------------------- public functions

def softmax_center(teacher_output: torch.Tensor, center: torch.Tensor, teacher_temp: float, *,
                   backend: str = "auto") -> TeacherTargets:
    """Softmax centering of the teacher, ``softmax((teacher_output - center) / teacher_temp)``
    per row, as targets for the fused losses (no ``[R, K]`` tensor is made).

    Args:
        teacher_output: ``[..., K]`` teacher logits, any float dtype (fp32 math).
        center: ``K`` values (``[K]``, ``[1, K]``, ``[1, 1, K]``): the running center.
        teacher_temp: the teacher temperature.
        backend: ``"auto"``, ``"torch"`` or ``"triton"`` (see ``fastssl._backend``).

    Returns:
        :class:`TeacherTargets`, with ``batch_mean`` the ``[K]`` column means of this
        process's logits (from the same pass) for a center update.

    >>> import torch
    >>> from fastssl.functional import softmax_center
    >>> t = torch.randn(8, 100)
    >>> q = softmax_center(t, torch.zeros(100), 0.04).probs()
    >>> torch.allclose(q, torch.softmax(t / 0.04, dim=-1), atol=1e-6)
    True
    """
    x = _check_logits("softmax_center", teacher_output, teacher_temp)
    K = x.shape[1]
    if not isinstance(center, torch.Tensor) or center.numel() != K:
        shape = tuple(center.shape) if isinstance(center, torch.Tensor) else type(center).__name__
        raise ValueError(f"softmax_center: center must hold K={K} values, got {shape}")
    if center.device != x.device:
        raise ValueError(f"softmax_center: teacher_output is on {x.device} but center on {center.device}")
    teacher_temp = float(teacher_temp)
    backend = resolve_backend(backend, x.device, "softmax_center")
    # A copy of the center (K floats): callers may update theirs in place before the backward.
    c = center.detach().reshape(K).to(torch.float32, copy=True)
    stats, mean = _row_stats(x, c, None, teacher_temp, True, backend)
    return TeacherTargets(teacher_output.detach(), teacher_temp, c, None, stats, mean)


def sinkhorn_knopp(teacher_output: torch.Tensor, teacher_temp: float, n_iterations: int = 3, *, group=None,
                   backend: str = "auto") -> TeacherTargets:
    """Sinkhorn-Knopp centering of the teacher as the DINOv2/DINOv3 authors compute it
    (``sinkhorn_knopp_teacher``), in the log domain and without the ``[K, R]`` matrix.

    Args:
        teacher_output: ``[..., K]`` teacher logits; the rows are every leading index.
        teacher_temp: the teacher temperature.
        n_iterations: Sinkhorn-Knopp iterations (the authors': 3), at least 1.
        group: the process group whose rows are normalised together (the authors' default
            group in DINOv2, ``get_process_subgroup()`` in DINOv3); ``None``: the default
            group when ``torch.distributed`` is initialised, else this process alone.
        backend: ``"auto"``, ``"torch"`` or ``"triton"``.

    Returns:
        :class:`TeacherTargets` whose rows sum to one, as the authors' (their ``Q.t()``).

    Rows live on every process of ``group``: each column pass all-reduces a max and a sum
    of K floats (the authors all-reduce one sum); the row passes are local.

    >>> import torch
    >>> from fastssl.functional import sinkhorn_knopp
    >>> q = sinkhorn_knopp(torch.randn(16, 100), teacher_temp=0.07).probs()
    >>> q.shape, bool(torch.allclose(q.sum(-1), torch.ones(16)))
    (torch.Size([16, 100]), True)
    """
    x = _check_logits("sinkhorn_knopp", teacher_output, teacher_temp)
    if isinstance(n_iterations, bool) or not isinstance(n_iterations, int) or n_iterations < 1:
        raise ValueError(f"sinkhorn_knopp: n_iterations must be an integer >= 1, got {n_iterations!r}")
    teacher_temp = float(teacher_temp)
    backend = resolve_backend(backend, x.device, "sinkhorn_knopp")
    reduce = distributed.is_initialized() and dist.get_world_size(group) > 1
    row_offset = None
    for it in range(n_iterations):
        col_m, col_l = _col_lse(x, row_offset, teacher_temp, backend)
        if reduce:
            top = col_m.clone()
            dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
            col_l = col_l * torch.exp2(col_m - top)
            dist.all_reduce(col_l, group=group)
            col_m = top
        offset = -(col_m + torch.log2(col_l))
        if it + 1 < n_iterations:
            stats, _ = _row_stats(x, None, offset, teacher_temp, False, backend)
            row_offset = -(stats[0] + torch.log2(stats[1]))
    stats, _ = _row_stats(x, None, offset, teacher_temp, False, backend)
    return TeacherTargets(teacher_output.detach(), teacher_temp, None, offset, stats, None)
