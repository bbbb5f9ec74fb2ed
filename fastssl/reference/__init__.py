"""The authors' formulations, written plainly in PyTorch.

They are what fastssl must match: the tests evaluate them in float64 against the
fused ops, and the benchmarks time them as the baselines users run today.
"""

from . import dinov2, dinov3
from .dino import AuthorsDINOLoss, dino_loss_pairwise
from .paws import init_paws_loss, make_labels_matrix, snn_reference

__all__ = ["AuthorsDINOLoss", "dino_loss_pairwise", "dinov2", "dinov3", "init_paws_loss", "make_labels_matrix",
           "snn_reference"]
