"""Build script.

The Triton kernels live in the top-level ``kernels/`` folder and install as the
subpackage ``fastssl.kernels``; the C++/CUDA sources in ``csrc/`` ship as
``fastssl/csrc`` and build the extension ``fastssl._C``; everything else is plain
Python under ``fastssl/``.

The extension is built here when torch is importable at build time
(``pip install --no-build-isolation ...``): a ``CUDAExtension`` when a CUDA toolkit
whose major version matches torch's CUDA is found (see ``fastssl/_build.py``), else
a ``CppExtension`` with the CPU kernels only. Without torch (a plain ``pip install .``
builds in an isolated environment holding setuptools only) no extension is built and
``fastssl`` compiles it just in time on first use. ``FASTSSL_NO_EXTENSION=1`` skips it.
"""

import importlib.util
import os
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).resolve().parent


def _build_helpers():
    # By path: importing the fastssl package would import torch.
    spec = importlib.util.spec_from_file_location("_fastssl_build", HERE / "fastssl" / "_build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _extension():
    """``(ext_modules, cmdclass)`` for fastssl._C, or nothing when it is not built here."""
    if os.environ.get("FASTSSL_NO_EXTENSION", "0") not in ("", "0"):
        print("fastssl: FASTSSL_NO_EXTENSION is set; fastssl._C will be built just in time on first use")
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        print("fastssl: torch is not importable at build time; fastssl._C will be built just in time on first use "
              "(or install with --no-build-isolation)")
        return [], {}
    build = _build_helpers()
    cuda_home, why = build.cuda_plan(torch.version.cuda)
    if cuda_home is not None:
        build.use_cuda_home(cuda_home)
        make, kind = cpp_extension.CUDAExtension, "CUDA + CPU kernels"
    else:
        make, kind = cpp_extension.CppExtension, "CPU kernels only"
    print(f"fastssl: building fastssl._C with {kind} ({why})")
    ext = make(name="fastssl._C", sources=build.sources(cuda_home is not None, relative_to=HERE),
               extra_compile_args=build.extra_compile_args(cuda_home), extra_link_args=build.extra_link_args())
    return [ext], {"build_ext": cpp_extension.BuildExtension}


ext_modules, cmdclass = _extension()

setup(
    packages=[*find_packages(include=["fastssl", "fastssl.*"]), "fastssl.kernels", "fastssl.csrc"],
    package_dir={"fastssl": "fastssl", "fastssl.kernels": "kernels", "fastssl.csrc": "csrc"},
    package_data={"fastssl.csrc": ["*.h", "*.cpp", "*.cu"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
