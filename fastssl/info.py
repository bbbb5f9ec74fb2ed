"""``python -m fastssl.info``: versions, usable backends and the GPU, for bug reports."""

from __future__ import annotations

import importlib.util
import platform
import sys

import torch

from . import __version__
from ._backend import interpreter_enabled, triton_available


def collect() -> dict:
    info = {
        "fastssl": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "triton": None,
        "triton_interpreter": interpreter_enabled(),
        "cpp_extension": importlib.util.find_spec("fastssl._C") is not None,
        "gpus": [],
    }
    if triton_available():
        import triton

        info["triton"] = triton.__version__
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            info["gpus"].append(f"{p.name} (sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB, "
                                f"{p.multi_processor_count} SMs)")
    gpu = bool(info["gpus"])
    info["backends"] = {
        "torch": "usable on every device",
        "triton": ("kernels on CUDA tensors" if gpu and info["triton"] else
                   "kernels on CPU tensors through the interpreter" if info["triton"] and interpreter_enabled()
                   else "installed, needs a CUDA GPU (or TRITON_INTERPRET=1 for CPU tensors)" if info["triton"]
                   else "not available (triton is not installed)"),
    }
    return info


def main() -> None:
    info = collect()
    width = max(len(k) for k in info)
    for key, value in info.items():
        if isinstance(value, dict):
            for sub, text in value.items():
                print(f"{'backend ' + sub:<{width + 8}}  {text}")
        elif isinstance(value, list):
            print(f"{key:<{width + 8}}  {', '.join(value) if value else 'none'}")
        else:
            print(f"{key:<{width + 8}}  {value}")


if __name__ == "__main__":
    main()
