"""DINO's multi-crop on the device: every box sampled at once, every crop made in one launch per size."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..ops._crops import _pack, _resized_crops
from .boxes import sample_boxes

__all__ = ["MultiCrop", "CropParams", "IMAGENET_MEAN", "IMAGENET_STD"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class CropParams:
    """The random draws of one :class:`MultiCrop` call, crop-major (row ``k * B + b``: crop ``k`` of image ``b``).

    ``*_boxes``: ``[n * B, 5]`` float32 rows ``(image index, top, left, height, width)``, integer
    valued; ``*_flips``: ``[n * B]`` bool, True where the crop is flipped horizontally.
    ``sampled``: drawn by :meth:`MultiCrop.sample_params`, inside the images by construction, so
    :meth:`MultiCrop.apply` checks the boxes on the device (an assert, no host sync); other
    boxes are checked on the host, with a ``ValueError`` naming a bad one.
    """

    global_boxes: torch.Tensor
    global_flips: torch.Tensor
    local_boxes: torch.Tensor
    local_flips: torch.Tensor
    sampled: bool = False


def _image_sizes(images) -> tuple[torch.Tensor, torch.Tensor, torch.device]:
    """``(heights, widths, device)`` of a ``[B, C, H, W]`` tensor or a list of ``[C, H_i, W_i]`` tensors."""
    if isinstance(images, torch.Tensor):
        if images.dim() != 4 or 0 in images.shape:
            raise ValueError(f"MultiCrop: images must be a non-empty [B, C, H, W] tensor or a list of [C, H, W] "
                             f"tensors, got a tensor of shape {tuple(images.shape)}")
        B, _, H, W = images.shape
        full = lambda v: torch.full((B,), v, dtype=torch.int64, device=images.device)
        return full(H), full(W), images.device
    if not isinstance(images, Sequence) or len(images) == 0:
        raise ValueError(f"MultiCrop: images must be a [B, C, H, W] tensor or a non-empty list of [C, H, W] tensors, "
                         f"got {type(images).__name__}")
    for i, im in enumerate(images):
        if not isinstance(im, torch.Tensor) or im.dim() != 3 or 0 in im.shape:
            shape = tuple(im.shape) if isinstance(im, torch.Tensor) else type(im).__name__
            raise ValueError(f"MultiCrop: images[{i}] must be a non-empty [C, H, W] tensor, got {shape}")
    sizes = torch.tensor([im.shape[1:] for im in images], dtype=torch.int64)
    device = images[0].device
    sizes = sizes.to(device, non_blocking=True)
    return sizes[:, 0], sizes[:, 1], device


class MultiCrop(torch.nn.Module):
    """DINO's multi-crop: ``n_global`` large and ``n_local`` small random resized crops of every image, on its device.

    Each crop follows ``torchvision.transforms.RandomResizedCrop`` (up to 10 tries of an area
    fraction in ``scale`` and a log-uniform aspect ratio in ``ratio``, then the central crop)
    and ``RandomHorizontalFlip(flip_p)``; all boxes of a batch are drawn at once as tensor ops
    from ``generator``, so a seeded generator repeats a run. The crops are made by
    :func:`fastssl.ops.resized_crops`: one launch for the global crops, one for the local ones,
    resized with ``interpolation`` (DINO: bicubic) and normalised with ``mean``/``std``.

    Args:
        global_size, local_size: output sides of the global and local crops.
        n_global, n_local: crops per image of each kind (``n_local=0`` returns an empty locals tensor).
        global_scale, local_scale: ranges of a crop's area as a fraction of its image's.
        ratio: range of the aspect ratio (width / height).
        flip_p: probability of a horizontal flip, per crop.
        interpolation: ``"bicubic"`` (DINO's) or ``"bilinear"``.
        antialias: antialiased down-scaling, as torchvision's default and PIL.
        mean, std: per-channel normalisation applied to ``x / 255`` for uint8 images and to ``x``
            for floating ones; both None returns un-normalised crops (0..255 for uint8 images).
        out_dtype: float32, float16 or bfloat16 (uint8 when not normalising).
        channels_last: return the crops in channels-last memory format.

    Call with a ``[B, C, H, W]`` uint8 or floating tensor, or a list of ``[C, H_i, W_i]``
    tensors of different sizes (one device), and optionally a ``torch.Generator`` on that
    device. Returns ``(globals [n_global * B, C, global_size, global_size], locals [n_local * B,
    C, local_size, local_size])`` crop-major (rows ``k * B .. (k + 1) * B - 1`` are crop ``k`` of
    every image), the layout ``fastssl.DinoLoss`` expects; with ``return_params=True`` also the
    :class:`CropParams` drawn.
    """

    def __init__(self, global_size: int = 224, local_size: int = 96, n_global: int = 2, n_local: int = 8,
                 global_scale: Sequence[float] = (0.4, 1.0), local_scale: Sequence[float] = (0.05, 0.4),
                 ratio: Sequence[float] = (3 / 4, 4 / 3), flip_p: float = 0.5, *, interpolation: str = "bicubic",
                 antialias: bool = True, mean: Sequence[float] | None = IMAGENET_MEAN,
                 std: Sequence[float] | None = IMAGENET_STD, out_dtype: torch.dtype = torch.float32,
                 channels_last: bool = False):
        super().__init__()
        for name, v in (("global_size", global_size), ("local_size", local_size)):
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"MultiCrop: {name} must be a positive int, got {v!r}")
        for name, v in (("n_global", n_global), ("n_local", n_local)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"MultiCrop: {name} must be a non-negative int, got {v!r}")
        if not 0.0 <= flip_p <= 1.0:
            raise ValueError(f"MultiCrop: flip_p must be in [0, 1], got {flip_p}")
        # Validate the ranges now rather than at the first call.
        probe = torch.ones(1, dtype=torch.int64)
        for name, scale in (("global_scale", global_scale), ("local_scale", local_scale)):
            try:
                sample_boxes(probe, probe, 0, scale, ratio)
            except ValueError as exc:
                raise ValueError(f"MultiCrop: {name}/ratio: {exc}") from None
        self.global_size, self.local_size = global_size, local_size
        self.n_global, self.n_local = n_global, n_local
        self.global_scale, self.local_scale = tuple(global_scale), tuple(local_scale)
        self.ratio = tuple(ratio)
        self.flip_p = float(flip_p)
        self.interpolation, self.antialias = interpolation, bool(antialias)
        self.mean, self.std = mean, std
        self.out_dtype, self.channels_last = out_dtype, bool(channels_last)

    def extra_repr(self) -> str:
        return (f"global_size={self.global_size}, local_size={self.local_size}, n_global={self.n_global}, "
                f"n_local={self.n_local}, global_scale={self.global_scale}, local_scale={self.local_scale}, "
                f"ratio={tuple(round(r, 4) for r in self.ratio)}, flip_p={self.flip_p}, "
                f"interpolation={self.interpolation!r}")

    def sample_params(self, images, generator: torch.Generator | None = None) -> CropParams:
        """Draw the boxes and flips for ``images`` (a batch tensor or a list) without making the crops."""
        heights, widths, device = _image_sizes(images)
        B = heights.shape[0]
        g_boxes = sample_boxes(heights, widths, self.n_global, self.global_scale, self.ratio, generator=generator)
        l_boxes = sample_boxes(heights, widths, self.n_local, self.local_scale, self.ratio, generator=generator)
        flips = torch.rand((self.n_global + self.n_local) * B, generator=generator, device=device) < self.flip_p
        n = self.n_global * B
        return CropParams(g_boxes, flips[:n], l_boxes, flips[n:], sampled=True)

    def apply(self, images, params: CropParams) -> tuple[torch.Tensor, torch.Tensor]:
        """The crops of ``images`` for given :class:`CropParams`: ``(globals, locals)``."""
        # Packed once for both sizes; sampled boxes are checked on the device (see CropParams.sampled).
        packed = _pack(images)
        kw = dict(interpolation=self.interpolation, antialias=self.antialias, mean=self.mean, std=self.std,
                  out_dtype=self.out_dtype, channels_last=self.channels_last, check_on_host=not params.sampled)
        # Sampled boxes are crop-major: crops_per_image lets the GPU make them image by image.
        g = _resized_crops(packed, params.global_boxes, self.global_size, flips=params.global_flips,
                           crops_per_image=self.n_global if params.sampled else 0, **kw)
        loc = _resized_crops(packed, params.local_boxes, self.local_size, flips=params.local_flips,
                             crops_per_image=self.n_local if params.sampled else 0, **kw)
        return g, loc

    def forward(self, images, generator: torch.Generator | None = None, return_params: bool = False):
        params = self.sample_params(images, generator)
        g, loc = self.apply(images, params)
        return (g, loc, params) if return_params else (g, loc)
