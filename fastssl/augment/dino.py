"""The DINO authors' per-crop augmentation (``DataAugmentationDINO``, main_dino.py) for a batch on the device."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..ops._color import dino_color_u8
from . import functional as F
from .multicrop import IMAGENET_MEAN, IMAGENET_STD, CropParams, MultiCrop

__all__ = ["DinoAugment", "DinoParams", "ColorParams", "JITTER_OPS"]

# torchvision's ColorJitter numbering of its four ops (the values in ColorParams.order).
JITTER_OPS = ("brightness", "contrast", "saturation", "hue")


@dataclass
class ColorParams:
    """Per-crop draws of the colour pipeline, one row per crop (``[N]`` tensors unless noted).

    ``jitter``: ColorJitter applied; ``order``: ``[N, 4]`` the order of its ops (indices into
    :data:`JITTER_OPS`); ``brightness``, ``contrast``, ``saturation``, ``hue``: their factors;
    ``grayscale``: RandomGrayscale applied; ``blur``: Gaussian blur applied, with ``sigma`` and the
    odd ``kernel_size`` (1 where not applied); ``solarize``: solarisation applied.
    """

    jitter: torch.Tensor
    order: torch.Tensor
    brightness: torch.Tensor
    contrast: torch.Tensor
    saturation: torch.Tensor
    hue: torch.Tensor
    grayscale: torch.Tensor
    blur: torch.Tensor
    sigma: torch.Tensor
    kernel_size: torch.Tensor
    solarize: torch.Tensor


@dataclass
class DinoParams:
    """Everything :class:`DinoAugment` draws for one batch: the crops and each kind's colour parameters."""

    crops: CropParams
    global_color: ColorParams
    local_color: ColorParams


def _uint8_on_cpu(images) -> bool:
    """A uint8 batch (or list) on the CPU: the 8-bit pipeline takes it."""
    first = images if isinstance(images, torch.Tensor) else images[0] if len(images) else None
    return isinstance(first, torch.Tensor) and first.dtype == torch.uint8 and first.device.type == "cpu"


def _probabilities(name: str, p, n: int) -> tuple[float, ...]:
    values = (float(p),) * n if isinstance(p, (int, float)) else tuple(float(v) for v in p)
    if len(values) != n or not all(0.0 <= v <= 1.0 for v in values):
        raise ValueError(f"DinoAugment: {name} must be one probability in [0, 1] or {n} of them, got {p!r}")
    return values


