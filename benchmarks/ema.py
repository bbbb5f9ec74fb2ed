"""The EMA teacher update: fastssl's one-launch update against the loops and foreach ops in use.

    python -m benchmarks.ema [--preset smoke|cpu|target|full] [--out DIR]

Every contender updates the same teacher tensors from the same student tensors,
``teacher = m * teacher + (1 - m) * student`` with m = 0.996 (DINO's first value):

* ``fastssl``: ``fastssl.ema_update_(teacher, student, m)`` on the two tensor lists
  (backend "auto": the Triton kernel on CUDA, on the CPU one call of the C++ loop of
  ``csrc/ema.cpp``), its plan cached by the warm-up;
* ``fastssl-graph``: the same with m in a device tensor, captured in a CUDA graph and
  timed by replaying it (CUDA only);
* ``fastssl-torch``: backend "torch" (CUDA only: on the CPU it is what ``fastssl`` runs);
* ``authors``: DINO main_dino.py's loop, ``param_k.data.mul_(m).add_((1 - m) * param_q.data)``;
* ``foreach_mul_add``: ``torch._foreach_mul_`` then ``torch._foreach_add_(alpha=1 - m)`` (DINOv2);
* ``foreach_lerp``: ``torch._foreach_lerp_(teacher, student, 1 - m)`` (timm's ModelEmaV3);
* ``flat_lerp``: one ``lerp_`` over teacher and student copied once into flat buffers,
  the floor a flat layout reaches.

Parameter sets: the parameters of timm ViTs built on the meta device (no weights,
no download), materialised with ``torch.empty`` on the benchmark device and filled
with random values; teacher and student in the case's dtype. Bytes: 3 x parameter
bytes (teacher and student read, teacher written), the floor of the update. Before
any timing, every contender's update (at m = 0.5, so that it shows in bf16) is
checked against the update computed in float64.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

import fastssl
from benchmarks import harness
from fastssl import _ext

NAME = "ema"
CONTENDERS = ("fastssl", "fastssl-graph", "fastssl-torch", "authors", "foreach_mul_add", "foreach_lerp",
              "flat_lerp")
CUDA_ONLY = ("fastssl-graph", "fastssl-torch")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
MODELS = {"ViT-Ti/16": "vit_tiny_patch16_224", "ViT-S/16": "vit_small_patch16_224",
          "ViT-B/16": "vit_base_patch16_224", "ViT-L/16": "vit_large_patch16_224"}
MOMENTUM = 0.996
CHECK_MOMENTUM = 0.5
# Relative error of the updated teacher against the float64 update: one rounding to the dtype
# (two for the baselines that compute in bf16).
TOLERANCE = {"fp32": 1e-6, "bf16": 1e-2}
# The targets, on an H100, for ViT-B/16 fp32.
TARGET = dict(model="ViT-B/16", dtype="fp32")
GOALS = dict(vs_authors=10.0, vs_lerp=1.2, roofline_pct=85.0)


class CorrectnessError(AssertionError):
    """A contender's updated teacher differs from the float64 update beyond the tolerance."""


@dataclass(frozen=True)
class Case:
    model: str
    dtype: str
    depth: int | None = None  # fewer transformer blocks than the model has (smoke preset)

    @property
    def label(self) -> str:
        depth = "" if self.depth is None else f" depth={self.depth}"
        return f"{self.model}{depth} {self.dtype}"


@dataclass(frozen=True)
class Preset:
    models: Sequence[str]
    dtypes: Sequence[str] = ("fp32", "bf16")
    depth: int | None = None
    sets: int = 3  # fresh random values per case
    warmup: int | None = None  # None: harness.time_fn's default for the device
    reps: int | None = None
    cases: list[Case] = field(init=False, default_factory=list)

    def __post_init__(self):
        for model in self.models:
            for dtype in self.dtypes:
                self.cases.append(Case(model, dtype, self.depth))


PRESETS = {
    "smoke": Preset(models=("ViT-Ti/16",), depth=2, sets=1, warmup=1, reps=3),
    "cpu": Preset(models=("ViT-Ti/16",), sets=8, warmup=3, reps=30),  # ~1 ms calls on shared cores
    "target": Preset(models=(TARGET["model"],)),
    "full": Preset(models=("ViT-S/16", "ViT-B/16", "ViT-L/16")),
}


def default_preset(device: torch.device) -> str:
    return "target" if device.type == "cuda" else "cpu"


