"""Ahead-of-time compile of every Triton kernel for real GPUs, with no GPU needed.

``python -m fastssl.kernels.aot --arch 80 90`` builds, down to a cubin, what the launchers
launch: for the modules in ``fastssl.kernels.workloads``, the launches recorded over those
workloads (a child process runs them on CPU tensors with ``record_launches``: kernel,
signature as the JIT specialises it, constexprs, options); for the others, what their
``aot_specs`` list for their ``AOT_PROBLEMS``. It prints registers, spills (local memory)
and shared memory per kernel, and exits non-zero on any compile error, or on a fused
multiply-add in a kernel whose launcher turns fusion off (``enable_fp_fusion=False``: its
numbers depend on it).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from ._launch import launch_options

# Every kernel module of the package: its launches are recorded over fastssl.kernels.workloads,
# or (until it launches through _launch.launch) listed by its aot_specs(**problem) and AOT_PROBLEMS.
MODULES = ["dino", "ema", "snn"]


def _resource_usage(cubin: bytes) -> dict:
    """Registers, local memory (spills and stack) and static shared memory of a cubin."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
    usage = {}
    for key in ("REG", "STACK", "LOCAL", "SHARED"):
        m = re.search(rf"\b{key}:(\d+)", out)
        if m:
            usage[key] = int(m.group(1))
    return usage


def compile_spec(fn, signature, constexprs, options, arch, pointers_aligned=True):
    """Build one kernel. Signature entries take Triton's AOT hints, as ``triton.tools.compile``:
    ``"i32:16"`` an integer divisible by 16 (``"*fp32:16"`` a 16-byte aligned pointer),
    ``"i32:1"`` an integer equal to 1 (a constant, as the JIT makes it). With
    ``pointers_aligned``, pointers without a hint are taken as aligned too, as the JIT
    specialises them for torch's allocations (hand-written specs); recorded launches say."""
    sig, consts, attrs = {}, dict(constexprs), {}
    for name, kind in signature.items():
        kind, _, hint = kind.partition(":")
        if hint == "1":
            consts[name] = 1
        elif hint == "16" or (kind.startswith("*") and hint == "" and pointers_aligned):
            attrs[(fn.arg_names.index(name),)] = [["tt.divisibility", 16]]
        sig[name] = kind
    for name in consts:
        sig[name] = "constexpr"
    src = ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=launch_options(options))


def fused_multiply_adds(kernel) -> int:
    """The multiply-adds the compiler fused in a kernel's PTX (``fma.rn.f32``); libdevice's own
    (``fma.rn.ftz.f32``, in log2 for one) are written as FMAs and stay."""
    return len(re.findall(r"\bfma\.rn\.f32\b", kernel.asm["ptx"]))


def record(modules: list[str]) -> list[dict]:
    """The launches of ``modules``' workloads, unique, recorded in a child process: it runs under
    ``TRITON_INTERPRET=1`` so that the Python layer takes the kernels on CPU tensors (the
    kernels themselves never run)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "launches.json")
        env = dict(os.environ, TRITON_INTERPRET="1")
        subprocess.run([sys.executable, "-m", "fastssl.kernels.aot", "--record-to", out, "--modules", *modules],
                       env=env, check=True)
        with open(out) as f:
            return json.load(f)


def _record_to(path: str, modules: list[str]) -> int:
    from . import workloads
    from ._launch import record_launches

    unique = {}
    with record_launches() as launches:
        for name in modules:
            workloads.WORKLOADS[name]()
    for launch in launches:
        unique.setdefault(json.dumps(launch, sort_keys=True), launch)
    with open(path, "w") as f:
        json.dump(list(unique.values()), f)
    return 0


def _builds(modules: list[str]):
    """``(kernel, signature, constexprs, options, pointers_aligned)`` for every build: recorded
    launches of the modules with workloads, hand-written specs of the others."""
    from .workloads import WORKLOADS

    recorded = [m for m in modules if m in WORKLOADS]
    for launch in record(recorded) if recorded else []:
        fn = getattr(importlib.import_module(launch["module"]), launch["kernel"])
        yield fn, launch["signature"], launch["constexprs"], launch["options"], False
    for name in modules:
        if name in recorded:
            continue
        mod = importlib.import_module(f"fastssl.kernels.{name}")
        for problem in mod.AOT_PROBLEMS:
            for fn, signature, constexprs, options in mod.aot_specs(**problem):
                yield fn, signature, constexprs, options, True


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90], help="SM versions, e.g. 80 90")
    parser.add_argument("--modules", nargs="+", default=MODULES, help="kernel modules to build")
    parser.add_argument("--record-to", default=None, help=argparse.SUPPRESS)  # the recording child process
    args = parser.parse_args(argv)
    interpreted = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    if args.record_to:
        return _record_to(args.record_to, args.modules)
    if interpreted:
        print("unset TRITON_INTERPRET: the interpreter does not compile kernels", file=sys.stderr)
        return 2

    seen, failures = set(), 0
    header = f"{'kernel':<22} {'sm':>3} {'dtype':<10} {'constexprs':<44} {'warps':>5} {'stages':>6} " \
             f"{'regs':>4} {'spill':>5} {'smem':>6} {'s':>5}"
    print(header)
    print("-" * len(header))
    for fn, signature, constexprs, options, aligned in _builds(args.modules):
        for arch in args.arch:
            key = (fn.__name__, arch, json.dumps(signature, sort_keys=True),
                   json.dumps(constexprs, sort_keys=True), json.dumps(options, sort_keys=True))
            if key in seen:
                continue
            seen.add(key)
            hints = {k: v.partition(":")[2] for k, v in signature.items() if v.partition(":")[2] == "1"}
            const = " ".join(f"{k}={v}" for k, v in {**constexprs, **hints}.items())
            ptrs = [v[1:].partition(":")[0] for v in signature.values() if v.startswith("*")]
            ptr_dtype = next((d for d in ptrs if d != "fp32"), "fp32")
            t0 = time.perf_counter()
            try:
                kernel = compile_spec(fn, signature, constexprs, options, arch, aligned)
            except Exception:
                failures += 1
                print(f"{fn.__name__:<22} {arch:>3} FAILED to compile ({const})")
                traceback.print_exc()
                continue
            if options.get("enable_fp_fusion") is False and fused_multiply_adds(kernel):
                failures += 1
                print(f"{fn.__name__:<22} {arch:>3} has {fused_multiply_adds(kernel)} fused multiply-adds "
                      f"though its launcher turns fusion off ({const})")
            use = _resource_usage(kernel.asm["cubin"])
            spill = use.get("LOCAL", 0) + use.get("STACK", 0)
            print(f"{fn.__name__:<22} {arch:>3} {ptr_dtype:<10} {const:<44} {options['num_warps']:>5} "
                  f"{options['num_stages']:>6} {use.get('REG', '?'):>4} {spill:>5} "
                  f"{kernel.metadata.shared:>6} {time.perf_counter() - t0:5.1f}")
    print(f"\n{len(seen)} kernel builds, {failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
