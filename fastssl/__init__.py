"""fastssl: fused GPU kernels for self-supervised vision training.

The public API is flat: ``from fastssl import DinoLoss``. Every fused op takes
``backend="auto" | "torch" | "triton"`` (see ``fastssl._backend``).
"""

from . import functional, ops
from .augment import DinoAugment, MultiCrop
from .ema import MomentumTeacher, ema_update_
from .evaluation import SoftNNClassifier
from .losses import DinoLoss, PawsLoss, init_paws_loss
from .samplers import ClassStratifiedSampler

__version__ = "0.1.0"

__all__ = ["DinoLoss", "MomentumTeacher", "ema_update_", "functional", "ops", "__version__",
           "ClassStratifiedSampler", "PawsLoss", "SoftNNClassifier", "init_paws_loss",
           "MultiCrop", "DinoAugment"]
