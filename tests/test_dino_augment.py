"""fastssl.DinoAugment: each per-sample op equals torchvision's functional op on that sample, same parameters."""

from __future__ import annotations

import pytest
import torch
import torchvision.transforms.v2.functional as TF
from helpers import DEVICE
from torchvision.transforms.v2 import InterpolationMode

import fastssl
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
    images = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, device=DEVICE) for h, w in ((40, 52), (61, 45))]
    aug = fastssl.DinoAugment(global_size=24, local_size=16, n_local=3)
    g, loc, params = aug(images, generator=gen(int(torch.randint(1 << 30, ()))), return_params=True)
    B = len(images)
    assert g.shape == (2 * B, 3, 24, 24) and loc.shape == (3 * B, 3, 16, 16)
    for crops, boxes, flips, color, size in (
            (g, params.crops.global_boxes, params.crops.global_flips, params.global_color, 24),
            (loc, params.crops.local_boxes, params.crops.local_flips, params.local_color, 16)):
        for n, (i, top, left, h, w) in enumerate(boxes.long().tolist()):
            im = TF.resized_crop(images[i].cpu().float() / 255, top, left, h, w, [size, size],
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
