"""DINOv3's ``DINOLoss``, ``iBOTPatchLoss`` and ``SinkhornKnoppTeacher`` (Siméoni et al. 2025,
https://arxiv.org/abs/2508.10104), fused; see :mod:`fastssl.losses.crop_pairs`."""

from __future__ import annotations

import math

import torch
from torch import nn

from .._backend import BACKENDS
from ..losses.centering import ClsTokenLossBase, PatchTokenLossBase
from ..losses.crop_pairs import dino_cross_entropy
from ..losses.targets import TeacherTargets, sinkhorn_knopp

__all__ = ["DINOLoss", "SinkhornKnoppTeacher", "iBOTPatchLoss"]


class DINOLoss(ClsTokenLossBase):
    """Drop-in for DINOv3's ``DINOLoss``: the CLS-token cross-entropy over every (student crop,
    teacher crop) pair, the **mean** over pairs and samples, fused.

    ``forward(student_logits [S, B, K], teacher_probs [T, B, K], ignore_diagonal=False)``:
    ``teacher_probs`` may also be :meth:`teacher_targets`' fused targets over the ``T * B``
    teacher rows (then no ``[T, B, K]`` probability tensor exists). With ``ignore_diagonal``
    the pairs s == t (s, t < min(S, T)) are left out of the sum and of the count. Returns a
    float32 scalar; 16-bit logits are computed in fp32.

    The center is NaN until :meth:`init_weights` (the authors'); ``center`` ``[1, out_dim]`` is
    the only state. ``group``: the process group of the authors' ``get_process_subgroup()``.

    >>> import torch
    >>> from fastssl.dinov3 import DINOLoss
    >>> loss_fn = DINOLoss(out_dim=1000)
    >>> targets = loss_fn.teacher_targets(torch.randn(2 * 4, 1000), teacher_temp=0.07)  # Sinkhorn-Knopp
    >>> local = loss_fn(torch.randn(8, 4, 1000), targets)
    >>> global_ = loss_fn(torch.randn(2, 4, 1000), targets, ignore_diagonal=True)
    """

    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9, *, group=None,
                 backend: str = "auto"):
        super().__init__("DINOLoss", out_dim, (1, out_dim), math.nan, student_temp, center_momentum, group, backend)

    def init_weights(self) -> None:
        self.center.zero_()

    @torch.no_grad()
    def softmax_center_teacher(self, teacher_output: torch.Tensor, teacher_temp: float,
                               update_centers: bool = True) -> torch.Tensor:
        """``softmax((teacher_output - center) / teacher_temp)``, after the pending center update
        when ``update_centers``."""
        if update_centers:
            self.apply_center_update()
        return self._softmax_center_probs(teacher_output, teacher_temp)

    @torch.no_grad()
    def sinkhorn_knopp_teacher(self, teacher_output: torch.Tensor, teacher_temp: float,
                               n_iterations: int = 3) -> torch.Tensor:
        """Sinkhorn-Knopp probabilities ``[rows, K]`` over every rank's rows of ``group``."""
        return self._sinkhorn_probs(teacher_output, teacher_temp, n_iterations)

    def forward(self, student_logits: torch.Tensor, teacher_probs: torch.Tensor | TeacherTargets,
                ignore_diagonal: bool = False) -> torch.Tensor:
        if isinstance(student_logits, torch.Tensor) and student_logits.dim() != 3:
            raise ValueError(f"DINOLoss: student_logits must be [student crops, B, K], got "
                             f"{tuple(student_logits.shape)}")
        if isinstance(teacher_probs, torch.Tensor) and teacher_probs.dim() != 3:
            raise ValueError(f"DINOLoss: teacher_probs must be [teacher crops, B, K], got {tuple(teacher_probs.shape)}")
        return dino_cross_entropy(student_logits, teacher_probs, student_temp=self.student_temp,
                                  ignore_diagonal=bool(ignore_diagonal), backend=self.backend)


class SinkhornKnoppTeacher(nn.Module):
    """Drop-in for DINOv3's ``SinkhornKnoppTeacher`` module (the iBOT loss's): ``forward(
    teacher_output [n, K], teacher_temp, n_masked_patches_tensor, n_iterations=3)`` returns
    the ``[n, K]`` Sinkhorn-Knopp probabilities over every rank's rows of ``group``. The
    authors' ``n_masked_patches_tensor`` only scales Q by a constant their last normalisation
    removes: accepted, not needed, not all-reduced (theirs fails without a process group).
    Nothing to compile: it is a few streaming kernels already."""

    def __init__(self, *, group=None, backend: str = "auto"):
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"SinkhornKnoppTeacher: backend must be one of {BACKENDS}, got {backend!r}")
        self.group = group
        self.backend = backend

    @torch.no_grad()
    def forward(self, teacher_output: torch.Tensor, teacher_temp: float,
                n_masked_patches_tensor: torch.Tensor | None = None, n_iterations: int = 3) -> torch.Tensor:
        return self.targets(teacher_output, teacher_temp, n_iterations=n_iterations).probs()

    @torch.no_grad()
    def targets(self, teacher_output: torch.Tensor, teacher_temp: float, n_iterations: int = 3) -> TeacherTargets:
        """The fused form: :class:`TeacherTargets` instead of the ``[n, K]`` probabilities."""
        return sinkhorn_knopp(teacher_output, teacher_temp, n_iterations, group=self.group, backend=self.backend)


class iBOTPatchLoss(PatchTokenLossBase):  # noqa: N801 (the authors' name)
    """Drop-in for DINOv3's ``iBOTPatchLoss``: iBOT's masked-patch cross-entropy, fused
    (:func:`fastssl.functional.ibot_loss`): ``forward_masked(student_patch_tokens_masked,
    teacher_patch_tokens_masked, student_masks_flat, n_masked_patches=None, masks_weight=None)``
    and ``forward(student_patch_tokens, teacher_patch_tokens, student_masks_flat)`` as the
    authors'; ``self.sinkhorn_knopp_teacher`` is a :class:`SinkhornKnoppTeacher`. The center
    ``[1, 1, patch_out_dim]`` is NaN until :meth:`init_weights` and is the only state.

    >>> import torch
    >>> from fastssl.dinov3 import iBOTPatchLoss
    >>> loss_fn = iBOTPatchLoss(patch_out_dim=512)
    >>> masks = torch.rand(4, 49) < 0.3
    >>> n = int(masks.sum())
    >>> targets = loss_fn.teacher_targets(torch.randn(n, 512), teacher_temp=0.07)
    >>> loss = loss_fn.forward_masked(torch.randn(n, 512), targets, masks, n_masked_patches=n)
    """

    def __init__(self, patch_out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9, *,
                 group=None, backend: str = "auto"):
        super().__init__("iBOTPatchLoss", patch_out_dim, (1, 1, patch_out_dim), math.nan, student_temp,
                         center_momentum, group, backend)
        self.sinkhorn_knopp_teacher = SinkhornKnoppTeacher(group=group, backend=backend)

    def init_weights(self) -> None:
        self.center.zero_()

    @torch.no_grad()
    def softmax_center_teacher(self, teacher_patch_tokens: torch.Tensor, teacher_temp: float,
                               update_centers: bool = True) -> torch.Tensor:
        """``softmax((teacher_patch_tokens - center) / teacher_temp)``, after the pending center
        update when ``update_centers``."""
        if update_centers:
            self.apply_center_update()
        return self._softmax_center_probs(teacher_patch_tokens, teacher_temp)
