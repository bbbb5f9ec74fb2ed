r"""iBOT's masked-patch loss (Zhou et al. 2022, as DINOv2 and DINOv3 use it), fused.

Each masked patch token of the student's global crops is scored against the teacher's
probabilities for the same patch, ``-<q_i, log_softmax(s_i / tau_s)>``, weighted by
``1 / (masked patches of its image)``, summed and divided by the number of images. It is
the crop-pair cross-entropy (:func:`~fastssl.losses.crop_pairs.dino_cross_entropy`) with one
crop each, a row per masked patch and per-row weights: no fp32 ``[n, K]`` log-softmax and
no gradient copy of it exist (64 images x 196 patches, half masked, K = 65,536: 1.6 GB each
in the authors' code).
"""

from __future__ import annotations

import operator

import torch

from .crop_pairs import dino_cross_entropy
from .targets import TeacherTargets

__all__ = ["ibot_loss", "ibot_loss_dense"]


def _check_masks(op: str, masks: torch.Tensor) -> torch.Tensor:
    if not isinstance(masks, torch.Tensor) or masks.dtype != torch.bool or masks.dim() != 2:
        what = f"{masks.dtype} tensor of shape {tuple(masks.shape)}" if isinstance(masks, torch.Tensor) \
            else type(masks).__name__
        raise ValueError(f"{op}: student_masks_flat must be a boolean [images, patches] tensor, got a {what}")
    return masks


def _rows(teacher) -> int:
    x = teacher.logits if isinstance(teacher, TeacherTargets) else teacher
    return x.numel() // max(x.shape[-1], 1) if isinstance(x, torch.Tensor) else -1


def masked_patch_weights(masks: torch.Tensor) -> torch.Tensor:
    """The authors' default iBOT weights: for each masked patch (in ``masks``' row-major order,
    as ``masks.nonzero()`` lists them), 1 / the number of masked patches of its image."""
    per_image = 1.0 / masks.sum(dim=-1).clamp(min=1).to(torch.float32)
    return per_image[:, None].expand(masks.shape)[masks]


def ibot_loss(student_masked: torch.Tensor, teacher_masked: torch.Tensor | TeacherTargets,
              student_masks_flat: torch.Tensor, *, n_masked_patches: int | None = None,
              masks_weight: torch.Tensor | None = None, student_temp: float = 0.1, backend: str = "auto"
              ) -> torch.Tensor:
    """iBOT's loss over masked patch tokens, as the authors' ``iBOTPatchLoss.forward_masked``.

    Args:
        student_masked: ``[n, K]`` student logits of the masked patches (any float dtype).
        teacher_masked: ``[n, K]`` teacher probabilities of the same patches, or
            :class:`TeacherTargets` over those ``n`` rows (``sinkhorn_knopp`` of the teacher's
            masked-patch logits, or ``softmax_center``). No gradient flows to it.
        student_masks_flat: ``[images, patches]`` boolean masks; their first dimension is the
            divisor, and they give the default weights.
        n_masked_patches: only the first this many rows count (default: all ``n``).
        masks_weight: ``[n_masked_patches]`` per-row weights; default 1 / the masked patches of
            the row's image, in the masks' row-major order.
        student_temp: the student temperature.
        backend: ``"auto"``, ``"torch"`` or ``"triton"``.

    Returns:
        The float32 scalar ``-sum_i w_i <q_i, log_softmax(s_i / tau)> / images``.

    >>> import torch
    >>> from fastssl.functional import ibot_loss, sinkhorn_knopp
    >>> masks = torch.rand(4, 49) < 0.3                      # 4 images of 7 x 7 patches
    >>> n = int(masks.sum())
    >>> targets = sinkhorn_knopp(torch.randn(n, 512), teacher_temp=0.07)
    >>> loss = ibot_loss(torch.randn(n, 512, requires_grad=True), targets, masks)
    """
    op = "ibot_loss"
    masks = _check_masks(op, student_masks_flat)
    if not isinstance(student_masked, torch.Tensor) or student_masked.dim() != 2:
        shape = tuple(student_masked.shape) if isinstance(student_masked, torch.Tensor) else type(student_masked)
        raise ValueError(f"{op}: student_patch_tokens_masked must be [n, K], got {shape}")
    n, K = student_masked.shape
    if _rows(teacher_masked) != n or (isinstance(teacher_masked, torch.Tensor) and teacher_masked.shape != (n, K)):
        x = teacher_masked.logits if isinstance(teacher_masked, TeacherTargets) else teacher_masked
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{op}: teacher_patch_tokens_masked {shape} must have the student's {n} rows of "
                         f"K={K} (student_patch_tokens_masked {tuple(student_masked.shape)})")
    if n_masked_patches is not None:
        n_masked_patches = operator.index(n_masked_patches)
        if not 0 <= n_masked_patches <= n:
            raise ValueError(f"{op}: n_masked_patches={n_masked_patches} must lie in [0, {n}], the rows given")
        if n_masked_patches < n:
            student_masked = student_masked[:n_masked_patches]
            if isinstance(teacher_masked, TeacherTargets):
                teacher_masked = teacher_masked._replace(logits=teacher_masked.logits.reshape(n, K)[:n_masked_patches],
                                                         stats=teacher_masked.stats[:, :n_masked_patches])
            else:
                teacher_masked = teacher_masked[:n_masked_patches]
            n = n_masked_patches
    if masks_weight is None:
        masks_weight = masked_patch_weights(masks)
    if not isinstance(masks_weight, torch.Tensor) or masks_weight.shape != (n,):
        shape = tuple(masks_weight.shape) if isinstance(masks_weight, torch.Tensor) else type(masks_weight).__name__
        raise ValueError(f"{op}: masks_weight must hold one weight per counted row ({n}), got {shape} (the "
                         "default weights are one per masked patch of student_masks_flat)")
    return dino_cross_entropy(student_masked, teacher_masked, student_temp=student_temp, weights=masks_weight,
                              scale=1.0 / masks.shape[0], backend=backend)


