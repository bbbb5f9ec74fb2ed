"""fastssl.DinoAugment: each per-sample op equals torchvision's functional op on that sample, same parameters."""

from __future__ import annotations

import pytest
import torch
import torchvision.transforms.v2.functional as TF
from helpers import DEVICE
from torchvision.transforms.v2 import InterpolationMode

import fastssl
from fastssl.augment import IMAGENET_MEAN, IMAGENET_STD
from fastssl.augment import functional as F
from fastssl.augment.dino import JITTER_OPS

ATOL = 2e-5  # fp32 rounding of the same formulas, on [0, 1] values


def gen(seed: int) -> torch.Generator:
    return torch.Generator(device=DEVICE).manual_seed(seed)


def images01(n: int = 6, size: int = 20) -> torch.Tensor:
    x = torch.rand(n, 3, size, size, device=DEVICE)
    x[0] = x[0, :1]  # a gray sample: zero chroma
    x[1, :, :4] = torch.tensor([1.0, 0.0, 0.0], device=DEVICE).view(3, 1, 1)  # saturated, at the hue seam
    x[2, :, :, :3] = 0.0
    x[3, :, :, :3] = 1.0
    return x


def per_sample(ours: torch.Tensor, x: torch.Tensor, ref_fn, what: str, atol: float = ATOL) -> None:
    assert ours.shape == x.shape, what
    for n in range(x.shape[0]):
        ref = ref_fn(x[n].cpu(), n)
        err = (ours[n].cpu() - ref).abs().max().item()
        assert err <= atol, f"{what}: sample {n} differs from torchvision by {err:.3g}"


# ----------------------------------------------------------------------------- the functional ops

@pytest.mark.parametrize("name,lo,hi", [("brightness", 0.6, 1.4), ("contrast", 0.6, 1.4),
                                        ("saturation", 0.8, 1.2), ("hue", -0.1, 0.1), ("hue", -0.5, 0.5),
                                        ("saturation", 0.0, 2.0)])
def test_color_ops_match_torchvision(name, lo, hi):
    x = images01()
    f = lo + (hi - lo) * torch.rand(x.shape[0], device=DEVICE)
    ours = getattr(F, f"adjust_{name}")(x, f)
    ref_op = getattr(TF, f"adjust_{name}")
    per_sample(ours, x, lambda im, n: ref_op(im, float(f[n])), f"adjust_{name}")


def test_grayscale_and_solarize_match_torchvision():
    x = images01()
    per_sample(F.rgb_to_grayscale(x, 3), x, lambda im, n: TF.rgb_to_grayscale(im, num_output_channels=3),
               "rgb_to_grayscale")
    assert F.rgb_to_grayscale(x).shape == (x.shape[0], 1, *x.shape[2:])
    apply = torch.rand(x.shape[0], device=DEVICE) < 0.5
    apply[0], apply[1] = True, False
    per_sample(F.solarize(x, apply), x, lambda im, n: TF.solarize(im, 0.5) if apply[n] else im, "solarize", 0.0)
    # On 0..255 images: threshold 128, as the authors' ImageOps.solarize.
    u8 = torch.randint(0, 256, (2, 3, 5, 5), dtype=torch.uint8)
    torch.testing.assert_close(F.solarize(u8.float() / 255, True) * 255, TF.solarize(u8, 128).float(),
                               atol=1e-4, rtol=0)


@pytest.mark.parametrize("fixed", [None, 9])
def test_gaussian_blur_matches_torchvision(fixed):
    x = images01(n=5, size=24)
    sigma = 0.1 + 1.9 * torch.rand(x.shape[0], device=DEVICE)
    sigma[0] = 2.0
    k = F.blur_kernel_size(sigma) if fixed is None else torch.full((x.shape[0],), fixed, device=DEVICE)
    k[1] = 1  # not blurred
    if fixed is None:
        assert int(k[0]) == 13  # +-3 sigma at sigma = 2
    ours = F.gaussian_blur(x, sigma, k)
    per_sample(ours, x, lambda im, n: TF.gaussian_blur(im, [int(k[n])] * 2, [float(sigma[n])] * 2)
               if int(k[n]) > 1 else im, "gaussian_blur")
    assert torch.equal(ours[1], x[1])
    # A known bound (no host sync): a wider zero-padded kernel reads the same pixels, same result.
    bounded = F.gaussian_blur(x, sigma, k, k_max=15)
    torch.testing.assert_close(bounded, ours, rtol=1e-6, atol=1e-6)
    assert torch.equal(bounded[1], x[1])


