"""Functional forms of fastssl's fused ops (``fastssl.functional.dino_loss``, ...)."""

from .losses.dino import dino_loss
from .losses.paws import paws_loss, snn

__all__ = ["dino_loss", "paws_loss", "snn"]
