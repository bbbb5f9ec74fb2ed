"""Functional forms of fastssl's fused ops (``fastssl.functional.dino_loss``, ...)."""

from .losses.crop_pairs import dino_cross_entropy
from .losses.dino import dino_loss
from .losses.gram import gram_loss
from .losses.ibot import ibot_loss, ibot_loss_dense
from .losses.koleo import koleo_loss
from .losses.paws import paws_loss, snn
from .losses.targets import TeacherTargets, sinkhorn_knopp, softmax_center

__all__ = ["TeacherTargets", "dino_cross_entropy", "dino_loss", "gram_loss", "ibot_loss", "ibot_loss_dense",
           "koleo_loss", "paws_loss", "sinkhorn_knopp", "snn", "softmax_center"]
