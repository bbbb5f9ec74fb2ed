"""``fastssl-train export``: a checkpoint's backbone as the file users take downstream.

Writes the teacher's (or student's) backbone weights as a safetensors file and, beside it, a JSON file of
the arguments of ``timm.create_model`` that build the same network, so that::

    args = json.load(open("vits16.json"))["timm_create_model"]
    model = timm.create_model(**args, pretrained=True, pretrained_cfg_overlay=dict(file="vits16.safetensors"))

gives the trained backbone (``forward`` returns the CLS features, as during training). The checkpoint may be
a file or an FSDP2 run's sharded folder (consolidated on the way; ``--consolidated FILE`` keeps that whole
state as one file, which ``knn``, ``attention`` and ``export`` read). What only training
uses is left out: the heads, and DINOv3's mask token (named when dropped). Existing files are replaced only
with ``--overwrite``; each file is written through a temporary file and a rename.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch

from .errors import CheckpointError, ConfigError
from .eval_config import ExportConfig
from .evaluate import model_from_checkpoint
from .log import write_atomically
from .sharded_checkpoint import consolidate, is_sharded_checkpoint

__all__ = ["export_command"]


def _targets(cfg: ExportConfig) -> tuple[Path, Path]:
    weights = Path(cfg.output)
    meta = weights.with_suffix(".json")
    if cfg.consolidated is not None and not is_sharded_checkpoint(cfg.checkpoint):
        raise ConfigError(f"--consolidated applies to a sharded checkpoint folder (an --fsdp run's); "
                          f"{cfg.checkpoint} is not one")
    if not cfg.overwrite:
        for path in (weights, meta):
            if path.exists():
                raise ConfigError(f"--output {cfg.output}: {path} exists; pass --overwrite to replace it")
        if cfg.consolidated is not None and Path(cfg.consolidated).exists():
            raise ConfigError(f"--consolidated {cfg.consolidated} exists; pass --overwrite to replace it")
    return weights, meta


def backbone_tensors(backbone: torch.nn.Module) -> tuple[dict, dict[str, torch.Tensor], list[str]]:
    """``(timm arguments, the weights timm's network of those arguments takes, names left out)`` of a
    backbone built by :func:`~fastssl.train.models.build_backbone`."""
    import timm

    args = getattr(backbone, "fastssl_timm_args", None)
    if args is None:
        raise CheckpointError("this backbone was not built by fastssl-train: no timm arguments to export")
    expected = timm.create_model(**args, pretrained=False).state_dict()
    ours = backbone.state_dict()
    dropped = sorted(set(ours) - set(expected))
    missing = sorted(set(expected) - set(ours))
    if missing:
        raise CheckpointError(f"the backbone lacks weights timm's {args['model_name']} has: {missing[:5]}")
    tensors = {}
    for name, ref in expected.items():
        if ours[name].shape != ref.shape:
            raise CheckpointError(f"{name} has shape {tuple(ours[name].shape)}, timm's {args['model_name']} "
                                  f"{tuple(ref.shape)}")
        tensors[name] = ours[name].detach().to("cpu").contiguous().clone()  # safetensors: no shared storage
    return args, tensors, dropped


def export_command(cfg: ExportConfig) -> dict:
    """Write the files; returns ``{"weights": path, "meta": path, "timm_create_model": args, "dropped": names}``."""
    from safetensors.torch import save_file

    weights, meta = _targets(cfg)  # before the checkpoint is read: a refused run does nothing
    if cfg.consolidated is not None:  # an FSDP2 run's folder, kept as one file too
        single = consolidate(cfg.checkpoint, cfg.consolidated, overwrite=cfg.overwrite)
        print(f"wrote {single}: the whole state of {cfg.checkpoint} in one file", flush=True)
        model, _ = model_from_checkpoint(cfg.replace(checkpoint=str(single)), torch.device("cpu"))
    elif is_sharded_checkpoint(cfg.checkpoint):  # an FSDP2 run's folder: its full tensors first, in one file
        with tempfile.TemporaryDirectory(dir=weights.parent if weights.parent.exists() else None) as scratch:
            single = consolidate(cfg.checkpoint, Path(scratch) / "consolidated.pth")
            model, _ = model_from_checkpoint(cfg.replace(checkpoint=str(single)), torch.device("cpu"))
    else:
        model, _ = model_from_checkpoint(cfg, torch.device("cpu"))
    args, tensors, dropped = backbone_tensors(model.backbone)
    weights.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{weights.name}.", suffix=".tmp", dir=weights.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"format": "pt", "checkpoint": str(cfg.checkpoint), "which": cfg.which})
        os.replace(tmp, weights)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    info = {"timm_create_model": args, "weights": weights.name, "checkpoint": str(cfg.checkpoint),
            "which": cfg.which, "left_out": dropped}
    write_atomically(meta, json.dumps(info, indent=2, sort_keys=True) + "\n")
    left = f" (left out, used in training only: {', '.join(dropped)})" if dropped else ""
    print(f"wrote {weights} ({len(tensors)} tensors of the {cfg.which}'s backbone{left}) and {meta}; load with:\n"
          f"  timm.create_model(**json.load(open({str(meta)!r}))['timm_create_model'], pretrained=True, "
          f"pretrained_cfg_overlay=dict(file={str(weights)!r}))", flush=True)
    return {"weights": weights, "meta": meta, "timm_create_model": args, "dropped": dropped}
