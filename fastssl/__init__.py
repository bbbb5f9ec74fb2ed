"""fastssl: fused GPU kernels for self-supervised vision training.

The public API is flat: ``from fastssl import DinoLoss``; drop-ins for the DINOv2 and
DINOv3 authors' losses live in ``fastssl.dinov2`` and ``fastssl.dinov3`` (one namespace per
repository, so code written against either switches by its import). Every fused op takes
``backend="auto" | "torch" | "triton"`` (see ``fastssl._backend``).
"""

from . import dinov2, dinov3, functional, ops
from .augment import DinoAugment, MultiCrop
from .ema import MomentumTeacher, ema_update_
from .evaluation import SoftNNClassifier
from .losses import DinoLoss, PawsLoss, init_paws_loss
from .samplers import ClassStratifiedSampler

__version__ = "0.1.0"

__all__ = ["DinoLoss", "MomentumTeacher", "ema_update_", "dinov2", "dinov3", "functional", "ops", "__version__",
           "ClassStratifiedSampler", "PawsLoss", "SoftNNClassifier", "init_paws_loss",
           "MultiCrop", "DinoAugment"]
