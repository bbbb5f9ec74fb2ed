"""Self-supervised losses with the authors' signatures and numerics."""

from .dino import DinoLoss, dino_loss

__all__ = ["DinoLoss", "dino_loss"]
