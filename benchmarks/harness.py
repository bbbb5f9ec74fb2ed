"""The measuring and reporting code every fastssl benchmark shares.

Honesty rules the benchmarks follow (and this module makes easy):

* every contender is timed on exactly the same input tensors;
* inputs are allocated before the timed / memory-measured region, never inside it;
* each function is warmed up (Triton autotuning, torch.compile, allocator caches)
  before any timing;
* the statistic is the median: per input set the median of ``reps`` timed calls,
  per case the median of the per-set medians over several fresh random input sets
  (:func:`time_contenders` then :func:`combine_sets`);
* on CUDA, timing is by CUDA events through ``triton.testing.do_bench``, which
  flushes the L2 cache before each call, so no call reads its inputs from the
  previous call's cache.

Results go to ``benchmarks/results/<device slug>/<name>.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import random
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "bar_plot",
    "benchmark_main",
    "combine_sets",
    "default_device",
    "device_info",
    "markdown_table",
    "peak_memory_bytes",
    "rel_err",
    "results_dir",
    "roofline_pct",
    "run_cases",
    "time_contenders",
    "time_fn",
    "write_results",
]

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_ROOT = Path(__file__).resolve().parent / "results"

# Timed calls per measurement when the caller does not say: GPU calls are cheap to repeat.
_DEFAULT_COUNTS = {"cuda": (25, 100), "cpu": (3, 10)}
_BANDWIDTH_CACHE: dict[str, float] = {}
_FLUSH_BYTES = 256 << 20  # zeroed before each timed CUDA call: larger than any current L2


# ----------------------------------------------------------------------------- device

def default_device() -> torch.device:
    """The first CUDA device when there is one, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _normalize(device: torch.device | str) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def _slug(name: str) -> str:
    slug = re.sub(r"\s+", "-", name.strip().lower())
    return re.sub(r"[^a-z0-9._-]", "", slug) or "unknown"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def _git_commit() -> str | None:
    """Short commit of the repository, with ``-dirty`` when tracked files have changes."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, check=True,
                              timeout=10).stdout.strip()

    try:
        commit = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("-dirty" if dirty else "") if commit else None


def _triton_version() -> str | None:
    try:
        import triton
    except Exception:  # absent or broken: the benchmarks still run the PyTorch paths
        return None
    return triton.__version__


def copy_bandwidth_gbs(device: torch.device | str) -> float:
    """Measured ``dst.copy_(src)`` bandwidth in GB/s (bytes read + bytes written), cached per device.

    1 GiB buffers on a GPU (far beyond L2), 64 MiB on the CPU; the median of several reps.
    """
    device = _normalize(device)
    key = str(device)
    if key not in _BANDWIDTH_CACHE:
        nbytes = (1 << 30) if device.type == "cuda" else (64 << 20)
        src = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
        dst = torch.empty_like(src)
        stats = time_fn(lambda: dst.copy_(src), device, warmup=3, reps=20)
        _BANDWIDTH_CACHE[key] = 2 * nbytes / (stats["median_ms"] * 1e-3) / 1e9
        del src, dst
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return _BANDWIDTH_CACHE[key]


def device_info(device: torch.device | str) -> dict:
    """What the results were measured on: device, versions, commit, date, measured copy bandwidth."""
    device = _normalize(device)
    info: dict[str, Any] = {"device": str(device)}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(name=props.name, slug=_slug(props.name),
                    compute_capability=f"{props.major}.{props.minor}", sms=props.multi_processor_count,
                    memory_gib=round(props.total_memory / 2**30, 1))
        # Spec bandwidth from the memory clock and bus width (double data rate), where torch reports them.
        clock_khz = getattr(props, "memory_clock_rate", None)
        bus_bits = getattr(props, "memory_bus_width", None)
        if clock_khz and bus_bits:
            info["spec_bandwidth_gbs"] = round(2 * clock_khz * 1e3 * bus_bits / 8 / 1e9, 1)
    else:
        info.update(name=_cpu_model(), slug="cpu", cpu_threads=torch.get_num_threads(),
                    cpu_count=os.cpu_count())
    info.update(
        torch=torch.__version__,
        triton=_triton_version(),
        python=platform.python_version(),
        cuda=torch.version.cuda,
        commit=_git_commit(),
        date=_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
    )
    info["copy_bandwidth_gbs"] = round(copy_bandwidth_gbs(device), 1)
    return info


# ----------------------------------------------------------------------------- timing

def _stats(times_ms: Sequence[float]) -> dict:
    return {"median_ms": statistics.median(times_ms), "min_ms": min(times_ms), "max_ms": max(times_ms),
            "reps": len(times_ms)}


def _time_cuda(fn: Callable[[], Any], device: torch.device, warmup: int, reps: int) -> dict:
    try:
        from triton.testing import do_bench
    except ImportError:  # no Triton: the same method by hand
        return _time_cuda_setup(lambda _: fn(), lambda: None, device, warmup, reps)

    with torch.cuda.device(device):
        # do_bench takes time budgets in ms and divides them by its own estimate of one call,
        # L2 flush included: estimate the same way so that it runs about `reps` timed calls.
        flush = torch.empty(_FLUSH_BYTES, dtype=torch.int8, device=device)
        fn()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(3):
            flush.zero_()
            fn()
        end.record()
        torch.cuda.synchronize()
        est_ms = max(start.elapsed_time(end) / 3, 1e-3)
        del flush
        budget = dict(warmup=warmup * est_ms, rep=reps * est_ms)
        try:
            times = do_bench(fn, return_mode="all", **budget)
        except (AssertionError, ValueError, TypeError):
            # A Triton without return_mode="all": ask for quantiles instead (the count is then
            # do_bench's own, about `reps`).
            median, lo, hi = do_bench(fn, quantiles=[0.5, 0.0, 1.0], **budget)
            return {"median_ms": median, "min_ms": lo, "max_ms": hi, "reps": reps}
    return _stats(times)


def _time_cuda_setup(fn: Callable[[Any], Any], setup: Callable[[], Any], device: torch.device, warmup: int,
                     reps: int) -> dict:
    # do_bench has no untimed per-call setup: the same method by hand. setup()'s kernels are
    # queued before the start event, so the events time fn alone; L2 is flushed in between.
    with torch.cuda.device(device):
        flush = torch.empty(_FLUSH_BYTES, dtype=torch.int8, device=device)
        for _ in range(max(1, warmup)):
            fn(setup())
        torch.cuda.synchronize()
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(reps)]
        for start, end in events:
            arg = setup()
            flush.zero_()
            start.record()
            fn(arg)
            end.record()
            del arg
        torch.cuda.synchronize()
    return _stats([start.elapsed_time(end) for start, end in events])


def _time_cpu(fn: Callable[..., Any], setup: Callable[[], Any] | None, warmup: int, reps: int) -> dict:
    stats = _time_cpu_interleaved({"fn": fn}, ["fn"], {"fn": setup} if setup is not None else {}, warmup, reps)
    return {k: v for k, v in stats["fn"].items() if k != "peak_mem_bytes"}


_ORDER = random.Random(0)  # the contenders' orders on a CPU: one stream per run, reproducible


def _time_cpu_interleaved(fns: dict[str, Callable[..., Any]], names: Sequence[str],
                          setups: dict[str, Callable[[], Any]], warmup: int | None, reps: int | None) -> dict:
    """CPU timing of several contenders call by call in turn, in a fresh order every round (one seeded
    stream for the whole run, so sets and cases draw different orders; no contender runs twice in a row):
    a CPU shared with other work slows whichever contender runs at the moment, so timing one contender's
    calls in a block and then the next's gives ratios that swing by +-10% from run to run; interleaved,
    every contender's calls see the same conditions. Shuffled rather than rotated: in a rotated order
    each contender always follows the same one: in the EMA benchmark ``foreach_lerp`` always followed
    ``foreach_mul_add`` and found the same tensors in the last-level cache, while ``fastssl`` followed
    ``flat_lerp``, whose own copies had evicted them."""
    d_warmup, d_reps = _DEFAULT_COUNTS["cpu"]
    warmup = d_warmup if warmup is None else max(0, int(warmup))
    reps = d_reps if reps is None else max(1, int(reps))
    def call(name: str) -> float:
        setup = setups.get(name)
        arg = () if setup is None else (setup(),)
        t0 = time.perf_counter()
        fns[name](*arg)
        return (time.perf_counter() - t0) * 1e3

    for _ in range(warmup):
        for name in names:
            call(name)
    times: dict[str, list[float]] = {name: [] for name in names}
    last = names[-1] if names else None
    for _ in range(reps):
        order = list(names)
        _ORDER.shuffle(order)
        if len(order) > 1 and order[0] == last:  # after itself it would find its own data in the cache
            order.append(order.pop(0))
        for name in order:
            times[name].append(call(name))
        last = order[-1]
    return {name: {**_stats(times[name]), "peak_mem_bytes": None} for name in names}


def time_fn(fn: Callable[..., Any], device: torch.device | str, *, warmup: int | None = None,
            reps: int | None = None, setup: Callable[[], Any] | None = None) -> dict:
    """Time ``fn()`` on ``device``: ``{"median_ms", "min_ms", "max_ms", "reps"}``.

    ``warmup`` untimed calls first, then ``reps`` timed ones (defaults: 25 / 100 on
    CUDA, 3 / 10 on CPU). CUDA: CUDA events via ``triton.testing.do_bench``, L2
    flushed before every call (``reps`` is then approximate, the reported count
    exact). CPU: ``time.perf_counter`` around each call.

    With ``setup``, every call is ``fn(setup())`` and only ``fn`` is timed (e.g. a
    forward in setup, its backward timed: a graph can be used once); on CUDA that is
    the same method (events, L2 flush) by hand, with exactly ``reps`` timed calls.
    """
    device = _normalize(device)
    kind = "cuda" if device.type == "cuda" else "cpu"
    d_warmup, d_reps = _DEFAULT_COUNTS[kind]
    warmup = d_warmup if warmup is None else max(0, int(warmup))
    reps = d_reps if reps is None else max(1, int(reps))
    if kind == "cuda":
        if setup is not None:
            return _time_cuda_setup(fn, setup, device, warmup, reps)
        return _time_cuda(fn, device, warmup, reps)
    return _time_cpu(fn, setup, warmup, reps)


def peak_memory_bytes(fn: Callable[..., Any], device: torch.device | str, *,
                      setup: Callable[[], Any] | None = None) -> int | None:
    """Bytes ``fn()`` allocates on top of what is already allocated, at its peak (CUDA); None on CPU.

    Inputs must exist before the call: only what the op itself allocates (outputs,
    saved tensors, temporaries) is counted. With ``setup``, ``fn(setup())``, setup's
    allocations counted in the base.
    """
    device = _normalize(device)
    if device.type != "cuda":
        return None
    arg = () if setup is None else (setup(),)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    out = fn(*arg)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    del out, arg
    return int(peak)


def time_contenders(fns: dict[str, Callable[..., Any]], device: torch.device | str, *,
                    warmup: int | None = None, reps: int | None = None, memory: bool = True,
                    rotate: int = 0, setups: dict[str, Callable[[], Any]] | None = None) -> dict[str, dict]:
    """Time several contenders on one input set: ``{name: time_fn stats + "peak_mem_bytes"}``.

    The callables must close over the *same* input tensors, built by the caller
    before this call. On a CPU the contenders' calls alternate (see
    :func:`_time_cpu_interleaved`); on a GPU each is timed in turn by :func:`time_fn`.
    ``setups`` gives a contender an untimed per-call setup (see :func:`time_fn`).
    ``rotate`` shifts the order the contenders run in (pass the input-set index), so
    that no contender is always first or last.
    """
    setups = setups or {}
    names = list(fns)
    if names:
        shift = rotate % len(names)
        names = names[shift:] + names[:shift]
    if _normalize(device).type == "cpu":
        out = _time_cpu_interleaved(fns, names, setups, warmup, reps)
        return {name: out[name] for name in fns}
    out = {}
    for name in names:
        setup = setups.get(name)
        stats = time_fn(fns[name], device, warmup=warmup, reps=reps, setup=setup)
        stats["peak_mem_bytes"] = peak_memory_bytes(fns[name], device, setup=setup) if memory else None
        out[name] = stats
    return {name: out[name] for name in fns}


def run_cases(name: str, cases: Sequence, all_cases: Sequence, run_case: Callable[[Any, int], list],
              seed: int = 0) -> list[dict]:
    """``run_case(case, seed)`` for each case, logging its time; the records of all of them.

    The seed follows the case's place in the preset (``all_cases``), not in ``cases``: a
    filtered run sees the same inputs as the full one.
    """
    records: list[dict] = []
    for i, case in enumerate(cases):
        t0 = time.perf_counter()
        records += run_case(case, seed + 1000 * list(all_cases).index(case))
        print(f"[{name}] case {i + 1}/{len(cases)} {case.label}: {time.perf_counter() - t0:.1f} s",
              file=sys.stderr, flush=True)
    return records


def combine_sets(per_set: Sequence[dict[str, dict]]) -> dict[str, dict]:
    """Merge :func:`time_contenders` results of several input sets.

    ``median_ms`` is the median of the per-set medians, ``min_ms`` / ``max_ms`` the
    extremes over all calls, ``reps`` the total count, ``peak_mem_bytes`` the largest.
    """
    combined: dict[str, dict] = {}
    for name in per_set[0] if per_set else ():
        runs = [s[name] for s in per_set]
        mems = [r["peak_mem_bytes"] for r in runs if r.get("peak_mem_bytes") is not None]
        combined[name] = {
            "median_ms": statistics.median(r["median_ms"] for r in runs),
            "min_ms": min(r["min_ms"] for r in runs),
            "max_ms": max(r["max_ms"] for r in runs),
            "reps": sum(r["reps"] for r in runs),
            "sets": len(runs),
            "set_medians_ms": [r["median_ms"] for r in runs],
            "peak_mem_bytes": max(mems) if mems else None,
        }
    return combined


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``||actual - expected|| / ||expected||`` in float64 (the absolute error when expected is 0)."""
    actual, expected = actual.detach().double(), expected.detach().double()
    scale = expected.norm().item()
    diff = (actual - expected).norm().item()
    return diff / scale if scale > 0 else diff