class DinoAugment(torch.nn.Module):
    """DINO's multi-crop augmentation for a batch on its device, every crop with its own random parameters.

    Per crop, in the authors' order (``DataAugmentationDINO``, Caron et al. 2021):
    ``RandomResizedCrop`` (bicubic) and a horizontal flip (:class:`MultiCrop`); ``ColorJitter(0.4,
    0.4, 0.2, 0.1)`` with probability ``jitter_p`` and its four ops in a random order per crop;
    ``RandomGrayscale(0.2)``; a Gaussian blur with sigma uniform in ``blur_sigma`` with probability
    1.0 for the first global crop, 0.1 for the second and 0.5 for the locals; solarisation
    (threshold 0.5, i.e. 128 on 0..255) with probability 0.2 on the second global crop only; then
    ``Normalize(mean, std)``. Each step is the torchvision functional op of that name on float
    images in [0, 1] (:mod:`fastssl.augment.functional`), run for all crops of a kind at once.

    On the CPU, uint8 images take an 8-bit pipeline, as the authors' PIL one (and as fast per
    core, for ``DataLoader`` workers): the crops are resampled to uint8 (torchvision's fixed-point
    path, as PIL's resize), and each colour step works on 8-bit values with PIL's arithmetic
    (``Image.blend``'s truncation, PIL's luma and HSV conversions, the 8-bit hue shift), one
    C++ pass per crop (``csrc/dino_color.cpp``), normalised once into float32. Its tests hold
    each step within one level of PIL's. Everywhere else (GPUs, float images) every step is the
    float definition: the crops are resampled into floats and clamped to [0, 1], with no rounding
    to 8 bits between steps. CPU and GPU results of the same parameters may therefore differ by
    about one level (1/255) per step. In both, the blur is the tensor definition, a Gaussian of an
    odd ``2 * ceil(3 * sigma) + 1`` taps (covering +-3 sigma) with reflect padding, which
    ``torchvision.transforms.v2.functional.gaussian_blur`` with that kernel size reproduces; PIL's
    ``GaussianBlur(radius=sigma)`` approximates it with box filters. ``blur_kernel_size=9`` gives
    DINOv2's fixed kernel.

    Args:
        global_size, local_size, n_local, global_scale, local_scale, ratio, flip_p, interpolation:
            as :class:`MultiCrop` (``n_global`` is ``len(global_blur_p)``).
        brightness, contrast, saturation, hue: ColorJitter strengths (factors uniform in
            ``[max(0, 1 - s), 1 + s]``, hue in ``[-hue, hue]``).
        jitter_p, grayscale_p: probabilities of ColorJitter and RandomGrayscale.
        global_blur_p, local_blur_p: blur probability per global crop, and for every local crop.
        blur_sigma: range of sigma.
        blur_kernel_size: None for ``2 * ceil(3 * sigma) + 1`` per crop, or one odd size for all.
        global_solarize_p, local_solarize_p: solarisation probabilities, as the blur's.
        mean, std: the final normalisation.

    Call with a ``[B, 3, H, W]`` uint8 tensor (or floats in [0, 1]), or a list of ``[3, H_i, W_i]``
    tensors, and optionally a ``torch.Generator`` on their device; returns ``(globals
    [n_global * B, 3, global_size, global_size], locals [n_local * B, 3, local_size, local_size])``
    crop-major, plus the :class:`DinoParams` with ``return_params=True``. ``sample_params`` and
    ``apply`` split the two steps.
    """

    def __init__(self, global_size: int = 224, local_size: int = 96, n_local: int = 8,
                 global_scale: Sequence[float] = (0.4, 1.0), local_scale: Sequence[float] = (0.05, 0.4),
                 ratio: Sequence[float] = (3 / 4, 4 / 3), flip_p: float = 0.5, *, brightness: float = 0.4,
                 contrast: float = 0.4, saturation: float = 0.2, hue: float = 0.1, jitter_p: float = 0.8,
                 grayscale_p: float = 0.2, global_blur_p: Sequence[float] = (1.0, 0.1), local_blur_p: float = 0.5,
                 blur_sigma: Sequence[float] = (0.1, 2.0), blur_kernel_size: int | None = None,
                 global_solarize_p: Sequence[float] = (0.0, 0.2), local_solarize_p: float = 0.0,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                 interpolation: str = "bicubic"):
        super().__init__()
        n_global = len(global_blur_p)
        # Crops in [0, 1]: x / 255 for uint8 images, as they are for floats.
        self.multicrop = MultiCrop(global_size, local_size, n_global, n_local, global_scale, local_scale, ratio,
                                   flip_p, interpolation=interpolation, mean=0.0, std=1.0)
        # The same crops as uint8 (rounded and clamped, as PIL's resize), for the CPU's 8-bit pipeline.
        self._multicrop_u8 = MultiCrop(global_size, local_size, n_global, n_local, global_scale, local_scale, ratio,
                                       flip_p, interpolation=interpolation, mean=None, std=None, out_dtype=torch.uint8)
        for name, v in (("brightness", brightness), ("contrast", contrast), ("saturation", saturation)):
            if v < 0:
                raise ValueError(f"DinoAugment: {name} must be non-negative, got {v}")
        if not 0.0 <= hue <= 0.5:
            raise ValueError(f"DinoAugment: hue must be in [0, 0.5], got {hue}")
        self.ranges = {"brightness": (max(0.0, 1 - brightness), 1 + brightness),
                       "contrast": (max(0.0, 1 - contrast), 1 + contrast),
                       "saturation": (max(0.0, 1 - saturation), 1 + saturation), "hue": (-hue, hue)}
        self.jitter_p = _probabilities("jitter_p", jitter_p, 1)[0]
        self.grayscale_p = _probabilities("grayscale_p", grayscale_p, 1)[0]
        self.global_blur_p = _probabilities("global_blur_p", global_blur_p, n_global)
        self.local_blur_p = _probabilities("local_blur_p", local_blur_p, 1)[0]
        self.global_solarize_p = _probabilities("global_solarize_p", global_solarize_p, n_global)
        self.local_solarize_p = _probabilities("local_solarize_p", local_solarize_p, 1)[0]
        lo, hi = (float(v) for v in blur_sigma)
        if not 0 < lo <= hi:
            raise ValueError(f"DinoAugment: blur_sigma must be a range 0 < min <= max, got {blur_sigma!r}")
        self.blur_sigma = (lo, hi)
        if blur_kernel_size is not None and (blur_kernel_size < 1 or blur_kernel_size % 2 == 0):
            raise ValueError(f"DinoAugment: blur_kernel_size must be None or an odd positive int, got "
                             f"{blur_kernel_size!r}")
        self.blur_kernel_size = blur_kernel_size
        # The largest kernel a crop can draw: the sigmas are drawn in fp32, so bound them in fp32 too.
        self.blur_k_max = blur_kernel_size or int(F.blur_kernel_size(torch.tensor([hi], dtype=torch.float32)))
        self.mean, self.std = tuple(mean), tuple(std)

    @property
    def n_global(self) -> int:
        return self.multicrop.n_global

    # ------------------------------------------------------------------------- parameters

    def _color_params(self, blur_p: torch.Tensor, solarize_p: torch.Tensor, generator) -> ColorParams:
        N, device = blur_p.shape[0], blur_p.device

        def rand(*shape):
            return torch.rand(*shape, generator=generator, device=device)

        def uniform(name):
            lo, hi = self.ranges[name]
            return lo + (hi - lo) * rand(N)

        jitter = rand(N) < self.jitter_p
        order = torch.argsort(rand(N, 4), dim=1)  # a uniform random permutation per crop
        factors = {name: uniform(name) for name in JITTER_OPS}
        grayscale = rand(N) < self.grayscale_p
        blur = rand(N) < blur_p
        lo, hi = self.blur_sigma
        sigma = lo + (hi - lo) * rand(N)
        if self.blur_kernel_size is None:
            size = F.blur_kernel_size(sigma)
        else:
            size = torch.full((N,), self.blur_kernel_size, dtype=torch.int64, device=device)
        kernel_size = torch.where(blur, size, torch.ones_like(size))
        solarize = rand(N) < solarize_p
        return ColorParams(jitter, order, factors["brightness"], factors["contrast"], factors["saturation"],
                           factors["hue"], grayscale, blur, sigma, kernel_size, solarize)

    def sample_params(self, images, generator: torch.Generator | None = None) -> DinoParams:
        """Draw every random parameter for ``images`` (crops, then colour) without applying them."""
        crops = self.multicrop.sample_params(images, generator)
        device = crops.global_boxes.device
        B = len(images)

        def per_crop(ps, n):  # crop-major: crop k's probability repeated over the batch
            return torch.tensor(ps, device=device).repeat_interleave(B) if n else torch.zeros(0, device=device)

        n_local = self.multicrop.n_local
        g = self._color_params(per_crop(self.global_blur_p, self.n_global),
                               per_crop(self.global_solarize_p, self.n_global), generator)
        loc = self._color_params(per_crop((self.local_blur_p,) * n_local, n_local),
                                 per_crop((self.local_solarize_p,) * n_local, n_local), generator)
        return DinoParams(crops, g, loc)

    # ------------------------------------------------------------------------- applying

    def color(self, x: torch.Tensor, p: ColorParams, normalize: bool = True) -> torch.Tensor:
        """The colour pipeline on crops ``x`` ``[N, 3, S, S]`` in [0, 1] with parameters ``p``."""
        N = x.shape[0]
        if N == 0:
            return x
        # ColorJitter in 4 rounds: in round r each crop applies its op order[:, r]. The three blends
        # (brightness: with 0, contrast: with the gray mean, saturation: with gray) run as one blend for
        # every crop, factor 1 (an exact identity) where a crop does not blend in that round. The hue
        # runs once, on every crop, between the blends before each crop's hue round and those after
        # it: no host read of which crops take the hue in which round, and each crop's arithmetic is
        # the per-round one (the identity blends change nothing).
        factors = torch.stack([p.brightness, p.contrast, p.saturation, torch.ones_like(p.hue)], dim=1)
        hue_round = torch.where(p.jitter, (p.order == JITTER_OPS.index("hue")).int().argmax(dim=1), 4)

        def blend(x: torch.Tensor, r: int, active: torch.Tensor) -> torch.Tensor:
            op = p.order[:, r]
            f = torch.where(active, factors.gather(1, op.unsqueeze(1)).squeeze(1), 1.0).view(-1, 1, 1, 1)
            gray = F.rgb_to_grayscale(x)
            other = torch.where((op == 2).view(-1, 1, 1, 1), gray,
                                torch.where((op == 1).view(-1, 1, 1, 1),
                                            gray.mean(dim=(1, 2, 3), keepdim=True), 0.0))
            return (x * f + other * (1.0 - f)).clamp_(0.0, 1.0)

        for r in range(3):  # the rounds before a crop's hue (a hue in round 0 has none)
            x = blend(x, r, p.jitter & (hue_round > r))
        x = torch.where(p.jitter.view(-1, 1, 1, 1), F.adjust_hue(x, p.hue), x)
        for r in range(1, 4):  # the rounds after it
            x = blend(x, r, p.jitter & (hue_round < r))
        x = torch.where(p.grayscale.view(-1, 1, 1, 1), F.rgb_to_grayscale(x, 3), x)
        # Every crop through the blur (size 1 where it does not apply: an exact identity), sized by the
        # largest kernel the sigma range allows: no host sync to read the batch's largest.
        x = F.gaussian_blur(x, p.sigma, p.kernel_size, k_max=self.blur_k_max)
        x = F.solarize(x, p.solarize, 0.5)
        if normalize:
            mean = torch.tensor(self.mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
            std = torch.tensor(self.std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
            x = (x - mean) / std
        return x

    def color_u8(self, x: torch.Tensor, p: ColorParams) -> torch.Tensor:
        """The colour pipeline on uint8 CPU crops ``x`` ``[N, 3, S, S]``, normalised: each step in 8 bits
        with PIL's arithmetic, as the authors' pipeline (``fastssl.ops._color``, ``csrc/dino_color.cpp``)."""
        factors = torch.stack([p.brightness, p.contrast, p.saturation, p.hue], dim=1)
        return dino_color_u8(x, p.order, factors, p.jitter, p.grayscale, p.blur, p.solarize, p.sigma, p.kernel_size,
                             self.mean, self.std)

    def apply(self, images, params: DinoParams) -> tuple[torch.Tensor, torch.Tensor]:
        """``(globals, locals)`` of ``images`` for given :class:`DinoParams`."""
        if _uint8_on_cpu(images):
            g, loc = self._multicrop_u8.apply(images, params.crops)
            return self.color_u8(g, params.global_color), self.color_u8(loc, params.local_color)
        g, loc = self.multicrop.apply(images, params.crops)
        # Bicubic overshoots; the authors' PIL crops are clipped to 0..255.
        g, loc = g.clamp_(0.0, 1.0), loc.clamp_(0.0, 1.0)
        return self.color(g, params.global_color), self.color(loc, params.local_color)

    def forward(self, images, generator: torch.Generator | None = None, return_params: bool = False):
        channels = images.shape[1] if isinstance(images, torch.Tensor) and images.dim() == 4 else \
            images[0].shape[0] if isinstance(images, (list, tuple)) and len(images) and images[0].dim() == 3 else 3
        if channels != 3:  # other malformed inputs are reported by MultiCrop
            raise ValueError(f"DinoAugment: images must be RGB (3 channels), got {channels}")
        params = self.sample_params(images, generator)
        g, loc = self.apply(images, params)
        return (g, loc, params) if return_params else (g, loc)