def test_functional_errors():
    x = torch.rand(2, 3, 8, 8)
    with pytest.raises(ValueError, match="one factor per sample"):
        F.adjust_brightness(x, torch.ones(3))
    with pytest.raises(ValueError, match=r"RGB images \[N, 3, H, W\]"):
        F.adjust_hue(torch.rand(2, 1, 8, 8), 0.1)
    with pytest.raises(ValueError, match="odd"):
        F.gaussian_blur(x, 1.0, 4)
    with pytest.raises(ValueError, match="larger than"):
        F.gaussian_blur(x, 1.0, 17)
    with pytest.raises(ValueError, match="k_max must be an odd positive int"):
        F.gaussian_blur(x, 1.0, 3, k_max=4)
    with pytest.raises(RuntimeError, match="at most k_max=3"):  # x on the CPU: the device check raises here
        F.gaussian_blur(x, 1.0, torch.tensor([3, 5]), k_max=3)


# ----------------------------------------------------------------------------- the pipeline

def reference_color(im: torch.Tensor, p, n: int, mean, std) -> torch.Tensor:
    """The authors' per-crop order with torchvision's functional ops and crop n's parameters."""
    if p.jitter[n]:
        for op in p.order[n].tolist():
            name = JITTER_OPS[op]
            im = getattr(TF, f"adjust_{name}")(im, float(getattr(p, name)[n]))
    if p.grayscale[n]:
        im = TF.rgb_to_grayscale(im, num_output_channels=3)
    if p.blur[n]:
        k = int(p.kernel_size[n])
        im = TF.gaussian_blur(im, [k, k], [float(p.sigma[n])] * 2)
    if p.solarize[n]:
        im = TF.solarize(im, 0.5)
    return TF.normalize(im, list(mean), list(std))


def test_dino_augment_matches_torchvision_per_crop():
    # Float images: the float pipeline on every device (uint8 images on a CPU take the 8-bit one,
    # tested against PIL below).
    images = [torch.randint(0, 256, (3, h, w), device=DEVICE).float() / 255 for h, w in ((40, 52), (61, 45))]
    aug = fastssl.DinoAugment(global_size=24, local_size=16, n_local=3)
    g, loc, params = aug(images, generator=gen(int(torch.randint(1 << 30, ()))), return_params=True)
    B = len(images)
    assert g.shape == (2 * B, 3, 24, 24) and loc.shape == (3 * B, 3, 16, 16)
    for crops, boxes, flips, color, size in (
            (g, params.crops.global_boxes, params.crops.global_flips, params.global_color, 24),
            (loc, params.crops.local_boxes, params.crops.local_flips, params.local_color, 16)):
        for n, (i, top, left, h, w) in enumerate(boxes.long().tolist()):
            im = TF.resized_crop(images[i].cpu(), top, left, h, w, [size, size],
                                 interpolation=InterpolationMode.BICUBIC, antialias=True).clamp(0, 1)
            if flips[n]:
                im = TF.horizontal_flip(im)
            ref = reference_color(im, color, n, aug.mean, aug.std)
            err = (crops[n].cpu() - ref).abs().max().item()
            assert err <= 1e-3, f"crop {n} (image {i}): {err:.3g}"


def test_color_pipeline_every_branch():
    """Many crops with every op on, in random orders, against the torchvision reference."""
    aug = fastssl.DinoAugment(jitter_p=1.0, grayscale_p=0.3, local_blur_p=0.7, local_solarize_p=0.5,
                              hue=0.5, saturation=0.9)
    x = images01(n=16, size=16)
    p = aug._color_params(torch.full((16,), 0.7, device=DEVICE), torch.full((16,), 0.5, device=DEVICE), gen(5))
    assert len({tuple(o) for o in p.order.tolist()}) > 4
    per_sample(aug.color(x, p), x, lambda im, n: reference_color(im, p, n, aug.mean, aug.std), "color", 1e-4)


