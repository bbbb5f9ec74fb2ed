"""PAWS soft nearest neighbours: fastssl's fused snn against the authors' formulation, compiled, and SDPA.

    python -m benchmarks.paws [--preset smoke|cpu|target|full] [--out DIR] [--device DEV]

The op is ``snn(q, S, Y) = softmax(normalize(q) @ normalize(S).T / tau) @ Y`` with its
gradient to q and S: the N x M part of the PAWS loss (the rest acts on [N, C]). Cases are
the paper's training shape per GPU (N = 512 anchor rows, M = 6720 supports, C = 960;
fwd, bwd, fwd+bwd) and the evaluation shape (N = 4096 queries against M = 128116
supports, C = 1000; forward without grad). Contenders, on the same input tensors:

* ``fastssl``: ``fastssl.functional.snn(backend="auto")``, the Triton kernels on CUDA (the
  PyTorch path elsewhere), with the case's labels: dense ``[M, C]`` or class ids ``[M]``;
* ``fastssl-torch``: ``backend="torch"`` (CUDA only; on the CPU it is what ``fastssl`` runs);
* ``authors``: ``fastssl.reference.snn_reference``, the authors' formulation with the dense
  label matrix, in the case's dtype;
* ``authors+compile``: the same through ``torch.compile`` (static shapes, warmed up untimed);
* ``sdpa``: ``F.scaled_dot_product_attention(q^, S^, Y, scale=1/tau)`` on the normalised
  embeddings and the dense labels in the case's dtype: the flash-attention baseline a
  PyTorch user would reach for (PyTorch picks its backend; none of the fused ones takes
  d = 2048 or a 960-wide value, so it may run the math path).

Before any timing, every contender's probabilities and gradients are checked against the
authors' formulation in float32 on the same rounded inputs (fastssl's judged, the others'
recorded).
"""

from __future__ import annotations

import itertools
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks import harness
from fastssl.functional import snn
from fastssl.reference import snn_reference

NAME = "paws"
CONTENDERS = ("fastssl", "fastssl-torch", "authors", "authors+compile", "sdpa")
CUDA_ONLY = ("fastssl-torch",)
TRAIN_MODES = ("fwd", "bwd", "fwd+bwd")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
TAU = 0.1
# Relative tolerance of fastssl's probabilities and gradients against the authors' formulation
# in fp32 (bf16: the kernels round probabilities to bf16 in the class matmul, gradients are bf16).
TOLERANCE = {"fp32": 1e-4, "bf16": 2e-2}
# The shapes and goals.
TRAIN = dict(N=512, M=6720, C=960)
EVAL = dict(N=4096, M=128116, d=384, C=1000)
GOALS = dict(train_vs_authors=2.0, train_vs_sdpa=1.0, eval_vs_authors=3.0)
# The memory goal is O(N * C + M * d): its constant, over the fp32 [N, C] probabilities
# and the [N, d] + [M, d] embeddings (the gradients' size). fastssl's forward keeps up to 8
# partial [N, C] accumulators; its backward one dc chunk of at most the bytes of the fp32 [M, d].
MEM_BOUND_FACTOR = 3.0


class CorrectnessError(AssertionError):
    """fastssl's probabilities or gradients differ from the authors' beyond the tolerance."""


@dataclass(frozen=True)
class Case:
    N: int
    M: int
    d: int
    C: int
    labels: str  # "dense" [M, C] or "ids" [M] (what fastssl gets; the baselines always take dense)
    dtype: str
    train: bool  # training (with gradients, all modes) or evaluation (forward, no grad)

    @property
    def modes(self) -> tuple[str, ...]:
        return TRAIN_MODES if self.train else ("fwd",)

    @property
    def label(self) -> str:
        return (f"{'train' if self.train else 'eval'} N={self.N} M={self.M} d={self.d} C={self.C} "
                f"{self.labels} {self.dtype}")

    def gflop(self, mode: str) -> float:
        """Matmul work of the op (similarities and class sums forward; backward adds the label
        product, both gradients and the recomputed similarities)."""
        fwd = 2 * self.N * self.M * (self.d + self.C)
        bwd = 2 * self.N * self.M * (3 * self.d + self.C)
        return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode] / 1e9


