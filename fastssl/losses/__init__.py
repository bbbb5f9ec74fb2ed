"""Self-supervised losses with the authors' signatures and numerics."""

from .dino import DinoLoss, dino_loss
from .paws import PawsLoss, init_paws_loss, paws_loss, snn

__all__ = ["DinoLoss", "PawsLoss", "dino_loss", "init_paws_loss", "paws_loss", "snn"]
