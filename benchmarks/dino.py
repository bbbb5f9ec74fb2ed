"""The DINO loss: fastssl's fused loss against the authors' per-pair loop, eager and compiled.

    python -m benchmarks.dino [--preset smoke|cpu|target|full] [--out DIR]

Contenders, all called as the module's forward (loss, then the center update, as in
training) on the same input tensors:

* ``fastssl``: ``fastssl.DinoLoss(backend="auto")``, the Triton kernels on CUDA (the
  fused PyTorch closed form elsewhere);
* ``fastssl-torch``: ``backend="torch"``, the PyTorch closed form (CUDA only: on the
  CPU it is what ``fastssl`` runs already);
* ``authors``: ``fastssl.reference.AuthorsDINOLoss``, the loop of the authors' main_dino.py;
* ``authors+compile``: the same module through ``torch.compile`` (static shapes,
  compiled and warmed up before any timing).

Modes: ``fwd`` (forward with grad-requiring student logits, no backward), ``bwd``
(``torch.autograd.grad`` alone, each call on a fresh graph whose forward ran untimed
just before) and ``fwd+bwd``.
Before any timing, every contender's loss, student gradient and updated center are
checked against the authors' loop run in float32 on the same (rounded) inputs.
"""

from __future__ import annotations

import itertools
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

import fastssl
from benchmarks import harness
from fastssl.reference import AuthorsDINOLoss

NAME = "dino"
CONTENDERS = ("fastssl", "fastssl-torch", "authors", "authors+compile")
MODES = ("fwd", "bwd", "fwd+bwd")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# Relative tolerance of loss, gradient and center against the authors' loop in float32. The
# bf16 one covers rounding the gradient to bf16 and the authors' own bf16 log-softmax.
TOLERANCE = {"fp32": 1e-4, "bf16": 1e-2}
# The authors' defaults (main_dino.py); epoch 0 of a schedule without warm-up: teacher_temp 0.04.
LOSS_ARGS = dict(warmup_teacher_temp=0.04, teacher_temp=0.04, warmup_teacher_temp_epochs=0, nepochs=100,
                 student_temp=0.1, center_momentum=0.9)
EPOCH = 0
# The issue's target problem and goals (fwd+bwd).
TARGET = dict(B=64, K=65536, local=8)
GOALS = dict(vs_authors=5.0, vs_compile=1.5, roofline_pct_issue=60.0, mem_over_grad=1.1)


class CorrectnessError(AssertionError):
    """A contender's loss, gradient or center differs from the authors' beyond the tolerance."""


@dataclass(frozen=True)
class Case:
    B: int
    K: int
    local: int  # local crops; ncrops = 2 global + local
    dtype: str

    @property
    def ncrops(self) -> int:
        return 2 + self.local

    @property
    def crops(self) -> str:
        return f"2+{self.local}"

    @property
    def label(self) -> str:
        return f"B={self.B} K={self.K} {self.crops} {self.dtype}"


@dataclass(frozen=True)
class Preset:
    B: Sequence[int]
    K: Sequence[int]
    local: Sequence[int]
    dtypes: Sequence[str] = ("fp32", "bf16")
    modes: Sequence[str] = MODES
    compile: str = "all"  # cases with authors+compile: "all", "largest" (per dtype and crops) or "first"
    sets: int = 3  # fresh random input sets per case
    warmup: int | None = None  # None: harness.time_fn's default for the device
    reps: int | None = None
    note: str = ""
    cases: list[Case] = field(init=False, default_factory=list)

    def __post_init__(self):
        for dtype, B, K, local in itertools.product(self.dtypes, self.B, self.K, self.local):
            self.cases.append(Case(B, K, local, dtype))

    def compiled(self, case: Case) -> bool:
        if self.compile == "all":
            return True
        if self.compile == "first":
            return case == self.cases[0]
        same = [c for c in self.cases if (c.dtype, c.local) == (case.dtype, case.local)]
        return case == max(same, key=lambda c: c.B * c.K)


_CPU_COMPILE_NOTE = ("`authors+compile` runs only on the largest case of each dtype and crop count: "
                     "torch.compile (Inductor, C++ codegen) takes about 10 s per shape on a 2-core CPU.")