@dataclass(frozen=True)
class Preset:
    train: Sequence[tuple[int, int, int, int]]  # (N, M, d, C)
    eval: Sequence[tuple[int, int, int, int]] = ()
    labels: Sequence[str] = ("dense", "ids")
    dtypes: Sequence[str] = ("fp32", "bf16")
    compile: str = "all"  # cases with authors+compile: "all", "first" or "none"
    sets: int = 3
    warmup: int | None = None
    reps: int | None = None
    note: str = ""
    cases: list[Case] = field(init=False, default_factory=list)

    def __post_init__(self):
        for dtype, (N, M, d, C), labels in itertools.product(self.dtypes, self.train, self.labels):
            self.cases.append(Case(N, M, d, C, labels, dtype, True))
        for dtype, (N, M, d, C) in itertools.product(self.dtypes, self.eval):
            self.cases.append(Case(N, M, d, C, "ids", dtype, False))

    def compiled(self, case: Case) -> bool:
        return self.compile == "all" or (self.compile == "first" and case == self.cases[0])


PRESETS = {
    "smoke": Preset(train=((16, 64, 32, 8),), eval=((24, 200, 16, 10),), compile="first", sets=1, warmup=1,
                    reps=2, note="Tiny shapes for the test suite: timings mean nothing."),
    "cpu": Preset(train=((128, 1024, 64, 64), (128, 1024, 256, 64)), eval=((256, 8192, 64, 100),),
                  compile="first", sets=6, warmup=3, reps=30,  # ~1 ms calls on shared cores
                  note="`authors+compile` runs on the first case only: Inductor's C++ codegen takes "
                       "10-20 s per shape on a 2-core CPU."),
    "target": Preset(train=((TRAIN["N"], TRAIN["M"], 256, TRAIN["C"]), (TRAIN["N"], TRAIN["M"], 2048, TRAIN["C"])),
                     eval=((EVAL["N"], EVAL["M"], EVAL["d"], EVAL["C"]),)),
    "full": Preset(train=tuple((n, TRAIN["M"], d, TRAIN["C"]) for n in (256, 512, 1024) for d in (128, 256, 512,
                                                                                              1024, 2048)),
                   eval=((EVAL["N"], EVAL["M"], EVAL["d"], EVAL["C"]), (1024, EVAL["M"], 2048, EVAL["C"]))),
}


def default_preset(device: torch.device) -> str:
    return "target" if device.type == "cuda" else "cpu"


# ----------------------------------------------------------------------------- inputs and contenders

@dataclass
class Inputs:
    query: torch.Tensor      # [N, d], requires grad for training cases
    supports: torch.Tensor   # [M, d]
    ids: torch.Tensor        # [M] int64
    dense: torch.Tensor      # [M, C] float32, the one-hot of ids
    grad: torch.Tensor       # [N, C] upstream gradient of the probabilities


def make_inputs(case: Case, device: torch.device, seed: int) -> Inputs:
    gen = torch.Generator(device=device).manual_seed(seed)
    dtype = DTYPES[case.dtype]
    query = torch.randn(case.N, case.d, generator=gen, device=device).to(dtype)
    supports = torch.randn(case.M, case.d, generator=gen, device=device).to(dtype)
    # Balanced classes, shuffled (the sampler's batches cycle through them; eval sets are unsorted).
    ids = (torch.arange(case.M, device=device) % case.C)[torch.randperm(case.M, generator=gen, device=device)]
    dense = F.one_hot(ids, case.C).float()
    grad = torch.randn(case.N, case.C, generator=gen, device=device) / case.N
    if case.train:
        query.requires_grad_()
        supports.requires_grad_()
    return Inputs(query, supports, ids, dense, grad)


def _sdpa(query, supports, labels, tau):
    q = F.normalize(query, dim=1)[None, None]
    s = F.normalize(supports, dim=1)[None, None]
    return F.scaled_dot_product_attention(q, s, labels.to(query.dtype)[None, None], scale=1.0 / tau)[0, 0]


def build(name: str, case: Case, device: torch.device):
    """``fn(inputs) -> probs`` for a contender."""
    if name in ("fastssl", "fastssl-torch"):
        backend = "auto" if name == "fastssl" else "torch"
        if case.labels == "ids":
            return lambda x: snn(x.query, x.supports, x.ids, TAU, num_classes=case.C, backend=backend)
        return lambda x: snn(x.query, x.supports, x.dense, TAU, backend=backend)
    if name in ("authors", "authors+compile"):
        fn = snn_reference if name == "authors" else torch.compile(snn_reference, dynamic=False)
        return lambda x: fn(x.query, x.supports, x.dense.to(x.query.dtype), TAU)
    if name == "sdpa":
        return lambda x: _sdpa(x.query, x.supports, x.dense, TAU)
    raise ValueError(f"unknown contender {name!r}")


