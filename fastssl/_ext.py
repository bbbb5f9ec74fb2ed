"""Loading the C++/CUDA extension: ``fastssl._C`` when it was built at install time, else a
just-in-time build (``torch.utils.cpp_extension.load``, ninja) cached per torch/CUDA/Python version.

The ops it registers live under ``torch.ops.fastssl``; :func:`load_extension` only has to run
once per process before they are called.
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
_loaded: str | None = None


def cache_dir() -> Path:
    """Where just-in-time builds go: ``$FASTSSL_EXTENSIONS_DIR``, else ``~/.cache/fastssl/<versions>``."""
    root = os.environ.get("FASTSSL_EXTENSIONS_DIR")
    if root is None:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = os.path.join(base, "fastssl", "extensions")
    cuda = f"cu{torch.version.cuda.replace('.', '')}" if torch.version.cuda else "cpu"
    tag = f"torch{torch.__version__.split('+')[0]}-{cuda}-py{sys.version_info.major}{sys.version_info.minor}"
    return Path(root) / tag


def _jit_build() -> None:
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        raise RuntimeError(
            f"fastssl: the C++ extension fastssl._C is not installed and no C++ compiler ({cxx!r}) was found to build "
            "it. Install a compiler (e.g. g++) or reinstall fastssl with torch present at build time: "
            "pip install --no-build-isolation .")
    cuda_home, why = _build.cuda_plan(torch.version.cuda)
    if cuda_home is not None:
        _build.use_cuda_home(cuda_home)  # before torch.utils.cpp_extension guesses (wrongly) from PATH
    from torch.utils import cpp_extension

    build_dir = cache_dir()
    build_dir.mkdir(parents=True, exist_ok=True)
    kind = "CUDA + CPU kernels" if cuda_home else f"CPU kernels only: {why}"
    print(f"fastssl: compiling the C++ extension ({kind}) into {build_dir}; this takes a few minutes the first time "
          "and is cached", file=sys.stderr, flush=True)
    flags = _build.extra_compile_args(cuda_home)
    try:
        cpp_extension.load(name="fastssl_C", sources=_build.sources(cuda_home is not None),
                           extra_cflags=flags["cxx"], extra_cuda_cflags=flags.get("nvcc"),
                           extra_ldflags=_build.extra_link_args(),
                           build_directory=str(build_dir), is_python_module=False, verbose=False)
    except (RuntimeError, OSError, subprocess.CalledProcessError) as e:
        raise RuntimeError(f"fastssl: building the C++ extension in {build_dir} failed: {e}") from e


def load_extension() -> str:
    """Make the ``torch.ops.fastssl`` C++ ops available; return how (``"fastssl._C"`` or ``"jit"``).

    ``FASTSSL_FORCE_JIT=1`` skips the installed module (used to test the just-in-time path).
    """
    global _loaded
    if _loaded is not None:
        return _loaded
    with _lock:
        if _loaded is not None:
            return _loaded
        how = None
        if os.environ.get("FASTSSL_FORCE_JIT", "0") in ("", "0"):
            try:
                importlib.import_module("fastssl._C")
                how = "fastssl._C"
            except ImportError:
                how = None
        if how is None:
            _jit_build()
            how = "jit"
        _loaded = how
    # The fake (meta) implementations, in Python, need the ops defined first.
    from .ops import _crops

    _crops._register_fake()
    return how


def load_installed_extension() -> bool:
    """Import the installed ``fastssl._C`` if there is one (no compiler, no build); whether the ops
    are now defined. Run when ``fastssl.ops`` is imported, so that the first call of an op may
    already be traced by ``torch.compile(fullgraph=True)``."""
    global _loaded
    if _loaded is not None:
        return True
    if os.environ.get("FASTSSL_FORCE_JIT", "0") not in ("", "0"):
        return False
    with _lock:
        try:
            importlib.import_module("fastssl._C")
        except ImportError:
            return False
        _loaded = "fastssl._C"
    return True


def has_cuda_kernels() -> bool:
    """Whether the loaded ops have CUDA kernels (the extension was built with nvcc)."""
    load_extension()
    return torch._C._dispatch_has_kernel_for_dispatch_key("fastssl::resized_crops", "CUDA")