PRESETS = {
    # The smallest problem, for the test suite (seconds), with one compiled case.
    "smoke": Preset(B=(4,), K=(256,), local=(2,), compile="first", sets=2, warmup=1, reps=3,
                    note="`authors+compile` runs only on the first case: torch.compile (Inductor, "
                         "C++ codegen) takes 10-20 s per shape on a 2-core CPU, and this preset is for "
                         "the tests."),
    # ~1 ms calls on shared cores: 5 sets of 50 (3 of 20 left a 10% ratio inside the run-to-run noise)
    "cpu": Preset(B=(8, 16), K=(512, 2048), local=(4, 8), compile="largest", sets=5, warmup=3, reps=50,
                  note=_CPU_COMPILE_NOTE),
    "target": Preset(B=(TARGET["B"],), K=(TARGET["K"],), local=(TARGET["local"],)),
    # The lease command's: the target problem, forward + backward only (the goals'), 2 input sets.
    "lease": Preset(B=(TARGET["B"],), K=(TARGET["K"],), local=(TARGET["local"],), modes=("fwd+bwd",), sets=2),
    # 48 cases, each compiled for authors+compile: split it over several runs with --filter.
    "full": Preset(B=(32, 64, 128, 256), K=(4096, 65536, 131072), local=(8, 10)),
}


def default_preset(device: torch.device) -> str:
    return "target" if device.type == "cuda" else "cpu"


# ----------------------------------------------------------------------------- contenders

def build(name: str, case: Case, device: torch.device) -> torch.nn.Module:
    if name == "fastssl":
        return fastssl.DinoLoss(case.K, case.ncrops, **LOSS_ARGS, backend="auto").to(device)
    if name == "fastssl-torch":
        return fastssl.DinoLoss(case.K, case.ncrops, **LOSS_ARGS, backend="torch").to(device)
    authors = AuthorsDINOLoss(case.K, case.ncrops, **LOSS_ARGS).to(device)
    if name == "authors":
        return authors
    if name == "authors+compile":
        # Static shapes: the best case for the compiler, what a fixed-batch training run gets.
        return torch.compile(authors, dynamic=False)
    raise ValueError(f"unknown contender {name!r}")


def make_inputs(case: Case, device: torch.device, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Student logits ``[ncrops*B, K]`` (a leaf requiring grad), teacher ``[2B, K]``, in the case's dtype."""
    gen = torch.Generator(device=device).manual_seed(seed)
    dtype = DTYPES[case.dtype]
    # Drawn in fp32 and rounded, as a mixed-precision head hands them over.
    student = torch.randn(case.ncrops * case.B, case.K, generator=gen, device=device).to(dtype)
    teacher = torch.randn(2 * case.B, case.K, generator=gen, device=device).to(dtype)
    return student.requires_grad_(), teacher


def timed_call(mode: str, module, student: torch.Tensor, teacher: torch.Tensor):
    """``(fn, setup)`` for a mode: the timed function and its untimed per-call setup (or None).

    ``bwd`` runs a fresh forward in the setup and times its backward: a compiled
    backward frees (donates) its saved buffers, so a graph cannot be replayed with
    ``retain_graph=True``; every contender gets the same treatment, as in training.
    """
    if mode == "fwd":
        return (lambda: module(student, teacher, EPOCH)), None
    if mode == "bwd":
        return (lambda loss: torch.autograd.grad(loss, student)), (lambda: module(student, teacher, EPOCH))
    if mode == "fwd+bwd":
        return (lambda: torch.autograd.grad(module(student, teacher, EPOCH), student)), None
    raise ValueError(f"unknown mode {mode!r}")


# ----------------------------------------------------------------------------- correctness

def checked(name: str) -> tuple[str, ...]:
    """The errors held to ``TOLERANCE``. The baselines' gradient is recorded, not judged: the
    authors' bf16 log-softmax alone is ~2e-2 off its fp32 gradient, and they are the reference."""
    if name.startswith("fastssl"):
        return ("loss_rel_err", "grad_rel_err", "center_rel_err")
    return ("loss_rel_err", "center_rel_err")


def check(modules: dict, case: Case, student: torch.Tensor, teacher: torch.Tensor) -> dict[str, dict]:
    """Loss, gradient and updated center of every contender against the authors' loop in fp32.

    Raises :class:`CorrectnessError` beyond ``TOLERANCE`` (see :func:`checked`). The first
    check also warms every module up (Triton compilation, allocator) before any timing.
    """
    ref = AuthorsDINOLoss(case.K, case.ncrops, **LOSS_ARGS).to(student.device)
    s32 = student.detach().float().requires_grad_()
    ref_loss = ref(s32, teacher.detach().float(), EPOCH)
    (ref_grad,) = torch.autograd.grad(ref_loss, s32)
    tol = TOLERANCE[case.dtype]
    errors = {}
    for name, module in modules.items():
        module.center.zero_()  # the state the reference starts from
        loss = module(student, teacher, EPOCH)
        (grad,) = torch.autograd.grad(loss, student)
        if student.is_cuda:
            torch.cuda.synchronize(student.device)
        errs = {"loss_rel_err": harness.rel_err(loss, ref_loss), "grad_rel_err": harness.rel_err(grad, ref_grad),
                "center_rel_err": harness.rel_err(module.center, ref.center)}
        if grad.dtype != student.dtype:
            raise CorrectnessError(f"dino {case.label}: {name} returned a {grad.dtype} gradient for "
                                   f"{student.dtype} logits")
        errs["max_rel_err"] = max(errs[key] for key in checked(name))
        for key in checked(name):
            if not errs[key] <= tol:  # also catches NaN
                what = key.removesuffix("_rel_err")
                raise CorrectnessError(f"dino {case.label}: {name} {what} differs from the authors' loop in "
                                       f"fp32 by {errs[key]:.3e} (relative) > {tol:.0e}")
        errors[name] = errs
    return errors


# ----------------------------------------------------------------------------- bytes

def design_bytes(case: Case, mode: str) -> int:
    """HBM bytes the fused design moves (logits in the case's dtype, the gradient in the student's).

    fwd: the teacher is read twice (the teacher pass for its softmax statistics and the
    center, then the student pass) and the student once; bwd: student and teacher read,
    gradient written; fwd+bwd: both. Per-row statistics and the [K] center are negligible.
    """
    e = DTYPES[case.dtype].itemsize
    student, teacher = case.ncrops * case.B * case.K * e, 2 * case.B * case.K * e
    grad = student  # the student's shape and dtype
    fwd, bwd = 2 * teacher + student, student + teacher + grad
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode]