def test_params_follow_the_authors_probabilities():
    images = torch.zeros(200, 3, 8, 8, dtype=torch.uint8, device=DEVICE)
    p = fastssl.DinoAugment(global_size=8, local_size=8, n_local=2).sample_params(images, gen(0))
    g, loc = p.global_color, p.local_color
    assert g.blur[:200].all() and not g.solarize[:200].any()  # first global crop: always blurred, never solarised
    assert 0.0 < g.blur[200:].float().mean() < 0.25 and 0.1 < g.solarize[200:].float().mean() < 0.35
    assert 0.35 < loc.blur.float().mean() < 0.65 and not loc.solarize.any()
    assert 0.7 < g.jitter.float().mean() < 0.9 and 0.1 < loc.grayscale.float().mean() < 0.3
    assert ((g.brightness >= 0.6) & (g.brightness <= 1.4)).all() and (g.hue.abs() <= 0.1).all()
    assert ((g.sigma >= 0.1) & (g.sigma <= 2.0)).all()
    assert torch.equal(torch.sort(g.order, dim=1).values, torch.arange(4, device=DEVICE).expand(400, 4))
    assert torch.equal(g.kernel_size[~g.blur], torch.ones_like(g.kernel_size[~g.blur]))


def test_same_seed_same_output():
    images = torch.randint(0, 256, (2, 3, 30, 40), dtype=torch.uint8, device=DEVICE)
    aug = fastssl.DinoAugment(global_size=16, local_size=12, n_local=2)
    a, b = aug(images, gen(1)), aug(images, gen(1))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], aug(images, gen(2))[1])


def test_errors():
    for kwargs, match in ((dict(hue=0.7), "hue must be in"), (dict(jitter_p=2.0), "jitter_p"),
                          (dict(global_solarize_p=(0.1,)), "global_solarize_p"),
                          (dict(blur_kernel_size=4), "odd positive"), (dict(blur_sigma=(0.0, 1.0)), "blur_sigma")):
        with pytest.raises(ValueError, match=match):
            fastssl.DinoAugment(**kwargs)
    with pytest.raises(ValueError, match="RGB"):
        fastssl.DinoAugment(global_size=8, local_size=8)(torch.zeros(1, 1, 10, 10, dtype=torch.uint8))


# ----------------------------------------------------------------------------- the 8-bit CPU pipeline

_PIL_JITTER = ("adjust_brightness", "adjust_contrast", "adjust_saturation", "adjust_hue")


def pil_steps(crop: torch.Tensor, p, n: int) -> tuple[torch.Tensor, int]:
    """The authors' per-crop colour steps on a PIL image of the uint8 crop (torchvision's PIL ops, the
    blur as torchvision's tensor gaussian_blur of the uint8 image): the result and the steps taken."""
    import numpy as np
    import torchvision.transforms.functional as TF1
    from PIL import Image, ImageOps

    im, steps = Image.fromarray(crop.permute(1, 2, 0).numpy()), 0
    if p.jitter[n]:
        for op in p.order[n].tolist():
            im = getattr(TF1, _PIL_JITTER[op])(im, float(getattr(p, JITTER_OPS[op])[n]))
            steps += 1
    if p.grayscale[n]:
        im, steps = TF1.rgb_to_grayscale(im, num_output_channels=3), steps + 1
    x = torch.from_numpy(np.array(im)).permute(2, 0, 1).contiguous()
    if p.blur[n]:
        k = int(p.kernel_size[n])
        x, steps = TF.gaussian_blur(x, [k, k], [float(p.sigma[n])] * 2), steps + 1
    if p.solarize[n]:
        x = torch.from_numpy(np.array(ImageOps.solarize(Image.fromarray(x.permute(1, 2, 0).numpy()), 128)))
        x, steps = x.permute(2, 0, 1), steps + 1
    return x, steps


def _levels(out: torch.Tensor, aug) -> torch.Tensor:
    """Normalised crops back on the 0..255 scale."""
    mean = torch.tensor(aug.mean).view(1, 3, 1, 1)
    std = torch.tensor(aug.std).view(1, 3, 1, 1)
    return (out * std + mean) * 255


