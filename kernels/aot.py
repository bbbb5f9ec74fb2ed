"""Ahead-of-time compile of every Triton kernel for real GPUs, with no GPU needed.

``python -m fastssl.kernels.aot --arch 80 90`` builds each kernel with the block
sizes, warps and stages that its launcher picks for the problems listed in the
module's ``AOT_PROBLEMS``, down to a cubin, prints registers, spills (local memory)
and shared memory per kernel, and exits non-zero on any compile error, or on a fused
multiply-add in a kernel whose launcher turns fusion off (``enable_fp_fusion=False``:
its numbers depend on it).
"""

from __future__ import annotations

import argparse
import importlib
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

# Every kernel module of the package; each exposes aot_specs(**problem) and AOT_PROBLEMS.
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


def compile_spec(fn, signature, constexprs, options, arch):
    """Build one kernel. Signature entries take Triton's AOT hints, as ``triton.tools.compile``:
    ``"i32:16"`` an integer divisible by 16, ``"i32:1"`` an integer equal to 1 (a constant,
    as the JIT makes it). Pointers are taken as 16-byte aligned, as the JIT specialises them
    for torch's allocations, so loads vectorise as they will at run time."""
    sig, consts, attrs = {}, dict(constexprs), {}
    for name, kind in signature.items():
        kind, _, hint = kind.partition(":")
        if hint == "1":
            consts[name] = 1
        elif hint == "16" or (kind.startswith("*") and hint == ""):
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90], help="SM versions, e.g. 80 90")
    parser.add_argument("--modules", nargs="+", default=MODULES, help="kernel modules to build")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("unset TRITON_INTERPRET: the interpreter does not compile kernels", file=sys.stderr)
        return 2

    seen, failures = set(), 0
    header = f"{'kernel':<22} {'sm':>3} {'dtype':<10} {'constexprs':<44} {'warps':>5} {'stages':>6} " \
             f"{'regs':>4} {'spill':>5} {'smem':>6} {'s':>5}"
    print(header)
    print("-" * len(header))
    for name in args.modules:
        mod = importlib.import_module(f"fastssl.kernels.{name}")
        for problem in mod.AOT_PROBLEMS:
            for fn, signature, constexprs, options in mod.aot_specs(**problem):
                for arch in args.arch:
                    key = (fn.__name__, arch, tuple(signature.items()), tuple(constexprs.items()),
                           options["num_warps"], options["num_stages"])
                    if key in seen:
                        continue
                    seen.add(key)
                    hints = {k: v.partition(":")[2] for k, v in signature.items() if v.partition(":")[2] == "1"}
                    const = " ".join(f"{k}={v}" for k, v in {**constexprs, **hints}.items())
                    ptrs = [v[1:].partition(":")[0] for v in signature.values() if v.startswith("*")]
                    ptr_dtype = next((d for d in ptrs if d != "fp32"), "fp32")
                    t0 = time.perf_counter()
                    try:
                        kernel = compile_spec(fn, signature, constexprs, options, arch)
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
