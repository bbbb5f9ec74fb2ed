"""The PyTorch paths that compile themselves: once per shape, where ``torch.compile`` works.

An eager PyTorch closed form makes one pass over its tensors per op, where ``torch.compile`` of
the authors' code fuses them; a PyTorch path wrapped here is compiled the same way (Inductor: a
C++ compiler for CPU tensors, Triton for CUDA ones) so that it is at least as fast. It runs
eagerly with ``FASTSSL_COMPILE=0``, after a compile that failed (said once), and inside a
caller's own ``torch.compile`` (where the plain function is traced with the rest).
"""

from __future__ import annotations

import functools
import os
import warnings

import torch

__all__ = ["compiled_when_possible"]


def compiled_when_possible(fn):
    """``fn``, compiled on its first call, else eager. Static shapes (``dynamic=False``): a new shape
    compiles again, and past torch's recompile limit that shape runs eagerly; symbolic shapes are
    not used because Inductor's backward fails on some of them (a batch of 8, 8 then 7 rows of
    ``view(n, B, K)``: "expected [s] to have been codegen-ed", torch 2.14), an error that would come
    out of ``backward()``, where nothing here could catch it."""
    state: dict = {}

    @functools.wraps(fn)
    def run(*args):
        if os.environ.get("FASTSSL_COMPILE", "1") == "0" or state.get("failed") or torch.compiler.is_compiling():
            return fn(*args)
        if "compiled" not in state:
            state["compiled"] = torch.compile(fn, dynamic=False)
        try:
            return state["compiled"](*args)
        except Exception as exc:  # no C++ compiler, an Inductor bug: the eager path gives the same numbers
            state["failed"] = True
            first = str(exc).splitlines()[0] if str(exc) else ""
            warnings.warn(f"fastssl: torch.compile of {fn.__qualname__} failed ({type(exc).__name__}: {first}); it "
                          "runs eagerly from now on (set FASTSSL_COMPILE=0 to skip the attempt)", RuntimeWarning,
                          stacklevel=2)
            return fn(*args)

    run.compile_state = state
    return run
