"""DINOv2's ``DINOLoss`` and ``iBOTPatchLoss`` (Oquab et al. 2023,
https://arxiv.org/abs/2304.07193), fused; see :mod:`fastssl.losses.crop_pairs`."""

from __future__ import annotations

import torch

from ..losses.centering import ClsTokenLossBase, PatchTokenLossBase
from ..losses.crop_pairs import dino_cross_entropy
from ..losses.targets import TeacherTargets

__all__ = ["DINOLoss", "iBOTPatchLoss"]


def _crops(op: str, name: str, crops) -> torch.Tensor:
    """The authors' list of per-crop ``[B, K]`` tensors (or a ``[crops, B, K]`` tensor, as
    their teacher list is) as one ``[crops, B, K]`` tensor; a list is stacked (one copy)."""
    if isinstance(crops, torch.Tensor):
        return crops if crops.dim() == 3 else crops.unsqueeze(0)
    crops = list(crops)
    if not crops or any(not isinstance(c, torch.Tensor) or c.shape != crops[0].shape or c.dim() != 2 for c in crops):
        shapes = [tuple(c.shape) if isinstance(c, torch.Tensor) else type(c).__name__ for c in crops]
        raise ValueError(f"{op}: {name} must be a non-empty list of [B, K] tensors of one shape, got {shapes}")
    return torch.stack(crops)


class DINOLoss(ClsTokenLossBase):
    """Drop-in for DINOv2's ``DINOLoss``: the CLS-token cross-entropy over every (student crop,
    teacher crop) pair, **summed** over pairs of batch means, fused.

    ``forward(student_output_list, teacher_out_softmaxed_centered_list)``: S student ``[B, K]``
    logits and T teacher ``[B, K]`` probabilities (lists, or ``[S, B, K]`` / ``[T, B, K]``
    tensors, which avoid a stacking copy; the teacher may also be
    :meth:`teacher_targets`' fused targets over ``T * B`` rows). Returns
    ``-sum_{s, t} mean_b <q_tb, log_softmax(s_sb / student_temp)>``, float32.
    The center starts at zeros (DINOv2's); ``center`` ``[1, out_dim]`` is the only state.

    >>> import torch
    >>> from fastssl.dinov2 import DINOLoss
    >>> loss_fn = DINOLoss(out_dim=1000)
    >>> q = loss_fn.sinkhorn_knopp_teacher(torch.randn(2 * 4, 1000), teacher_temp=0.07).view(2, 4, 1000)
    >>> loss = loss_fn(list(torch.randn(8, 4, 1000)), q)
    """

    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9, *, group=None,
                 backend: str = "auto"):
        super().__init__("DINOLoss", out_dim, (1, out_dim), 0.0, student_temp, center_momentum, group, backend)

    @torch.no_grad()
    def softmax_center_teacher(self, teacher_output: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        """Apply the pending center update, then ``softmax((teacher_output - center) / teacher_temp)``."""
        self.apply_center_update()
        return self._softmax_center_probs(teacher_output, teacher_temp)

    @torch.no_grad()
    def sinkhorn_knopp_teacher(self, teacher_output: torch.Tensor, teacher_temp: float,
                               n_iterations: int = 3) -> torch.Tensor:
        """Sinkhorn-Knopp probabilities ``[rows, K]`` over every rank's rows (the default group)."""
        return self._sinkhorn_probs(teacher_output, teacher_temp, n_iterations)

    def forward(self, student_output_list, teacher_out_softmaxed_centered_list) -> torch.Tensor:
        student = _crops("DINOLoss", "student_output_list", student_output_list)
        teacher = teacher_out_softmaxed_centered_list
        if not isinstance(teacher, TeacherTargets):
            teacher = _crops("DINOLoss", "teacher_out_softmaxed_centered_list", teacher)
        return dino_cross_entropy(student, teacher, student_temp=self.student_temp,
                                  scale=1.0 / max(student.shape[1], 1), backend=self.backend)


class iBOTPatchLoss(PatchTokenLossBase):  # noqa: N801 (the authors' name)
    """Drop-in for DINOv2's ``iBOTPatchLoss``: iBOT's masked-patch cross-entropy, fused
    (:func:`fastssl.functional.ibot_loss`). ``forward_masked(student_patch_tokens_masked,
    teacher_patch_tokens_masked, student_masks_flat, n_masked_patches=None, masks_weight=None)``
    and ``forward(student_patch_tokens, teacher_patch_tokens, student_masks_flat)`` as the
    authors'; ``center`` ``[1, 1, patch_out_dim]`` (zeros at first) is the only state.

    >>> import torch
    >>> from fastssl.dinov2 import iBOTPatchLoss
    >>> loss_fn = iBOTPatchLoss(patch_out_dim=512)
    >>> masks = torch.rand(4, 49) < 0.3
    >>> n = int(masks.sum())
    >>> q = loss_fn.sinkhorn_knopp_teacher(torch.randn(n, 512), 0.07, torch.tensor(n))
    >>> loss = loss_fn.forward_masked(torch.randn(n, 512), q, masks)
    """

    def __init__(self, patch_out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9, *,
                 group=None, backend: str = "auto"):
        super().__init__("iBOTPatchLoss", patch_out_dim, (1, 1, patch_out_dim), 0.0, student_temp, center_momentum,
                         group, backend)

    @torch.no_grad()
    def softmax_center_teacher(self, teacher_patch_tokens: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        """Apply the pending center update, then ``softmax((teacher_patch_tokens - center) / teacher_temp)``."""
        self.apply_center_update()
        return self._softmax_center_probs(teacher_patch_tokens, teacher_temp)

    @torch.no_grad()
    def sinkhorn_knopp_teacher(self, teacher_output: torch.Tensor, teacher_temp: float,
                               n_masked_patches_tensor: torch.Tensor | None = None,
                               n_iterations: int = 3) -> torch.Tensor:
        """Sinkhorn-Knopp probabilities ``[n, K]`` over every rank's masked rows. The authors'
        sample count ``n_masked_patches_tensor`` only scales Q by a constant that their last
        normalisation removes: it is accepted and not needed (nor all-reduced)."""
        return self._sinkhorn_probs(teacher_output, teacher_temp, n_iterations)
