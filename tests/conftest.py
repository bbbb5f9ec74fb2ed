"""Test setup: Triton kernels run through the interpreter on CPU tensors.

TRITON_INTERPRET must be set before triton is imported, hence here. Every test
gets fresh random inputs: an autouse fixture seeds torch from the OS and prints
the seed (shown on failure); set FASTSSL_TEST_SEED to replay one.
"""

import os
import secrets
import warnings

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# The interpreter evaluates masked-out lanes too (e.g. -inf - -inf in padded rows of an
# online softmax); numpy warns about them although they are never stored.
warnings.filterwarnings("ignore", category=RuntimeWarning, module="triton.runtime.interpreter")


@pytest.fixture(autouse=True)
def fresh_seed():
    seed = int(os.environ.get("FASTSSL_TEST_SEED", secrets.randbits(31)))
    torch.manual_seed(seed)
    print(f"FASTSSL_TEST_SEED={seed}")
    return seed


@pytest.fixture(params=["torch", "triton"])
def backend(request):
    """Both implementations of a fused op: plain PyTorch and the Triton kernels."""
    return request.param