def roofline_pct(bytes_moved: float, ms: float, bandwidth_gbs: float) -> float:
    """Achieved bandwidth ``bytes_moved / time`` as a percentage of ``bandwidth_gbs`` (GB/s, 1e9 bytes)."""
    if ms <= 0 or bandwidth_gbs <= 0:
        raise ValueError(f"roofline_pct: time ({ms} ms) and bandwidth ({bandwidth_gbs} GB/s) "
                         "must be positive")
    return 100.0 * (bytes_moved / (ms * 1e-3)) / (bandwidth_gbs * 1e9)


# ----------------------------------------------------------------------------- reporting

def goal_line(text: str, value: float | None, unit: str, goal: float, on_cuda: bool, *, higher: bool = True) -> str:
    """One issue target as a markdown bullet: the measured value and PASS / FAIL, judged on CUDA only
    (the targets are for the GPU; a CPU run reports its number without a verdict)."""
    if value is None:
        return f"- {text}: not measured on this device"
    verdict = ("PASS" if (value >= goal if higher else value <= goal) else "FAIL") if on_cuda else \
        "not judged (CPU run; the goals are for the GPU)"
    return f"- {text}: {value:.2f}{unit} {verdict}"


def cpu_goal_line(text: str, value: float | None, unit: str, goal: float, on_cpu: bool, *, higher: bool = True) -> str:
    """A goal of the PyTorch / C++ paths on a CPU (issue 22: never slower than what users would write
    instead) as a markdown bullet, judged PASS / FAIL on a CPU run only."""
    if value is None:
        return f"- {text}: not measured on this device"
    verdict = ("PASS" if (value >= goal if higher else value <= goal) else "FAIL") if on_cpu else \
        "not judged (GPU run; the goal is for the CPU)"
    return f"- {text}: {value:.2f}{unit} {verdict}"


