"""How the C++/CUDA extension ``fastssl._C`` is built: its sources, flags and the CUDA toolkit.

Shared by ``setup.py`` (ahead of time) and :mod:`fastssl._ext` (just in time). Importable
without torch and without importing the ``fastssl`` package (``setup.py`` loads this file by
path), so nothing here imports torch at module level.

Finding the toolkit: torch guesses ``CUDA_HOME`` as the parent of the folder of the first
``nvcc`` on ``PATH``. That guess is wrong where ``nvcc`` is a wrapper script or a symlink
(``/usr/local/bin/nvcc`` running ``/usr/local/cuda-13.0/bin/nvcc``), so :func:`find_cuda_home`
follows links and reads a wrapper script for the real ``nvcc`` before it falls back to the usual
prefixes. Headers that torch's CUDA headers include but a trimmed toolkit lacks (``cusparse.h``,
``cublas_v2.h``, ...) ship with the torch wheel's ``nvidia`` packages; :func:`wheel_cuda_include_dirs`
finds them, and they go on the search path *after* the toolkit's own headers (``-isystem``).
"""

from __future__ import annotations

import glob
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parents[1]


def csrc_dir() -> Path:
    """The C++/CUDA sources: ``csrc/`` of a source tree, or ``fastssl/csrc`` of an installed wheel."""
    for d in (ROOT / "csrc", Path(__file__).resolve().parent / "csrc"):
        if (d / CPU_SOURCES[0]).is_file():
            return d
    raise FileNotFoundError(f"fastssl: the C++ sources ({CPU_SOURCES[0]}) are neither in {ROOT / 'csrc'} nor in "
                            f"{Path(__file__).resolve().parent / 'csrc'}")


CPU_SOURCES = ["resized_crops.cpp", "ema.cpp", "dino_color.cpp"]
CUDA_SOURCES = ["resized_crops_cuda.cu"]

# GPUs the CUDA kernels are compiled for: A100 (sm_80) and H100 (sm_90), plus PTX for sm_90
# so newer GPUs JIT it. Override with FASTSSL_CUDA_ARCHS="80;90;100".
DEFAULT_CUDA_ARCHS = ("80", "90")

# Headers whose absence from a toolkit means the wheel's copies are needed.
_WHEEL_HEADERS = ("cusparse.h", "cublas_v2.h", "cusolverDn.h", "curand.h", "cufft.h")


def _is_toolkit(prefix: str | os.PathLike | None) -> bool:
    if not prefix:
        return False
    p = Path(prefix)
    return (p / "bin" / "nvcc").is_file() and (p / "include" / "cuda_runtime.h").is_file()


def _nvcc_targets(nvcc: str) -> list[str]:
    """The real nvcc behind ``nvcc``: itself, where its links lead, and what a wrapper script runs."""
    found = [nvcc, os.path.realpath(nvcc)]
    try:
        with open(nvcc, "rb") as f:
            head = f.read(8192)
    except OSError:
        return found
    if head.startswith(b"#!"):
        text = head.decode("utf-8", "replace")
        found += re.findall(r"(/[^\s\"'`;|&]*?/bin/nvcc)\b", text)
    return found


def find_cuda_home() -> str | None:
    """The prefix of the CUDA toolkit (``<prefix>/bin/nvcc``, ``<prefix>/include``), or None.

    Order: ``$CUDA_HOME`` / ``$CUDA_PATH``; the ``nvcc`` on ``PATH`` after following symlinks
    and wrapper scripts; ``/usr/local/cuda``, ``/usr/local/cuda-*``, ``/opt/cuda``.
    """
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if _is_toolkit(os.environ.get(var)):
            return str(Path(os.environ[var]).resolve())
    nvcc = shutil.which("nvcc")
    if nvcc:
        for target in _nvcc_targets(nvcc):
            prefix = Path(target).resolve().parent.parent
            if _is_toolkit(prefix):
                return str(prefix)
    candidates = ["/usr/local/cuda", *sorted(glob.glob("/usr/local/cuda-*"), reverse=True), "/opt/cuda"]
    for prefix in candidates:
        if _is_toolkit(prefix):
            return str(Path(prefix).resolve())
    return None


def nvcc_version(cuda_home: str) -> tuple[int, int] | None:
    """``(major, minor)`` that ``<cuda_home>/bin/nvcc --version`` reports, or None."""
    try:
        out = subprocess.run([os.path.join(cuda_home, "bin", "nvcc"), "--version"], capture_output=True,
                             text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"release (\d+)\.(\d+)", out)
    return (int(m.group(1)), int(m.group(2))) if m else None


def wheel_cuda_include_dirs(cuda_home: str | None) -> list[str]:
    """Include folders of the ``nvidia`` packages (torch's CUDA wheels) holding headers the toolkit lacks."""
    missing = [h for h in _WHEEL_HEADERS if not (cuda_home and (Path(cuda_home) / "include" / h).is_file())]
    if not missing:
        return []
    try:
        spec = importlib.util.find_spec("nvidia")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        return []
    dirs = []
    for base in spec.submodule_search_locations:
        for inc in sorted(Path(base).glob("*/include")):
            if any((inc / h).is_file() for h in missing) and str(inc) not in dirs:
                dirs.append(str(inc))
    return dirs


def cuda_archs(default: tuple[str, ...] | list[str] = DEFAULT_CUDA_ARCHS) -> list[str]:
    """``FASTSSL_CUDA_ARCHS`` ("80;90"), else ``default``."""
    env = os.environ.get("FASTSSL_CUDA_ARCHS")
    archs = [a.strip().replace(".", "") for a in re.split(r"[;, ]+", env) if a.strip()] if env else []
    return archs or list(default)


