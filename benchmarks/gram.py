"""DINOv3's Gram anchoring loss: fastssl's fused kernels against the authors' GramLoss, eager and compiled.

    python -m benchmarks.gram [--preset smoke|cpu|target|lease] [--out DIR]

Each case is one training step's Gram loss, forward and backward to the student's patch
features (the Gram teacher's have no gradient), on the same input tensors for every
contender: B images of N patches, d-wide features, normalised, negatives kept (the
settings of the authors' released configurations), per image (``[B, N, N]`` matrices) or
over the batch (``[B N, B N]``).

Contenders:

* ``fastssl``: ``fastssl.functional.gram_loss`` (the Triton kernels on CUDA: no similarity
  matrix, tile products fp32-accurate; the PyTorch path elsewhere);
* ``fastssl-torch``: ``backend="torch"`` (CUDA only: on the CPU it is what ``fastssl`` runs);
* ``authors``: their ``GramLoss.forward`` as written (``fastssl.reference.dinov3.gram_loss``:
  fp32 casts, two matmuls, in-place masks, ``MSELoss``) with PyTorch's default fp32 matmuls;
* ``authors+tf32``: the same with TF32 matmuls (``torch.backends.cuda.matmul.allow_tf32``), as
  the authors train; CUDA only (the CPU has no TF32);
* ``authors+compile``: the same through ``torch.compile`` with TF32, compiled and warmed up
  before any timing.

Before timing, each contender's loss and gradient are checked against the authors' step in
fp32 (no TF32) on the same inputs; contenders with TF32 products to a looser tolerance.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks import harness
from fastssl.functional import gram_loss
from fastssl.reference import dinov3 as ref

NAME = "gram"
CONTENDERS = ("fastssl", "fastssl-torch", "authors", "authors+tf32", "authors+compile")
CUDA_ONLY = ("fastssl-torch", "authors+tf32")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
TOLERANCE = {"fp32": 1e-4, "bf16": 1e-2}
TF32_TOLERANCE = 5e-3  # TF32 products (10 bits) of the normalised fp32 features
TF32 = ("authors+tf32", "authors+compile")
GOALS = dict(vs_authors_tf32=1.5, mem_over_feats=3.0)


@dataclass(frozen=True)
class Case:
    B: int
    N: int   # patches per image
    d: int
    dtype: str
    img_level: bool = True

    @property
    def label(self) -> str:
        level = "image" if self.img_level else "batch"
        return f"{level} B={self.B} N={self.N} d={self.d} {self.dtype}"


@dataclass(frozen=True)
class Preset:
    cases: list
    compile: bool = True
    sets: int = 3
    warmup: int | None = None
    reps: int | None = None


PRESETS = {
    "smoke": Preset([Case(2, 40, 24, "fp32"), Case(2, 30, 16, "bf16", img_level=False)], sets=1, warmup=1, reps=3),
    "cpu": Preset([Case(4, 256, 384, dtype) for dtype in DTYPES] + [Case(2, 256, 384, "fp32", img_level=False)],
                  sets=2, warmup=2, reps=5),
    "target": Preset([Case(16, N, 1024, dtype) for N in (1024, 4096) for dtype in DTYPES]
                     + [Case(16, 1024, 1024, "bf16", img_level=False)], sets=2),
    # The lease command's (its stage has 60 s): the goals' cases (bf16) only, no compile (the goals compare
    # with the authors' eager code), fewer calls (the authors' step at N = 4096 takes tens of ms).
    "lease": Preset([Case(16, 1024, 1024, "bf16"), Case(16, 4096, 1024, "bf16")], compile=False, sets=2, warmup=3,
                    reps=10),
}


def default_preset(device: torch.device) -> str:
    return "target" if device.type == "cuda" else "cpu"


# ----------------------------------------------------------------------------- one step per contender

@contextlib.contextmanager
def _tf32(enabled: bool):
    """PyTorch's TF32 matmul setting for the duration (CUDA; the CPU ignores it)."""
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def make_inputs(case: Case, device: torch.device, seed: int) -> dict:
    gen = torch.Generator(device=device).manual_seed(seed)
    dtype = DTYPES[case.dtype]
    student = torch.randn(case.B, case.N, case.d, generator=gen, device=device).to(dtype).requires_grad_()
    teacher = torch.randn(case.B, case.N, case.d, generator=gen, device=device).to(dtype)
    return dict(student=student, teacher=teacher)