def timed_call(mode: str, fn, x: Inputs):
    """``(fn, setup)``: the timed call and its untimed per-call setup (or None)."""
    wrt = (x.query, x.supports)
    if mode == "fwd" and not x.query.requires_grad:
        def forward():
            with torch.no_grad():
                return fn(x)
        return forward, None
    if mode == "fwd":
        return (lambda: fn(x)), None
    if mode == "bwd":
        return (lambda probs: torch.autograd.grad(probs, wrt, x.grad)), (lambda: fn(x))
    if mode == "fwd+bwd":
        return (lambda: torch.autograd.grad(fn(x), wrt, x.grad)), None
    raise ValueError(f"unknown mode {mode!r}")


# ----------------------------------------------------------------------------- correctness

def check(fns: dict, case: Case, x: Inputs) -> dict[str, dict]:
    """Probabilities (and gradients) of every contender against the authors' formulation in fp32.

    Raises :class:`CorrectnessError` when fastssl's exceed ``TOLERANCE``; the first call also
    warms every contender up (Triton compilation, allocator) before any timing.
    """
    allow_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # an fp32 reference, whatever the global setting
    try:
        q32 = x.query.detach().float().requires_grad_(case.train)
        s32 = x.supports.detach().float().requires_grad_(case.train)
        ref = snn_reference(q32, s32, x.dense, TAU)
        ref_grads = torch.autograd.grad(ref, (q32, s32), x.grad) if case.train else ()
    finally:
        torch.backends.cuda.matmul.allow_tf32 = allow_tf32
    tol = TOLERANCE[case.dtype]
    errors = {}
    for name, fn in fns.items():
        with torch.set_grad_enabled(case.train):
            probs = fn(x)
        errs = {"probs_rel_err": harness.rel_err(probs, ref)}
        if case.train:
            dq, ds = torch.autograd.grad(probs, (x.query, x.supports), x.grad)
            errs["dq_rel_err"] = harness.rel_err(dq, ref_grads[0])
            errs["ds_rel_err"] = harness.rel_err(ds, ref_grads[1])
        errs["max_rel_err"] = max(errs.values())
        if name.startswith("fastssl") and not errs["max_rel_err"] <= tol:  # also catches NaN
            raise CorrectnessError(f"paws {case.label}: {name} differs from the authors' formulation in fp32 by "
                                   f"{errs} (relative) > {tol:.0e}")
        errors[name] = errs
    return errors


# ----------------------------------------------------------------------------- running

def _log(msg: str) -> None:
    print(f"[{NAME}] {msg}", file=sys.stderr, flush=True)


def _warm_up(name: str, fn, case: Case, device: torch.device, seed: int) -> float | None:
    """One forward and backward untimed (torch.compile's compilation); the seconds it took, or None
    when the contender cannot run this case (it is then dropped from the case, loudly)."""
    x = make_inputs(case, device, seed)
    t0 = time.perf_counter()
    try:
        probs = fn(x)
        if case.train:
            torch.autograd.grad(probs, (x.query, x.supports), x.grad)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    except Exception as exc:  # e.g. no C++ compiler for Inductor, out of memory, no SDPA kernel
        first = str(exc).splitlines()[0] if str(exc) else ""
        _log(f"WARNING {case.label}: {name} failed, no row: {type(exc).__name__}: {first}")
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return None
    return time.perf_counter() - t0


