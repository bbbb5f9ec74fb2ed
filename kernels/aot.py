"""Ahead-of-time compile of every Triton kernel for real GPUs, with no GPU needed.

``python -m fastssl.kernels.aot --arch 80 90`` (from the repository root) builds, down to a
cubin, exactly what the lease launches: a child process records the launches of
``benchmarks.workloads`` (kernel checks at fixed sizes, benchmarks at their target shapes)
on CPU tensors, nothing run, each as the JIT specialises it (signature with alignment and
divisibility, constexprs, options); this process compiles each for every ``--arch``. It
prints registers, spills (local memory) and shared memory per kernel, and exits non-zero on
any compile error, a spill, or a fused multiply-add in a kernel whose launcher turns fusion
off (``enable_fp_fusion=False``: its numbers depend on it).
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

# The kernel modules of the package, each with its workload in benchmarks.workloads.
MODULES = ["dino", "ema", "snn", "gram", "koleo"]


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
    """Build one kernel. Signature entries carry the JIT's hints, as ``triton.tools.compile``:
    ``"i32:16"`` an integer divisible by 16, ``"*fp32:16"`` a 16-byte aligned pointer,
    ``"i32:1"`` an integer equal to 1 (a constant, as the JIT makes it)."""
    sig, consts, attrs = {}, dict(constexprs), {}
    for name, kind in signature.items():
        kind, _, hint = kind.partition(":")
        if hint == "1":
            consts[name] = 1
        elif hint == "16":
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
    """The unique launches of ``modules``' workloads, recorded in a child process under
    ``TRITON_INTERPRET=1``, so that the Python layer takes the kernels on CPU tensors (they
    never run)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "launches.json")
        env = dict(os.environ, TRITON_INTERPRET="1")
        subprocess.run([sys.executable, "-m", "benchmarks.workloads", "--device", "cpu", "--modules", *modules,
                        "--json", out], env=env, check=True, stdout=subprocess.DEVNULL)
        with open(out) as f:
            return json.load(f)


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
    launches = record(args.modules)
    for launch in launches:
        fn = getattr(importlib.import_module(launch["module"]), launch["kernel"])
        signature, constexprs, options = launch["signature"], launch["constexprs"], launch["options"]
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
            if spill:
                failures += 1
                print(f"{fn.__name__:<22} {arch:>3} spills {spill} bytes to local memory ({const})")
    print(f"\n{len(launches)} recorded variants, {len(seen)} kernel builds, {failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
