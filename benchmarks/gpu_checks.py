"""Workloads for the GPU tools that see what the tests and timings cannot: a profiler's hardware
counters and compute-sanitizer's memory and race checkers.

    python -m benchmarks.gpu_checks counters   # the multicrop target batch, for `ncu`
    python -m benchmarks.gpu_checks sanitize   # every fused op once, small, for `compute-sanitizer`

``benchmarks/gpu_session.sh profile`` and ``sanitize`` run them under the tools.

``counters`` runs the crop op (the tiled program, then the pixel one) on the multicrop
benchmark's target batch and prints what the static model of the tiled program's sm_90 code
predicts for it, to set beside the counters: the model says the kernel is bound by instruction
issue and by the shared-memory pipe alike (~0.66-0.67 ms on an H100), which decides what its next
version should cut. ``sanitize`` runs, on small odd shapes, both crop programs (every channel
count and dtype path, flips, boxes at the image borders), the DINO loss, the PAWS snn with dense
labels and class ids, and the EMA update, forward and backward where there is one: under
memcheck an out-of-bounds access, under racecheck a shared-memory race of the crop programs,
shows up as an error the sanitizer reports. Run without the tools, each is a quick smoke run.
"""

from __future__ import annotations

import argparse
import sys

import torch

import fastssl
from benchmarks import multicrop

# The static model of the tiled program (session 7, sm_90 SASS, H100 at 1.755 GHz, 132 SMs) for
# the target batch: warp instructions issued and shared-memory wavefronts, per crop size.
MODEL = {
    "224 crops": dict(thread_instructions_per_value=105, values=256 * 2 * 3 * 224 * 224),
    "96 crops": dict(thread_instructions_per_value=161, values=256 * 10 * 3 * 96 * 96),
    "issue-bound ms": 0.657,
    "shared-memory-bound ms": 0.674,
}


def counters(device: torch.device, reps: int) -> None:
    """The crop op on the target batch: `reps` calls of the tiled program, then of the pixel one."""
    gen = torch.Generator(device=device).manual_seed(0)
    case = multicrop.PRESETS["target"].cases[0]
    images = torch.randint(0, 256, (case.B, 3, case.H, case.W), generator=gen, device=device, dtype=torch.uint8)
    m = multicrop  # the benchmark's crops: bicubic, antialiased, flipped, normalised
    mc = fastssl.MultiCrop(m.GLOBAL, m.LOCAL, m.N_GLOBAL, m.N_LOCAL, m.GLOBAL_SCALE, m.LOCAL_SCALE)
    ops = multicrop._fastssl_op(images, mc, gen, pixel=device.type == "cuda")
    for name, op in ops.items():
        for _ in range(reps):
            op()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        print(f"ran {name} {reps}x: {case.label}")
    print("model of the tiled program (not a measurement):")
    for key, value in MODEL.items():
        if isinstance(value, dict):
            warps = value["thread_instructions_per_value"] * value["values"] / 32
            print(f"  {key}: {value['thread_instructions_per_value']} thread instructions a value, "
                  f"{warps / 1e6:.0f} M warp instructions (smsp__inst_executed.sum)")
        else:
            print(f"  {key}: {value}")


def _crops(device: torch.device) -> None:
    from fastssl.ops._crops import _pack, _resized_crops

    gen = torch.Generator().manual_seed(1)
    shapes = [(3, 61, 77), (3, 40, 100), (3, 123, 45)]  # widths both multiples of 4 (word stage) and not
    for channels, dtype in [(3, torch.uint8), (1, torch.uint8), (2, torch.uint8), (3, torch.float32),
                            (3, torch.bfloat16)]:
        images = [torch.randint(0, 256, (channels, h, w), generator=gen).to(dtype).to(device) for _, h, w in shapes]
        boxes = []
        for i, (_, h, w) in enumerate(shapes):
            boxes += [[i, 0, 0, h, w], [i, h - 7, w - 9, 7, 9], [i, 3, 5, h - 3, w - 5], [i, 0.5, 1.25, h / 2, w / 3]]
        boxes = torch.tensor(boxes, dtype=torch.float32, device=device)
        flips = torch.arange(len(boxes), device=device) % 2 == 0
        resizes = [(37, "bicubic", True), (150, "bilinear", False), (13, "bicubic", False)]
        for program in ("tiled", "pixel"):
            for size, interpolation, antialias in resizes:
                for channels_last in (False, True):
                    _resized_crops(_pack(images), boxes, size, flips=flips, interpolation=interpolation,
                                   antialias=antialias, mean=None, std=None, out_dtype=torch.float32,
                                   channels_last=channels_last, check_on_host=True, program=program)
    print("crops: both programs, 1-3 channels, uint8/float/bf16, border boxes, flips")


def _losses(device: torch.device) -> None:
    gen = torch.Generator().manual_seed(2)
    for dtype in (torch.float32, torch.bfloat16):
        B, K, ncrops = 3, 1000, 6
        student = torch.randn(ncrops * B, K, generator=gen).to(device, dtype).requires_grad_()
        teacher = torch.randn(2 * B, K, generator=gen).to(device, dtype)
        loss, _ = fastssl.functional.dino_loss(student, teacher, torch.zeros(1, K, device=device), ncrops, 0.04)
        loss.backward()
        for labels in ("dense", "ids"):
            N, M, d, C = 37, 301, 40, 13
            q = torch.randn(N, d, generator=gen).to(device, dtype).requires_grad_()
            s = torch.randn(M, d, generator=gen).to(device, dtype).requires_grad_()
            ids = torch.randint(0, C, (M,), generator=gen).to(device)
            y = torch.nn.functional.one_hot(ids, C).float() if labels == "dense" else ids
            probs = fastssl.functional.snn(q, s, y, 0.1, num_classes=C)
            probs.backward(torch.randn(probs.shape, generator=gen).to(device))
    print("losses: DINO fwd+bwd, PAWS snn fwd+bwd (dense, ids), fp32 and bf16")


def _ema(device: torch.device) -> None:
    gen = torch.Generator().manual_seed(3)
    shapes = [(), (1,), (7, 3), (384,), (1000, 13), (5, 5, 5)]
    for t_dtype, s_dtype in [(torch.float32, torch.float32), (torch.bfloat16, torch.float32)]:
        teacher = [torch.randn(shape, generator=gen).to(device, t_dtype) for shape in shapes]
        student = [torch.randn(shape, generator=gen).to(device, s_dtype) for shape in shapes]
        fastssl.ema_update_(teacher, student, 0.996)
        fastssl.ema_update_(teacher, student, torch.tensor(0.9, device=device))
    print("ema: odd shapes, mixed dtypes, float and tensor momentum")


def sanitize(device: torch.device, only: str | None) -> None:
    parts = {"crops": _crops, "losses": _losses, "ema": _ema}
    for name, part in parts.items():
        if only in (None, name):
            part(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("workload", choices=("counters", "sanitize"))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--reps", type=int, default=3, help="counters: calls of each program")
    parser.add_argument("--only", choices=("crops", "losses", "ema"), help="sanitize: one part")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.workload == "counters":
        counters(device, args.reps)
    else:
        sanitize(device, args.only)
    return 0


if __name__ == "__main__":
    sys.exit(main())
