"""Launch-configuration sweeps of the Triton kernels, for a session with a GPU.

    python -m benchmarks.tune dino|paws|ema [--smoke] [--out DIR]

The launchers read their block sizes, warps and split counts from module constants of
``fastssl.kernels.<module>`` (``_TILE``, ``_MAX_BLOCK_C``, ``_BLOCK``, ...). They were
chosen from a static model of the compiled code, with no GPU to time them on. Each candidate
here sets some of those constants for the duration of its run; ``shipped`` is the committed
values. Every candidate's outputs are first compared with shipped's on the same inputs (the
relative error must stay within the op's test tolerance), then the op is timed like the
benchmarks time it (``harness.time_fn``: medians of CUDA-event timings, L2 flushed, warm-up
first). A candidate worth committing beats shipped by more than the spread of its timings and
builds spill-free (``python -m fastssl.kernels.aot``) on sm_80 and sm_90.

``--smoke`` runs tiny problems (on the CPU, the kernels under ``TRITON_INTERPRET=1``): it checks
the candidates, not their speed. Results: ``benchmarks/results/<device>/tune-<name>.{json,md}``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from benchmarks import harness

# (label, constants of fastssl.kernels.<module>); "shipped" sets nothing.
CANDIDATES: dict[str, list[tuple[str, dict]]] = {
    "dino": [
        ("shipped", {}),
        ("tile 2048", {"_TILE": 2048}),
        ("tile 8192", {"_TILE": 8192}),
        ("4 warps", {"_OPTIONS": {"num_warps": 4}}),
        ("16 warps", {"_OPTIONS": {"num_warps": 16}}),
        ("2 stages", {"_OPTIONS": {"num_stages": 2}}),
        ("512 programs", {"_TARGET_PROGRAMS": 512}),
        ("2048 programs", {"_TARGET_PROGRAMS": 2048}),
    ],
    "paws": [
        ("shipped", {}),
        ("class tile 1024 (16 query rows)", {"_MAX_BLOCK_C": 1024}),
        ("class tile 512", {"_MAX_BLOCK_C": 512}),
        ("class tile 128", {"_MAX_BLOCK_C": 128}),
        ("fp32 dots bf16x3", {"FP32_PRECISION": "bf16x3"}),
        ("matmul programs 512", {"_MIN_MM_PROGRAMS": 512}),
        ("2048 programs", {"_TARGET_PROGRAMS": 2048}),
    ],
    "ema": [
        ("shipped", {}),
        ("block 2048", {"_BLOCK": 2048}),
        ("block 8192", {"_BLOCK": 8192}),
        ("4 warps", {"_NUM_WARPS": 4}),
        ("block 2048, 4 warps", {"_BLOCK": 2048, "_NUM_WARPS": 4}),
    ],
}
MODULES = {"dino": "dino", "paws": "snn", "ema": "ema"}
# Relative error a candidate may show against shipped: the ops' test tolerances.
TOLERANCE = {"fp32": 1e-4, "bf16": 2e-2}


@contextlib.contextmanager
def patched(module, values: dict) -> Iterator[None]:
    """The module's constants set to ``values`` (a dict value updates a dict constant), then restored."""
    saved = {name: getattr(module, name) for name in values}
    try:
        for name, value in values.items():
            setattr(module, name, {**saved[name], **value} if isinstance(value, dict) else value)
        yield
    finally:
        for name, value in saved.items():
            setattr(module, name, value)


# ----------------------------------------------------------------------------- problems

def _dino_problems(smoke: bool, device: torch.device):
    """``(label, dtype, make_call)``: make_call(seed) builds the inputs, returns (call, outputs)."""
    from fastssl.losses.dino import dino_loss

    ncrops, B, K = (4, 3, 300) if smoke else (10, 64, 65536)
    for dtype in ("fp32", "bf16"):
        def make(seed, dtype=dtype):
            gen = torch.Generator(device=device).manual_seed(seed)
            dt = getattr(torch, {"fp32": "float32", "bf16": "bfloat16"}[dtype])
            student = (torch.randn(ncrops * B, K, generator=gen, device=device) * 3).to(dt).requires_grad_()
            teacher = (torch.randn(2 * B, K, generator=gen, device=device) * 3).to(dt)
            center = torch.randn(1, K, generator=gen, device=device) * 0.1

            def call():
                student.grad = None
                loss, _ = dino_loss(student, teacher, center, ncrops, 0.04, backend="triton")
                loss.backward()
                return loss.detach(), student.grad

            return call
        yield f"B={B} K={K} 2+{ncrops - 2} crops fwd+bwd", dtype, make


def _paws_problems(smoke: bool, device: torch.device):
    from fastssl.losses.paws import snn

    shapes = [(20, 70, 16, 12)] if smoke else [(512, 6720, 256, 960), (512, 6720, 2048, 960)]
    for (N, M, d, C), dtype in ((s, t) for s in shapes for t in ("fp32", "bf16")):
        def make(seed, N=N, M=M, d=d, C=C, dtype=dtype):
            gen = torch.Generator(device=device).manual_seed(seed)
            dt = getattr(torch, {"fp32": "float32", "bf16": "bfloat16"}[dtype])
            query = torch.randn(N, d, generator=gen, device=device).to(dt).requires_grad_()
            supports = torch.randn(M, d, generator=gen, device=device).to(dt).requires_grad_()
            labels = torch.softmax(torch.randn(M, C, generator=gen, device=device), 1)
            grad = torch.randn(N, C, generator=gen, device=device)

            def call():
                query.grad = supports.grad = None
                probs = snn(query, supports, labels, 0.1, backend="triton")
                probs.backward(grad)
                return probs.detach(), query.grad, supports.grad

            return call
        yield f"N={N} M={M} d={d} C={C} dense fwd+bwd", dtype, make


