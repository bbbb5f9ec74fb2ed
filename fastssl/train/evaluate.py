"""``fastssl-train knn``: the k-NN accuracy of a checkpoint's network (DINO, DINOv3 or PAWS) on a labelled folder."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .checkpoint import CheckpointError, check_state_dict, load_checkpoint, load_pretrained
from .data import DataError, DigitsImages, ImageFolder, load_digits_split
from .dino_config import DinoConfig
from .dinov3_config import Dinov3Config
from .errors import ConfigError
from .eval_config import AttentionConfig, ExportConfig, KnnCommandConfig
from .knn import knn_eval
from .models import MultiCropModel, PawsModel

if TYPE_CHECKING:
    from .dinov3 import Dinov3Model
from .paws_config import PawsConfig

__all__ = ["knn_command", "model_from_checkpoint"]

EvalConfig = KnnCommandConfig | AttentionConfig | ExportConfig


def _paws_model_from_checkpoint(cfg: EvalConfig, state: dict) -> tuple[PawsModel, PawsConfig]:
    """A PAWS run's encoder: this trainer's (``model`` + its config) or the PAWS authors' (``encoder``:
    the heads' widths read off the weights, the backbone named by ``--arch``)."""
    from .paws import build_paws_model, paws_state_from_authors

    if "encoder" in state:
        if not cfg.arch:
            raise CheckpointError(f"{cfg.checkpoint!r} is a PAWS authors' checkpoint: give --arch (e.g. resnet50)")
        weights = paws_state_from_authors(state)
        train_cfg = PawsConfig(arch=cfg.arch)
        if "fc.fc3.weight" in weights:
            output_dim, hidden_dim = weights["fc.fc3.weight"].shape
            train_cfg = train_cfg.replace(output_dim=int(output_dim), hidden_dim=int(hidden_dim))
        train_cfg = train_cfg.replace(use_pred_head=any(k.startswith("pred.") for k in weights))
    else:
        train_cfg = PawsConfig.from_dict(state["config"], strict=False)
        weights = {k.removeprefix("module.").replace("_orig_mod.", ""): v for k, v in state["model"].items()}
    model = build_paws_model(train_cfg)
    check_state_dict(model, weights, "encoder", cfg.checkpoint)
    model.load_state_dict(weights)
    return model, train_cfg


def _dinov3_model_from_checkpoint(cfg: EvalConfig, state: dict, saved: dict) -> tuple[Dinov3Model, Dinov3Config]:
    """A ``fastssl-train dinov3`` run's teacher or student (``--which``): backbone with its mask token,
    DINO and iBOT heads."""
    from .dinov3 import build_dinov3_model

    train_cfg = Dinov3Config.from_dict(saved, strict=False)
    if cfg.which not in state:
        raise CheckpointError(f"checkpoint {cfg.checkpoint!r} has no {cfg.which!r} entry (keys: {sorted(state)})")
    weights = {k.removeprefix("module.").replace("_orig_mod.", ""): v for k, v in state[cfg.which].items()}
    model = build_dinov3_model(train_cfg, drop_path_rate=0.0)
    check_state_dict(model, weights, cfg.which, cfg.checkpoint)
    model.load_state_dict(weights)
    return model, train_cfg


def model_from_checkpoint(cfg: EvalConfig, device: torch.device
                          ) -> tuple[MultiCropModel | PawsModel | Dinov3Model, DinoConfig | PawsConfig | Dinov3Config]:
    """``(network, its training config)`` of ``cfg.checkpoint``: the config saved in a fastssl
    checkpoint, else ``--arch`` / ``--patch-size`` (the authors' checkpoints). DINO and DINOv3
    checkpoints give their teacher or student (``--which``), PAWS ones their encoder; either way
    ``network.backbone`` holds the features."""
    from .dino import build_dino_model

    state = load_checkpoint(cfg.checkpoint)
    saved = state.get("config")
    if "encoder" in state or (isinstance(saved, dict) and saved.get("command") == "paws"):
        paws_model, paws_cfg = _paws_model_from_checkpoint(cfg, state)
        return paws_model.to(device).eval(), paws_cfg
    if isinstance(saved, dict) and saved.get("command") == "dinov3":
        v3_model, v3_cfg = _dinov3_model_from_checkpoint(cfg, state, saved)
        return v3_model.to(device).eval(), v3_cfg
    if isinstance(saved, dict):
        train_cfg = DinoConfig.from_dict(saved, strict=False)
        if train_cfg.head_layers < 1:  # the trainer before 0.2 built one layer for --head-layers 0
            train_cfg = train_cfg.replace(head_layers=1)
    else:
        if not cfg.arch:
            raise CheckpointError(f"{cfg.checkpoint!r} carries no fastssl config: give --arch (and --patch-size)")
        train_cfg = DinoConfig(arch=cfg.arch)
        args = state.get("args")  # the authors' argparse Namespace
        for key in ("out_dim", "patch_size", "use_bn_in_head", "norm_last_layer"):
            if args is not None and hasattr(args, key):
                train_cfg = train_cfg.replace(**{key: getattr(args, key)})
        if cfg.patch_size:
            train_cfg = train_cfg.replace(patch_size=cfg.patch_size)
        if train_cfg.patch_size == 16 and "patch16" in cfg.arch:
            train_cfg = train_cfg.replace(patch_size=None)
    model = build_dino_model(train_cfg, drop_path_rate=0.0)
    load_pretrained(model, cfg.checkpoint, cfg.which)
    return model.to(device).eval(), train_cfg


def eval_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but torch sees no GPU")
    return torch.device("cuda" if torch.cuda.is_available() and name != "cpu" else "cpu")


def knn_command(cfg: KnnCommandConfig) -> dict:
    device = eval_device(cfg.device)
    crop_fraction, num_workers = cfg.eval_crop_fraction, cfg.num_workers
    bank: DigitsImages | ImageFolder
    query: DigitsImages | ImageFolder
    if cfg.data == "digits":
        model, train_cfg = model_from_checkpoint(cfg, device)
        xtr, ytr, xte, yte = load_digits_split(train_cfg.digits_size)
        bank, query = DigitsImages(xtr, ytr), DigitsImages(xte, yte)
        crop_fraction, num_workers = 1.0, 0  # whole digits, in memory: workers would only add start-up time
    else:
        assert cfg.val_data is not None  # validated
        bank, query = ImageFolder(cfg.data), ImageFolder(cfg.val_data)  # data errors before the model
        if bank.classes != query.classes:
            raise DataError(f"knn: {cfg.data!r} and {cfg.val_data!r} have different class folders")
        model, train_cfg = model_from_checkpoint(cfg, device)
    result = knn_eval(model.backbone, bank, query, device, k=cfg.knn_k, T=cfg.knn_t,
                      size=cfg.global_crop_size or train_cfg.global_crop_size, crop_fraction=crop_fraction,
                      batch_size=cfg.knn_batch_size, num_workers=num_workers)
    print(f"k-NN (k={cfg.knn_k}, T={cfg.knn_t}) of the {cfg.which} of {cfg.checkpoint}: "
          f"top-1 {result['top1']:.2f}%  top-5 {result['top5']:.2f}%", flush=True)
    return result
