"""``fastssl-train attention``: the last block's CLS self-attention of a ViT checkpoint, as PNGs.

The picture of the DINO paper: for every head, how much the CLS token attends to each patch,
upsampled to the image (nearest, one square per patch), and the mask of the patches that hold
``threshold`` (60%) of that head's attention mass; plus the mean over heads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .errors import CheckpointError, ConfigError, DataError
from .eval_config import AttentionConfig
from .models import is_vit

__all__ = ["attention_command", "cls_attention"]


@torch.no_grad()
def cls_attention(backbone, x: torch.Tensor) -> torch.Tensor:
    """``[B, heads, h, w]``: the last block's attention of the CLS token to every patch token.

    The weights the block itself computes: its attention runs unfused for this call (timm's explicit
    ``softmax(q k^T * scale)`` path, whatever comes before it: RoPE on the patches, q/k norms, biases) and
    a hook on its ``attn_drop`` catches them. The patch tokens follow the prefix (the CLS token and any
    storage / register tokens: ``num_prefix_tokens``).
    """
    if not hasattr(backbone, "blocks"):
        raise ValueError("attention maps need a ViT backbone (a timm VisionTransformer)")
    attn = backbone.blocks[-1].attn
    if not (hasattr(attn, "fused_attn") and isinstance(getattr(attn, "attn_drop", None), torch.nn.Module)):
        raise ValueError(f"attention maps: the last block's {type(attn).__name__} has no unfused attention path "
                         "(fused_attn / attn_drop) to read the weights from")
    caught: list[torch.Tensor] = []
    hook = attn.attn_drop.register_forward_hook(lambda mod, inp, out: caught.append(inp[0]))
    fused = attn.fused_attn
    was_training = backbone.training
    attn.fused_attn = False
    backbone.eval()  # no dropout, no drop path
    try:
        backbone(x)
    finally:
        hook.remove()
        attn.fused_attn = fused
        backbone.train(was_training)
    if len(caught) != 1:
        raise ValueError(f"attention maps: the last block's attention ran {len(caught)} times in one forward")
    weights = caught[0][:, :, 0]  # [B, heads, N]: the CLS token's row
    prefix = getattr(backbone, "num_prefix_tokens", 1)
    patch = backbone.patch_embed.patch_size
    h, w = x.shape[-2] // patch[0], x.shape[-1] // patch[1]
    return weights[:, :, prefix:].reshape(x.shape[0], -1, h, w)


def threshold_masks(maps: torch.Tensor, threshold: float) -> torch.Tensor:
    """Per head, the patches of highest attention that together hold ``threshold`` of its mass."""
    flat = maps.flatten(-2)
    flat = flat / flat.sum(-1, keepdim=True)
    values, order = flat.sort(dim=-1)
    keep_sorted = values.cumsum(-1) > (1 - threshold)
    keep = torch.zeros_like(keep_sorted).scatter_(-1, order, keep_sorted)
    return keep.view_as(maps)


def _png(t: torch.Tensor, path: Path) -> None:
    from torchvision.io import write_png

    t = t.float()
    t = (t - t.min()) / (t.max() - t.min() + 1e-12) if t.dtype.is_floating_point else t
    img = (t * 255).round().clamp(0, 255).to(torch.uint8)
    write_png(img.unsqueeze(0) if img.dim() == 2 else img, str(path))


def attention_command(cfg: AttentionConfig) -> list[Path]:
    from ..augment import IMAGENET_MEAN, IMAGENET_STD
    from ..ops import resized_crops
    from .evaluate import model_from_checkpoint

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.image.startswith("digits:"):
        from .data import load_digits_split

        digits = load_digits_split()[2]
        index = int(cfg.image.removeprefix("digits:"))
        if index >= len(digits):
            raise ConfigError(f"--image digits:N: N must be below the {len(digits)} test digits, got {index}")
        image = digits[index]
    else:
        from .data import _decode_file

        path = Path(cfg.image)
        if not path.is_file():
            raise DataError(f"--image {str(path)!r}: no such image file")
        try:
            image = _decode_file(str(path))
        except Exception as e:  # noqa: BLE001 - any undecodable file: one message, not a traceback
            raise DataError(f"--image {str(path)!r} cannot be read as an image: {type(e).__name__}: {e}") from e
    model, train_cfg = model_from_checkpoint(cfg, device)
    backbone: Any = model.backbone  # a timm ViT: its attributes are timm's
    if not is_vit(backbone):
        raise CheckpointError(f"{cfg.checkpoint}: attention maps need a ViT backbone, not --arch {train_cfg.arch}")
    patch = int(backbone.patch_embed.patch_size[0])
    size = cfg.image_size or train_cfg.global_crop_size
    size -= size % patch
    box = torch.tensor([[0, 0, 0, image.shape[1], image.shape[2]]], dtype=torch.float32)
    x = resized_crops(image.to(device), box, size, interpolation="bicubic", mean=IMAGENET_MEAN, std=IMAGENET_STD)
    maps = cls_attention(backbone, x)[0].float().cpu()  # [heads, h, w]
    masks = threshold_masks(maps, cfg.threshold)
    up = lambda t: F.interpolate(t[None].float(), scale_factor=patch, mode="nearest")[0]  # noqa: E731
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "image.png"]
    _png(resized_crops(image, box.cpu(), size, interpolation="bicubic", out_dtype=torch.uint8).squeeze(0).float() / 255,
         written[0])
    for h in range(maps.shape[0]):
        for name, t in ((f"attn-head{h}.png", maps[h]), (f"mask-head{h}.png", masks[h].float())):
            written.append(out / name)
            _png(up(t[None])[0], written[-1])
    written.append(out / "attn-mean.png")
    _png(up(maps.mean(0)[None])[0], written[-1])
    print(f"{len(written)} PNGs in {out}: the image, each of the {maps.shape[0]} heads' CLS attention and its "
          f"{cfg.threshold:.0%} mask, and their mean", flush=True)
    return written
