"""Which implementation of a fused op runs: the Triton kernels or plain PyTorch.

Every fused op takes ``backend=`` with one of three values:

* ``"auto"``: the Triton kernels for CUDA tensors, PyTorch for anything else;
* ``"torch"``: the PyTorch implementation, on any device;
* ``"triton"``: the kernels. On CPU tensors they only run under Triton's
  interpreter (``TRITON_INTERPRET=1`` set before triton is imported), which is
  how the test suite checks them without a GPU.
"""

from __future__ import annotations

import importlib.util
import os

import torch

BACKENDS = ("auto", "torch", "triton")


# find_spec, not an import: importing triton is deferred until a kernel runs.
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def triton_available() -> bool:
    """True when triton is installed (it is a Linux-only dependency)."""
    return _TRITON_INSTALLED


def interpreter_enabled() -> bool:
    """True when Triton kernels run through the interpreter (on CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on")


def resolve_backend(backend: str, device: torch.device, op: str) -> str:
    """Turn ``backend=`` into ``"torch"`` or ``"triton"`` for tensors on ``device``.

    Raises ``ValueError`` for an unknown name and ``RuntimeError`` when the kernels
    are asked for where they cannot run.
    """
    if backend not in BACKENDS:
        raise ValueError(f"{op}: backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return "torch"
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    if not triton_available():
        raise RuntimeError(f"{op}: backend='triton' needs the triton package, which is not importable here")
    if device.type == "cuda" or (device.type == "cpu" and interpreter_enabled()):
        return "triton"
    if device.type == "cpu":
        raise RuntimeError(
            f"{op}: backend='triton' got CPU tensors; the kernels run on CPU only under Triton's "
            "interpreter (set TRITON_INTERPRET=1 before importing triton), else use backend='torch'"
        )
    raise RuntimeError(f"{op}: backend='triton' does not support {device.type} tensors")