# ----------------------------------------------------------------------------- parameter sets

@functools.cache
def parameter_shapes(model: str, depth: int | None = None) -> tuple[torch.Size, ...]:
    """The shapes of a timm model's parameters, from a model built on the meta device."""
    try:
        import timm
    except ImportError as exc:
        raise SystemExit("benchmarks.ema needs timm for the ViT parameter sets: pip install timm") from exc
    kwargs = {} if depth is None else dict(depth=depth)
    with torch.device("meta"):
        net = timm.create_model(MODELS[model], pretrained=False, **kwargs)
    return tuple(p.shape for p in net.parameters())


def make_tensors(case: Case, device: torch.device) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Teacher and student parameter lists of the case, uninitialised (``torch.empty``)."""
    dtype = DTYPES[case.dtype]
    shapes = parameter_shapes(case.model, case.depth)
    teacher = [torch.empty(s, dtype=dtype, device=device) for s in shapes]
    student = [torch.empty(s, dtype=dtype, device=device) for s in shapes]
    return teacher, student


def fill(tensors: Sequence[torch.Tensor], seed: int) -> None:
    gen = torch.Generator(device=tensors[0].device).manual_seed(seed)
    for t in tensors:
        t.normal_(generator=gen)


# ----------------------------------------------------------------------------- contenders

def _authors(teacher, student, m):
    with torch.no_grad():
        for param_q, param_k in zip(student, teacher, strict=True):
            param_k.data.mul_(m).add_((1 - m) * param_q.detach().data)


def _graph(teacher, student, m: float) -> Callable[[], None]:
    """``ema_update_`` with a device momentum, captured in a CUDA graph; returns the replay."""
    m_dev = torch.tensor(m, device=teacher[0].device)
    side = torch.cuda.Stream(teacher[0].device)
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # the warm-up builds the plan (device tables), outside capture
        fastssl.ema_update_(teacher, student, m_dev)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fastssl.ema_update_(teacher, student, m_dev)

    def replay(_momentum=m_dev):  # holds the momentum tensor the graph reads
        graph.replay()

    return replay


def build(name: str, teacher, student, m: float) -> tuple[Callable[[], None], Callable[[], torch.Tensor]]:
    """``(timed call, updated teacher as one flat tensor)`` of a contender, over these tensors.

    ``flat_lerp`` copies them once into flat buffers (its layout) and updates those.
    """
    def flat_teacher():
        return torch.cat([t.reshape(-1) for t in teacher])

    if name == "fastssl":
        return (lambda: fastssl.ema_update_(teacher, student, m)), flat_teacher
    if name == "fastssl-torch":
        return (lambda: fastssl.ema_update_(teacher, student, m, backend="torch")), flat_teacher
    if name == "fastssl-graph":
        return _graph(teacher, student, m), flat_teacher
    if name == "authors":
        return (lambda: _authors(teacher, student, m)), flat_teacher
    if name == "foreach_mul_add":
        def mul_add():
            torch._foreach_mul_(teacher, m)
            torch._foreach_add_(teacher, student, alpha=1 - m)
        return mul_add, flat_teacher
    if name == "foreach_lerp":
        return (lambda: torch._foreach_lerp_(teacher, student, 1 - m)), flat_teacher
    if name == "flat_lerp":
        flat_t, flat_s = flat_teacher(), torch.cat([s.reshape(-1) for s in student])
        return (lambda: flat_t.lerp_(flat_s, 1 - m)), (lambda: flat_t)
    raise ValueError(f"unknown contender {name!r}")


# ----------------------------------------------------------------------------- correctness

def check(names: Sequence[str], case: Case, teacher, student) -> dict[str, float]:
    """Each contender's update at m = 0.5, on a copy of the teacher, against the float64 update.

    Returns the relative errors; raises :class:`CorrectnessError` beyond ``TOLERANCE``.
    The first call of every contender (Triton compilation, plan) happens here, untimed.
    """
    m = CHECK_MOMENTUM
    flat_t = torch.cat([t.reshape(-1) for t in teacher]).double()
    expected = flat_t * m + torch.cat([s.reshape(-1) for s in student]).double() * (1 - m)
    scale = expected.norm().item()
    del flat_t
    errors = {}
    for name in names:
        copies = [t.clone() for t in teacher]
        fn, result = build(name, copies, student, m)
        fn()
        err = (result().double() - expected).norm().item() / scale
        del fn, result, copies
        if not err <= TOLERANCE[case.dtype]:  # also catches NaN
            raise CorrectnessError(f"ema {case.label}: {name} differs from the float64 update by {err:.3e} "
                                   f"(relative) > {TOLERANCE[case.dtype]:.0e}")
        errors[name] = err
    return errors


# ----------------------------------------------------------------------------- running

def run_case(case: Case, preset: Preset, device: torch.device, contenders: Sequence[str], info: dict,
             seed: int) -> list[dict]:
    names = [c for c in CONTENDERS if c in contenders]
    teacher, student = make_tensors(case, device)
    fill(teacher, seed)
    fill(student, seed + 1)
    errors = check(names, case, teacher, student)
    calls = {name: build(name, teacher, student, MOMENTUM)[0] for name in names}
    per_set = []
    for s in range(preset.sets):
        if s and device.type == "cpu":
            # Fresh tensors: on a CPU the time depends on where they land (measured on 2 cores, ViT-Ti/16
            # fp32: 1.48 ms with the student 2 KiB off the teacher's page offset, 1.64 ms at 64 bytes off).
            del calls, teacher, student
            teacher, student = make_tensors(case, device)
            calls = {name: build(name, teacher, student, MOMENTUM)[0] for name in names}
        if s:  # fresh values (on a GPU in the same tensors: the graph and plans stay bound to them)
            fill(teacher, seed + 2 * s)
            fill(student, seed + 2 * s + 1)
        per_set.append(harness.time_contenders(calls, device, warmup=preset.warmup, reps=preset.reps,
                                               rotate=s))
    stats = harness.combine_sets(per_set)
    del calls
    n_params = sum(t.numel() for t in teacher)
    param_bytes = n_params * DTYPES[case.dtype].itemsize
    n_tensors = len(teacher)
    del teacher, student
    if device.type == "cuda":
        torch.cuda.empty_cache()

    authors_ms = stats["authors"]["median_ms"] if "authors" in stats else None
    lerp_ms = stats["foreach_lerp"]["median_ms"] if "foreach_lerp" in stats else None
    records = []
    for name in names:
        st = stats[name]
        mem = st["peak_mem_bytes"]
        records.append(dict(
            case=case.label, model=case.model, dtype=case.dtype, contender=name, tensors=n_tensors,
            params_m=n_params / 1e6, bytes_moved=3 * param_bytes, median_ms=st["median_ms"],
            min_ms=st["min_ms"], max_ms=st["max_ms"], reps=st["reps"], sets=st["sets"],
            set_medians_ms=st["set_medians_ms"], peak_mem_mb=None if mem is None else mem / 2**20,
            speedup=None if authors_ms is None else authors_ms / st["median_ms"],
            vs_lerp=None if lerp_ms is None else lerp_ms / st["median_ms"],
            roofline_pct=harness.roofline_pct(3 * param_bytes, st["median_ms"], info["copy_bandwidth_gbs"]),
            rel_err=errors[name], tolerance=TOLERANCE[case.dtype]))
    return records


def run(preset: Preset, device: torch.device, info: dict, *, contenders: Sequence[str] | None = None,
        cases: Sequence[Case] | None = None, seed: int = 0) -> list[dict]:
    if contenders is None:
        contenders = [c for c in CONTENDERS if device.type == "cuda" or c not in CUDA_ONLY]
    return harness.run_cases(NAME, cases or preset.cases, preset.cases,
                             lambda c, sd: run_case(c, preset, device, contenders, info, sd), seed)


# ----------------------------------------------------------------------------- reporting

def target_lines(records: Sequence[dict], on_cuda: bool) -> list[str]:
    """The issue's goals for ViT-B/16 fp32, one line each, judged on CUDA only."""
    rows = {r["contender"]: r for r in records
            if r["model"] == TARGET["model"] and r["dtype"] == TARGET["dtype"] and "depth" not in r["case"]}
    if "fastssl" not in rows:
        return []
    ours = rows["fastssl"]
    checks = []
    if "authors" in rows:
        checks.append((f">= {GOALS['vs_authors']:.0f}x faster than the authors' loop", ours["speedup"], "x",
                       GOALS["vs_authors"]))
    if "foreach_lerp" in rows:
        checks.append((f">= {GOALS['vs_lerp']}x faster than _foreach_lerp_", ours["vs_lerp"], "x",
                       GOALS["vs_lerp"]))
    checks.append((f">= {GOALS['roofline_pct']:.0f}% of measured copy bandwidth (3 x parameter bytes)",
                   ours["roofline_pct"], "%", GOALS["roofline_pct"]))
    lines = [f"Targets (issue), {TARGET['model']} {TARGET['dtype']}:"]
    lines += [harness.goal_line(text, value, unit, goal, on_cuda) for text, value, unit, goal in checks]
    graph = rows.get("fastssl-graph")
    lines.append("- captured in a CUDA graph with a device momentum: " + (
        f"PASS (checked against the float64 update; replay {graph['median_ms']:.4g} ms)" if graph
        else "not measured on this device (needs CUDA)"))
    return lines


