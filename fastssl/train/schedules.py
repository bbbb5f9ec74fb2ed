"""Per-iteration schedules, as the DINO authors define them (``utils.cosine_scheduler``).

A value per training iteration: a linear warm-up from ``start_warmup_value`` to ``base`` over
``warmup_epochs``, then a cosine from ``base`` to ``final``. The teacher momentum (a cosine
without warm-up) is :func:`fastssl.ema.cosine_momentum_schedule`, the same formula.
"""

from __future__ import annotations

import math

import numpy as np

from ..ema import cosine_momentum_schedule

__all__ = ["cosine_momentum_schedule", "cosine_schedule"]


def cosine_schedule(base: float, final: float, epochs: int, niter_per_ep: int, warmup_epochs: int = 0,
                    start_warmup_value: float = 0.0) -> np.ndarray:
    """``epochs * niter_per_ep`` values: ``warmup_epochs * niter_per_ep`` linear steps from
    ``start_warmup_value`` to ``base`` (both included, as the authors' ``np.linspace``), then
    ``final + (base - final) * (1 + cos(pi * i / n)) / 2`` over the ``n`` remaining iterations."""
    if epochs < 1 or niter_per_ep < 1:
        raise ValueError(f"cosine_schedule: epochs={epochs} and niter_per_ep={niter_per_ep} must be positive")
    if not 0 <= warmup_epochs <= epochs:
        raise ValueError(f"cosine_schedule: warmup_epochs={warmup_epochs} must lie in [0, epochs={epochs}]")
    warmup_iters = warmup_epochs * niter_per_ep
    warmup = np.linspace(start_warmup_value, base, warmup_iters) if warmup_iters else np.zeros(0)
    n = epochs * niter_per_ep - warmup_iters
    cosine = final + 0.5 * (base - final) * (1.0 + np.cos(math.pi * np.arange(n) / max(n, 1)))
    return np.concatenate((warmup, cosine))