def _ema_problems(smoke: bool, device: torch.device):
    import fastssl
    import fastssl.ema

    if smoke:
        shapes = [torch.Size(s) for s in ((7,), (33, 5), (4097,), ())]
        label = "4 small tensors"
    else:
        from benchmarks.ema import parameter_shapes
        shapes, label = parameter_shapes("ViT-B/16"), "ViT-B/16"
    for dtype in ("fp32", "bf16"):
        def make(seed, dtype=dtype):
            gen = torch.Generator(device=device).manual_seed(seed)
            dt = getattr(torch, {"fp32": "float32", "bf16": "bfloat16"}[dtype])
            teacher = [torch.randn(s, generator=gen, device=device).to(dt) for s in shapes]
            student = [torch.randn(s, generator=gen, device=device).to(dt) for s in shapes]
            start = [t.clone() for t in teacher]
            fastssl.ema._CACHE.clear()  # the plan holds the config it was built with

            def call():
                for t, s0 in zip(teacher, start, strict=True):
                    t.copy_(s0)
                fastssl.ema_update_(teacher, student, 0.5, backend="triton")
                return (torch.cat([t.reshape(-1).float() for t in teacher]),)

            def timed():
                fastssl.ema_update_(teacher, student, 0.996, backend="triton")

            call.timed = timed
            return call
        yield f"{label} ({len(shapes)} tensors)", dtype, make


PROBLEMS: dict[str, Callable] = {"dino": _dino_problems, "paws": _paws_problems, "ema": _ema_problems}


# ----------------------------------------------------------------------------- the sweep

def sweep(name: str, device: torch.device, *, smoke: bool, seed: int = 0) -> list[dict]:
    """Every candidate of ``name`` on every problem: checked against shipped, then timed."""
    module = importlib.import_module(f"fastssl.kernels.{MODULES[name]}")
    records = []
    counts = dict(warmup=1, reps=2) if smoke else {}
    for label, dtype, make in PROBLEMS[name](smoke, device):
        call = make(seed)
        reference = [x.detach().double().clone() for x in call()]
        for cand, values in CANDIDATES[name]:
            rec = dict(case=f"{label} {dtype}", candidate=cand, constants=values)
            with patched(module, values):
                call = make(seed)
                try:
                    outputs = call()
                except Exception as exc:  # a candidate that fails to compile or launch is a result too
                    rec.update(error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
                    records.append(rec)
                    print(f"[{name}] {rec['case']}: {cand}: {rec['error']}", file=sys.stderr, flush=True)
                    continue
                err = max(harness.rel_err(o.double(), r) for o, r in zip(outputs, reference, strict=True))
                rec.update(rel_err=err, ok=err <= TOLERANCE[dtype])
                stats = harness.time_fn(getattr(call, "timed", call), device, **counts)
            rec.update(median_ms=stats["median_ms"], min_ms=stats["min_ms"], max_ms=stats["max_ms"])
            records.append(rec)
            print(f"[{name}] {rec['case']}: {cand}: {stats['median_ms']:.4g} ms (rel err {err:.2e})",
                  file=sys.stderr, flush=True)
        shipped = next(r for r in records if r["case"] == f"{label} {dtype}" and r["candidate"] == "shipped")
        for r in records:
            if r["case"] == shipped["case"] and "median_ms" in r and "median_ms" in shipped:
                r["vs_shipped"] = shipped["median_ms"] / r["median_ms"]
    return records


def main(argv: list[str] | None = None) -> dict[str, Path]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.tune", description=__doc__.split("\n")[0])
    parser.add_argument("name", choices=sorted(CANDIDATES))
    parser.add_argument("--smoke", action="store_true", help="tiny problems: check the candidates, not their speed")
    parser.add_argument("--out", type=Path, help="results folder (default: benchmarks/results/<device>/)")
    args = parser.parse_args(argv)
    device = harness.default_device()
    if device.type != "cuda" and not args.smoke:
        parser.error("timing launch configurations needs a GPU; on the CPU run --smoke (with TRITON_INTERPRET=1)")
    info = harness.device_info(device)
    records = sweep(args.name, device, smoke=args.smoke)
    columns = ["case", "candidate", "median_ms", "min_ms", "max_ms", "vs_shipped", "rel_err", "ok", "error"]
    columns = [c for c in columns if any(r.get(c) is not None for r in records)]
    print(harness.markdown_table(records, columns))
    notes = ("Candidates set module constants of fastssl.kernels." + MODULES[args.name] + " for their run; "
             "`vs_shipped` > 1 is faster than the committed constants. " + ("Smoke run: timings mean nothing."
                                                                            if args.smoke else ""))
    out = args.out if args.out is not None else harness.results_dir(info)
    return harness.write_results(records, info, out, f"tune-{args.name}", columns=columns,
                                 plot=lambda recs, fig: _plot(recs, fig), notes=notes)


def _plot(records: list[dict], fig) -> None:
    cases = list(dict.fromkeys(r["case"] for r in records))
    axes = fig.subplots(len(cases), 1, squeeze=False)[:, 0]
    fig.set_size_inches(8, 2.2 * len(cases) + 0.5)
    for ax, case in zip(axes, cases, strict=True):
        rows = [r for r in records if r["case"] == case and "vs_shipped" in r]
        ax.barh([r["candidate"] for r in rows], [r["vs_shipped"] for r in rows])
        ax.axvline(1.0, color="k", lw=0.8)
        ax.set_title(case, fontsize=9)
        ax.tick_params(labelsize=7)
    axes[-1].set_xlabel("speed vs shipped (higher is faster)")


if __name__ == "__main__":
    main()