def cpu_target_lines(records: Sequence[dict], on_cpu: bool) -> list[str]:
    """Issue 22's goals for the CPU path (the C++ loop): no slower than `_foreach_lerp_` or the authors'
    loop on the same tensors, for each teacher dtype measured. Judged on a CPU run only."""
    lines = []
    for case in dict.fromkeys(r["case"] for r in records):
        rows = {r["contender"]: r for r in records if r["case"] == case}
        if "fastssl" not in rows:
            continue
        ours = rows["fastssl"]
        lines.append(f"CPU targets (issue 22), {case}:")
        if "foreach_lerp" in rows:
            lines.append(harness.cpu_goal_line(">= 1x the speed of torch._foreach_lerp_", ours["vs_lerp"], "x", 1.0,
                                               on_cpu))
        if "authors" in rows:
            lines.append(harness.cpu_goal_line(">= 1x the speed of the authors' loop", ours["speedup"], "x", 1.0,
                                               on_cpu))
    return lines


def columns(records: Sequence[dict]) -> list[str]:
    cols = ["case", "contender", "median_ms", "min_ms", "max_ms", "speedup", "vs_lerp", "roofline_pct",
            "peak_mem_mb", "rel_err"]
    return [c for c in cols if any(r.get(c) is not None for r in records)]


