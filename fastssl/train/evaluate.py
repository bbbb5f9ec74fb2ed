"""``fastssl-train knn``: the k-NN accuracy of a checkpoint's network on a labelled folder."""

from __future__ import annotations

import torch

from .checkpoint import CheckpointError, load_checkpoint, load_pretrained
from .data import DataError, DigitsImages, ImageFolder, load_digits_split
from .knn import knn_eval

__all__ = ["knn_command", "model_from_checkpoint"]


def model_from_checkpoint(cfg: dict, device: torch.device):
    """``(network, its training config)`` of ``cfg["checkpoint"]``: the config saved in a fastssl
    checkpoint, else ``--arch`` / ``--patch-size`` (the authors' checkpoints)."""
    from .dino import build_dino_model

    state = load_checkpoint(cfg["checkpoint"])
    train_cfg = state.get("config")
    if not isinstance(train_cfg, dict):
        if not cfg.get("arch"):
            raise CheckpointError(f"{cfg['checkpoint']!r} carries no fastssl config: give --arch (and --patch-size)")
        from .cli import parse_args

        train_cfg = vars(parse_args(["dino", "--data", "none", "--arch", cfg["arch"]]))
        args = state.get("args")
        for key in ("out_dim", "patch_size", "use_bn_in_head", "norm_last_layer"):
            if args is not None and hasattr(args, key):
                train_cfg[key] = getattr(args, key)
        if cfg.get("patch_size"):
            train_cfg["patch_size"] = cfg["patch_size"]
        if train_cfg.get("patch_size") == 16 and "patch16" in cfg["arch"]:
            train_cfg["patch_size"] = None
    model = build_dino_model(train_cfg, drop_path_rate=0.0)
    load_pretrained(model, cfg["checkpoint"], cfg["which"])
    return model.to(device).eval(), train_cfg


def knn_command(cfg: dict) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() and cfg["device"] != "cpu" else "cpu")
    if cfg["data"] == "digits":
        model, train_cfg = model_from_checkpoint(cfg, device)
        xtr, ytr, xte, yte = load_digits_split(train_cfg.get("digits_size", 32))
        bank, query = DigitsImages(xtr, ytr), DigitsImages(xte, yte)
        cfg["num_workers"] = 0  # in memory: workers would only add start-up time
    else:
        if not cfg["val_data"]:
            raise DataError("knn: --val-data (the labelled images to classify) is required with a folder --data")
        bank, query = ImageFolder(cfg["data"]), ImageFolder(cfg["val_data"])  # data errors before the model
        if bank.classes != query.classes:
            raise DataError(f"knn: {cfg['data']!r} and {cfg['val_data']!r} have different class folders")
        model, train_cfg = model_from_checkpoint(cfg, device)
    eval_cfg = dict(cfg)
    eval_cfg["global_crop_size"] = cfg["global_crop_size"] or train_cfg.get("global_crop_size") or 224
    if cfg["data"] == "digits":
        eval_cfg["eval_crop_fraction"] = 1.0
    result = knn_eval(model.backbone, bank, query, device, eval_cfg)
    print(f"k-NN (k={cfg['knn_k']}, T={cfg['knn_t']}) of the {cfg['which']} of {cfg['checkpoint']}: "
          f"top-1 {result['top1']:.2f}%  top-5 {result['top5']:.2f}%", flush=True)
    return result
