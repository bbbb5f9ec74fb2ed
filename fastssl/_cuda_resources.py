"""What each CUDA kernel of ``fastssl._C`` costs a GPU: registers, shared memory, stack, spills.

``python -m fastssl._cuda_resources --arch 80 90`` compiles every ``.cu`` source of the extension
to a cubin per architecture, with the extension's own flags plus ptxas's ``--resource-usage``,
prints one line per kernel and fails on a compile error or on any spill: a spill is a kernel
writing registers to local memory, a silent slowdown that a change of block size or of a
``__launch_bounds__`` brings. The CUDA counterpart of ``python -m fastssl.kernels.aot``; no GPU needed.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

from . import _build

_ENTRY = re.compile(r"Compiling entry function '(?P<name>[^']+)' for 'sm_(?P<arch>\d+)'")
_FRAME = re.compile(r"(?P<stack>\d+) bytes stack frame, (?P<stores>\d+) bytes spill stores, (?P<loads>\d+) bytes spill "
                    r"loads")
_USED = re.compile(r"Used (?P<regs>\d+) registers(?:.*?(?P<smem>\d+) bytes smem)?")


def _demangle(names: list[str]) -> list[str]:
    try:
        out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True).stdout
        return out.splitlines()
    except (OSError, subprocess.CalledProcessError):
        return names


# The flag torch's ninja build adds to every compile; its docstrings also show other standards
# (torch 2.11's says -std=c++20 in an example but builds with C++17), so only this line is read.
_STD_FLAG = re.compile(r"common_cflags \+= \['-std=(c\+\+\d+)'")


def _cxx_standard(source: str | None = None) -> str:
    """The C++ standard torch's extension builder asks for (C++20 in torch 2.14, C++17 in 2.11),
    read from ``source``, the text of ``torch.utils.cpp_extension`` (the installed one by default)."""
    if source is None:
        from torch.utils import cpp_extension

        source = Path(cpp_extension.__file__).read_text()
    found = _STD_FLAG.search(source)
    return f"-std={found.group(1)}" if found else "-std=c++17"


def nvcc_command(source: Path, arch: str, cubin: Path, cuda_home: str) -> list[str]:
    """nvcc as the extension build runs it, for one source and one architecture, to a cubin."""
    from torch.utils import cpp_extension

    includes = [f"-I{p}" for p in cpp_extension.include_paths(device_type="cuda")]
    includes.append(f"-I{sysconfig.get_paths()['include']}")
    flags = [f for f in _build.extra_compile_args(cuda_home)["nvcc"] if not f.startswith("-gencode")]
    return [f"{cuda_home}/bin/nvcc", "-cubin", "-o", str(cubin), str(source), *includes,
            *cpp_extension.COMMON_NVCC_FLAGS, *flags, f"-gencode=arch=compute_{arch},code=sm_{arch}",
            _cxx_standard(), "-DTORCH_EXTENSION_NAME=_C", "--resource-usage"]


def resource_usage(source: Path, arch: str, cuda_home: str) -> list[dict]:
    """One dict per kernel of ``source`` compiled for sm_``arch``: name, registers, smem, stack, spills."""
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.run(nvcc_command(source, arch, Path(tmp) / "k.cubin", cuda_home), capture_output=True,
                              text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"nvcc failed on {source.name} for sm_{arch}:\n{proc.stderr[-4000:]}")
    kernels: list[dict] = []
    for line in proc.stderr.splitlines():
        if m := _ENTRY.search(line):
            kernels.append({"name": m["name"], "arch": m["arch"], "registers": None, "smem": 0, "stack": 0,
                            "spill_stores": 0, "spill_loads": 0})
        elif kernels and (m := _FRAME.search(line)):
            kernels[-1].update(stack=int(m["stack"]), spill_stores=int(m["stores"]), spill_loads=int(m["loads"]))
        elif kernels and (m := _USED.search(line)):
            kernels[-1].update(registers=int(m["regs"]), smem=int(m["smem"] or 0))
    for k, name in zip(kernels, _demangle([k["name"] for k in kernels]), strict=True):
        k["name"] = re.sub(r"fastssl::(\(anonymous namespace\)::)?", "", name)
    return kernels


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", nargs="+", default=list(_build.DEFAULT_CUDA_ARCHS),
                        help="compute capabilities to compile for, e.g. 80 90")
    args = parser.parse_args(argv)
    import torch

    cuda_home, why = _build.cuda_plan(torch.version.cuda)
    if cuda_home is None:
        print(f"fastssl._cuda_resources: no CUDA kernels to compile here ({why})")
        return 0
    _build.use_cuda_home(cuda_home)
    spills = 0
    for source in (_build.csrc_dir() / s for s in _build.CUDA_SOURCES):
        for arch in args.arch:
            try:
                kernels = resource_usage(source, arch, cuda_home)
            except RuntimeError as e:
                print(e)
                return 1
            for k in kernels:
                spilled = k["spill_stores"] + k["spill_loads"]
                spills += spilled > 0
                print(f"sm_{arch}  {k['registers']:>3} regs  {k['smem']:>6} B static smem  {k['stack']:>3} B stack  "
                      f"{'SPILLS ' + str(spilled) + ' B' if spilled else 'no spill':<14} {k['name']}")
    print(f"fastssl._cuda_resources: {spills} kernel(s) spill")
    return 1 if spills else 0


if __name__ == "__main__":
    sys.exit(main())
