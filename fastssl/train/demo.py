"""``fastssl-train demo`` (``make demo``): DINO on scikit-learn's digits from scratch, then k-NN of the
trained teacher against the same network at its random initialisation, on the held-out digits.

It trains in a folder it creates (``runs/demo-<n>``, the first free n) and deletes nothing: an
``--output-dir`` must be new, empty, or a demo run's folder (which resumes, as any run folder).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from .config import RunConfig
from .dino_config import DinoConfig
from .errors import ConfigError

__all__ = ["new_demo_folder", "run_demo"]


def new_demo_folder(root: Path = Path("runs")) -> Path:
    """Create and return ``root/demo-<n>`` for the first n not taken."""
    root.mkdir(parents=True, exist_ok=True)
    for n in range(1, 100_000):
        folder = root / f"demo-{n}"
        try:
            folder.mkdir()  # atomic: two demos started together get two folders
        except FileExistsError:
            continue
        return folder
    raise ConfigError(f"no free demo-<n> folder in {root}: give --output-dir")


def run_demo(cfg: RunConfig, *, output_dir_given: bool) -> int:
    import torch

    from .checkpoint import load_pretrained
    from .data import DigitsImages, load_digits_split
    from .dino import build_dino_model, train_dino
    from .knn import knn_eval

    assert isinstance(cfg, DinoConfig)
    if output_dir_given:
        out = Path(cfg.output_dir)
        if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "checkpoint.pth").is_file())):
            raise ConfigError(f"--output-dir {out} is not empty and holds no checkpoint.pth: the demo trains in a "
                              "new or empty folder, or resumes a demo run's folder")
    else:
        out = new_demo_folder()
        cfg = cfg.replace(output_dir=str(out))
        print(f"demo: training in {out}", flush=True)
    t0 = time.perf_counter()
    result = train_dino(cfg)
    device = torch.device("cuda" if torch.cuda.is_available() and cfg.device != "cpu" else "cpu")
    xtr, ytr, xte, yte = load_digits_split(cfg.digits_size)
    bank, query = DigitsImages(xtr, ytr), DigitsImages(xte, yte)
    trained = build_dino_model(cfg, drop_path_rate=0.0).to(device)
    load_pretrained(trained, out / "checkpoint.pth", "teacher")
    torch.manual_seed(cfg.seed)  # the student's seed: the very network training started from
    random_init = build_dino_model(cfg).to(device)

    def knn(backbone) -> dict[str, float]:
        return knn_eval(backbone, bank, query, device, k=cfg.knn_k, T=cfg.knn_t, size=cfg.global_crop_size,
                        crop_fraction=cfg.eval_crop_fraction, batch_size=cfg.knn_batch_size,
                        num_workers=cfg.num_workers)

    dino, rand = knn(trained.backbone), knn(random_init.backbone)
    minutes = (time.perf_counter() - t0) / 60
    print(f"{result.step} training steps; training and evaluation took {minutes:.1f} min")
    print(f"kNN top-1 (k={cfg.knn_k}, T={cfg.knn_t}): DINO {dino['top1']:.1f}% | random init {rand['top1']:.1f}%")
    sys.stdout.flush()
    return 0
