"""DINOv3's Gram anchoring stage: the Gram teacher, when it is refreshed, and the patch features it anchors.

Siméoni et al. 2025, "DINOv3", https://arxiv.org/abs/2508.10104, section 4 (``SSLMetaArch``'s ``gram_*``
in facebookresearch/dinov3). Late in training the student's patch features are pulled towards the pairwise
similarities (the Gram matrix) of an earlier network's: :class:`GramTeacher`, a frozen copy of the EMA
teacher's backbone. It is loaded from the EMA teacher before iteration ``it_load_ema_teacher`` and, with
``rep_update``, replaced by it again after every iteration ``it`` with ``it + 1 >= it_first_update`` and
``(it + 1) % update_frequency == 0``, at most ``max_updates`` times (:class:`GramRefresh`). It sees the
global crops at their own, larger size (512 in the authors' ViT-7B stage, against the student's 256);
its patch features are resized to the student's patch grid (:func:`resize_patches`, bicubic by default)
and, where ``tokens_used`` says, only the masked or unmasked patches enter the loss
(:func:`select_patches`). The loss itself is :class:`fastssl.dinov3.GramLoss`; its weight may follow
:func:`linear_warmup_cosine_decay`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["RESIZE_METHODS", "TOKENS_USED", "GramRefresh", "GramTeacher", "linear_warmup_cosine_decay",
           "resize_patches", "select_patches"]

TOKENS_USED = ("all", "masked", "unmasked")
RESIZE_METHODS = ("bicubic", "bilinear", "nearest", "area")  # F.interpolate's modes for a 2-D grid


@dataclass(frozen=True)
class GramRefresh:
    """When the Gram teacher takes the EMA teacher's weights (the authors' ``gram.*`` options).

    Args:
        it_load_ema_teacher: the iteration before which it is first loaded (-1: never; then its weights
            come from elsewhere, the authors' ``gram.ckpt``).
        rep_update: replace it again every ``update_frequency`` iterations.
        update_frequency: iterations between replacements.
        it_first_update: no replacement after an iteration below ``it_first_update - 1``.
        max_updates: at most this many replacements (None: no limit).
    """

    it_load_ema_teacher: int = -1
    rep_update: bool = True
    update_frequency: int = 50_000
    it_first_update: int = 0
    max_updates: int | None = None

    def __post_init__(self):
        if self.it_load_ema_teacher < -1:
            raise ValueError(f"GramRefresh: it_load_ema_teacher={self.it_load_ema_teacher} must be >= -1 (-1: never)")
        if self.update_frequency < 1:
            raise ValueError(f"GramRefresh: update_frequency={self.update_frequency} must be >= 1")
        if self.it_first_update < 0:
            raise ValueError(f"GramRefresh: it_first_update={self.it_first_update} must be >= 0")
        if self.max_updates is not None and self.max_updates < 0:
            raise ValueError(f"GramRefresh: max_updates={self.max_updates} must be >= 0 or None")

    def loads_before(self, it: int) -> bool:
        """Whether the EMA teacher is loaded into the Gram teacher before iteration ``it``."""
        return it == self.it_load_ema_teacher

    def updates_after(self, it: int, done: int) -> bool:
        """Whether the Gram teacher is replaced after iteration ``it``, ``done`` replacements so far."""
        return (self.rep_update and it + 1 >= self.it_first_update and (it + 1) % self.update_frequency == 0
                and (self.max_updates is None or done < self.max_updates))

    def updates_before(self, it: int) -> int:
        """Replacements made after the iterations before ``it`` (what a run resumed at ``it`` has done).
        Exact (the count is saved with a checkpoint too); the authors' resume recomputes it as
        ``ceil((it + 1 - it_first_update) / update_frequency)``, which agrees where ``it_first_update`` is a
        positive multiple of ``update_frequency`` (their configs) and can be one more elsewhere."""
        if not self.rep_update or it <= 0:
            return 0
        # iterations j < it with j + 1 >= it_first_update and (j + 1) % f == 0: multiples of f in [lo, it]
        f, lo = self.update_frequency, max(self.it_first_update, 1)
        count = max(0, it // f - (lo - 1) // f)
        return count if self.max_updates is None else min(count, self.max_updates)


def linear_warmup_cosine_decay(start: float, peak: float, end: float, warmup_iterations: int,
                               total_iterations: int, cosine_iterations: int | None = None) -> np.ndarray:
    """A value per iteration: ``warmup_iterations`` linear steps from ``start`` towards ``peak`` (``peak``
    itself not reached), a cosine from ``peak`` to ``end`` (both reached) over ``cosine_iterations``
    (default: the rest), then ``end`` to ``total_iterations``. The authors' Gram loss weight schedule."""
    if cosine_iterations is None:
        cosine_iterations = total_iterations - warmup_iterations
    constant = total_iterations - cosine_iterations - warmup_iterations
    if min(warmup_iterations, cosine_iterations, constant) < 0:
        raise ValueError(f"linear_warmup_cosine_decay: warmup_iterations={warmup_iterations} and cosine_iterations="
                         f"{cosine_iterations} do not fit in total_iterations={total_iterations}")
    linear = np.linspace(start, peak, warmup_iterations, endpoint=False)
    cosine = (peak - end) * (np.cos(np.linspace(0.0, np.pi, cosine_iterations)) + 1.0) / 2.0 + end
    return np.concatenate([linear, cosine, np.full(constant, float(end))])


def resize_patches(patches: torch.Tensor, grid: int, mode: str = "bicubic", antialias: bool = False) -> torch.Tensor:
    """``[N, P, D]`` patch features of a square ``sqrt(P) x sqrt(P)`` grid resized to ``grid x grid``:
    ``[N, grid * grid, D]`` (``F.interpolate`` over the grid, ``align_corners=False``; unchanged when the
    grids agree)."""
    n, p, d = patches.shape
    side = int(round(p ** 0.5))
    if side * side != p:
        raise ValueError(f"resize_patches: {p} patches are not a square grid")
    if mode not in RESIZE_METHODS:
        raise ValueError(f"resize_patches: mode must be one of {RESIZE_METHODS}, got {mode!r}")
    if side == grid:
        return patches
    hw = patches.transpose(1, 2).unflatten(-1, (side, side))  # [N, D, side, side]
    kwargs: dict[str, Any] = {} if mode in ("nearest", "area") else {"align_corners": False, "antialias": antialias}
    out = F.interpolate(hw, size=(grid, grid), mode=mode, **kwargs)
    return out.flatten(-2).transpose(1, 2)


def select_patches(student: torch.Tensor, teacher: torch.Tensor, masks: torch.Tensor,
                   tokens_used: str = "all") -> tuple[torch.Tensor, torch.Tensor]:
    """The patches the Gram loss compares: all ``[N, P, D]`` of both, or only those where ``masks``
    (``[N, P]`` bool) is set (``"masked"``) or not (``"unmasked"``), as ``[n, D]`` rows."""
    if tokens_used not in TOKENS_USED:
        raise ValueError(f"select_patches: tokens_used must be one of {TOKENS_USED}, got {tokens_used!r}")
    if student.shape != teacher.shape:
        raise ValueError(f"select_patches: student patches {tuple(student.shape)} and teacher patches "
                         f"{tuple(teacher.shape)} differ")
    if tokens_used == "all":
        return student, teacher
    if masks.shape != student.shape[:2] or masks.dtype != torch.bool:
        raise ValueError(f"select_patches: masks must be bool {tuple(student.shape[:2])}, got {masks.dtype} "
                         f"{tuple(masks.shape)}")
    keep = masks if tokens_used == "masked" else ~masks
    return student[keep], teacher[keep]


class GramTeacher(nn.Module):
    """A frozen copy of a backbone (a timm ViT) whose patch features anchor the student's.

    ``GramTeacher(teacher_backbone)`` copies it (eval mode, no gradients); :meth:`load_` replaces its
    weights by another backbone's of the same structure (the EMA teacher's: the authors' ``update_gram``
    and ``gram_load_ema_teacher``); :meth:`patch_features` gives the normalised patch tokens of images,
    resized to a patch grid.
    """

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = copy.deepcopy(backbone).eval().requires_grad_(False)
        self.prefix = int(getattr(backbone, "num_prefix_tokens", 1))  # CLS + storage tokens

    def train(self, mode: bool = True) -> GramTeacher:  # always in eval mode, as the authors'
        return super().train(False)

    @torch.no_grad()
    def load_(self, backbone: nn.Module) -> None:
        """Its parameters and buffers set to ``backbone``'s (same names and shapes: else a ValueError)."""
        ours, theirs = self.backbone.state_dict(), backbone.state_dict()
        if ours.keys() != theirs.keys():
            raise ValueError(f"GramTeacher.load_: the backbones differ: {sorted(ours.keys() ^ theirs.keys())[:5]}")
        for name, t in ours.items():
            if t.shape != theirs[name].shape:
                raise ValueError(f"GramTeacher.load_: {name} is {tuple(t.shape)} here, {tuple(theirs[name].shape)} "
                                 "in the backbone given")
            t.copy_(theirs[name])

    @torch.no_grad()
    def patch_features(self, images: torch.Tensor, grid: int, mode: str = "bicubic",
                       antialias: bool = False) -> torch.Tensor:
        """``[N, grid * grid, D]``: the final-norm patch tokens of ``images`` ``[N, 3, H, W]`` on a
        ``grid x grid`` patch grid (:func:`resize_patches`)."""
        tokens = cast(Any, self.backbone).forward_features(images)
        return resize_patches(tokens[:, self.prefix:], grid, mode, antialias)
