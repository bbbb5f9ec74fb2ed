"""The DINOv3 objective: fastssl's fused CLS and iBOT losses with Sinkhorn-Knopp targets against
the authors' code, eager and compiled.

    python -m benchmarks.dinov3 [--preset smoke|cpu|target] [--out DIR]

Each case is one training step's loss work, forward and backward, on the same input tensors
for every contender:

* ``cls``: Sinkhorn-Knopp over the teacher's 2 global crops ``[2, B, K]``, then DINOv3's two
  CLS terms, the 8 local crops against both teacher crops and the 2 global crops against the
  other one (``ignore_diagonal``), weighted as ``compute_losses`` (2 x 8 and 2 x 1 terms);
* ``ibot``: Sinkhorn-Knopp over the teacher's masked patches ``[n, K]``, then the masked-patch
  loss with per-patch weights (``forward_masked``), for B images of 196 patches, half masked.

Contenders:

* ``fastssl``: ``fastssl.functional.sinkhorn_knopp`` targets and ``dino_cross_entropy`` (the
  Triton kernels on CUDA, the PyTorch closed form elsewhere): no ``[rows, K]`` probability,
  log-softmax or gradient copy of them;
* ``fastssl-torch``: ``backend="torch"`` (CUDA only: on the CPU it is what ``fastssl`` runs);
* ``authors``: their Sinkhorn-Knopp (fp32, in place) and their loss (an fp32 log-softmax per
  crop and an einsum over the pairs; iBOT's elementwise product and sum), as written in
  facebookresearch/dinov3 (``fastssl.reference.dinov2``);
* ``authors+compile``: the same step through ``torch.compile`` (DINOv3 compiles its
  Sinkhorn-Knopp module), compiled and warmed up before any timing.

Before timing, each contender's loss and gradients are checked against the authors' step in
fp32 on the same inputs.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks import harness
from fastssl.functional import dino_cross_entropy, sinkhorn_knopp
from fastssl.reference import dinov2 as ref

NAME = "dinov3"
CONTENDERS = ("fastssl", "fastssl-torch", "authors", "authors+compile")
CUDA_ONLY = ("fastssl-torch",)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
TOLERANCE = {"fp32": 1e-4, "bf16": 1e-2}
TEACHER_TEMP, STUDENT_TEMP, LOCAL = 0.07, 0.1, 8
# compute_losses' scales: global terms 2 x (2 - 1) with the diagonal out, local 2 x 8.
GLOBAL_SCALE, LOCAL_SCALE = 2 / (2 + 2 * LOCAL), 2 * LOCAL / (2 + 2 * LOCAL)
GOALS = dict(vs_authors=3.0, vs_compile=1.5, mem_over_grad=1.1)


@dataclass(frozen=True)
class Case:
    kind: str  # "cls" or "ibot"
    B: int     # images
    K: int
    dtype: str
    patches: int = 196

    @property
    def rows(self) -> int:
        """iBOT: the masked patches (half of them)."""
        return self.B * self.patches // 2

    @property
    def label(self) -> str:
        what = f"2+{LOCAL} crops" if self.kind == "cls" else f"{self.rows} masked patches"
        return f"{self.kind} B={self.B} K={self.K} {what} {self.dtype}"


@dataclass(frozen=True)
class Preset:
    cases: list
    compile: bool = True
    sets: int = 3
    warmup: int | None = None
    reps: int | None = None


PRESETS = {
    "smoke": Preset([Case("cls", 4, 300, "fp32"), Case("ibot", 2, 300, "bf16", patches=25)], sets=1, warmup=1,
                    reps=3),
    "cpu": Preset([Case(kind, B, K, dtype, patches) for kind, B, K, patches in
                   (("cls", 16, 4096, 196), ("ibot", 8, 2048, 49)) for dtype in DTYPES], sets=2, warmup=2, reps=10),
    "target": Preset([Case("cls", 64, K, dtype) for K in (65536, 262144) for dtype in DTYPES]
                     + [Case("ibot", 64, 65536, dtype) for dtype in DTYPES], sets=2),
    # The lease command's: the goals' cases (bf16) only.
    "lease": Preset([Case("cls", 64, 65536, "bf16"), Case("cls", 64, 262144, "bf16"), Case("ibot", 64, 65536, "bf16")],
                    sets=2),
}


def default_preset(device: torch.device) -> str:
    return "target" if device.type == "cuda" else "cpu"


# ----------------------------------------------------------------------------- one step per contender

def make_inputs(case: Case, device: torch.device, seed: int) -> dict:
    gen = torch.Generator(device=device).manual_seed(seed)
    dtype = DTYPES[case.dtype]

    def logits(*shape, grad=False):
        x = torch.randn(*shape, generator=gen, device=device).to(dtype)
        return x.requires_grad_() if grad else x

    if case.kind == "cls":
        return dict(local=logits(LOCAL, case.B, case.K, grad=True), glob=logits(2, case.B, case.K, grad=True),
                    teacher=logits(2, case.B, case.K))
    weights = (torch.rand(case.rows, generator=gen, device=device) + 0.5) / case.patches
    return dict(student=logits(case.rows, case.K, grad=True), teacher=logits(case.rows, case.K), weights=weights)


def _students(inputs: dict) -> list[torch.Tensor]:
    return [inputs[k] for k in ("local", "glob", "student") if k in inputs]


def fastssl_step(case: Case, inputs: dict, backend: str):
    if case.kind == "cls":
        targets = sinkhorn_knopp(inputs["teacher"], TEACHER_TEMP, backend=backend)
        return (LOCAL_SCALE * dino_cross_entropy(inputs["local"], targets, backend=backend)
                + GLOBAL_SCALE * dino_cross_entropy(inputs["glob"], targets, ignore_diagonal=True, backend=backend))
    targets = sinkhorn_knopp(inputs["teacher"], TEACHER_TEMP, backend=backend)
    return dino_cross_entropy(inputs["student"], targets, weights=inputs["weights"], scale=1 / case.B,
                              backend=backend)


def authors_step(case: Case, inputs: dict):
    """The authors' code path: fp32 Sinkhorn-Knopp, then their losses."""
    with torch.no_grad():
        q = ref.sinkhorn_knopp(inputs["teacher"].float().flatten(0, -2), TEACHER_TEMP)
    if case.kind == "cls":
        q = q.view(2, case.B, case.K)
        return (LOCAL_SCALE * ref.cross_entropy_over_pairs_einsum(inputs["local"], q, STUDENT_TEMP)
                + GLOBAL_SCALE * ref.cross_entropy_over_pairs_einsum(inputs["glob"], q, STUDENT_TEMP, True))
    per_row = (q * torch.log_softmax(inputs["student"].float() / STUDENT_TEMP, dim=-1)).sum(-1)
    return -(per_row * inputs["weights"]).sum() / case.B