def run_case(case: Case, preset: Preset, device: torch.device, contenders: Sequence[str], seed: int) -> list[dict]:
    names = [c for c in CONTENDERS if c in contenders and (c != "authors+compile" or preset.compiled(case))]
    if "authors+compile" in names:
        torch.compiler.reset()  # a fresh compile per shape, clear of the recompile limit
    fns = {name: build(name, case, device) for name in names}
    warm = {name: _warm_up(name, fns[name], case, device, seed) for name in names}
    names = [n for n in names if warm[n] is not None]
    fns = {n: fns[n] for n in names}
    errors: dict[str, dict] = {}
    per_mode: dict[str, list] = {mode: [] for mode in case.modes}
    for s in range(preset.sets):
        x = make_inputs(case, device, seed + s)
        for name, errs in check(fns, case, x).items():
            worst = errors.setdefault(name, dict(errs))
            for key, value in errs.items():
                worst[key] = max(worst[key], value)
        for mode in case.modes:
            calls = {name: timed_call(mode, fns[name], x) for name in names}
            per_mode[mode].append(harness.time_contenders(
                {name: fn for name, (fn, _) in calls.items()}, device, warmup=preset.warmup, reps=preset.reps,
                rotate=s, setups={name: setup for name, (_, setup) in calls.items() if setup is not None}))
            del calls
        del x
    if device.type == "cuda":
        torch.cuda.empty_cache()

    records = []
    nm_bytes = case.N * case.M * 4  # one fp32 N x M matrix, what the authors' formulation builds
    bound_bytes = (case.N * case.C + (case.N + case.M) * case.d) * 4
    for mode in case.modes:
        stats = harness.combine_sets(per_mode[mode])
        authors_ms = stats["authors"]["median_ms"] if "authors" in stats else None
        for name in names:
            st = stats[name]
            mem = st["peak_mem_bytes"]
            rec = dict(case=case.label, contender=name, N=case.N, M=case.M, d=case.d, C=case.C,
                       labels=case.labels, dtype=case.dtype, train=case.train, mode=mode,
                       median_ms=st["median_ms"], min_ms=st["min_ms"], max_ms=st["max_ms"], reps=st["reps"],
                       sets=st["sets"], set_medians_ms=st["set_medians_ms"],
                       tflops=case.gflop(mode) / st["median_ms"],
                       peak_mem_mb=None if mem is None else mem / 2**20,
                       mem_over_nm=None if mem is None else mem / nm_bytes,
                       mem_over_bound=None if mem is None else mem / bound_bytes,
                       speedup=None if authors_ms is None else authors_ms / st["median_ms"],
                       tolerance=TOLERANCE[case.dtype], **errors[name])
            if name == "authors+compile":
                rec["compile_s"] = warm[name]
            records.append(rec)
    return records


def run(preset: Preset, device: torch.device, info: dict, *, contenders: Sequence[str] | None = None,
        cases: Sequence[Case] | None = None, seed: int = 0) -> list[dict]:
    if contenders is None:
        contenders = [c for c in CONTENDERS if device.type == "cuda" or c not in CUDA_ONLY]
    return harness.run_cases(NAME, cases or preset.cases, preset.cases,
                             lambda c, sd: run_case(c, preset, device, contenders, sd), seed)


# ----------------------------------------------------------------------------- reporting

def target_lines(records: Sequence[dict], on_cuda: bool) -> list[str]:
    """The issue's goals, one line each, judged on CUDA only."""
    lines = []
    groups = dict.fromkeys((r["case"], r["mode"]) for r in records
                           if r["contender"] == "fastssl" and r["mode"] in ("fwd+bwd", "fwd")
                           and (r["train"] == (r["mode"] == "fwd+bwd")))
    for label, mode in groups:
        rows = {r["contender"]: r for r in records if r["case"] == label and r["mode"] == mode}
        ours = rows["fastssl"]
        is_target = (ours["N"], ours["M"], ours["C"]) == (TRAIN["N"], TRAIN["M"], TRAIN["C"]) if ours["train"] \
            else (ours["N"], ours["M"], ours["d"], ours["C"]) == tuple(EVAL.values())
        if not is_target:
            continue
        lines.append(f"Targets (issue), {label}, {mode}:")
        checks = []
        if ours["train"]:
            if "authors" in rows:
                checks.append((f">= {GOALS['train_vs_authors']}x faster than authors",
                               rows["authors"]["median_ms"] / ours["median_ms"], "x", GOALS["train_vs_authors"], True))
            if "sdpa" in rows:
                checks.append(("no slower than sdpa", rows["sdpa"]["median_ms"] / ours["median_ms"], "x",
                               GOALS["train_vs_sdpa"], True))
        elif "authors" in rows:
            checks.append((f">= {GOALS['eval_vs_authors']}x the authors' throughput",
                           rows["authors"]["median_ms"] / ours["median_ms"], "x", GOALS["eval_vs_authors"], True))
        if ours.get("mem_over_bound") is not None:
            checks.append((f"peak memory O(N*C + M*d): within {MEM_BOUND_FACTOR:g}x fp32 [N,C] + [N,d] + [M,d]",
                           ours["mem_over_bound"], "x", MEM_BOUND_FACTOR, False))
        lines += [harness.goal_line(text, value, unit, goal, on_cuda, higher=higher)
                  for text, value, unit, goal, higher in checks]
    return lines