def results_dir(info: dict, root: str | os.PathLike | None = None) -> Path:
    """``<root>/<device slug>/``, root defaulting to ``benchmarks/results``."""
    return Path(root if root is not None else RESULTS_ROOT) / info["slug"]


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        if value == 0:
            return "0"
        if abs(value) < 1e-3 or abs(value) >= 1e6:
            return f"{value:.2e}"
        return f"{value:.4g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value).replace("|", "\\|")


def markdown_table(records: Sequence[dict], columns: Sequence[str]) -> str:
    """A GitHub markdown table of ``columns`` (record keys); missing or None values are blank."""
    left = ("contender", "case", "mode", "dtype")
    lines = ["| " + " | ".join(columns) + " |",
             "|" + "|".join("---" if c in left else "---:" for c in columns) + "|"]
    for rec in records:
        lines.append("| " + " | ".join(_fmt(rec.get(c)) for c in columns) + " |")
    return "\n".join(lines)


def _header(info: dict, name: str) -> str:
    versions = ", ".join(f"{k} {info[k]}" for k in ("torch", "triton", "python", "cuda") if info.get(k))
    lines = [
        f"# {name} benchmark",
        "",
        f"- device: {info.get('name')} (`{info.get('device')}`), measured copy bandwidth "
        f"{info.get('copy_bandwidth_gbs')} GB/s"
        + (f" (spec {info['spec_bandwidth_gbs']} GB/s)" if info.get("spec_bandwidth_gbs") else ""),
        f"- versions: {versions}",
        f"- commit: {info.get('commit') or 'unknown'}",
        f"- date: {info.get('date')}",
    ]
    return "\n".join(lines)


