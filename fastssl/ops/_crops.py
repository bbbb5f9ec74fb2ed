r"""Multi-crop: every crop of a batch cropped, resized, flipped and normalised in one kernel launch.

:func:`resized_crops` checks its arguments, packs the images into one flat buffer with
per-image offsets and shapes (so a list of images of different sizes, as GPU JPEG decoding
returns, needs no padding), and calls the C++/CUDA op ``torch.ops.fastssl.resized_crops``
(``csrc/``): ``at::parallel_for`` over crops on CPU, one launch for every crop on CUDA.

Each crop equals ``torchvision.transforms.v2.functional.resized_crop`` (that is
``torch.nn.functional.interpolate`` with ``align_corners=False``) on the same box: the
separable resize with the triangle (bilinear) or cubic (bicubic) filter; with ``antialias``
the filter widens by the scale when down-scaling (torch's ``_upsample_*_aa``, cubic
a = -0.5), without it the plain 2- or 4-tap filter with clamped edges (cubic a = -0.75).
The math is fp32. A fractional box samples the same continuous coordinates, its edges cut at
the pixels it overlaps. The formulas are in the header comment of ``csrc/resample.h``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from .. import _ext

__all__ = ["resized_crops"]

_IN_DTYPES = (torch.uint8, torch.float32, torch.float16, torch.bfloat16)
_OUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.uint8)
_INTERPOLATIONS = ("bilinear", "bicubic")
# Slack on "inside the image" for boxes computed in floating point.
_BOX_SLACK = 1e-3


class Packed(NamedTuple):
    """Images as one flat buffer: rows (offset, H, W) per image on its device and on the host."""

    data: torch.Tensor
    image_info: torch.Tensor
    info_host: torch.Tensor
    channels: int


def _check_image_elements(largest: int) -> None:
    if largest >= 2**31:
        raise ValueError(f"resized_crops: an image has {largest} elements (C*H*W); the kernels index inside one "
                         "image with 32-bit offsets, so each image must have fewer than 2**31")


def _pack(images) -> Packed:
    """The images (a batch tensor or a list of [C, H, W] tensors) as one flat buffer."""
    if isinstance(images, torch.Tensor):
        if images.dim() == 3:
            images = images.unsqueeze(0)
        if images.dim() != 4:
            raise ValueError(f"resized_crops: images must be a [B, C, H, W] tensor or a list of [C, H, W] tensors, "
                             f"got a tensor of shape {tuple(images.shape)}")
        B, C, H, W = images.shape
        if B == 0 or C == 0 or H == 0 or W == 0:
            raise ValueError(f"resized_crops: images has an empty dimension: {tuple(images.shape)}")
        _check_image_elements(C * H * W)
        data = images.contiguous().view(-1)
        info = [(b * C * H * W, H, W) for b in range(B)]
    else:
        if not isinstance(images, Sequence) or len(images) == 0:
            raise ValueError("resized_crops: images must be a [B, C, H, W] tensor or a non-empty list of [C, H, W] "
                             f"tensors, got {type(images).__name__}"
                             + (" of length 0" if isinstance(images, Sequence) else ""))
        for i, im in enumerate(images):
            if not isinstance(im, torch.Tensor) or im.dim() != 3 or 0 in im.shape:
                shape = tuple(im.shape) if isinstance(im, torch.Tensor) else type(im).__name__
                raise ValueError(f"resized_crops: images[{i}] must be a non-empty [C, H, W] tensor, got {shape}")
        C, dtype, device = images[0].shape[0], images[0].dtype, images[0].device
        for i, im in enumerate(images):
            if im.shape[0] != C:
                raise ValueError(f"resized_crops: images[{i}] has {im.shape[0]} channels but images[0] has {C} "
                                 f"(shapes {tuple(images[0].shape)} and {tuple(im.shape)})")
            if im.dtype != dtype or im.device != device:
                raise ValueError(f"resized_crops: images[{i}] is {im.dtype} on {im.device} but images[0] is {dtype} "
                                 f"on {device}")
        _check_image_elements(max(im.numel() for im in images))
        data = torch.cat([im.reshape(-1) for im in images])
        info, offset = [], 0
        for im in images:
            info.append((offset, im.shape[1], im.shape[2]))
            offset += im.numel()
    if data.dtype == torch.float64:
        data = data.float()
    if data.dtype not in _IN_DTYPES:
        raise ValueError(f"resized_crops: images must be uint8 or floating point, got {data.dtype}")
    info_host = torch.tensor(info, dtype=torch.int64)
    return Packed(data, info_host.to(data.device, non_blocking=True), info_host, int(C))


def _per_channel(name: str, value, C: int, device: torch.device) -> torch.Tensor | None:
    if value is None:
        return None
    t = torch.as_tensor(value, dtype=torch.float32).reshape(-1)
    if t.numel() == 1 and C != 1:
        t = t.expand(C)
    if t.numel() != C:
        raise ValueError(f"resized_crops: {name} must have one value per channel (C={C}), got shape "
                         f"{tuple(torch.as_tensor(value).shape)}")
    if name == "std":
        if torch.compiler.is_compiling():  # traced: checked on the device
            torch._assert_async((t != 0).all(), "resized_crops: std must be non-zero")
        elif isinstance(value, (int, float, list, tuple)):  # host numbers: checked as such, no tensor read
            if 0 in (value if isinstance(value, (list, tuple)) else [value]):
                raise ValueError(f"resized_crops: std must be non-zero, got {t.tolist()}")
        elif bool((t == 0).any()):  # a host sync only for a std given on a GPU
            raise ValueError(f"resized_crops: std must be non-zero, got {t.tolist()}")
    return t.to(device).contiguous()


def _check_box_values(boxes: torch.Tensor, info: torch.Tensor) -> None:
    """Every box inside its image, with positive sides and a valid image index (host-side check;
    ``info`` the images' layout on the host)."""
    b = boxes.detach().to("cpu", torch.float64)
    B = info.shape[0]
    idx = b[:, 0]
    bad = (idx < 0) | (idx >= B) | (idx != idx.floor())
    if bad.any():
        n = int(bad.nonzero()[0])
        raise ValueError(f"resized_crops: boxes[{n}] has image index {idx[n].item():g}, out of range for {B} images")
    bad = ~(b[:, 3] > 0) | ~(b[:, 4] > 0)  # NaN sides too
    if bad.any():
        n = int(bad.nonzero()[0])
        raise ValueError(f"resized_crops: boxes[{n}] has a non-positive side: height={b[n, 3].item():g}, "
                         f"width={b[n, 4].item():g}")
    hw = info[idx.long(), 1:].double()
    # A box starts inside its image (a tiny box at top = H would read row H) and ends within the slack.
    bad = ~((b[:, 1] >= 0) & (b[:, 2] >= 0) & (b[:, 1] < hw[:, 0]) & (b[:, 2] < hw[:, 1]) &
            (b[:, 1] + b[:, 3] <= hw[:, 0] + _BOX_SLACK) & (b[:, 2] + b[:, 4] <= hw[:, 1] + _BOX_SLACK))
    if bad.any():
        n = int(bad.nonzero()[0])
        top, left, h, w = (v.item() for v in b[n, 1:])
        raise ValueError(f"resized_crops: boxes[{n}] (top={top:g}, left={left:g}, height={h:g}, width={w:g}) is "
                         f"outside its image {int(idx[n])} of height {int(hw[n, 0])} and width {int(hw[n, 1])}")


def _assert_box_values_async(boxes: torch.Tensor, image_info: torch.Tensor) -> None:
    """The same conditions as :func:`_check_box_values` as tensor ops, for traced code: an assert on the
    boxes' device (no host sync; on CUDA a device-side assert), so bad boxes fail instead of reading
    clamped pixels."""
    info = image_info.to(boxes.device)
    idx = boxes[:, 0]
    valid_idx = (idx >= 0) & (idx < info.shape[0]) & (idx == idx.floor())
    hw = info[idx.long().clamp(0, info.shape[0] - 1), 1:].to(boxes.dtype)  # clamped only to read; judged above
    ok = valid_idx & (boxes[:, 3] > 0) & (boxes[:, 4] > 0) & (boxes[:, 1] >= 0) & (boxes[:, 2] >= 0) & \
        (boxes[:, 1] < hw[:, 0]) & (boxes[:, 2] < hw[:, 1]) & \
        (boxes[:, 1] + boxes[:, 3] <= hw[:, 0] + _BOX_SLACK) & (boxes[:, 2] + boxes[:, 4] <= hw[:, 1] + _BOX_SLACK)
    torch._assert_async(ok.all(), "resized_crops: a box is outside its image, has a non-positive side or an "
                        "out-of-range image index (checked on the device under torch.compile; run eagerly to be told "
                        "which)")


def resized_crops(images: torch.Tensor | Sequence[torch.Tensor], boxes: torch.Tensor, size: int, *,
                  flips: torch.Tensor | None = None, interpolation: str = "bilinear", antialias: bool = True,
                  mean: Sequence[float] | torch.Tensor | None = None, std: Sequence[float] | torch.Tensor | None = None,
                  out_dtype: torch.dtype = torch.float32, channels_last: bool = False) -> torch.Tensor:
    """Crop, resize, flip and normalise many crops of many images in one kernel launch.

    Args:
        images: a ``[B, C, H, W]`` tensor, or a list of ``[C, H_i, W_i]`` tensors of different
            sizes (one dtype and device); uint8 or floating point (float64 is computed in fp32).
        boxes: ``[N, 5]`` rows ``(image index, top, left, height, width)`` in pixels, one output
            crop per row; fractional values are allowed. Moved to the images' device.
        size: the side of the square output crops.
        flips: optional ``[N]`` bool; where True the crop is flipped horizontally.
        interpolation: ``"bilinear"`` or ``"bicubic"`` (a torchvision ``InterpolationMode`` works too).
        antialias: widen the filter when down-scaling, as torchvision's ``antialias=True``.
        mean, std: optional per-channel values (C of them, or one for all). When either is given
            the output is ``(x / 255 - mean) / std`` for uint8 images and ``(x - mean) / std``
            for floating ones (a missing mean is 0, a missing std 1). Without them the output is
            the resampled image on its own scale (0..255 for uint8 images).
        out_dtype: float32 (default), float16, bfloat16, or uint8 (rounded and clamped to
            0..255, without normalisation only). Floating output is not clamped (bicubic
            overshoots, as torchvision's float path).
        channels_last: return the crops in channels-last memory format.

    Returns:
        ``[N, C, size, size]`` crops on the images' device.

    Each crop matches ``torchvision.transforms.v2.functional.resized_crop(image, top, left,
    height, width, [size, size], interpolation, antialias=antialias)`` of the float image
    (then rounded and clamped for uint8 output) to fp32 rounding, as torchvision computes on
    CUDA. uint8 images to uint8 crops on CPU (no mean/std) instead take torch's fixed-point
    path, which torchvision runs for uint8 images on CPU: int16 weights, the horizontal pass
    rounded and clamped to uint8 before the vertical one (``csrc/resample_uint8.h``); for
    integer boxes the crops then equal torchvision's exactly.
    """
    return _resized_crops(_pack(images), boxes, size, flips=flips, interpolation=interpolation, antialias=antialias,
                          mean=mean, std=std, out_dtype=out_dtype, channels_last=channels_last, check_on_host=True)


def _resized_crops(packed: Packed, boxes, size, *, flips, interpolation, antialias, mean, std, out_dtype,
                   channels_last, check_on_host: bool, crops_per_image: int = 0,
                   program: str | None = None) -> torch.Tensor:
    """:func:`resized_crops` of packed images. ``check_on_host=False`` (boxes valid by construction,
    e.g. ``MultiCrop``'s) checks the box values on the device instead: a device-side assert rather
    than a ValueError naming the box, and no host sync. ``crops_per_image=K > 0`` says the boxes are
    crop-major (box ``k * N / K + i`` is crop k of image i, as MultiCrop samples them): the CUDA kernel
    then makes them image by image, each image read once into L2. ``program`` ("pixel" or "tiled") runs
    that GPU program of ``csrc/crop_programs.h``: on CUDA for the benchmark, emulated on CPU for the tests."""
    data, image_info, C = packed.data, packed.image_info, packed.channels
    device = data.device
    if hasattr(interpolation, "value"):  # torchvision's InterpolationMode
        interpolation = interpolation.value
    if interpolation not in _INTERPOLATIONS:
        raise ValueError(f"resized_crops: interpolation must be one of {_INTERPOLATIONS}, got {interpolation!r}")
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
        raise ValueError(f"resized_crops: size must be a positive int, got {size!r}")
    if out_dtype not in _OUT_DTYPES:
        raise ValueError(f"resized_crops: out_dtype must be one of {_OUT_DTYPES}, got {out_dtype}")
    boxes = torch.as_tensor(boxes)
    if boxes.dim() != 2 or boxes.shape[1] != 5:
        raise ValueError(f"resized_crops: boxes must be [N, 5] rows (image index, top, left, height, width), got "
                         f"shape {tuple(boxes.shape)}")
    if boxes.is_complex() or boxes.dtype == torch.bool:
        raise ValueError(f"resized_crops: boxes must be real numbers, got {boxes.dtype}")
    N = boxes.shape[0]
    if flips is not None:
        flips = torch.as_tensor(flips)
        if flips.shape != (N,):
            raise ValueError(f"resized_crops: flips must be [N] with N={N} (one per box), got {tuple(flips.shape)}")
        flips = flips.to(device=device, dtype=torch.bool).contiguous()
    if out_dtype == torch.uint8 and (mean is not None or std is not None):
        raise ValueError("resized_crops: out_dtype=torch.uint8 cannot hold normalised values; drop mean/std or use a "
                         "floating out_dtype")
    mean_t = _per_channel("mean", mean, C, device)
    std_t = _per_channel("std", std, C, device)
    normalise = mean_t is not None or std_t is not None
    input_scale = 1.0 / 255.0 if normalise and data.dtype == torch.uint8 else 1.0
    boxes = boxes.to(dtype=torch.float32)
    # check_on_host=False: the device-side check on a CPU too, so that the CPU path reads nothing, as the GPU's.
    on_host = not torch.compiler.is_compiling() and check_on_host
    if on_host:
        _check_box_values(boxes, packed.info_host)  # a sync when the boxes are on a GPU
    boxes = boxes.to(device=device).contiguous()
    if not on_host:
        _assert_box_values_async(boxes, image_info)
    if _ext.loaded() is None:
        _load_op()
    args = (data, image_info, boxes, flips, C, size, interpolation, bool(antialias), mean_t, std_t, input_scale,
            out_dtype, bool(channels_last), int(crops_per_image))
    if program is not None:
        return torch.ops.fastssl._resized_crops_program(*args, program)
    return torch.ops.fastssl.resized_crops(*args)


@torch.compiler.disable
def _load_op() -> None:
    """Load the extension, building it on first use if it was not installed (a graph break when traced)."""
    _ext.load_extension()


# An installed build is loaded now (an import: no compiler), so that the first call may be inside
# torch.compile(fullgraph=True); without one, the first (eager) call builds it.
_ext.load_installed_extension()
