"""The networks of the trainer: a timm backbone, the DINO head, and the multi-crop wrapper.

The module names follow the DINO authors' ``main_dino.py`` (``backbone.*``, ``head.mlp.*``,
``head.last_layer.weight_g`` / ``weight_v``) and timm's ViT uses the same block names as
their ``vision_transformer.py``, so their released ``student`` / ``teacher`` state dicts load.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ARCH_ALIASES", "DinoHead", "MultiCropModel", "PawsModel", "add_mask_token", "build_backbone",
           "features_with_masks", "is_vit", "is_vit_name", "uniform_drop_path_", "unknown_arch_message"]

# Small networks that timm does not name: (timm architecture, overrides). "vit_digits" is the
# ViT of `make demo`: 4x4 patches, so a 16x16 global crop is 4x4 tokens and an 8x8 local crop 2x2.
ARCH_ALIASES = {
    "vit_digits": ("vit_tiny_patch16_224", dict(img_size=16, patch_size=4, embed_dim=96, depth=4, num_heads=3)),
    "vit_pico": ("vit_tiny_patch16_224", dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2)),
}


def is_vit(backbone: nn.Module) -> bool:
    return hasattr(backbone, "blocks") and hasattr(backbone, "patch_embed")


def is_vit_name(arch: str) -> bool:
    """Whether ``arch`` names a ViT (which --img-size and --patch-size shape)."""
    return ARCH_ALIASES.get(arch, (arch, {}))[0].startswith(("vit_", "deit_"))


def unknown_arch_message(arch: str) -> str | None:
    """None when ``arch`` is a timm model or an alias, else what to say (with timm's close names)."""
    import timm

    name = ARCH_ALIASES.get(arch, (arch, {}))[0]
    if timm.is_model(name):
        return None
    close = timm.list_models(f"{arch.split('_')[0]}*")[:6] if arch else []
    return (f"must be a timm model name or one of {', '.join(sorted(ARCH_ALIASES))}"
            + (f" (timm has e.g. {', '.join(close)})" if close else ""))


def build_backbone(arch: str, *, drop_path_rate: float = 0.0, img_size: int | None = None,
                   patch_size: int | None = None, **timm_kwargs) -> nn.Module:
    """A timm backbone by name, without classifier (``forward`` returns ``[B, num_features]``).

    ViTs are built with ``dynamic_img_size=True`` (global and local crops share the position
    embeddings, interpolated) and return the CLS token. ``timm_kwargs`` go to ``timm.create_model``.
    No pretrained weights are fetched.
    """
    try:
        import timm
    except ImportError as e:  # pragma: no cover - timm is a dependency of the train extra
        raise ImportError("fastssl.train needs timm: pip install 'fastssl[train]'") from e
    name, aliased = ARCH_ALIASES.get(arch, (arch, {}))
    kwargs: dict = dict(aliased)
    problem = unknown_arch_message(arch)
    if problem is not None:
        raise ValueError(f"architecture {arch!r}: {problem}")
    if is_vit_name(arch):
        kwargs.update(dynamic_img_size=True, global_pool="token")
        if img_size is not None:
            kwargs["img_size"] = img_size
        if patch_size is not None:
            kwargs["patch_size"] = patch_size
    elif img_size is not None or patch_size is not None:
        raise ValueError(f"--img-size / --patch-size apply to ViTs only, not to {arch!r}")
    model = timm.create_model(name, pretrained=False, num_classes=0, drop_path_rate=drop_path_rate, **kwargs,
                              **timm_kwargs)
    # What timm.create_model needs to build this network again (for `fastssl-train export`); drop path only
    # regularises training.
    model.__dict__["fastssl_timm_args"] = {"model_name": name, "num_classes": 0, **kwargs, **timm_kwargs}
    return model


def uniform_drop_path_(backbone: nn.Module, rate: float) -> None:
    """Every block of a timm ViT drops its residual branches with probability ``rate`` (the DINOv2 / DINOv3
    authors' uniform stochastic depth; timm's rule rises linearly from 0 over the blocks). timm's
    ``DropPath`` drops each sample with that probability; the authors' drop a fixed share of the batch."""
    from timm.layers import DropPath

    for block in getattr(backbone, "blocks", ()):
        for name in ("drop_path1", "drop_path2"):
            if hasattr(block, name):
                setattr(block, name, DropPath(rate) if rate > 0 else nn.Identity())


def add_mask_token(backbone: nn.Module) -> nn.Parameter:
    """Give a timm ViT a learned mask token ``backbone.mask_token`` ``[1, embed_dim]`` (zeros, as the DINOv2 /
    DINOv3 authors'), which :func:`features_with_masks` puts in place of the masked patch embeddings, before the
    position embedding and the prefix tokens: their ``prepare_tokens_with_masks``, by a forward hook on
    ``patch_embed`` (timm's model code is not copied; its forward is unchanged without masks)."""
    if not is_vit(backbone):
        raise ValueError("a mask token needs a ViT backbone (with patch_embed and blocks)")
    token = nn.Parameter(torch.zeros(1, cast(int, backbone.embed_dim)))
    backbone.register_parameter("mask_token", token)
    cast(nn.Module, backbone.patch_embed).register_forward_hook(_put_mask_token)
    return token


def _put_mask_token(patch_embed: nn.Module, args, out: torch.Tensor) -> torch.Tensor | None:
    """The hook of :func:`add_mask_token`: what :func:`features_with_masks` lent the call, else nothing."""
    lent = patch_embed.__dict__.get("_fastssl_masks")
    if lent is None:
        return None
    masks, token = lent
    if out.dim() == 4:  # NHWC (dynamic_img_size)
        grid = out.shape[1] * out.shape[2]
        masks = masks.view(out.shape[0], out.shape[1], out.shape[2], 1) if masks.shape == (out.shape[0], grid) \
            else None
    else:  # [B, N, C]
        grid = out.shape[1]
        masks = masks.unsqueeze(-1) if masks.shape == (out.shape[0], grid) else None
    if masks is None:
        raise ValueError(f"masks {tuple(lent[0].shape)} must be [crops, patches] = [{out.shape[0]}, {grid}]")
    return torch.where(masks, token.to(out.dtype), out)


def features_with_masks(backbone: nn.Module, x: torch.Tensor, masks: torch.Tensor | None) -> torch.Tensor:
    """``backbone.forward_features(x)`` (``[B, tokens, D]``, normalised) with the patches where ``masks``
    (``[B, patches]`` bool) is set replaced by the mask token of :func:`add_mask_token` at the embedding."""
    vit: Any = backbone  # a timm ViT: its attributes are timm's
    if masks is None:
        return vit.forward_features(x)
    pe = vit.patch_embed
    pe.__dict__["_fastssl_masks"] = (masks, vit.mask_token)
    try:
        return vit.forward_features(x)
    finally:
        pe.__dict__.pop("_fastssl_masks", None)


def _trunc_normal_init(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class WeightNormLinear(nn.Module):
    """``y = x @ (g * v / ||v||).T`` with one norm per output row, no bias.

    The parameters are named as ``torch.nn.utils.weight_norm`` names them (``weight_g``
    ``[out, 1]``, ``weight_v`` ``[out, in]``), as in the authors' checkpoints, without the
    deprecated hook (plain code, which ``torch.compile`` traces).
    """

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        v = torch.empty(out_features, in_features)
        nn.init.kaiming_uniform_(v, a=math.sqrt(5))  # nn.Linear's initialisation
        self.weight_v = nn.Parameter(v)
        self.weight_g = nn.Parameter(torch.ones(out_features, 1))  # the authors fill g with 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight_v * (self.weight_g / self.weight_v.norm(dim=1, keepdim=True))
        return F.linear(x, w)

    def extra_repr(self) -> str:
        return f"in_features={self.weight_v.shape[1]}, out_features={self.weight_v.shape[0]}"


class DinoHead(nn.Module):
    """The DINO projection head: an MLP to a bottleneck, L2 normalisation, a weight-normalised
    linear layer to ``out_dim`` logits.

    With ``norm_last_layer`` the norms ``g`` of the last layer stay 1 (not trained), which the
    authors found makes training more stable (ViT-S: True; ViT-B: False for better results).
    ``weight_norm=False`` makes the last layer a plain ``Linear`` without bias, initialised as the
    MLP: the DINOv2 / DINOv3 authors' ``DINOHead`` (whose MLP is the same).
    """

    def __init__(self, in_dim: int, out_dim: int, *, use_bn: bool = False, norm_last_layer: bool = True,
                 nlayers: int = 3, hidden_dim: int = 2048, bottleneck_dim: int = 256, weight_norm: bool = True):
        super().__init__()
        if nlayers < 1:
            raise ValueError(f"DinoHead: nlayers must be >= 1, got {nlayers}")
        self.mlp: nn.Module
        if nlayers == 1:
            self.mlp = nn.Linear(in_dim, bottleneck_dim)
        else:
            layers: list[nn.Module] = [nn.Linear(in_dim, hidden_dim)]
            for _ in range(nlayers - 2):
                layers += [nn.BatchNorm1d(hidden_dim)] if use_bn else []
                layers += [nn.GELU(), nn.Linear(hidden_dim, hidden_dim)]
            layers += [nn.BatchNorm1d(hidden_dim)] if use_bn else []
            layers += [nn.GELU(), nn.Linear(hidden_dim, bottleneck_dim)]
            self.mlp = nn.Sequential(*layers)
        self.apply(_trunc_normal_init)
        self.last_layer: nn.Module
        if weight_norm:
            self.last_layer = WeightNormLinear(bottleneck_dim, out_dim)
            self.last_layer.weight_g.requires_grad_(not norm_last_layer)
        else:
            self.last_layer = nn.Linear(bottleneck_dim, out_dim, bias=False)
            _trunc_normal_init(self.last_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.mlp(x)
        x = F.normalize(x, dim=-1, p=2, eps=1e-6 if x.dtype == torch.float16 else 1e-12)
        return self.last_layer(x)


class MultiCropModel(nn.Module):
    """``backbone`` then ``head``: one backbone call per crop resolution, one head call for all.

    ``forward(globals, locals)`` takes crop-major batches (all crops of one size stacked:
    ``[2B, C, S, S]``, ``[n_local * B, C, s, s]``) and returns the head's output for every
    crop, in the same order.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, *crops: torch.Tensor) -> torch.Tensor:
        feats = [self.backbone(x) for x in crops if x is not None and x.shape[0] > 0]
        return self.head(torch.cat(feats) if len(feats) > 1 else feats[0])


class PawsModel(nn.Module):
    """PAWS's encoder: ``backbone``, a projection head ``fc`` and an optional prediction head ``pred``.

    As the PAWS authors' ``init_model`` (suncet ``paws_train.py``), with their module names so that
    their checkpoints map onto it: ``fc`` is ``fc1`` Linear(F, H) - ``bn1`` - ReLU - ``fc2``
    Linear(H, H) - ``bn2`` - ReLU - ``fc3`` Linear(H, out) with ``H`` the backbone's width by default;
    ``pred`` is ``bn1`` - ``fc1`` Linear(out, out / 4) - ``bn2`` - ReLU - ``fc2`` Linear(out / 4, out).

    ``forward(*crops)`` takes batches of crops of one resolution each (``[n_i, C, S_i, S_i]``) and, as
    the authors' multi-resolution forward, runs backbone and heads once per batch (so the heads'
    BatchNorms normalise each resolution with its own statistics); it returns ``(h, z)`` of all crops
    in order: the projections and the predictions (``z is h`` without a prediction head).
    :meth:`embed` is ``z`` alone, what the authors' soft-NN evaluation scores.
    """

    def __init__(self, backbone: nn.Module, output_dim: int = 2048, hidden_dim: int | None = None,
                 use_pred_head: bool = True):
        super().__init__()
        width = cast(int, backbone.num_features)  # timm's feature width
        hidden = hidden_dim or width
        self.backbone = backbone
        self.fc = nn.Sequential(OrderedDict([
            ("fc1", nn.Linear(width, hidden)), ("bn1", nn.BatchNorm1d(hidden)), ("relu1", nn.ReLU(inplace=True)),
            ("fc2", nn.Linear(hidden, hidden)), ("bn2", nn.BatchNorm1d(hidden)), ("relu2", nn.ReLU(inplace=True)),
            ("fc3", nn.Linear(hidden, output_dim))]))
        self.pred: nn.Module | None = None
        if use_pred_head:
            narrow = max(output_dim // 4, 1)  # the authors' 4x bottleneck
            self.pred = nn.Sequential(OrderedDict([
                ("bn1", nn.BatchNorm1d(output_dim)), ("fc1", nn.Linear(output_dim, narrow)),
                ("bn2", nn.BatchNorm1d(narrow)), ("relu", nn.ReLU(inplace=True)),
                ("fc2", nn.Linear(narrow, output_dim))]))

    def _one(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.fc(self.backbone(x))
        return h, (self.pred(h) if self.pred is not None else h)

    def forward(self, *crops: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        outs = [self._one(x) for x in crops if x is not None and x.shape[0] > 0]
        if len(outs) == 1:
            return outs[0]
        return torch.cat([h for h, _ in outs]), torch.cat([z for _, z in outs])

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self._one(x)[1]