def notes(preset_name: str, preset: Preset, records: Sequence[dict], device: torch.device) -> str:
    sizes = {r["case"]: (r["tensors"], r["params_m"]) for r in records}
    tols = ", ".join(f"{tol:.0e} ({dtype})" for dtype, tol in TOLERANCE.items())
    lines = [
        f"Preset `{preset_name}`: {len(preset.cases)} cases, {preset.sets} random value sets per case; "
        "times are the median over sets of the per-set median (min / max over all calls).",
        "Parameter sets: " + "; ".join(f"{case}: {n} tensors, {p:.2f} M parameters"
                                       for case, (n, p) in sizes.items()) + ".",
        f"Momentum {MOMENTUM}. `speedup` = authors' median / this median; `vs_lerp` = `foreach_lerp` "
        "median / this median; `roofline_pct`: 3 x parameter bytes (the floor) per call against the "
        "measured copy bandwidth, for every contender.",
        f"Correctness: every contender's update at m = {CHECK_MOMENTUM} against the float64 update, relative "
        f"tolerance {tols} (`rel_err`).",
    ]
    if device.type != "cuda":
        lines.append("CPU run: `fastssl` is the PyTorch path, one call of the C++ loop of `csrc/ema.cpp` "
                     f"({'loaded' if _ext.loaded() else 'NOT loaded: torch._foreach_* instead'}; the Triton kernel "
                     "needs a GPU); no memory column (CUDA allocator stats only); no CUDA-graph row.")
    target = target_lines(records, device.type == "cuda") + cpu_target_lines(records, device.type == "cpu")
    return "\n".join(f"- {line}" for line in lines) + ("\n\n" + "\n".join(target) if target else "")


def plot(records: list[dict], fig) -> None:
    """Median time per contender grouped by case, log scale."""
    cases = list(dict.fromkeys(r["case"] for r in records))
    contenders = list(dict.fromkeys(r["contender"] for r in records))
    fig.set_size_inches(max(8.0, 0.3 * len(cases) * len(contenders) + 2), 4.5)
    ax = fig.add_subplot(1, 1, 1)
    harness.bar_plot(ax, records, cases, contenders, lambda r: r["case"])
    ax.set_title("EMA teacher update: median time per call (min-max whiskers)", fontsize=9)


def main(argv: list[str] | None = None) -> dict[str, Path]:
    return harness.benchmark_main(sys.modules[__name__], argv, filter_example="ViT-L/16 bf16")


if __name__ == "__main__":
    main()
