"""What every launcher needs around a kernel launch: the tensors' device, row-strided inputs,
and a clear error where Triton's interpreter cannot run the kernels."""

from __future__ import annotations

import contextlib
import functools
import inspect

import torch
import triton

__all__ = ["InterpreterUnsupported", "describe_launch", "interpreter_problem", "launch", "launch_device",
           "launch_options", "record_launches", "recording", "rows_contiguous"]


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
    if _records is not None:  # recorded, not run: no interpreter needed
        return contextlib.nullcontext()
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


# While not None, launches are described here instead of run (see record_launches).
_records: list[dict] | None = None


@contextlib.contextmanager
def record_launches():
    """Within this context every :func:`launch` is described, not run: the yielded list gets
    each launch's kernel, signature (with the JIT's specialisations), constexprs and compile
    options. The AOT build (``fastssl.kernels.aot``) records a pass over its workloads on CPU
    tensors this way and compiles exactly that set for real GPUs; outputs stay unwritten."""
    global _records
    previous, _records = _records, []
    try:
        yield _records
    finally:
        _records = previous


def recording() -> bool:
    """True inside :func:`record_launches`: launchers then choose what a GPU would run."""
    return _records is not None


def launch(kernel, grid: tuple, **kwargs) -> None:
    """``kernel[grid](**kwargs)``: every launch passes through here, with keyword arguments,
    so that :func:`record_launches` sees them all."""
    if _records is not None:
        _records.append(describe_launch(kernel, kwargs))
        return
    kernel[grid](**kwargs)


_TRITON_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64",
                  torch.int64: "i64", torch.int32: "i32", torch.int16: "i16", torch.int8: "i8", torch.uint8: "u8",
                  torch.bool: "i1"}
_OPTION_NAMES = ("num_warps", "num_stages", "enable_fp_fusion")


def describe_launch(kernel, kwargs: dict) -> dict:
    """What a launch compiles, as Triton's JIT specialises it: tensors as typed pointers
    (``:16`` when the address is 16-byte aligned), integers as ``i32`` (``:1`` equal to 1,
    ``:16`` divisible by 16, unless the kernel does not specialise them; ``i64`` beyond 32
    bits), floats as ``fp32``; the constexprs and the compile options."""
    fn = kernel.fn
    params = inspect.signature(fn).parameters
    no_spec = getattr(kernel, "do_not_specialize", None)
    if no_spec is None:  # Triton's interpreter keeps the decorator's arguments instead
        no_spec = getattr(kernel, "kwargs", {}).get("do_not_specialize", ())
    names = list(params)
    no_spec = {names[i] if isinstance(i, int) else i for i in no_spec or ()}
    signature, constexprs = {}, {}
    for name, param in params.items():
        value = kwargs[name]
        if "constexpr" in str(param.annotation) or value is None:  # the JIT makes None a constant too
            constexprs[name] = value
        elif isinstance(value, torch.Tensor):
            aligned = name not in no_spec and value.data_ptr() % 16 == 0
            signature[name] = f"*{_TRITON_DTYPES[value.dtype]}" + (":16" if aligned else "")
        elif isinstance(value, bool):
            signature[name] = "i1"
        elif isinstance(value, int):
            if not -2**31 <= value < 2**31:
                signature[name] = "i64:16" if value % 16 == 0 and name not in no_spec else "i64"
            elif name in no_spec:
                signature[name] = "i32"
            else:
                signature[name] = "i32:1" if value == 1 else "i32:16" if value % 16 == 0 else "i32"
        elif isinstance(value, float):
            signature[name] = "fp32"
        else:
            raise TypeError(f"{fn.__name__}: cannot describe argument {name}={value!r} for the AOT build")
    return dict(module=fn.__module__, kernel=fn.__name__, signature=signature, constexprs=constexprs,
                options={k: kwargs[k] for k in _OPTION_NAMES if k in kwargs})


def rows_contiguous(x: torch.Tensor) -> torch.Tensor:
    """The kernels index rows by a stride and columns contiguously."""
    return x if x.stride(-1) == 1 else x.contiguous()