def issue_bytes(case: Case) -> int:
    """The issue's simpler fwd+bwd count: student read twice, teacher once, gradient written once."""
    e = DTYPES[case.dtype].itemsize
    student, teacher = case.ncrops * case.B * case.K * e, 2 * case.B * case.K * e
    grad = student
    return 2 * student + teacher + grad


# ----------------------------------------------------------------------------- running

def _log(msg: str) -> None:
    print(f"[{NAME}] {msg}", file=sys.stderr, flush=True)


def _compile(module, case: Case, device: torch.device, seed: int) -> float | None:
    """Compile forward and backward ahead of everything else; the seconds it took, or None when the
    toolchain fails (the contender is then dropped from the case, loudly)."""
    student, teacher = make_inputs(case, device, seed)
    t0 = time.perf_counter()
    try:
        torch.autograd.grad(module(student, teacher, EPOCH), student)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    except Exception as exc:  # e.g. no C++ compiler for Inductor's CPU code
        first = str(exc).splitlines()[0] if str(exc) else ""
        _log(f"WARNING {case.label}: torch.compile failed, no authors+compile row: "
             f"{type(exc).__name__}: {first}")
        return None
    return time.perf_counter() - t0


def run_case(case: Case, preset: Preset, device: torch.device, contenders: Sequence[str], info: dict,
             seed: int) -> list[dict]:
    names = [c for c in CONTENDERS if c in contenders and (c != "authors+compile" or preset.compiled(case))]
    if "authors+compile" in names:
        torch.compiler.reset()  # a fresh compile per shape, clear of the recompile limit
    modules = {name: build(name, case, device) for name in names}
    compile_s = None
    if "authors+compile" in names:
        compile_s = _compile(modules["authors+compile"], case, device, seed)
        if compile_s is None:
            del modules["authors+compile"]
            names.remove("authors+compile")
    errors: dict[str, dict] = {}
    per_mode: dict[str, list] = {mode: [] for mode in preset.modes}
    for s in range(preset.sets):
        student, teacher = make_inputs(case, device, seed + s)
        for name, errs in check(modules, case, student, teacher).items():
            worst = errors.setdefault(name, dict(errs))
            for key, value in errs.items():
                worst[key] = max(worst[key], value)
        for mode in preset.modes:
            # Every contender closes over the same two tensors.
            calls = {name: timed_call(mode, modules[name], student, teacher) for name in names}
            per_mode[mode].append(harness.time_contenders(
                {name: fn for name, (fn, _) in calls.items()}, device, warmup=preset.warmup, reps=preset.reps,
                rotate=s, setups={name: setup for name, (_, setup) in calls.items() if setup is not None}))
            del calls
        del student, teacher
    if device.type == "cuda":
        torch.cuda.empty_cache()

    records = []
    grad_bytes = case.ncrops * case.B * case.K * DTYPES[case.dtype].itemsize
    for mode in preset.modes:
        stats = harness.combine_sets(per_mode[mode])
        authors_ms = stats["authors"]["median_ms"] if "authors" in stats else None
        for name in names:
            st, errs = stats[name], errors[name]
            mem = st["peak_mem_bytes"]
            rec = dict(case=case.label, contender=name, B=case.B, K=case.K, ncrops=case.crops,
                       dtype=case.dtype, mode=mode, median_ms=st["median_ms"], min_ms=st["min_ms"],
                       max_ms=st["max_ms"], reps=st["reps"], sets=st["sets"],
                       set_medians_ms=st["set_medians_ms"],
                       peak_mem_mb=None if mem is None else mem / 2**20,
                       speedup=None if authors_ms is None else authors_ms / st["median_ms"],
                       loss_rel_err=errs["loss_rel_err"], grad_rel_err=errs["grad_rel_err"],
                       center_rel_err=errs["center_rel_err"], max_rel_err=errs["max_rel_err"],
                       tolerance=TOLERANCE[case.dtype])
            if name == "authors+compile":
                rec["compile_s"] = compile_s
            if mode == "fwd+bwd":
                rec["grad_bytes"] = grad_bytes
                rec["mem_over_grad"] = None if mem is None else mem / grad_bytes
            if name == "fastssl":
                rec["bytes_moved"] = design_bytes(case, mode)
                rec["roofline_pct"] = harness.roofline_pct(rec["bytes_moved"], st["median_ms"],
                                                           info["copy_bandwidth_gbs"])
                if mode == "fwd+bwd":
                    rec["bytes_issue"] = issue_bytes(case)
                    rec["roofline_pct_issue"] = harness.roofline_pct(rec["bytes_issue"], st["median_ms"],
                                                                     info["copy_bandwidth_gbs"])
            records.append(rec)
    return records