def cpu_target_lines(records: Sequence[dict], on_cpu: bool) -> list[str]:
    """Issue 22's goal for the PyTorch path: at least the authors' speed, forward + backward, in every
    training case (each dtype, d and kind of labels) the run measured. Judged on a CPU run only."""
    lines = []
    for case in dict.fromkeys(r["case"] for r in records if r["train"] and r["mode"] == "fwd+bwd"):
        rows = {r["contender"]: r for r in records if r["case"] == case and r["mode"] == "fwd+bwd"}
        if "fastssl" in rows and "authors" in rows:
            if not lines:
                lines.append("CPU targets (issue 22), snn forward + backward, the PyTorch path against the authors':")
            lines.append(harness.cpu_goal_line(f"{case}: >= 1x the authors' speed",
                                               rows["authors"]["median_ms"] / rows["fastssl"]["median_ms"], "x",
                                               1.0, on_cpu))
    return lines


def columns(records: Sequence[dict]) -> list[str]:
    cols = ["case", "mode", "contender", "median_ms", "min_ms", "max_ms", "speedup", "tflops", "peak_mem_mb",
            "mem_over_nm", "mem_over_bound", "max_rel_err"]
    return [c for c in cols if any(r.get(c) is not None for r in records)]


def notes(preset_name: str, preset: Preset, records: Sequence[dict], device: torch.device) -> str:
    compiled = [f"{r['case']} ({r['compile_s']:.1f} s)" for r in records
                if r["contender"] == "authors+compile" and r.get("compile_s") is not None and r["mode"] == "fwd"]
    tols = ", ".join(f"{tol:.0e} ({dtype})" for dtype, tol in TOLERANCE.items())
    lines = [
        f"Preset `{preset_name}`: {len(preset.cases)} cases, {preset.sets} random input sets per case; times are "
        "the median over sets of the per-set median (min / max over all calls). tau = 0.1.",
        "Modes: `fwd` (training cases: inputs requiring grad; evaluation cases: under no_grad), `bwd` "
        "(`torch.autograd.grad` to query and supports of a fresh graph whose forward ran untimed), `fwd+bwd`. "
        "Speedup = authors' median / this median; `tflops` counts the op's matmul work "
        "(fwd 2NM(d + C), bwd 2NM(3d + C)) whatever a contender actually computes.",
        "Labels: the baselines take the dense one-hot [M, C] in the case's dtype; `fastssl` takes the case's "
        "`dense` matrix or `ids` (class ids, no [M, C] matrix).",
        f"Correctness: probabilities and both gradients against the authors' formulation in fp32, relative "
        f"tolerance {tols} for fastssl (the others' errors are recorded, not judged); `max_rel_err` is the worst.",
        "`mem_over_nm`: peak memory the call allocates over one fp32 N x M matrix; `mem_over_bound`: over the "
        f"fp32 size of [N, C] + [N, d] + [M, d] (the issue's O(N*C + M*d), goal <= {MEM_BOUND_FACTOR:g}).",
    ]
    if device.type != "cuda":
        lines.append("CPU run: `fastssl` is the PyTorch path (the Triton kernels need a GPU): bf16 embeddings "
                     "multiply in bf16 with fp32 accumulation, as the authors' autocast; no memory column.")
    if preset.note:
        lines.append(preset.note)
    if compiled:
        lines.append(f"`authors+compile` compile time (forward + backward, untimed): {', '.join(compiled)}.")
    target = target_lines(records, device.type == "cuda") + cpu_target_lines(records, device.type == "cpu")
    return "\n".join(f"- {line}" for line in lines) + ("\n\n" + "\n".join(target) if target else "")


def plot(records: list[dict], fig) -> None:
    """Median time per contender grouped by case, one panel per mode, log scale."""
    modes = list(dict.fromkeys(r["mode"] for r in records))
    contenders = list(dict.fromkeys(r["contender"] for r in records))
    fig.set_size_inches(10.0, 3.2 * len(modes))
    axes = fig.subplots(len(modes), 1, squeeze=False)[:, 0]
    for ax, mode in zip(axes, modes, strict=True):
        rows = [r for r in records if r["mode"] == mode]
        cases = list(dict.fromkeys(r["case"] for r in rows))
        harness.bar_plot(ax, rows, cases, contenders, lambda r: r["case"])
        ax.set_title(f"PAWS snn, {mode}: median time per call (min-max whiskers)", fontsize=9)


def main(argv: list[str] | None = None) -> dict[str, Path]:
    return harness.benchmark_main(sys.modules[__name__], argv, filter_example="train d=2048 ids bf16")


if __name__ == "__main__":
    main()