def test_uint8_color_steps_match_pil():
    # Every branch and order, hue shifts at the ends of their range and across the wrap, factors
    # past 1 (PIL's clipped blend), gray and saturated crops: each step within one level of PIL's.
    aug = fastssl.DinoAugment(jitter_p=0.9, grayscale_p=0.3, local_blur_p=0.6, local_solarize_p=0.5, hue=0.5,
                              saturation=0.9, brightness=0.7, contrast=0.7)
    N, S = 48, 19
    crops = torch.randint(0, 256, (N, 3, S, S), dtype=torch.uint8)
    crops[0] = crops[0, :1]  # gray
    crops[1, :, :5] = torch.tensor([255, 0, 0], dtype=torch.uint8).view(3, 1, 1)  # saturated
    crops[2] //= 8  # dark
    p = aug._color_params(torch.full((N,), 0.6), torch.full((N,), 0.5), gen(int(torch.randint(1 << 30, ()))))
    p.hue[:4] = torch.tensor([0.5, -0.5, 0.0, -0.004])
    p.jitter[:4] = True
    out = _levels(aug.color_u8(crops, p), aug)
    assert out.dtype == torch.float32 and out.shape == crops.shape
    assert (out - out.round()).abs().max() < 1e-3  # 8-bit values, normalised once
    for n in range(N):
        ref, steps = pil_steps(crops[n], p, n)
        err = (out[n].round() - ref.float()).abs().max().item()
        assert err <= steps, f"crop {n}: {err} levels from PIL after {steps} steps"


@pytest.mark.parametrize("side", [7, 30])
def test_uint8_blur_is_separable_and_sized_per_crop(side):
    # Each crop its own kernel size (1: untouched), the largest reaching past the crop's middle.
    N = 9
    crops = torch.randint(0, 256, (N, 3, side, side), dtype=torch.uint8)
    sigma = 0.1 + 1.9 * torch.rand(N)
    k = torch.minimum(F.blur_kernel_size(sigma), torch.tensor(2 * (side // 2) - 1))
    k[0] = 1
    k[1] = 2 * (side // 2) - 1
    blur = torch.ones(N, dtype=torch.bool)
    none = torch.zeros(N, dtype=torch.bool)
    from fastssl.ops._color import dino_color_u8

    out = dino_color_u8(crops, torch.arange(4).expand(N, 4), torch.ones(N, 4), none, none, blur, none, sigma, k,
                        (0.0,) * 3, (1 / 255,) * 3).round()
    for n in range(N):
        ref = TF.gaussian_blur(crops[n], [int(k[n])] * 2, [float(sigma[n])] * 2) if k[n] > 1 else crops[n]
        assert (out[n] - ref.float()).abs().max() <= 1, f"crop {n}, kernel {int(k[n])}"
    assert torch.equal(out[0], crops[0].float())


def test_uint8_pipeline_on_cpu_matches_the_authors_steps():
    # DinoAugment on uint8 CPU images: the crops are torchvision's uint8 resized_crop (the fixed-point
    # path, as PIL's resize), the colour steps PIL's, ToTensor and Normalize once at the end.
    images = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8) for h, w in ((40, 52), (61, 45))]
    aug = fastssl.DinoAugment(global_size=24, local_size=16, n_local=3, jitter_p=0.9, local_solarize_p=0.5)
    g, loc, params = aug(images, generator=gen(int(torch.randint(1 << 30, ()))), return_params=True)
    assert g.shape == (4, 3, 24, 24) and loc.shape == (6, 3, 16, 16) and g.dtype == loc.dtype == torch.float32
    for crops, boxes, flips, color, size in (
            (g, params.crops.global_boxes, params.crops.global_flips, params.global_color, 24),
            (loc, params.crops.local_boxes, params.crops.local_flips, params.local_color, 16)):
        out = _levels(crops, aug)
        for n, (i, top, left, h, w) in enumerate(boxes.long().tolist()):
            crop = TF.resized_crop(images[i], top, left, h, w, [size, size], interpolation=InterpolationMode.BICUBIC,
                                   antialias=True)
            crop = TF.horizontal_flip(crop) if flips[n] else crop
            ref, steps = pil_steps(crop, color, n)
            err = (out[n].round() - ref.float()).abs().max().item()
            assert err <= max(steps, 0), f"crop {n} (image {i}): {err} levels after {steps} steps"


def test_color_op_opcheck():
    from fastssl import _ext

    _ext.load_extension()
    N, S = 3, 11
    args = (torch.randint(0, 256, (N, 3, S, S), dtype=torch.uint8), torch.argsort(torch.rand(N, 4), dim=1),
            torch.rand(N, 4) * 0.2 + 0.9, torch.tensor([True, False, True]), torch.tensor([False, True, False]),
            torch.tensor([True, True, False]), torch.tensor([False, False, True]), torch.rand(N) + 0.5,
            torch.tensor([3, 5, 1]), torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD))
    torch.library.opcheck(torch.ops.fastssl.dino_color_u8.default, args)