def cuda_plan(torch_cuda_version: str | None) -> tuple[str | None, str]:
    """``(cuda_home, why)``: the toolkit to build the CUDA kernels with, or None and the reason not.

    The CUDA kernels are built when torch is a CUDA build, a toolkit is found and its major
    version matches torch's (``FASTSSL_NO_CUDA=1`` turns them off).
    """
    if os.environ.get("FASTSSL_NO_CUDA", "0") not in ("", "0"):
        return None, "FASTSSL_NO_CUDA is set"
    if not torch_cuda_version:
        return None, "torch is not a CUDA build"
    home = find_cuda_home()
    if home is None:
        return None, "no CUDA toolkit (nvcc) found; set CUDA_HOME"
    version = nvcc_version(home)
    if version is None:
        return None, f"could not run {home}/bin/nvcc --version"
    if str(version[0]) != torch_cuda_version.split(".")[0]:
        return None, (f"the toolkit at {home} is CUDA {version[0]}.{version[1]} but torch was built with CUDA "
                      f"{torch_cuda_version}")
    return home, f"CUDA {version[0]}.{version[1]} at {home}"


def use_cuda_home(cuda_home: str) -> None:
    """Point torch.utils.cpp_extension at ``cuda_home`` (its own guess may be a wrapper's folder)."""
    os.environ["CUDA_HOME"] = cuda_home
    import torch.utils.cpp_extension as cpp

    cpp.CUDA_HOME = cuda_home


def sources(with_cuda: bool, relative_to: str | os.PathLike | None = None) -> list[str]:
    """The source files to compile (relative to ``relative_to`` when given, as setuptools wants)."""
    d = csrc_dir()
    files = [d / n for n in CPU_SOURCES + (CUDA_SOURCES if with_cuda else [])]
    if relative_to is not None:
        return [os.path.relpath(f, relative_to) for f in files]
    return [str(f) for f in files]


def source_files() -> list[Path]:
    """Every file the extension is built from (headers too): what a rebuild depends on."""
    return sorted(p for p in csrc_dir().iterdir() if p.suffix in (".h", ".cpp", ".cu"))


def _openmp() -> list[str]:
    """-fopenmp on Linux: without it ``at::parallel_for`` in the CPU kernel runs on one thread (ATen's
    header only forks under ``_OPENMP``). The library it links, libgomp.so.1, is the one torch ships
    and has already loaded, so there is one OpenMP runtime in the process."""
    return ["-fopenmp"] if sys.platform.startswith("linux") else []


def extra_link_args() -> list[str]:
    return _openmp()


def _no_contraction() -> list[str]:
    """No fused multiply-add where the source writes a multiply then an add: the EMA must round
    both products as the authors' ``mul_`` then ``add_`` (compilers contract by default where the
    target has FMA: aarch64 always, x86 with -march=native)."""
    return [] if sys.platform == "win32" else ["-ffp-contract=off"]


def extra_compile_args(cuda_home: str | None, archs: list[str] | None = None,
                       ptx: bool = True) -> dict[str, list[str]]:
    """Flags for the C++ compiler and, with a toolkit, nvcc: -O3, OpenMP, no FMA contraction, the
    wheel's headers, and the CUDA archs (``cuda_archs()`` by default) with PTX of the last one
    (``ptx``) for newer GPUs."""
    cxx = ["-O3", "-g0", *_openmp(), *_no_contraction()]
    args = {"cxx": cxx}
    if cuda_home is not None:
        cxx.append("-DFASTSSL_WITH_CUDA")
        wheel_inc = [f for d in wheel_cuda_include_dirs(cuda_home) for f in ("-isystem", d)]
        cxx += wheel_inc
        archs = archs or cuda_archs()
        nvcc = ["-O3", "-DFASTSSL_WITH_CUDA", *wheel_inc]
        nvcc += [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
        if ptx:
            nvcc.append(f"-gencode=arch=compute_{archs[-1]},code=compute_{archs[-1]}")
        args["nvcc"] = nvcc
    return args


class JitPlan(NamedTuple):
    """What a just-in-time build compiles: CUDA kernels for ``archs`` (none: CPU kernels only),
    the toolkit, why, the cache tag that records it, and how long it takes, in words."""

    cuda_home: str | None
    archs: tuple[str, ...]
    why: str
    tag: str
    expect: str


def jit_plan(torch_cuda_version: str | None, gpu_archs: list[str]) -> JitPlan:
    """The just-in-time build for this machine: CPU kernels only where no CUDA device is visible
    (``gpu_archs`` empty: the compute capabilities of the visible GPUs, e.g. ``["90"]``), else CUDA
    kernels for exactly those GPUs (``FASTSSL_CUDA_ARCHS`` overrides) beside the CPU ones."""
    if not gpu_archs:
        why = "no CUDA device is visible" if torch_cuda_version else "torch is not a CUDA build"
        return JitPlan(None, (), why, "cpu", "about a minute")
    cuda_home, why = cuda_plan(torch_cuda_version)
    if cuda_home is None:
        return JitPlan(None, (), why, "cpu", "about a minute")
    archs = tuple(cuda_archs(sorted(set(gpu_archs))))
    tag = "sm" + "-".join(archs)
    return JitPlan(cuda_home, archs, f"{why}, for sm_{', sm_'.join(archs)}", tag, "several minutes")
