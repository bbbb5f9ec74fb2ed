"""Per-sample colour and blur ops on a batch of float images ``[N, C, H, W]`` in [0, 1], no loop over samples.

Each op takes one parameter per sample (an ``[N]`` tensor) and gives, on every sample, what the
torchvision functional op of the same name gives on that sample alone
(``torchvision.transforms.v2.functional``, float definitions, to fp32 rounding):

* ``adjust_brightness``: ``clamp(f * x, 0, 1)``;
* ``adjust_saturation``: ``clamp(f * x + (1 - f) * gray(x), 0, 1)``;
* ``adjust_contrast``: ``clamp(f * x + (1 - f) * mean(gray(x)), 0, 1)``, the mean over the sample;
* ``adjust_hue``: RGB to HSV, hue shifted by ``f`` modulo 1, back to RGB;
* ``rgb_to_grayscale``: ``0.2989 R + 0.587 G + 0.114 B`` (ITU-R 601-2 luma), repeated over channels;
* ``gaussian_blur``: a normalised Gaussian of ``kernel_size`` taps at ``sigma``, reflect padding;
* ``solarize``: ``1 - x`` where ``x >= threshold``.
"""

from __future__ import annotations

import torch

__all__ = ["adjust_brightness", "adjust_contrast", "adjust_saturation", "adjust_hue", "rgb_to_grayscale",
           "gaussian_blur", "solarize", "blur_kernel_size"]

_LUMA = (0.2989, 0.587, 0.114)


def _per_sample(factor, x: torch.Tensor) -> torch.Tensor:
    """A scalar or an ``[N]`` tensor as ``[N, 1, 1, 1]`` on x's device and dtype."""
    f = torch.as_tensor(factor, dtype=x.dtype, device=x.device)
    if f.dim() == 0:
        f = f.expand(x.shape[0])
    if f.shape != (x.shape[0],):
        raise ValueError(f"expected one factor per sample ({x.shape[0]}), got shape {tuple(f.shape)}")
    return f.view(-1, 1, 1, 1)


def _check_rgb(x: torch.Tensor, what: str) -> None:
    if x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"{what}: expected float RGB images [N, 3, H, W], got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{what}: expected a floating point tensor in [0, 1], got {x.dtype}")


def rgb_to_grayscale(x: torch.Tensor, num_output_channels: int = 1) -> torch.Tensor:
    """Luma of ``[N, 3, H, W]`` images: ``[N, num_output_channels, H, W]``."""
    _check_rgb(x, "rgb_to_grayscale")
    r, g, b = x.unbind(dim=1)
    gray = (r * _LUMA[0] + g * _LUMA[1] + b * _LUMA[2]).unsqueeze(1)
    return gray.expand(-1, num_output_channels, -1, -1) if num_output_channels != 1 else gray


def _blend(x: torch.Tensor, other: torch.Tensor | float, f: torch.Tensor) -> torch.Tensor:
    return (x * f + other * (1.0 - f)).clamp_(0.0, 1.0)


def adjust_brightness(x: torch.Tensor, factor) -> torch.Tensor:
    """Per-sample brightness: ``clamp(factor * x, 0, 1)``."""
    return (x * _per_sample(factor, x)).clamp_(0.0, 1.0)


def adjust_saturation(x: torch.Tensor, factor) -> torch.Tensor:
    """Per-sample saturation: blend with the sample's grayscale image (0 gives gray, 1 the input)."""
    _check_rgb(x, "adjust_saturation")
    return _blend(x, rgb_to_grayscale(x), _per_sample(factor, x))


def adjust_contrast(x: torch.Tensor, factor) -> torch.Tensor:
    """Per-sample contrast: blend with the mean of the sample's grayscale image."""
    _check_rgb(x, "adjust_contrast")
    mean = rgb_to_grayscale(x).mean(dim=(1, 2, 3), keepdim=True)
    return _blend(x, mean, _per_sample(factor, x))


