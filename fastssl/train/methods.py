"""The training methods of ``fastssl-train``: for each, its config class, presets and trainer.

Adding a method is a config (a :class:`~fastssl.train.config.RunConfig` subclass, ``<method>_config.py``),
its presets (``presets.py``), its trainer module (a ``train_<method>(cfg)`` function) and one entry here:
the command line, ``--help``, presets, ``config.json``, checkpoint config checks and errors follow.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .config import RunConfig
from .dino_config import DinoConfig
from .dinov3_config import Dinov3Config
from .paws_config import PawsConfig
from .presets import DINO_PRESETS, DINOV3_PRESETS, PAWS_PRESETS

__all__ = ["METHODS", "Method"]


@dataclass(frozen=True)
class Method:
    help: str
    config: type[RunConfig]
    presets: Mapping[str, RunConfig]
    trainer: str  # "module:function", imported when the method runs (the command line stays light)

    def train_function(self) -> Callable[..., Any]:
        module, name = self.trainer.split(":")
        return getattr(importlib.import_module(module, __package__), name)


METHODS: dict[str, Method] = {
    "dino": Method("train DINO", DinoConfig, DINO_PRESETS, ".dino:train_dino"),
    "paws": Method("train PAWS (semi-supervised, a few labels)", PawsConfig, PAWS_PRESETS, ".paws:train_paws"),
    "dinov3": Method("train DINOv3 (DINO + iBOT + KoLeo, without the Gram stage)", Dinov3Config, DINOV3_PRESETS,
                     ".dinov3:train_dinov3"),
}
