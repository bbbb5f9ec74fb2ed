"""The authors' formulations, written plainly in PyTorch.

They are what fastssl must match: the tests evaluate them in float64 against the
fused ops, and the benchmarks time them as the baselines users run today.
"""

from .dino import AuthorsDINOLoss, dino_loss_pairwise

__all__ = ["AuthorsDINOLoss", "dino_loss_pairwise"]