def _rgb_to_hsv(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r, g, b = x.unbind(dim=1)
    v, _ = x.max(dim=1)
    c = v - x.min(dim=1)[0]  # chroma
    gray = c == 0
    s = c / torch.where(gray, torch.ones_like(v), v)
    d = torch.where(gray, torch.ones_like(c), c)
    # Hue in sixths: which channel is the maximum decides the sector (R first, then G, as torchvision).
    h = torch.where(v == r, (g - b) / d, torch.where(v == g, (b - r) / d + 2.0, (r - g) / d + 4.0))
    h = torch.where(gray, torch.zeros_like(h), h)
    h = torch.remainder(h / 6.0, 1.0)
    return h, s, v


def _hsv_to_rgb(h: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    h6 = h * 6.0
    sector = torch.floor(h6)
    f = h6 - sector
    sector = torch.remainder(sector, 6.0)
    p = (v * (1.0 - s)).clamp_(0.0, 1.0)
    q = (v * (1.0 - s * f)).clamp_(0.0, 1.0)
    t = (v * (1.0 - s * (1.0 - f))).clamp_(0.0, 1.0)

    # (R, G, B) of sectors 0..5: (v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q).
    def pick(*vals):
        out = vals[5]
        for k in range(4, -1, -1):
            out = torch.where(sector == k, vals[k], out)
        return out

    red = pick(v, q, p, p, t, v)
    green = pick(t, v, v, q, p, p)
    blue = pick(p, p, t, v, v, q)
    return torch.stack((red, green, blue), dim=1)


def adjust_hue(x: torch.Tensor, factor) -> torch.Tensor:
    """Per-sample hue shift by ``factor`` (in [-0.5, 0.5], a fraction of the hue circle) through HSV."""
    _check_rgb(x, "adjust_hue")
    f = _per_sample(factor, x).view(-1, 1, 1)
    h, s, v = _rgb_to_hsv(x)
    return _hsv_to_rgb(torch.remainder(h + f, 1.0), s, v)


def blur_kernel_size(sigma: torch.Tensor, sigmas: float = 3.0) -> torch.Tensor:
    """The odd kernel size covering ``+- sigmas * sigma``: ``2 * ceil(sigmas * sigma) + 1`` per sample (int64)."""
    return 2 * torch.ceil(sigmas * sigma.double()).long() + 1


def gaussian_blur(x: torch.Tensor, sigma, kernel_size, *, k_max: int | None = None) -> torch.Tensor:
    """Per-sample Gaussian blur with per-sample odd ``kernel_size`` and ``sigma`` (``[N]`` tensors or scalars).

    ``k_max``: an upper bound of the kernel sizes known to the caller; the sizes are then checked on
    the device (an assert, no host sync) instead of read back to size the convolution.

    Sample ``n`` equals ``torchvision.transforms.v2.functional.gaussian_blur(x[n], [k, k], [s, s])``:
    taps at integer offsets ``-k//2 .. k//2`` weighted ``exp(-t^2 / (2 s^2))``, normalised, applied
    separably with reflect padding. A ``kernel_size`` of 1 leaves the sample unchanged. Kernels of
    different sizes share one grouped convolution: each is zero-padded to the largest, which reads
    the same pixels since reflect padding of a smaller radius is a prefix of a larger one.
    """
    if x.dim() != 4 or not x.is_floating_point():
        raise ValueError(f"gaussian_blur: expected float images [N, C, H, W], got {x.dtype} {tuple(x.shape)}")
    N, C, H, W = x.shape
    k = torch.as_tensor(kernel_size, device=x.device).long().reshape(-1).expand(N)
    s = torch.as_tensor(sigma, device=x.device, dtype=torch.float32).reshape(-1).expand(N)
    if N == 0:
        return x.clone()
    if k_max is None:
        k_max = int(k.max())
        if bool(((k % 2) == 0).any()) or int(k.min()) < 1:
            raise ValueError(f"gaussian_blur: kernel sizes must be odd and positive, got {k.tolist()}")
    else:
        if isinstance(k_max, bool) or not isinstance(k_max, int) or k_max < 1 or k_max % 2 == 0:
            raise ValueError(f"gaussian_blur: k_max must be an odd positive int, got {k_max!r}")
        torch._assert_async(((k % 2 == 1) & (k >= 1) & (k <= k_max)).all(),
                            f"gaussian_blur: kernel sizes must be odd, positive and at most k_max={k_max}")
    r = k_max // 2
    if r >= min(H, W):
        raise ValueError(f"gaussian_blur: kernel size {k_max} needs images larger than {r} pixels, got {H}x{W}")
    if r == 0:
        return x.clone()
    t = torch.arange(-r, r + 1, device=x.device, dtype=torch.float32)
    inside = t.abs().unsqueeze(0) <= (k // 2).unsqueeze(1)  # [N, 2r+1]
    pdf = torch.exp(-0.5 * (t.unsqueeze(0) / s.unsqueeze(1)) ** 2) * inside
    kernel = (pdf / pdf.sum(dim=1, keepdim=True)).to(x.dtype)  # [N, K]
    weight = kernel.repeat_interleave(C, dim=0)  # one kernel per (sample, channel) group
    y = torch.nn.functional.pad(x, (r, r, r, r), mode="reflect").reshape(1, N * C, H + 2 * r, W + 2 * r)
    y = torch.nn.functional.conv2d(y, weight.view(N * C, 1, 1, -1), groups=N * C)
    y = torch.nn.functional.conv2d(y, weight.view(N * C, 1, -1, 1), groups=N * C)
    return y.view(N, C, H, W)


def solarize(x: torch.Tensor, apply, threshold: float = 0.5) -> torch.Tensor:
    """``1 - x`` where ``x >= threshold`` in the samples where ``apply`` (an ``[N]`` bool tensor or bool) holds."""
    a = torch.as_tensor(apply, device=x.device, dtype=torch.bool)
    a = a.expand(x.shape[0]).view(-1, 1, 1, 1) if a.dim() <= 1 else a
    return torch.where(a & (x >= threshold), 1.0 - x, x)
