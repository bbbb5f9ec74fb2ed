"""Vectorised ``RandomResizedCrop`` boxes: every (crop, image) pair sampled at once on the device.

The rule is torchvision's ``RandomResizedCrop.get_params``: up to ``tries`` draws of an area
fraction (uniform in ``scale``) and an aspect ratio (log-uniform in ``ratio``), giving
``w = round(sqrt(area * ratio))`` and ``h = round(sqrt(area / ratio))``; the first draw with
``0 < w <= W`` and ``0 < h <= H`` wins and its top-left corner is uniform over the valid
integer positions. When no draw fits, the central crop with the aspect ratio clamped to
``ratio``. Here all tries are drawn up front as tensors and the first valid one is selected,
so no Python loop runs per crop or per try (the random streams differ from torchvision's).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = ["sample_boxes"]


def _check_range(name: str, value: Sequence[float], positive: bool) -> tuple[float, float]:
    if len(value) != 2:
        raise ValueError(f"{name} must be a (min, max) pair, got {value!r}")
    lo, hi = float(value[0]), float(value[1])
    if not lo <= hi or (positive and lo <= 0) or (not positive and lo < 0):
        raise ValueError(f"{name} must satisfy {'0 <' if positive else '0 <='} min <= max, got {value!r}")
    return lo, hi


def sample_boxes(heights: torch.Tensor, widths: torch.Tensor, n_crops: int, scale: Sequence[float],
                 ratio: Sequence[float], *, tries: int = 10, generator: torch.Generator | None = None
                 ) -> torch.Tensor:
    """``n_crops`` random resized-crop boxes per image, crop-major.

    Args:
        heights, widths: ``[B]`` integer tensors, the images' sizes (on the device to sample on).
        n_crops: crops per image.
        scale: range of the crop's area as a fraction of the image's.
        ratio: range of the crop's aspect ratio (width / height), sampled log-uniformly.
        tries: draws per crop before falling back to the central crop (torchvision: 10).
        generator: the random source (on the tensors' device); None for torch's default.

    Returns:
        ``[n_crops * B, 5]`` float32 rows ``(image index, top, left, height, width)`` with integer
        values, row ``k * B + b`` being crop ``k`` of image ``b`` (the layout of
        :func:`fastssl.ops.resized_crops`).
    """
    lo_s, hi_s = _check_range("scale", scale, positive=False)
    lo_r, hi_r = _check_range("ratio", ratio, positive=True)
    if n_crops < 0 or tries < 1:
        raise ValueError(f"n_crops must be >= 0 and tries >= 1, got {n_crops} and {tries}")
    device = heights.device
    B = heights.shape[0]
    M = n_crops * B
    H = heights.to(torch.float64).repeat(n_crops)  # [M], crop-major
    W = widths.to(torch.float64).repeat(n_crops)
    img = torch.arange(B, device=device).repeat(n_crops)

    def uniform(*shape):
        return torch.rand(*shape, generator=generator, device=device, dtype=torch.float64)

    area = (H * W).unsqueeze(1) * (lo_s + (hi_s - lo_s) * uniform(M, tries))
    log_lo, log_hi = math.log(lo_r), math.log(hi_r)
    aspect = torch.exp(log_lo + (log_hi - log_lo) * uniform(M, tries))
    w = torch.round(torch.sqrt(area * aspect))
    h = torch.round(torch.sqrt(area / aspect))
    valid = (w > 0) & (w <= W.unsqueeze(1)) & (h > 0) & (h <= H.unsqueeze(1))
    # The first valid try: argmax of a bool picks the first True.
    first = valid.to(torch.uint8).argmax(dim=1, keepdim=True)
    found = valid.any(dim=1)
    w = w.gather(1, first).squeeze(1)
    h = h.gather(1, first).squeeze(1)

    # The fallback: the central crop, aspect ratio clamped to the range.
    in_ratio = W / H
    fw = torch.where(in_ratio < lo_r, W, torch.where(in_ratio > hi_r, torch.round(H * hi_r), W))
    fh = torch.where(in_ratio < lo_r, torch.round(W / lo_r), H)
    fw, fh = fw.clamp(min=1), fh.clamp(min=1)
    h = torch.where(found, h, fh)
    w = torch.where(found, w, fw)
    # Top-left: uniform integers in [0, H - h] and [0, W - w]; centred for the fallback.
    u = uniform(M, 2)
    top = torch.where(found, torch.floor(u[:, 0] * (H - h + 1)).clamp(max=H - h), torch.div(H - h, 2).floor())
    left = torch.where(found, torch.floor(u[:, 1] * (W - w + 1)).clamp(max=W - w), torch.div(W - w, 2).floor())
    return torch.stack([img.to(torch.float64), top, left, h, w], dim=1).to(torch.float32)