def _default_plot(records: Sequence[dict], fig) -> None:
    """Median time per contender, grouped by case (and mode when records have one), log scale."""
    def group(rec):
        return f"{rec.get('case', '')} {rec.get('mode', '')}".strip()

    groups = list(dict.fromkeys(group(r) for r in records))
    contenders = list(dict.fromkeys(r["contender"] for r in records))
    fig.set_size_inches(max(8.0, 0.25 * len(groups) * len(contenders) + 2), 4.5)
    ax = fig.add_subplot(1, 1, 1)
    bar_plot(ax, records, groups, contenders, group)
    ax.set_title("median time per call (min-max whiskers)")


def bar_plot(ax, records: Sequence[dict], groups: Sequence[str], contenders: Sequence[str],
             group_of: Callable[[dict], str]) -> None:
    """Grouped bars of ``median_ms`` with min-max whiskers on a log axis (shared by the benchmarks' plots)."""
    width = 0.8 / max(1, len(contenders))
    index = {g: i for i, g in enumerate(groups)}
    for j, name in enumerate(contenders):
        rows = [r for r in records if r["contender"] == name and group_of(r) in index]
        if not rows:
            continue
        xs = [index[group_of(r)] + (j - (len(contenders) - 1) / 2) * width for r in rows]
        med = [r["median_ms"] for r in rows]
        err = [[m - r["min_ms"] for m, r in zip(med, rows, strict=True)],
               [r["max_ms"] - m for m, r in zip(med, rows, strict=True)]]
        ax.bar(xs, med, width, yerr=err, capsize=2, label=name)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups, rotation=30, ha="right", fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel("ms")
    ax.grid(axis="y", which="both", alpha=0.3)
    ax.legend(fontsize=7)


