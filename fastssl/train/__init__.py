"""The fastssl trainer: DINO and PAWS on the fused parts, from one GPU to many with torchrun.

``fastssl-train dino|paws|knn|attention|demo`` (``python -m fastssl.train``). Every option is a field
of a config class: ``config.py`` (how an option is declared; ``RunConfig``, what every method shares),
``dino_config.py``, ``paws_config.py``, ``eval_config.py``; ``presets.py`` the authors' recipes;
``methods.py`` the methods ``cli.py`` offers. Files: ``dino.py`` and ``paws.py`` the training loops;
what they share: ``runtime.py`` (processes, clipping, seeds, decisions all ranks take), ``run_folder.py``
(the lock, leftovers, the log rewound), ``resume.py`` (where a run starts, the overrides), ``log.py``
(``log.jsonl``, the progress bar), ``checkpoint.py``, ``errors.py``; ``models.py`` backbones and heads,
``optim.py`` LARS, ``data.py`` the data sets, ``schedules.py``, ``knn.py``, ``evaluate.py``,
``attention.py``, ``demo.py``.
"""

from .cli import main

__all__ = ["main"]
