"""``fastssl-train knn``: the k-NN accuracy of a checkpoint's network (DINO or PAWS) on a labelled folder."""

from __future__ import annotations

import torch

from .checkpoint import CheckpointError, load_checkpoint, load_pretrained
from .data import DataError, DigitsImages, ImageFolder, load_digits_split
from .knn import knn_eval

__all__ = ["knn_command", "model_from_checkpoint"]


def _paws_model_from_checkpoint(cfg: dict, state: dict, train_cfg: dict | None):
    """A PAWS run's encoder: this trainer's (``model`` + its config) or the PAWS authors' (``encoder``:
    the heads' widths read off the weights, the backbone named by ``--arch``)."""
    from .checkpoint import check_state_dict
    from .cli import parse_args
    from .paws import build_paws_model, paws_state_from_authors

    if "encoder" in state:
        if not cfg.get("arch"):
            raise CheckpointError(f"{cfg['checkpoint']!r} is a PAWS authors' checkpoint: give --arch (e.g. resnet50)")
        weights = paws_state_from_authors(state)
        train_cfg = vars(parse_args(["paws", "--data", "none", "--arch", cfg["arch"]]))
        if "fc.fc3.weight" in weights:
            train_cfg["output_dim"], train_cfg["hidden_dim"] = weights["fc.fc3.weight"].shape
        train_cfg["use_pred_head"] = any(k.startswith("pred.") for k in weights)
    else:
        weights = {k.removeprefix("module.").replace("_orig_mod.", ""): v for k, v in state["model"].items()}
    model = build_paws_model(train_cfg)
    check_state_dict(model, weights, "encoder", cfg["checkpoint"])
    model.load_state_dict(weights)
    return model, train_cfg


def model_from_checkpoint(cfg: dict, device: torch.device):
    """``(network, its training config)`` of ``cfg["checkpoint"]``: the config saved in a fastssl
    checkpoint, else ``--arch`` / ``--patch-size`` (the authors' checkpoints). DINO checkpoints give
    their teacher or student (``--which``), PAWS ones their encoder; either way ``network.backbone``
    holds the features."""
    from .dino import build_dino_model

    state = load_checkpoint(cfg["checkpoint"])
    train_cfg = state.get("config")
    if "encoder" in state or (isinstance(train_cfg, dict) and train_cfg.get("command") == "paws"):
        model, train_cfg = _paws_model_from_checkpoint(cfg, state, train_cfg)
        return model.to(device).eval(), train_cfg
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
