"""KoLeo (DINOv2 / DINOv3): fastssl's loss against the authors' KoLeoLoss, eager and compiled.

    python -m benchmarks.koleo [--preset smoke|cpu|target|lease] [--out DIR]

Each case is one KoLeo term, forward and backward, on the same ``[B, D]`` features for every
contender: the global batch of DINOv3's distributed KoLeo on one process (B = 4,096), its
nearest neighbour each (topk = 1, the authors' configurations).

Contenders:

* ``fastssl``: ``fastssl.functional.koleo_loss`` (on CUDA the Triton top-k search: no B x B
  inner-product matrix, fp32-accurate products; PyTorch elsewhere);
* ``fastssl-torch``: ``backend="torch"`` (CUDA only: on the CPU it is what ``fastssl`` runs);
* ``authors``: their ``KoLeoLoss.forward`` as written (``fastssl.reference.dinov3.koleo_loss``:
  normalise, a B x B matmul with -1 on its diagonal, ``torch.max``, ``nn.PairwiseDistance``, in
  the input's dtype) with PyTorch's default fp32 matmuls;
* ``authors+tf32``: the same with TF32 matmuls; CUDA only;
* ``authors+compile``: the same through ``torch.compile``, compiled and warmed up before timing.

Before timing, each contender's loss and gradient are checked against the authors' step in
fp32 on the same rounded inputs. The authors' code keeps bf16 features in bf16 (autocast off
keeps the input's dtype), where inner products tie and neighbours differ, and TF32 products
may flip a near tie too: for those contenders only the loss is checked, to a bf16 (TF32)
tolerance.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks import harness
from fastssl.functional import koleo_loss
from fastssl.reference import dinov3 as ref

NAME = "koleo"
CONTENDERS = ("fastssl", "fastssl-torch", "authors", "authors+tf32", "authors+compile")
CUDA_ONLY = ("fastssl-torch", "authors+tf32")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
TOLERANCE = {"fp32": 1e-4, "bf16": 1e-2}
AUTHORS_BF16_LOSS_TOLERANCE = 5e-2  # their loss computed in bf16
TF32_TOLERANCE = 5e-3
GOALS = dict(vs_authors=1.0)


@dataclass(frozen=True)
class Case:
    B: int
    D: int
    dtype: str

    @property
    def label(self) -> str:
        return f"B={self.B} D={self.D} {self.dtype}"


@dataclass(frozen=True)
class Preset:
    cases: list
    compile: bool = True
    sets: int = 3
    warmup: int | None = None
    reps: int | None = None


PRESETS = {
    "smoke": Preset([Case(64, 48, "fp32"), Case(40, 32, "bf16")], sets=1, warmup=1, reps=3),
    "cpu": Preset([Case(1024, D, dtype) for D in (384, 1024) for dtype in DTYPES], sets=2, warmup=2, reps=5),
    "target": Preset([Case(4096, D, dtype) for D in (384, 768, 1024) for dtype in DTYPES], sets=2),
    # The lease command's (its stage has 30 s): the goals' cases, no compile (the goal compares with the
    # authors' eager code).
    "lease": Preset([Case(4096, D, "bf16") for D in (384, 1024)] + [Case(4096, 1024, "fp32")], compile=False, sets=2,
                    warmup=5, reps=25),
}


def default_preset(device: torch.device) -> str:
    return "target" if device.type == "cuda" else "cpu"


# ----------------------------------------------------------------------------- one step per contender

@contextlib.contextmanager
def _tf32(enabled: bool):
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def make_inputs(case: Case, device: torch.device, seed: int) -> dict:
    gen = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(case.B, case.D, generator=gen, device=device).to(DTYPES[case.dtype])
    return dict(x=x.requires_grad_())


def build(name: str, case: Case):
    """``step(inputs) -> loss`` of a contender."""
    if name in ("fastssl", "fastssl-torch"):
        backend = "auto" if name == "fastssl" else "torch"
        return lambda inputs: koleo_loss(inputs["x"], backend=backend)
    inner = torch.compile(ref.koleo_loss, dynamic=False) if name == "authors+compile" else ref.koleo_loss
    tf32 = name in ("authors+tf32", "authors+compile")

    def step(inputs):
        with _tf32(tf32):
            return inner(inputs["x"])
    if name in ("authors", "authors+tf32", "authors+compile"):
        return step
    raise ValueError(f"unknown contender {name!r}")


def fwd_bwd(step, inputs: dict):
    return torch.autograd.grad(step(inputs), inputs["x"])


# ----------------------------------------------------------------------------- running

def check(steps: dict, case: Case, inputs: dict) -> dict[str, float]:
    """Each contender against the authors' step in fp32 (no TF32) on the same rounded inputs; raises beyond
    the tolerance. Also the warm-up: Triton and torch.compile compile here."""
    x32 = inputs["x"].detach().float().requires_grad_()
    with _tf32(False):
        ref_loss = ref.koleo_loss(x32)
        (ref_grad,) = torch.autograd.grad(ref_loss, x32)
    errors = {}
    for name, step in steps.items():
        loss = step(inputs)
        (grad,) = torch.autograd.grad(loss, inputs["x"])
        # The authors' bf16 runs and TF32 products may pick other neighbours where inner products (nearly)
        # tie: their gradient then goes to other rows; only their loss is compared.
        loss_only = name.startswith("authors") and (case.dtype == "bf16" or name != "authors")
        err = harness.rel_err(loss, ref_loss)
        if not loss_only:
            err = max(err, harness.rel_err(grad, ref_grad))
        tol = TOLERANCE[case.dtype]
        if loss_only:
            tol = AUTHORS_BF16_LOSS_TOLERANCE if case.dtype == "bf16" else max(tol, TF32_TOLERANCE)
        if not err <= tol:
            raise AssertionError(f"koleo {case.label}: {name} differs from the authors' step in fp32 by {err:.3e} "
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
    authors_ms = stats["authors"]["median_ms"] if "authors" in stats else None
    records = []
    for name in names:
        st = stats[name]
        mem = st["peak_mem_bytes"]
        records.append(dict(case=case.label, B=case.B, D=case.D, dtype=case.dtype, contender=name, mode="fwd+bwd",
                            median_ms=st["median_ms"], min_ms=st["min_ms"], max_ms=st["max_ms"], reps=st["reps"],
                            sets=st["sets"], peak_mem_mb=None if mem is None else mem / 2**20,
                            speedup=None if authors_ms is None else authors_ms / st["median_ms"],
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
    """The issue's goal (global batch 4,096, D = 384 to 1,024, forward + backward): at least the authors'
    speed, judged on CUDA only."""
    lines = []
    for case in dict.fromkeys(r["case"] for r in records if r["B"] == 4096):
        rows = {r["contender"]: r for r in records if r["case"] == case}
        if "fastssl" not in rows or "authors" not in rows:
            continue
        lines.append(f"Targets (issue), {case}, fwd+bwd:")
        lines.append(harness.goal_line(f">= {GOALS['vs_authors']}x the authors' speed",
                                       rows["authors"]["median_ms"] / rows["fastssl"]["median_ms"], "x",
                                       GOALS["vs_authors"], on_cuda))
    return lines


def columns(records: Sequence[dict]) -> list[str]:
    cols = ["case", "contender", "median_ms", "min_ms", "max_ms", "speedup", "peak_mem_mb", "max_rel_err"]
    return [c for c in cols if any(r.get(c) is not None for r in records)]


def notes(preset_name: str, preset: Preset, records: Sequence[dict], device: torch.device) -> str:
    lines = [
        f"Preset `{preset_name}`: {len(preset.cases)} cases, {preset.sets} random input sets each; times are the "
        "median over sets of the per-set median of one forward + backward.",
        "Speedup = authors' median (fp32 matmul, no TF32) / this median. Memory: peak bytes allocated by the step "
        "beyond its inputs (CUDA only).",
        "Correctness: loss and gradient against the authors' step in fp32 on the same rounded inputs, relative "
        f"tolerance {', '.join(f'{t:.0e} ({d})' for d, t in TOLERANCE.items())}; the authors' runs with TF32 "
        f"({TF32_TOLERANCE:.0e}) or bf16 ({AUTHORS_BF16_LOSS_TOLERANCE:.0e}): the loss only (near ties may pick "
        "other neighbours).",
    ]
    if device.type != "cuda":
        lines.append("CPU run: `fastssl` is the PyTorch path (the Triton search needs a GPU).")
    target = target_lines(records, device.type == "cuda")
    return "\n".join(f"- {line}" for line in lines) + ("\n\n" + "\n".join(target) if target else "")


def main(argv: list[str] | None = None) -> dict[str, Path]:
    return harness.benchmark_main(sys.modules[__name__], argv, filter_example="D=1024 bf16")


if __name__ == "__main__":
    main()
