"""Data augmentation on the device: DINO's multi-crop and its per-crop colour pipeline, batched.

* :class:`MultiCrop`: random resized crops (+ flips, normalisation) of a batch, boxes sampled as
  tensor ops, crops made by :func:`fastssl.ops.resized_crops`;
* :class:`DinoAugment`: the DINO authors' full per-crop pipeline on top of it;
* :mod:`fastssl.augment.functional`: the per-sample colour and blur ops both use.
"""

from . import functional
from .boxes import sample_boxes
from .dino import ColorParams, DinoAugment, DinoParams
from .multicrop import IMAGENET_MEAN, IMAGENET_STD, CropParams, MultiCrop

__all__ = ["MultiCrop", "DinoAugment", "CropParams", "DinoParams", "ColorParams", "sample_boxes", "functional",
           "IMAGENET_MEAN", "IMAGENET_STD"]