def authors_step(case: Case, inputs: dict):
    return ref.gram_loss(inputs["student"], inputs["teacher"], case.img_level, True, False, False)


def build(name: str, case: Case):
    """``step(inputs) -> loss`` of a contender."""
    if name in ("fastssl", "fastssl-torch"):
        backend = "auto" if name == "fastssl" else "torch"
        return lambda inputs: gram_loss(inputs["student"], inputs["teacher"], img_level=case.img_level,
                                        remove_neg=False, backend=backend)
    if name == "authors":
        def step(inputs):
            with _tf32(False):
                return authors_step(case, inputs)
        return step
    if name in TF32:
        inner = (torch.compile(lambda inputs: authors_step(case, inputs), dynamic=False) if name == "authors+compile"
                 else lambda inputs: authors_step(case, inputs))

        def step(inputs):
            with _tf32(True):
                return inner(inputs)
        return step
    raise ValueError(f"unknown contender {name!r}")


def fwd_bwd(step, inputs: dict):
    return torch.autograd.grad(step(inputs), inputs["student"])


# ----------------------------------------------------------------------------- running

def check(steps: dict, case: Case, inputs: dict) -> dict[str, float]:
    """Each contender's loss and student gradient against the authors' step in fp32 (no TF32, same
    rounded inputs); raises beyond the tolerance. Also the warm-up: Triton and torch.compile compile here."""
    ref_inputs = dict(student=inputs["student"].detach().float().requires_grad_(), teacher=inputs["teacher"].float())
    with _tf32(False):
        ref_loss = authors_step(case, ref_inputs)
        (ref_grad,) = torch.autograd.grad(ref_loss, ref_inputs["student"])
    errors = {}
    for name, step in steps.items():
        loss = step(inputs)
        (grad,) = torch.autograd.grad(loss, inputs["student"])
        err = max(harness.rel_err(loss, ref_loss), harness.rel_err(grad, ref_grad))
        tol = max(TOLERANCE[case.dtype], TF32_TOLERANCE) if name in TF32 else TOLERANCE[case.dtype]
        if not err <= tol:
            raise AssertionError(f"gram {case.label}: {name} differs from the authors' step in fp32 by {err:.3e} "
                                 f"> {tol:.0e}")
        errors[name] = err
    return errors


def run_case(case: Case, preset: Preset, device: torch.device, contenders: Sequence[str], info: dict,
             seed: int) -> list[dict]:
    names = [c for c in CONTENDERS if c in contenders and (c != "authors+compile" or preset.compile)]
    if "authors+compile" in names:
        torch.compiler.reset()
    steps = {name: build(name, case) for name in names}
    errors: dict[str, float] = {}
    sets = []
    for s in range(preset.sets):
        inputs = make_inputs(case, device, seed + s)
        for name, err in check(steps, case, inputs).items():
            errors[name] = max(errors.get(name, 0.0), err)
        calls = {name: (lambda st=st, inputs=inputs: fwd_bwd(st, inputs)) for name, st in steps.items()}
        sets.append(harness.time_contenders(calls, device, warmup=preset.warmup, reps=preset.reps, rotate=s))
        del inputs, calls
    if device.type == "cuda":
        torch.cuda.empty_cache()
    stats = harness.combine_sets(sets)
    feats_bytes = case.B * case.N * case.d * 4  # the student's features in fp32
    rows = case.N if case.img_level else case.B * case.N
    matrix_bytes = (case.B if case.img_level else 1) * rows * rows * 4  # one similarity matrix in fp32
    base = stats.get("authors+tf32", stats.get("authors"))
    records = []
    for name in names:
        st = stats[name]
        mem = st["peak_mem_bytes"]
        records.append(dict(case=case.label, B=case.B, N=case.N, d=case.d, dtype=case.dtype,
                            img_level=case.img_level, contender=name, mode="fwd+bwd", median_ms=st["median_ms"],
                            min_ms=st["min_ms"], max_ms=st["max_ms"], reps=st["reps"], sets=st["sets"],
                            peak_mem_mb=None if mem is None else mem / 2**20,
                            mem_over_feats=None if mem is None else mem / feats_bytes,
                            mem_over_matrix=None if mem is None else mem / matrix_bytes,
                            speedup=None if base is None else base["median_ms"] / st["median_ms"],
                            max_rel_err=errors[name]))
    return records


