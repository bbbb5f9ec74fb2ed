"""The fastssl trainer: DINO on the fused parts, from one GPU to many with torchrun.

``fastssl-train dino|knn|attention|demo`` (``python -m fastssl.train``); see ``cli.py`` for every
option and ``presets.py`` for the authors' recipes. Files: ``dino.py`` the training loop,
``models.py`` backbone + head, ``data.py`` the data sets, ``schedules.py``, ``checkpoint.py``,
``knn.py``, ``attention.py``.
"""

from .cli import main

__all__ = ["main"]
