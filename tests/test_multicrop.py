"""fastssl.MultiCrop: RandomResizedCrop's boxes sampled on the device, and the crops they give."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
import torchvision.transforms.v2 as T
import torchvision.transforms.v2.functional as TF
from helpers import DEVICE
from torchvision.transforms.v2 import InterpolationMode

import fastssl
from fastssl.augment import sample_boxes

try:
    import benchmarks  # noqa: F401
except ImportError:  # plain `pytest` does not put the repository root on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def gen(seed: int) -> torch.Generator:
    return torch.Generator(device=DEVICE).manual_seed(seed)


def check_boxes(boxes: torch.Tensor, shapes, n_crops: int, scale, ratio) -> torch.Tensor:
    """Every box inside its image with integer values; returns which ones are draws (not the fallback)."""
    B = len(shapes)
    b = boxes.cpu().double()
    assert b.shape == (n_crops * B, 5)
    assert torch.equal(b, b.round()), "boxes must be integer valued"
    assert torch.equal(b[:, 0].long(), torch.arange(B).repeat(n_crops)), "rows must be crop-major"
    H = torch.tensor([s[0] for s in shapes], dtype=torch.float64).repeat(n_crops)
    W = torch.tensor([s[1] for s in shapes], dtype=torch.float64).repeat(n_crops)
    top, left, h, w = b[:, 1], b[:, 2], b[:, 3], b[:, 4]
    assert bool((h >= 1).all() and (w >= 1).all() and (top >= 0).all() and (left >= 0).all())
    assert bool((top + h <= H).all() and (left + w <= W).all()), "a box leaves its image"
    # A draw has w = round(sqrt(a r)), h = round(sqrt(a / r)): some (a, r) in range rounds to (w, h).
    area_lo, area_hi = (w - 0.5) * (h - 0.5), (w + 0.5) * (h + 0.5)
    r_lo, r_hi = (w - 0.5) / (h + 0.5), (w + 0.5) / (h - 0.5).clamp(min=1e-9)
    fits = (area_hi >= scale[0] * H * W) & (area_lo <= scale[1] * H * W) & (r_hi >= ratio[0]) & (r_lo <= ratio[1])
    central = (top == torch.div(H - h, 2, rounding_mode="floor")) & \
              (left == torch.div(W - w, 2, rounding_mode="floor"))
    assert bool((fits | central).all()), f"boxes out of scale/ratio range: {b[~(fits | central)][:5].tolist()}"
    return fits


# ----------------------------------------------------------------------------- boxes

@pytest.mark.parametrize("scale,ratio", [((0.4, 1.0), (3 / 4, 4 / 3)), ((0.05, 0.4), (3 / 4, 4 / 3)),
                                         ((0.08, 1.0), (0.5, 2.0))])
def test_boxes_inside_and_in_range(scale, ratio):
    shapes = [(375, 500), (500, 333), (64, 64), (17, 230), (3, 5)]
    H = torch.tensor([s[0] for s in shapes], device=DEVICE)
    W = torch.tensor([s[1] for s in shapes], device=DEVICE)
    boxes = sample_boxes(H, W, 400, scale, ratio, generator=gen(int(torch.randint(1 << 30, ()))))
    assert boxes.device.type == DEVICE.type and boxes.dtype == torch.float32
    fits = check_boxes(boxes, shapes, 400, scale, ratio)
    # On the photo-sized images nearly every crop is a draw: the fallback is rare there.
    assert fits.view(400, 5)[:, :3].float().mean() > 0.95


def test_fallback_is_torchvisions_central_crop():
    # No draw can fit: a 2-row image with at least 90% of its area asked for at a ratio <= 4/3.
    for H, W in ((2, 300), (300, 2), (1, 1)):
        boxes = sample_boxes(torch.tensor([H], device=DEVICE), torch.tensor([W], device=DEVICE), 5, (0.9, 1.0),
                             (3 / 4, 4 / 3), generator=gen(0)).cpu()
        ref = T.RandomResizedCrop.get_params(torch.zeros(1, H, W), [0.9, 1.0], [3 / 4, 4 / 3]) if (H, W) != (1, 1) \
            else (0, 0, 1, 1)
        for row in boxes.long().tolist():
            assert tuple(row[1:]) == tuple(ref), f"{H}x{W}: {row[1:]} != torchvision's {ref}"


def test_box_statistics_match_torchvision():
    """Same rule, different random streams: the distributions of area and ratio agree."""
    H, W, n = 375, 500, 1500
    boxes = sample_boxes(torch.tensor([H], device=DEVICE), torch.tensor([W], device=DEVICE), n, (0.05, 0.4),
                         (3 / 4, 4 / 3), generator=gen(1)).cpu().double()
    ref = torch.tensor([T.RandomResizedCrop.get_params(torch.zeros(1, H, W), [0.05, 0.4], [3 / 4, 4 / 3])
                        for _ in range(n)], dtype=torch.float64)
    for name, ours, theirs in (("area", boxes[:, 3] * boxes[:, 4] / (H * W), ref[:, 2] * ref[:, 3] / (H * W)),
                               ("log ratio", (boxes[:, 4] / boxes[:, 3]).log(), (ref[:, 3] / ref[:, 2]).log()),
                               ("top", boxes[:, 1] / H, ref[:, 0] / H)):
        assert abs(ours.mean() - theirs.mean()) < 0.03, name
        assert abs(ours.std() - theirs.std()) < 0.03, name


def test_same_seed_same_crops():
    images = torch.randint(0, 256, (3, 3, 60, 80), dtype=torch.uint8, device=DEVICE)
    mc = fastssl.MultiCrop(global_size=32, local_size=16, n_local=3)
    a = mc(images, generator=gen(7), return_params=True)
    b = mc(images, generator=gen(7), return_params=True)
    c = mc(images, generator=gen(8))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert torch.equal(a[2].global_boxes, b[2].global_boxes) and torch.equal(a[2].local_flips, b[2].local_flips)
    assert not torch.equal(a[1], c[1])


# ----------------------------------------------------------------------------- crops

@pytest.mark.parametrize("ragged", [False, True])
def test_crops_are_torchvisions_on_the_boxes(ragged):
    mean, std = fastssl.augment.IMAGENET_MEAN, fastssl.augment.IMAGENET_STD
    if ragged:
        shapes = [(50, 70), (81, 40), (64, 64)]
        images = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, device=DEVICE) for h, w in shapes]
    else:
        images = torch.randint(0, 256, (3, 3, 56, 72), dtype=torch.uint8, device=DEVICE)
    mc = fastssl.MultiCrop(global_size=40, local_size=24, n_global=2, n_local=3)
    g, loc, p = mc(images, generator=gen(int(torch.randint(1 << 30, ()))), return_params=True)
    B = len(images)
    assert g.shape == (2 * B, 3, 40, 40) and loc.shape == (3 * B, 3, 24, 24) and g.dtype == torch.float32
    m, s = torch.tensor(mean).view(3, 1, 1), torch.tensor(std).view(3, 1, 1)
    for crops, boxes, flips, size in ((g, p.global_boxes, p.global_flips, 40), (loc, p.local_boxes, p.local_flips, 24)):
        for n, (i, top, left, h, w) in enumerate(boxes.long().tolist()):
            ref = TF.resized_crop(images[i].cpu().float(), top, left, h, w, [size, size],
                                  interpolation=InterpolationMode.BICUBIC, antialias=True)
            if flips[n]:
                ref = TF.horizontal_flip(ref)
            ref = (ref / 255 - m) / s
            err = (crops[n].cpu() - ref).abs().max().item()
            assert err < 1e-3, f"crop {n} (image {i}): {err}"


def test_float_images_options_and_empty_locals():
    images = torch.rand(2, 3, 40, 50, device=DEVICE)
    mc = fastssl.MultiCrop(global_size=20, local_size=10, n_global=1, n_local=0, flip_p=0.0, mean=None, std=None,
                           interpolation="bilinear", out_dtype=torch.bfloat16)
    g, loc, p = mc(images, generator=gen(3), return_params=True)
    assert g.shape == (2, 3, 20, 20) and g.dtype == torch.bfloat16 and loc.shape == (0, 3, 10, 10)
    assert not p.global_flips.any()
    ref = fastssl.ops.resized_crops(images, p.global_boxes, 20, interpolation="bilinear")
    torch.testing.assert_close(g.float(), ref, atol=1e-2, rtol=1e-2)


def test_errors():
    cases = [(dict(global_size=0), "global_size must be a positive int"),
             (dict(n_local=-1), "n_local must be a non-negative int"),
             (dict(flip_p=1.5), "flip_p must be in"),
             (dict(local_scale=(0.5, 0.1)), "local_scale"),
             (dict(ratio=(0.0, 1.0)), "ratio")]
    for kwargs, match in cases:
        with pytest.raises(ValueError, match=match):
            fastssl.MultiCrop(**kwargs)
    mc = fastssl.MultiCrop(global_size=8, local_size=4)
    for images, match in ((torch.zeros(3, 10, 10), r"\[B, C, H, W\]"), ([], "non-empty list"),
                          ([torch.zeros(10, 10)], r"images\[0\]")):
        with pytest.raises(ValueError, match=match):
            mc(images)


def test_params_not_drawn_here_are_checked_on_the_host():
    # Boxes sample_params drew are inside by construction (checked on the device, no host sync);
    # params built by hand get resized_crops' host check and its ValueError, on any device.
    images = torch.randint(0, 256, (2, 3, 20, 24), dtype=torch.uint8, device=DEVICE)
    mc = fastssl.MultiCrop(global_size=8, local_size=4, n_global=1, n_local=1)
    drawn = mc.sample_params(images, generator=gen(0))
    assert drawn.sampled
    g, loc = mc.apply(images, drawn)
    assert g.shape == (2, 3, 8, 8) and loc.shape == (2, 3, 4, 4)
    bad = fastssl.augment.CropParams(drawn.global_boxes.clone(), drawn.global_flips, drawn.local_boxes,
                                     drawn.local_flips)
    assert not bad.sampled
    bad.global_boxes[1, 1] = 20.0  # top = H: outside image 1
    with pytest.raises(ValueError, match=r"boxes\[1\] .* is outside its image 1"):
        mc.apply(images, bad)


def test_bytes_moved():
    from benchmarks import multicrop
    case = multicrop.Case(B=2, H=10, W=20)
    # uint8 source read once, float32 crops written.
    assert multicrop.bytes_moved(case) == 2 * 3 * 10 * 20 + (2 * 2 * 224 * 224 + 2 * 10 * 96 * 96) * 3 * 4
    assert math.isclose(multicrop.Case(B=1, H=1, W=1).crops, 12)


def test_benchmark_smoke(tmp_path):
    from benchmarks import multicrop
    paths = multicrop.main(["--preset", "smoke", "--out", str(tmp_path), "--device", "cpu"])
    for kind in ("json", "md"):
        assert paths[kind].exists() and paths[kind].stat().st_size > 0
    text = paths["md"].read_text()
    assert "fastssl" in text and "torchvision-loop" in text and "images_per_s" in text
    assert "fastssl-op" in text


def test_benchmark_programs_agree():
    """The benchmark's op-only rows, the pixel program included (a GPU row; emulated here): both
    programs make the same crops, and the timed functions return them."""
    from benchmarks import multicrop
    images = torch.randint(0, 256, (2, 3, 70, 90), dtype=torch.uint8)
    mc = fastssl.MultiCrop(40, 16, 2, 3)
    fns = multicrop._fastssl_op(images, mc, torch.Generator().manual_seed(0), pixel=True)
    assert set(fns) == {"fastssl-op", "fastssl-op-pixel"}
    tiled, pixel = fns["fastssl-op"](), fns["fastssl-op-pixel"]()
    assert [t.shape for t in tiled] == [(2 * 2, 3, 40, 40), (3 * 2, 3, 16, 16)]
    for a, b in zip(tiled, pixel, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