def build(name: str, case: Case):
    """``step(inputs) -> loss`` of a contender."""
    if name == "fastssl":
        return lambda inputs: fastssl_step(case, inputs, "auto")
    if name == "fastssl-torch":
        return lambda inputs: fastssl_step(case, inputs, "torch")
    if name == "authors":
        return lambda inputs: authors_step(case, inputs)
    if name == "authors+compile":
        return torch.compile(lambda inputs: authors_step(case, inputs), dynamic=False)
    raise ValueError(f"unknown contender {name!r}")


def fwd_bwd(step, inputs: dict):
    return torch.autograd.grad(step(inputs), _students(inputs))


# ----------------------------------------------------------------------------- running

def check(steps: dict, case: Case, inputs: dict) -> dict[str, float]:
    """Each contender's loss and gradients against the authors' step in fp32 (same rounded inputs);
    raises beyond the tolerance. Also the warm-up: Triton and torch.compile compile here."""
    ref_inputs = {k: (v.detach().float().requires_grad_(v.requires_grad) if v.is_floating_point() else v)
                  for k, v in inputs.items()}
    ref_loss = authors_step(case, ref_inputs)
    ref_grads = torch.autograd.grad(ref_loss, _students(ref_inputs))
    errors = {}
    for name, step in steps.items():
        loss = step(inputs)
        grads = torch.autograd.grad(loss, _students(inputs))
        err = max([harness.rel_err(loss, ref_loss)] + [harness.rel_err(g, r) for g, r in zip(grads, ref_grads,
                                                                                                strict=True)])
        if not err <= TOLERANCE[case.dtype]:
            raise AssertionError(f"dinov3 {case.label}: {name} differs from the authors' step in fp32 by "
                                 f"{err:.3e} > {TOLERANCE[case.dtype]:.0e}")
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
        # Every contender closes over the same input tensors.
        calls = {name: (lambda st=st, inputs=inputs: fwd_bwd(st, inputs)) for name, st in steps.items()}
        sets.append(harness.time_contenders(calls, device, warmup=preset.warmup, reps=preset.reps, rotate=s))
        del inputs, calls
    if device.type == "cuda":
        torch.cuda.empty_cache()
    stats = harness.combine_sets(sets)
    rows = (LOCAL + 2) * case.B if case.kind == "cls" else case.rows
    grad_bytes = rows * case.K * DTYPES[case.dtype].itemsize
    authors_ms = stats["authors"]["median_ms"] if "authors" in stats else None
    records = []
    for name in names:
        st = stats[name]
        mem = st["peak_mem_bytes"]
        records.append(dict(case=case.label, kind=case.kind, B=case.B, K=case.K, dtype=case.dtype, contender=name,
                            mode="fwd+bwd", median_ms=st["median_ms"], min_ms=st["min_ms"], max_ms=st["max_ms"],
                            reps=st["reps"], sets=st["sets"], peak_mem_mb=None if mem is None else mem / 2**20,
                            mem_over_grad=None if mem is None else mem / grad_bytes,
                            speedup=None if authors_ms is None else authors_ms / st["median_ms"],
                            max_rel_err=errors[name], tolerance=TOLERANCE[case.dtype]))
    return records


