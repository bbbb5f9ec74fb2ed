"""Self-supervised losses with the authors' signatures and numerics."""

from .dino import DinoLoss, dino_loss
from .gram import GramLoss, gram_loss
from .koleo import KoLeoLoss, KoLeoLossDistributed, koleo_loss
from .paws import PawsLoss, init_paws_loss, paws_loss, snn

__all__ = ["DinoLoss", "GramLoss", "KoLeoLoss", "KoLeoLossDistributed", "PawsLoss", "dino_loss", "gram_loss",
           "init_paws_loss", "koleo_loss", "paws_loss", "snn"]
