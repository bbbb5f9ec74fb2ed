"""What every launcher needs around a kernel launch: the tensors' device, row-strided inputs,
and a clear error where Triton's interpreter cannot run the kernels."""

from __future__ import annotations

import contextlib
import functools

import torch
import triton

__all__ = ["InterpreterUnsupported", "aot_int", "interpreter_problem", "launch_device", "launch_options",
           "rows_contiguous"]


class InterpreterUnsupported(RuntimeError):
    """Triton's interpreter cannot run these kernels with the installed packages."""


@functools.cache
def interpreter_problem() -> str | None:
    """Why this Triton's interpreter cannot run kernels that loop to a run-time bound, or None.

    Triton before 3.7 hands such bounds to ``range`` as 1-element numpy arrays, and numpy 2.4
    made ``int()`` of those an error (deprecated since 1.25). Compiled kernels on GPUs are not
    affected; the interpreter with numpy < 2.4 or Triton >= 3.7 runs them.
    """
    import numpy

    def version(text: str) -> tuple[int, int]:
        major, minor = text.split(".")[:2]
        return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)

    if version(triton.__version__) < (3, 7) and version(numpy.__version__) >= (2, 4):
        return (f"Triton {triton.__version__}'s interpreter fails with numpy {numpy.__version__} (int() of a "
                "1-element array is an error since numpy 2.4): install numpy<2.4 or triton>=3.7 to run the "
                "kernels on CPU tensors, or use backend='torch'")
    return None


def launch_device(t: torch.Tensor, op: str):
    """The context to launch on ``t``'s device: its CUDA device, or (CPU tensors, interpreter) a
    check that the interpreter can run kernels with loops to run-time bounds."""
    if t.is_cuda:
        return torch.cuda.device(t.device)
    problem = interpreter_problem()
    if problem:
        raise InterpreterUnsupported(f"{op}: {problem}")
    return contextlib.nullcontext()


def launch_options(cfg: dict) -> dict:
    """The compile options in a launcher's config, for a launch and for the AOT build alike:
    warps, stages and, where set, ``enable_fp_fusion``. Triton fuses a multiply and an add into
    one FMA on GPUs unless told not to; its interpreter never does. Kernels whose statistics and
    recomputed values must round alike (a row's max, then exp2 of each value less it), or that
    must round as PyTorch does, set it False."""
    return {k: cfg[k] for k in ("num_warps", "num_stages", "enable_fp_fusion") if k in cfg}


def rows_contiguous(x: torch.Tensor) -> torch.Tensor:
    """The kernels index rows by a stride and columns contiguously."""
    return x if x.stride(-1) == 1 else x.contiguous()


def aot_int(value: int) -> str:
    """An i32 kernel argument for the AOT build, with the hint the JIT gives ``value``: equal to 1,
    or divisible by 16 (the JIT specialises on both; loads vectorise by the second)."""
    return "i32:1" if value == 1 else "i32:16" if value % 16 == 0 else "i32"