def run(preset: Preset, device: torch.device, info: dict, *, contenders: Sequence[str] | None = None,
        cases: Sequence[Case] | None = None, seed: int = 0) -> list[dict]:
    if contenders is None:
        contenders = [c for c in CONTENDERS if device.type == "cuda" or c not in CUDA_ONLY]
    return harness.run_cases(NAME, cases or preset.cases, preset.cases,
                             lambda c, sd: run_case(c, preset, device, contenders, info, sd), seed)


# ----------------------------------------------------------------------------- reporting

def target_lines(records: Sequence[dict], on_cuda: bool) -> list[str]:
    """The issue's goals (B = 16, d = 1024, bf16, per image, forward + backward), judged on CUDA only:
    no N x N matrix (peak memory a few times the features), and >= 1.5x the authors with TF32 at N = 4096."""
    lines = []
    for case in dict.fromkeys(r["case"] for r in records if r["B"] == 16 and r["d"] == 1024 and r["dtype"] == "bf16"
                              and r["img_level"]):
        rows = {r["contender"]: r for r in records if r["case"] == case}
        if "fastssl" not in rows:
            continue
        ours = rows["fastssl"]
        lines.append(f"Targets (issue), {case}, fwd+bwd:")
        if ours["N"] == 4096 and "authors+tf32" in rows:
            lines.append(harness.goal_line(f">= {GOALS['vs_authors_tf32']}x faster than authors+tf32",
                                           rows["authors+tf32"]["median_ms"] / ours["median_ms"], "x",
                                           GOALS["vs_authors_tf32"], on_cuda))
        lines.append(harness.goal_line(f"no N x N matrix: peak memory <= {GOALS['mem_over_feats']}x the fp32 "
                                       "features", ours["mem_over_feats"], "x", GOALS["mem_over_feats"], on_cuda,
                                       higher=False))
    return lines


def columns(records: Sequence[dict]) -> list[str]:
    cols = ["case", "contender", "median_ms", "min_ms", "max_ms", "speedup", "peak_mem_mb", "mem_over_feats",
            "mem_over_matrix", "max_rel_err"]
    return [c for c in cols if any(r.get(c) is not None for r in records)]


def notes(preset_name: str, preset: Preset, records: Sequence[dict], device: torch.device) -> str:
    lines = [
        f"Preset `{preset_name}`: {len(preset.cases)} cases, {preset.sets} random input sets each; times are the "
        "median over sets of the per-set median of one forward + backward (student gradient).",
        "Speedup = authors+tf32's median (authors' on a CPU) / this median. Memory: peak bytes allocated by the "
        "step beyond its inputs, over the student's features in fp32 (`mem_over_feats`) and over one similarity "
        "matrix in fp32 (`mem_over_matrix`; CUDA only).",
        "Correctness: loss and student gradient against the authors' step in fp32 without TF32 on the same rounded "
        f"inputs, relative tolerance {', '.join(f'{t:.0e} ({d})' for d, t in TOLERANCE.items())}, "
        f"{TF32_TOLERANCE:.0e} for the TF32 contenders.",
    ]
    if device.type != "cuda":
        lines.append("CPU run: `fastssl` is the PyTorch path (the Triton kernels need a GPU).")
    target = target_lines(records, device.type == "cuda")
    return "\n".join(f"- {line}" for line in lines) + ("\n\n" + "\n".join(target) if target else "")


def main(argv: list[str] | None = None) -> dict[str, Path]:
    return harness.benchmark_main(sys.modules[__name__], argv, filter_example="image N=4096 bf16")


if __name__ == "__main__":
    main()
