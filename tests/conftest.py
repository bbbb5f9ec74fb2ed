"""Test setup: where the kernels run, and fresh random inputs.

Without a GPU, the Triton kernels run through the interpreter on CPU tensors
(TRITON_INTERPRET=1, set here before triton is imported). With a GPU and no
TRITON_INTERPRET, the same tests run the real kernels on CUDA tensors
(``helpers.DEVICE``). Every test gets fresh random inputs: an autouse fixture seeds
torch from the OS and prints the seed (shown on failure); set FASTSSL_TEST_SEED to
replay one.
"""

import os
import secrets

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# The PyTorch paths that compile themselves (the DINO family's loss) run eagerly here: compiling them
# for each of the suite's shapes would take minutes. Their compiled form has tests of its own.
os.environ.setdefault("FASTSSL_COMPILE", "0")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def fresh_seed():
    seed = int(os.environ.get("FASTSSL_TEST_SEED", secrets.randbits(31)))
    torch.manual_seed(seed)
    print(f"FASTSSL_TEST_SEED={seed}")
    return seed


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    """A test that reaches Triton's interpreter where it cannot run (Triton < 3.7 with numpy >= 2.4,
    see ``fastssl.kernels._launch.interpreter_problem``) is skipped with that reason, not failed."""
    try:
        return (yield)
    except Exception as e:
        from fastssl.kernels._launch import InterpreterUnsupported

        cause = e
        while cause is not None and not isinstance(cause, InterpreterUnsupported):
            cause = cause.__cause__ or cause.__context__
        if cause is None:
            raise
        pytest.skip(str(cause))


@pytest.fixture(params=["torch", "triton"])
def backend(request):
    """Both implementations of a fused op: plain PyTorch and the Triton kernels."""
    return request.param
