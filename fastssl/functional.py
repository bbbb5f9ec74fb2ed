"""Functional forms of fastssl's fused ops (``fastssl.functional.dino_loss``, ...)."""

from .losses.dino import dino_loss

__all__ = ["dino_loss"]
