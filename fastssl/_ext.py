"""The C++/CUDA extension: loading it, its ops' fake implementations, and whether it is loaded.

This module is the one owner of all three. The ops live under ``torch.ops.fastssl``; they are
defined by ``fastssl._C`` when it was built at install time (``pip install
--no-build-isolation .``), else by a just-in-time build (``torch.utils.cpp_extension.load``,
ninja) cached per torch / CUDA / Python version and per kind of build: CPU kernels only where
no CUDA device is visible, else CUDA kernels for the visible GPUs' architectures as well
(``_build.jit_plan``), so that a CPU-only build made on a login node is never loaded on a GPU
node. Once the ops are defined, :func:`_ops_defined` registers their fake (meta)
implementations, here, so that ``torch.compile`` traces them; the extension names this module
(``set_python_module``) as where they live.

Callers: :func:`load_extension` (builds if it must), :func:`load_installed_extension` (an import,
never a build), :func:`loaded`.
"""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import torch

from . import _build

_lock = threading.Lock()
_loaded: str | None = None  # how the ops were defined: "fastssl._C", "jit", or "already" (by another loader)


def loaded() -> str | None:
    """How the ops were made available (see :func:`load_extension`), or None while they are not."""
    return _loaded


def gpu_archs() -> list[str]:
    """Compute capabilities of the visible CUDA devices (``"90"`` for sm_90), none without one."""
    if not torch.cuda.is_available():
        return []
    return sorted({"".join(map(str, torch.cuda.get_device_capability(i))) for i in range(torch.cuda.device_count())})


def cache_dir(plan: _build.JitPlan | None = None) -> Path:
    """Where just-in-time builds go: ``$FASTSSL_EXTENSIONS_DIR``, else ``~/.cache/fastssl/extensions``,
    then a folder per torch / CUDA / Python version and kind of build (``cpu``, ``sm90``, ...)."""
    root = os.environ.get("FASTSSL_EXTENSIONS_DIR")
    if root is None:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = os.path.join(base, "fastssl", "extensions")
    if plan is None:
        plan = _build.jit_plan(torch.version.cuda, gpu_archs())
    cuda = f"cu{torch.version.cuda.replace('.', '')}" if torch.version.cuda else "cpu"
    tag = f"torch{torch.__version__.split('+')[0]}-{cuda}-py{sys.version_info.major}{sys.version_info.minor}"
    return Path(root) / f"{tag}-{plan.tag}"


def _jit_build() -> None:
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        raise RuntimeError(
            f"fastssl: the C++ extension fastssl._C is not installed and no C++ compiler ({cxx!r}) was found to build "
            "it. Install a compiler (e.g. g++) or reinstall fastssl with torch present at build time: "
            "pip install --no-build-isolation .")
    plan = _build.jit_plan(torch.version.cuda, gpu_archs())
    if plan.cuda_home is not None:
        _build.use_cuda_home(plan.cuda_home)  # before torch.utils.cpp_extension guesses (wrongly) from PATH
    from torch.utils import cpp_extension

    build_dir = cache_dir(plan)
    build_dir.mkdir(parents=True, exist_ok=True)
    library = build_dir / ("fastssl_C.pyd" if sys.platform == "win32" else "fastssl_C.so")
    newest_source = max(f.stat().st_mtime for f in _build.source_files())
    if not library.exists() or library.stat().st_mtime < newest_source:  # else ninja only checks it
        kind = (f"CUDA kernels for sm_{', sm_'.join(plan.archs)} and CPU kernels" if plan.archs
                else f"CPU kernels only: {plan.why}")
        print(f"fastssl: compiling the C++ extension fastssl._C ({kind}) into {build_dir}: {plan.expect}, once "
              "(pip install --no-build-isolation . builds it at install time instead)", file=sys.stderr, flush=True)
    flags = _build.extra_compile_args(plan.cuda_home, list(plan.archs), ptx=False)
    try:
        cpp_extension.load(name="fastssl_C", sources=_build.sources(plan.cuda_home is not None),
                           extra_cflags=flags["cxx"], extra_cuda_cflags=flags.get("nvcc"),
                           extra_ldflags=_build.extra_link_args(),
                           build_directory=str(build_dir), is_python_module=False, verbose=False)
    except (RuntimeError, OSError, subprocess.CalledProcessError) as e:
        raise RuntimeError(f"fastssl: building the C++ extension in {build_dir} failed: {e}") from e


