"""The fastssl trainer: DINO and PAWS on the fused parts, from one GPU to many with torchrun.

``fastssl-train dino|paws|knn|attention|demo`` (``python -m fastssl.train``); see ``cli.py`` for every
option and ``presets.py`` for the authors' recipes. Files: ``dino.py`` and ``paws.py`` the training
loops, ``runtime.py`` what both share (processes, logging, clipping), ``models.py`` backbones and
heads, ``optim.py`` LARS, ``data.py`` the data sets, ``schedules.py``, ``checkpoint.py``, ``knn.py``,
``attention.py``.
"""

from .cli import main

__all__ = ["main"]