def run(preset: Preset, device: torch.device, info: dict, *, contenders: Sequence[str] | None = None,
        cases: Sequence[Case] | None = None, seed: int = 0) -> list[dict]:
    if contenders is None:
        # On the CPU backend="auto" is the PyTorch closed form: fastssl-torch would duplicate it.
        contenders = [c for c in CONTENDERS if device.type == "cuda" or c != "fastssl-torch"]
    return harness.run_cases(NAME, cases or preset.cases, preset.cases,
                             lambda c, sd: run_case(c, preset, device, contenders, info, sd), seed)


# ----------------------------------------------------------------------------- reporting

def target_lines(records: Sequence[dict], on_cuda: bool) -> list[str]:
    """The issue's goals at B=64, K=65536, 2+8 crops, fwd+bwd, one line each, judged on CUDA only."""
    lines = []
    for dtype in DTYPES:
        rows = {r["contender"]: r for r in records
                if r["mode"] == "fwd+bwd" and r["dtype"] == dtype and r["B"] == TARGET["B"]
                and r["K"] == TARGET["K"] and r["ncrops"] == f"2+{TARGET['local']}"}
        if "fastssl" not in rows:
            continue
        ours = rows["fastssl"]
        lines.append(f"Targets (issue), B={TARGET['B']} K={TARGET['K']} 2+{TARGET['local']} fwd+bwd {dtype}:")
        checks = []
        if "authors" in rows:
            checks.append((f">= {GOALS['vs_authors']}x faster than authors",
                           rows["authors"]["median_ms"] / ours["median_ms"], "x", GOALS["vs_authors"], True))
        if "authors+compile" in rows:
            checks.append((f">= {GOALS['vs_compile']}x faster than authors+compile",
                           rows["authors+compile"]["median_ms"] / ours["median_ms"], "x", GOALS["vs_compile"],
                           True))
        checks.append((f">= {GOALS['roofline_pct_issue']:.0f}% of measured copy bandwidth (issue's bytes)",
                       ours.get("roofline_pct_issue"), "%", GOALS["roofline_pct_issue"], True))
        checks.append((f"peak memory <= {GOALS['mem_over_grad']}x the gradient", ours.get("mem_over_grad"),
                       "x", GOALS["mem_over_grad"], False))
        lines += [harness.goal_line(text, value, unit, goal, on_cuda, higher=higher)
                  for text, value, unit, goal, higher in checks]
    return lines


