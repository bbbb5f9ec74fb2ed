"""The GPU programs of resized_crops (csrc/crop_programs.h), each against torchvision.

``_resized_crops_program`` runs one named program: on a GPU machine the CUDA kernel, here the same
steps emulated thread by thread on the CPU (a step of every thread of a block, then the next step),
so the kernels' tiling, tap tables, row chunks and fallbacks are checked without a GPU. The cases
below are built to reach each path of the tiled program.
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import DEVICE, gpu_only
from test_resized_crops import FLOAT_ATOL, check_crops, random_boxes, random_images, reference

import fastssl
from fastssl.ops import resized_crops
from fastssl.ops._crops import _pack, _resized_crops

PROGRAMS = ["pixel", "tiled"]
MODES = ["bilinear", "bicubic"]
# Mirrors crop_programs.h: a tile's widest tabulated window, the source rows of one pass, a tile's
# and a strip's rows.
TILE_TAPS, TILE_ROWS, TILE_Y, STRIP_ROWS = 16, 64, 16, 128


def run(program, images, boxes, size, device=DEVICE, **kw):
    """The op run by `program`: the CUDA kernel on a GPU, its emulation on the CPU."""
    args = dict(flips=None, interpolation="bilinear", antialias=True, mean=None, std=None, out_dtype=torch.float32,
                channels_last=False)
    args.update(kw)
    if args["flips"] is not None:
        args["flips"] = args["flips"].to(device)
    return _resized_crops(_pack([im.to(device) for im in images]), boxes.to(device), size, check_on_host=True,
                          program=program, **args)


def window(length: float, size: int, mode: str) -> int:
    """The widest antialiased window along an axis: 2 * ceil(support) + 1 taps at most."""
    support = (2.0 if mode == "bicubic" else 1.0) * max(length / size, 1.0)
    return 2 * math.ceil(support) + 1


@pytest.mark.parametrize("program", PROGRAMS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("antialias", [True, False])
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_program_matches_torchvision(program, mode, antialias, dtype):
    """Random images and boxes (borders included), flips; sizes that are not multiples of the tile."""
    shapes = [(int(torch.randint(20, 130, ())), int(torch.randint(20, 130, ()))) for _ in range(3)]
    images = random_images(dtype, shapes)
    boxes = random_boxes(shapes, 10)
    flips = torch.rand(boxes.shape[0]) < 0.5
    for size in (7, 40, 53):
        out = run(program, images, boxes, size, flips=flips, interpolation=mode, antialias=antialias)
        check_crops(out, images, boxes, size, mode, antialias, flips=flips, what=f"{program} {dtype}")
    if dtype == torch.uint8:
        # uint8 out on a GPU: the float result rounded and clamped, as torchvision on CUDA.
        out8 = run(program, images, boxes, 40, flips=flips, interpolation=mode, antialias=antialias,
                   out_dtype=torch.uint8)
        check_crops(out8, images, boxes, 40, mode, antialias, flips=flips, uint8_out=True, what=f"{program} uint8")


@pytest.mark.parametrize("mode", MODES)
def test_tiled_program_chunks_the_rows(mode):
    """A tile of 16 rows down-scaled 6.7x (bilinear) or 3.5x (bicubic) vertically reaches more source
    rows than one horizontal pass holds: two passes, the vertical sums carried across them."""
    H, W, size = (400, 70, 60) if mode == "bilinear" else (420, 70, 120)
    rows_reached = (TILE_Y - 1) * H / size + window(H, size, mode)
    assert window(H, size, mode) <= TILE_TAPS and rows_reached > TILE_ROWS
    images = random_images(torch.uint8, [(H, W)])
    boxes = torch.tensor([[0, 0, 0, H, W], [0, 7, 5, H - 7, 61]], dtype=torch.float32)
    for program in PROGRAMS:
        out = run(program, images, boxes, size, interpolation=mode)
        check_crops(out, images, boxes, size, mode, True, what=f"{program} chunked rows")


@pytest.mark.parametrize("mode", MODES)
def test_tiled_program_strips(mode):
    """Crops taller than one strip of tiles: a second strip whose last tile has one row, with row
    chunks in both strips (a 4x vertical down-scale), and random boxes up- and down-scaled."""
    size = STRIP_ROWS + TILE_Y + 1
    H, W = 560, 60
    assert (TILE_Y - 1) * H / size + window(H, size, "bilinear") > TILE_ROWS
    shapes = [(H, W), (int(torch.randint(100, 300, ())), int(torch.randint(100, 300, ())))]
    for dtype in (torch.uint8, torch.float32):
        images = random_images(dtype, shapes)
        boxes = torch.cat([torch.tensor([[0, 0, 0, H, W]], dtype=torch.float32), random_boxes(shapes, 3)[:6]])
        flips = torch.rand(boxes.shape[0]) < 0.5
        out = run("tiled", images, boxes, size, flips=flips, interpolation=mode)
        check_crops(out, images, boxes, size, mode, True, flips=flips, what=f"{dtype} strips")


@pytest.mark.parametrize("mode", MODES)
def test_tiled_program_falls_back_on_wide_windows(mode):
    """Windows wider than the tap tables: every axis, the vertical one only, the horizontal one only."""
    images = random_images(torch.float32, [(300, 260)])
    size = 9
    boxes = torch.tensor([[0, 0, 0, 300, 260],    # both axes wide
                          [0, 10, 20, 280, 12],   # rows wide, columns not
                          [0, 5, 0, 14, 250]],    # columns wide, rows not
                         dtype=torch.float32)
    for _, _, _, h, w in boxes.tolist():
        assert max(window(h, size, mode), window(w, size, mode)) > TILE_TAPS
    flips = torch.tensor([True, False, True])
    for program in PROGRAMS:
        out = run(program, images, boxes, size, flips=flips, interpolation=mode)
        check_crops(out, images, boxes, size, mode, True, flips=flips, what=f"{program} wide window")
    # A crop taller than a strip, its rows wide: every row of a strip made by the pixel program.
    tall = random_images(torch.float32, [(1100, 40)])
    box = torch.tensor([[0, 0, 0, 1100, 40]], dtype=torch.float32)
    size = STRIP_ROWS + 1
    assert window(1100, size, mode) > TILE_TAPS
    check_crops(run("tiled", tall, box, size, interpolation=mode), tall, box, size, mode, True, what="tall wide")


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_tiled_program_stage_pitches(dtype):
    """A tile's source columns staged at each row pitch (64, 128, 256): tiles down-scaled 1x, 3x
    and 6x across; and, with no antialias (2 taps at any scale), 12x: wider than the widest pitch,
    so the pixel program runs it."""
    images = random_images(dtype, [(50, 500)])
    size = 40
    boxes = torch.tensor([[0, 0, 0, 50, 40], [0, 0, 7, 50, 120], [0, 0, 3, 50, 240], [0, 1, 11, 49, 480]],
                         dtype=torch.float32)
    flips = torch.tensor([False, True, False, True])
    widths = [(size - 1) * w / size + window(w, size, "bilinear") for w in boxes[:, 4].tolist()]
    assert widths[0] <= 64 < widths[1] <= 128 < widths[2] <= 256 and window(240, size, "bilinear") <= TILE_TAPS
    for antialias, rows in ((True, slice(0, 3)), (False, slice(0, 4))):
        out = run("tiled", images, boxes[rows], size, flips=flips[rows], antialias=antialias)
        check_crops(out, images, boxes[rows], size, "bilinear", antialias, flips=flips[rows],
                    what=f"{dtype} pitches, antialias={antialias}")


@pytest.mark.parametrize("mode", MODES)
def test_tiled_program_stages_words_and_bytes(mode):
    """uint8 rows that start 4-byte aligned are staged 4 bytes at a time, others byte by byte: the
    same crops either way. The byte path: a batch one byte into its buffer."""
    H, W = 90, 96  # a width that is a multiple of 4
    batch = torch.randint(0, 256, (2, 3, H, W), dtype=torch.uint8)
    boxes = torch.cat([random_boxes([(H, W)] * 2, 8), torch.tensor([[0, 3, 1, 80, 93], [1, 0, 7, 61, 89]])])
    flips = torch.rand(boxes.shape[0]) < 0.5
    kw = dict(flips=flips.to(DEVICE), interpolation=mode, antialias=True, mean=None, std=None,
              out_dtype=torch.float32, channels_last=False, check_on_host=True, program="tiled")
    aligned = batch.to(DEVICE)
    shifted = torch.empty(batch.numel() + 1, dtype=torch.uint8, device=DEVICE)[1:].view(batch.shape).copy_(batch)
    assert aligned.data_ptr() % 4 == 0 and shifted.data_ptr() % 4 == 1
    words = _resized_crops(_pack(aligned), boxes, 37, **kw)
    check_crops(words, list(batch), boxes, 37, mode, True, flips=flips, what="staged by words")
    torch.testing.assert_close(_resized_crops(_pack(shifted), boxes, 37, **kw), words, atol=0, rtol=0)


@pytest.mark.parametrize("program", PROGRAMS)
def test_program_channels_dtypes_layouts(program):
    """1 and 6 channels (two channel passes of 4), fp16/bf16 images, normalisation, every out dtype,
    channels-last, fractional boxes: equal to the CPU kernel (the same sums in the same order)."""
    for C in (1, 6):
        shapes = [(57, 81), (33, 29)]
        images = random_images(torch.float32, shapes, C=C)
        boxes = torch.cat([random_boxes(shapes, 6), torch.tensor([[0, 1.25, 2.5, 40.5, 70.25], [1, 0.5, 0.0, 30.0,
                                                                                               27.75]])])
        flips = torch.rand(boxes.shape[0]) < 0.5
        mean, std = torch.rand(C).tolist(), (torch.rand(C) + 0.5).tolist()
        for in_dtype in (torch.float32, torch.float16, torch.bfloat16):
            ims = [im.to(in_dtype) for im in images]
            kw = dict(flips=flips, interpolation="bicubic", mean=mean, std=std)
            ref = resized_crops([im.float() for im in ims], boxes, 35, **kw)  # the CPU kernel
            for out_dtype in (torch.float32, torch.float16, torch.bfloat16):
                got = run(program, ims, boxes, 35, out_dtype=out_dtype, channels_last=out_dtype == torch.float16, **kw)
                assert got.dtype == out_dtype and got.shape == ref.shape
                tol = 1e-4 if out_dtype == torch.float32 else 2e-2
                torch.testing.assert_close(got.cpu().float(), ref, atol=tol, rtol=tol,
                                           msg=lambda m, C=C, i=in_dtype, o=out_dtype: f"C={C} {i}->{o}: {m}")
        got8 = run(program, images, boxes, 35, flips=flips, out_dtype=torch.uint8)
        ref8 = resized_crops(images, boxes, 35, flips=flips).clamp(0, 255).round()
        assert (got8.cpu().float() - ref8).abs().max() <= 1


@pytest.mark.parametrize("program", PROGRAMS)
def test_program_on_photos(program):
    """The sample photos scikit-learn ships to DINO's crops as MultiCrop samples them (crop-major, made
    image by image: crops_per_image), uint8 in, normalised float out."""
    datasets = pytest.importorskip("sklearn.datasets")
    photos = [torch.from_numpy(im.copy()).permute(2, 0, 1).contiguous() for im in datasets.load_sample_images().images]
    mc = fastssl.MultiCrop(224, 96, 2, 3)
    params = mc.sample_params(photos, torch.Generator().manual_seed(int(torch.randint(2**31, ()))))
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    m, s = torch.tensor(mean).view(3, 1, 1), torch.tensor(std).view(3, 1, 1)
    for boxes, flips, size, K in ((params.global_boxes, params.global_flips, 224, 2),
                                  (params.local_boxes, params.local_flips, 96, 3)):
        boxes = boxes.round()  # integer boxes: torchvision's resized_crop takes no others
        out = run(program, photos, boxes, size, flips=flips, interpolation="bicubic", mean=mean, std=std,
                  crops_per_image=K)
        for n, box in enumerate(boxes.tolist()):
            ref = reference(photos[int(box[0])], box, size, "bicubic", True, bool(flips[n]))
            err = (out[n].cpu() - (ref / 255 - m) / s).abs().max().item()
            assert err <= FLOAT_ATOL / 255 / min(std), f"{program} crop {n} of {K} per image: {err:.3g}"
        # The order the crops are made in does not change them.
        same = run(program, photos, boxes, size, flips=flips, interpolation="bicubic", mean=mean, std=std)
        torch.testing.assert_close(out, same, atol=0, rtol=0)


def test_crops_per_image_must_divide_the_boxes():
    images = [torch.rand(3, 10, 10)] * 2
    boxes = torch.tensor([[0, 0, 0, 10, 10.0], [1, 0, 0, 10, 10], [0, 1, 1, 5, 5]])
    for program in PROGRAMS:
        with pytest.raises(RuntimeError, match="crops_per_image must be 0 or divide the number of boxes"):
            run(program, images, boxes, 4, crops_per_image=2)


def test_program_name_is_checked():
    images = [torch.rand(3, 10, 10)]
    with pytest.raises(RuntimeError, match="program must be 'pixel' or 'tiled'"):
        run("fast", images, torch.tensor([[0, 0, 0, 10, 10.0]]), 4)


@gpu_only("needs a GPU to run the CUDA kernels")
@pytest.mark.parametrize("program", PROGRAMS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("antialias", [True, False])
def test_cuda_program_equals_its_cpu_emulation(program, mode, antialias):
    """The CUDA kernel and its emulation on the CPU run the same steps: equal up to the rounding of
    fused multiply-adds, which the GPU compiler forms and the CPU one does not. ImageNet-size images
    to DINO's crops, small odd ones, 1/3/4 channels, uint8 and fp16 images, every out dtype."""
    shapes = [(375, 500), (120, 90), (33, 200), (7, 9), (400, 70)]
    mc = fastssl.MultiCrop(224, 96, 2, 4)
    for C, in_dtype in ((3, torch.uint8), (1, torch.uint8), (4, torch.float16)):
        images = [im.to(in_dtype) for im in random_images(torch.uint8, shapes, C=C)]
        params = mc.sample_params(images, torch.Generator().manual_seed(int(torch.randint(2**31, ()))))
        for boxes, size in ((params.global_boxes, 224), (params.local_boxes, 96), (random_boxes(shapes, 30), 37)):
            flips = torch.rand(boxes.shape[0]) < 0.5
            for out_dtype, norm in ((torch.float32, False), (torch.float32, True), (torch.bfloat16, False),
                                    (torch.uint8, False)):
                kw = dict(flips=flips, interpolation=mode, antialias=antialias, out_dtype=out_dtype,
                          mean=[0.5] * C if norm else None, std=[0.25] * C if norm else None)
                gpu = run(program, images, boxes, size, channels_last=C == 4, **kw).cpu().float()
                cpu = run(program, images, boxes, size, device=torch.device("cpu"), channels_last=C == 4, **kw).float()
                what = f"C={C} {in_dtype}->{out_dtype} norm={norm} size={size}"
                if out_dtype == torch.uint8:
                    assert (gpu - cpu).abs().max() <= 1, what
                else:
                    scale = 1 / (255 * 0.25) if norm else 1.0
                    tol = FLOAT_ATOL * scale if out_dtype == torch.float32 else 1e-2 * (cpu.abs().max().item() + 1)
                    torch.testing.assert_close(gpu, cpu, atol=tol, rtol=1e-4 if out_dtype == torch.float32 else 1e-2,
                                               msg=lambda m, w=what: f"{w}: {m}")

