"""``F.normalize`` over the last dimension without its fp32 overflow and underflow.

``F.normalize(x, eps=eps)`` is ``x / max(|x|, eps)``, and PyTorch sums the squares of ``x``
as they are: in fp32 the norm is infinite beyond about 1e19 (the result all zeros), while bf16
features span fp32's range (below about 1e-19 the squares underflow, but such a norm is under
any eps the losses use, which then replaces it). Scaling each row by a
power of two p that brings its largest entry into [0.5, 1) first changes no rounding
(``x / max(|x|, eps) = (p x) / max(|p x|, p eps)``, p x exact) and keeps the sum of squares
in range: the same numbers as ``F.normalize`` wherever it is finite, and the float64
evaluation of its formula elsewhere. The Gram kernels scale their rows alike
(``fastssl.kernels.gram``).
"""

from __future__ import annotations

import torch

__all__ = ["normalize_rows"]


def normalize_rows(x: torch.Tensor, eps: float) -> torch.Tensor:
    """``x / max(|x|, eps)`` over the last dimension, each row scaled by a power of two first (the
    scale is a constant to autograd, as it is piecewise constant in x)."""
    with torch.no_grad():
        amax = x.abs().amax(dim=-1, keepdim=True)
        exponent = torch.frexp(amax).exponent.clamp_(-126, 126)  # amax = m 2^e, m in [0.5, 1)
        p = torch.ldexp(torch.ones_like(amax), -exponent)
    xs = x * p
    return xs / torch.maximum(torch.linalg.vector_norm(xs, dim=-1, keepdim=True), p * eps)