def ibot_loss_dense(student_patch_tokens: torch.Tensor, teacher_patch_tokens: torch.Tensor | TeacherTargets,
                    student_masks_flat: torch.Tensor, *, student_temp: float = 0.1, backend: str = "auto"
                    ) -> torch.Tensor:
    """iBOT's loss over every patch token with masks, as the authors' ``iBOTPatchLoss.forward``:
    per image the mean over its masked patches (0 without one), then the mean over images.

    Args:
        student_patch_tokens: ``[B, N, K]`` student logits of all patches.
        teacher_patch_tokens: ``[B, N, K]`` teacher probabilities, or :class:`TeacherTargets`
            over those ``B * N`` rows.
        student_masks_flat: ``[B, N]`` boolean masks.

    Unmasked patches weigh 0 but are still read; :func:`ibot_loss` on the masked rows only
    reads those.
    """
    op = "ibot_loss_dense"
    masks = _check_masks(op, student_masks_flat)
    if not isinstance(student_patch_tokens, torch.Tensor) or student_patch_tokens.dim() != 3 \
            or student_patch_tokens.shape[:2] != masks.shape:
        shape = tuple(student_patch_tokens.shape) if isinstance(student_patch_tokens, torch.Tensor) else "?"
        raise ValueError(f"{op}: student_patch_tokens must be [B, N, K] with [B, N] = student_masks_flat's "
                         f"{tuple(masks.shape)}, got {shape}")
    B, N, K = student_patch_tokens.shape
    if _rows(teacher_patch_tokens) != B * N:
        raise ValueError(f"{op}: teacher_patch_tokens must hold B * N = {B * N} rows of K={K} as the student's")
    if isinstance(teacher_patch_tokens, torch.Tensor):
        teacher_patch_tokens = teacher_patch_tokens.reshape(B * N, K)
    weights = (masks.to(torch.float32) / masks.sum(dim=-1, keepdim=True).clamp(min=1)).reshape(B * N)
    return dino_cross_entropy(student_patch_tokens.reshape(B * N, K), teacher_patch_tokens,
                              student_temp=student_temp, weights=weights, scale=1.0 / B, backend=backend)