def run(preset: Preset, device: torch.device, info: dict, *, contenders: Sequence[str] | None = None,
        cases: Sequence[Case] | None = None, seed: int = 0) -> list[dict]:
    if contenders is None:
        contenders = [c for c in CONTENDERS if device.type == "cuda" or c not in CUDA_ONLY]
    return harness.run_cases(NAME, cases or preset.cases, preset.cases,
                             lambda c, sd: run_case(c, preset, device, contenders, info, sd), seed)


# ----------------------------------------------------------------------------- reporting

def target_lines(records: Sequence[dict], on_cuda: bool) -> list[str]:
    """The issue's goals (B = 64, bf16 logits, forward + backward), one line each, judged on CUDA only."""
    lines = []
    for case in dict.fromkeys(r["case"] for r in records if r["B"] == 64 and r["dtype"] == "bf16"):
        rows = {r["contender"]: r for r in records if r["case"] == case}
        if "fastssl" not in rows:
            continue
        ours = rows["fastssl"]
        lines.append(f"Targets (issue), {case}, fwd+bwd:")
        checks = []
        if "authors" in rows:
            checks.append((f">= {GOALS['vs_authors']}x faster than authors", rows["authors"]["median_ms"]
                           / ours["median_ms"], "x", GOALS["vs_authors"], True))
        if "authors+compile" in rows:
            checks.append((f">= {GOALS['vs_compile']}x faster than authors+compile",
                           rows["authors+compile"]["median_ms"] / ours["median_ms"], "x", GOALS["vs_compile"], True))
        checks.append((f"extra memory <= {GOALS['mem_over_grad']}x the gradient", ours["mem_over_grad"], "x",
                       GOALS["mem_over_grad"], False))
        lines += [harness.goal_line(text, value, unit, goal, on_cuda, higher=higher)
                  for text, value, unit, goal, higher in checks]
    return lines


def columns(records: Sequence[dict]) -> list[str]:
    cols = ["case", "contender", "median_ms", "min_ms", "max_ms", "speedup", "peak_mem_mb", "mem_over_grad",
            "max_rel_err"]
    return [c for c in cols if any(r.get(c) is not None for r in records)]


def notes(preset_name: str, preset: Preset, records: Sequence[dict], device: torch.device) -> str:
    lines = [
        f"Preset `{preset_name}`: {len(preset.cases)} cases, {preset.sets} random input sets each; times are "
        "the median over sets of the per-set median of one forward + backward (Sinkhorn-Knopp included).",
        "Speedup = authors' median / this median. Memory: peak bytes allocated by the step beyond its inputs, "
        "over the bytes of the student gradient (CUDA only).",
        "Correctness: loss and gradients against the authors' step in fp32 on the same rounded inputs, relative "
        f"tolerance {', '.join(f'{t:.0e} ({d})' for d, t in TOLERANCE.items())}.",
    ]
    if device.type != "cuda":
        lines.append("CPU run: `fastssl` is the PyTorch closed form (the Triton kernels need a GPU).")
    target = target_lines(records, device.type == "cuda")
    return "\n".join(f"- {line}" for line in lines) + ("\n\n" + "\n".join(target) if target else "")


def main(argv: list[str] | None = None) -> dict[str, Path]:
    return harness.benchmark_main(sys.modules[__name__], argv, filter_example="cls K=65536 bf16")


if __name__ == "__main__":
    main()