_not_installed = False  # the import failed once: not retried (callers ask on every EMA update)


def _import_installed() -> bool:
    global _not_installed
    if _not_installed or os.environ.get("FASTSSL_FORCE_JIT", "0") not in ("", "0"):
        return False
    try:
        importlib.import_module("fastssl._C")
    except ImportError:
        _not_installed = True
        return False
    return True


def _ops_defined(how: str) -> str:
    """Record that the ops exist and register their fake implementations (once); call under the lock."""
    global _loaded
    if _loaded is None:
        _register_fakes()
        _loaded = how
    return _loaded


def load_extension() -> str:
    """Make the ``torch.ops.fastssl`` C++ ops available; return how (``"fastssl._C"`` or ``"jit"``).

    ``FASTSSL_FORCE_JIT=1`` skips the installed module (used to test the just-in-time path).
    """
    if _loaded is not None:
        return _loaded
    with _lock:
        if _loaded is not None:
            return _loaded
        if _import_installed():
            return _ops_defined("fastssl._C")
        _jit_build()
        return _ops_defined("jit")


def load_installed_extension() -> bool:
    """Import the installed ``fastssl._C`` if there is one (no compiler, no build); whether the ops
    are now defined. Run when ``fastssl.ops`` is imported, so that the first call of an op may
    already be traced by ``torch.compile(fullgraph=True)``."""
    if _loaded is not None:
        return True
    with _lock:
        if _loaded is not None:
            return True
        if _import_installed():
            _ops_defined("fastssl._C")
            return True
    return False


def has_cuda_kernels() -> bool:
    """Whether the loaded ops have CUDA kernels (the extension was built with nvcc)."""
    load_extension()
    return torch._C._dispatch_has_kernel_for_dispatch_key("fastssl::resized_crops", "CUDA")


# ----------------------------------------------------------------------------- fake implementations

def _register_fakes() -> None:
    """The fake (meta) implementation of every op of the extension, for ``torch.compile``."""

    def crops(data, image_info, boxes, flips, channels, size, interpolation, antialias, mean, std, input_scale,
              out_dtype, channels_last, crops_per_image=0, program=None):
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        return torch.empty((boxes.shape[0], channels, size, size), dtype=out_dtype, device=data.device,
                           memory_format=fmt)

    def ema_update_(teacher, student, momentum, momentum_tensor):
        # Fake tensors report their real device; a genuine meta tensor means mixed devices (the
        # dispatcher picks this over the CPU kernel): refused, not skipped in silence.
        if any(t.device.type == "meta" for t in (*teacher, *student)):
            raise ValueError("ema_update_: a tensor is on the meta device; all must be on one device")
        return None

    def dino_color_u8(crops, order, factors, jitter, grayscale, blur, solarize, sigma, kernel_size, mean, std):
        return torch.empty(crops.shape, dtype=torch.float32, device=crops.device)

    fakes = {"resized_crops": crops, "_resized_crops_program": crops, "ema_update_": ema_update_,
             "dino_color_u8": dino_color_u8}
    for name, fake in fakes.items():
        if hasattr(torch.ops.fastssl, name):  # an op a stale build lacks is simply absent
            torch.library.register_fake(f"fastssl::{name}")(fake)


# The ops may already be defined in this process by a loader other than this module's (torch
# imports this module, named by the extension, when it looks for a fake implementation).
if hasattr(torch.ops.fastssl, "resized_crops"):
    with _lock:
        _ops_defined("already")