def cpu_target_lines(records: Sequence[dict], on_cpu: bool) -> list[str]:
    """Issue 22's goal for the PyTorch path (``fastssl`` on a CPU, compiled once per shape):
    forward + backward no slower than ``torch.compile`` of the authors' loop. Judged on a CPU run only."""
    lines = []
    for case in dict.fromkeys(r["case"] for r in records if r["mode"] == "fwd+bwd"):
        rows = {r["contender"]: r for r in records if r["case"] == case and r["mode"] == "fwd+bwd"}
        if "fastssl" in rows and "authors+compile" in rows:
            lines.append(harness.cpu_goal_line(
                f"CPU target (issue 22), {case} fwd+bwd: >= 1x the speed of authors+compile",
                rows["authors+compile"]["median_ms"] / rows["fastssl"]["median_ms"], "x", 1.0, on_cpu))
    return lines


def columns(records: Sequence[dict]) -> list[str]:
    cols = ["case", "mode", "contender", "median_ms", "min_ms", "max_ms", "speedup", "peak_mem_mb",
            "mem_over_grad", "roofline_pct", "roofline_pct_issue", "max_rel_err"]
    return [c for c in cols if any(r.get(c) is not None for r in records)]


def notes(preset_name: str, preset: Preset, records: Sequence[dict], device: torch.device) -> str:
    compiled = [f"{r['case']} ({r['compile_s']:.1f} s)" for r in records
                if r["contender"] == "authors+compile" and r["mode"] == preset.modes[0]]
    tols = ", ".join(f"{tol:.0e} ({dtype})" for dtype, tol in TOLERANCE.items())
    lines = [
        f"Preset `{preset_name}`: {len(preset.cases)} cases x {len(preset.modes)} modes, {preset.sets} "
        "random input sets per case; times are the median over sets of the per-set median "
        "(min / max over all calls).",
        "Every contender's timed call is the module's forward (loss + center update); `bwd` times "
        "`torch.autograd.grad` of a fresh graph whose forward ran untimed before each call. "
        "Speedup = authors' median / this median.",
        "Correctness: loss, student gradient and updated center of every contender against the authors' "
        f"loop in float32 on the same rounded inputs, relative tolerance {tols} "
        "(the baselines' gradient is recorded, `grad_rel_err` in the JSON, not judged: the authors' bf16 "
        "log-softmax is itself ~2e-2 off); `max_rel_err` is the worst judged one.",
        "Bytes (fastssl rows): the fused design's traffic, fwd = 2 x teacher + student, "
        "bwd = student + teacher + gradient; `roofline_pct_issue` uses the issue's fwd+bwd count "
        "(2 x student + teacher + gradient); "
        "both against the measured copy bandwidth.",
    ]
    if device.type != "cuda":
        lines.append("CPU run: `fastssl` is the fused PyTorch closed form, compiled once per shape "
                     "(FASTSSL_COMPILE=0: eager; the Triton kernels need a GPU); no memory column (CUDA "
                     "allocator stats only).")
    if preset.note:
        lines.append(preset.note)
    if compiled:
        lines.append(f"`authors+compile` cases (compile time of forward + backward, untimed): "
                     f"{', '.join(compiled)}.")
    target = target_lines(records, device.type == "cuda") + cpu_target_lines(records, device.type == "cpu")
    return "\n".join(f"- {line}" for line in lines) + ("\n\n" + "\n".join(target) if target else "")


def plot(records: list[dict], fig) -> None:
    """Median time per contender grouped by case, one panel per mode, log scale."""
    modes = list(dict.fromkeys(r["mode"] for r in records))
    cases = list(dict.fromkeys(r["case"] for r in records))
    contenders = list(dict.fromkeys(r["contender"] for r in records))
    fig.set_size_inches(max(8.0, 0.22 * len(cases) * len(contenders) + 2), 3.2 * len(modes))
    axes = fig.subplots(len(modes), 1, squeeze=False)[:, 0]
    for ax, mode in zip(axes, modes, strict=True):
        rows = [r for r in records if r["mode"] == mode]
        harness.bar_plot(ax, rows, cases, contenders, lambda r: r["case"])
        ax.set_title(f"DINO loss, {mode}: median time per call (min-max whiskers)", fontsize=9)


def main(argv: list[str] | None = None) -> dict[str, Path]:
    return harness.benchmark_main(sys.modules[__name__], argv, filter_example="K=65536 bf16 2+8")


if __name__ == "__main__":
    main()