def write_results(records: list[dict], info: dict, out_dir: str | os.PathLike, name: str, *,
                  columns: list[str], plot: Callable[[list[dict], Any], None] | None = None,
                  notes: str | None = None) -> dict[str, Path]:
    """Write ``<name>.json``, ``<name>.md`` and ``<name>.png`` into ``out_dir``; return their paths.

    JSON: ``{"meta": info, "records": records}``. Markdown: a header (device,
    versions, commit, date), the table of ``columns``, then ``notes``. PNG:
    ``plot(records, fig)`` on a matplotlib Figure (Agg, no pyplot state), else a
    bar chart of median time per contender per case. Keys are ``"json"``, ``"md"``
    and ``"png"`` (absent when matplotlib is not installed: the ``bench`` extra).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / f"{name}.json", "md": out_dir / f"{name}.md"}
    paths["json"].write_text(json.dumps({"meta": info, "records": records}, indent=1, default=str) + "\n")
    md = [_header(info, name), "", markdown_table(records, columns), ""]
    if notes:
        md += [notes.rstrip(), ""]
    paths["md"].write_text("\n".join(md))
    try:
        from matplotlib.figure import Figure
    except ImportError:
        print(f"{name}: matplotlib is not installed (pip install -e '.[bench]'), no plot written")
        return paths
    fig = Figure(figsize=(8, 4.5), layout="constrained")  # a plot may resize it
    (plot or _default_plot)(records, fig)
    fig.suptitle(f"{name}: {info.get('name')}, torch {info.get('torch')}", fontsize=9)
    paths["png"] = out_dir / f"{name}.png"
    fig.savefig(paths["png"], dpi=120)
    return paths


# ----------------------------------------------------------------------------- command line

def benchmark_main(bench, argv: list[str] | None = None, *, filter_example: str = "") -> dict[str, Path]:
    """The command line every benchmark module shares: ``python -m benchmarks.<name> [options]``.

    ``bench`` is the benchmark module. It provides ``NAME``, ``PRESETS`` (each with a
    ``cases`` list whose items have a ``label``), ``CONTENDERS``, optionally ``CUDA_ONLY``,
    and the functions ``default_preset(device)``, ``run(preset, device, info, *,
    contenders, cases, seed) -> records``, ``columns(records)``, ``notes(preset_name,
    preset, records, device)`` and optionally ``plot(records, fig)`` (else the default
    bar chart). Prints the table and the notes, writes JSON/MD/PNG and returns their paths.
    """
    parser = argparse.ArgumentParser(prog=f"python -m benchmarks.{bench.NAME}",
                                     description=(bench.__doc__ or "").split("\n")[0])
    parser.add_argument("--preset", choices=sorted(bench.PRESETS), help="default: target on CUDA, cpu otherwise")
    parser.add_argument("--out", type=Path, help="results folder (default: benchmarks/results/<device>/)")
    parser.add_argument("--device", help="default: the first CUDA device, else the CPU")
    parser.add_argument("--contenders", nargs="+", choices=bench.CONTENDERS, help="default: all that apply")
    parser.add_argument("--filter", nargs="+", metavar="TOKEN",
                        help="keep the cases whose label has all these tokens"
                        + (f", e.g. {filter_example}" if filter_example else ""))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    device = torch.device(args.device) if args.device else default_device()
    preset_name = args.preset or bench.default_preset(device)
    preset = bench.PRESETS[preset_name]
    cuda_only = [c for c in args.contenders or () if c in getattr(bench, "CUDA_ONLY", ())]
    if device.type != "cuda" and cuda_only:
        parser.error(f"{', '.join(cuda_only)}: CUDA only")
    info = device_info(device)
    info.update(benchmark=bench.NAME, preset=preset_name)
    cases = [c for c in preset.cases if set(args.filter or ()) <= set(c.label.split())]
    if not cases:
        parser.error(f"--filter {args.filter} matches none of the {preset_name} cases")
    records = bench.run(preset, device, info, contenders=args.contenders, cases=cases, seed=args.seed)

    cols = bench.columns(records)
    text = bench.notes(preset_name, preset, records, device)
    print(markdown_table(records, cols))
    print()
    print(text)
    out = args.out if args.out is not None else results_dir(info)
    paths = write_results(records, info, out, f"{bench.NAME}-{preset_name}", columns=cols,
                          plot=getattr(bench, "plot", None), notes=text)
    print(f"\nwrote {', '.join(str(p) for p in paths.values())}")
    return paths
