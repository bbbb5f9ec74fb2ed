"""Triton kernels and their launchers (installed as ``fastssl.kernels``).

Each module holds the ``@triton.jit`` kernels of one op, the launchers that check
shapes and pick block sizes, and ``aot_specs`` describing what the launchers
compile, so that ``python -m fastssl.kernels.aot`` can build them for real GPUs.
Importing this package imports triton: the Python layer only does so when a
Triton backend is actually used.
"""
