"""``fastssl-train dinov3``: the loss weighting against a float64 transcription of the authors' compute_losses;
the block masks against the authors' generator and collate; the mask token exactly where masked; the
authors' parameter groups and schedules; attention maps of RoPE models with storage tokens; steps that learn,
bitwise resume in one process and under torchrun (gloo, 2 processes), SIGTERM, corrupt images; every option's
bad value refused by name."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import signal
from typing import Literal

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import assert_rel_close, torchrun
from test_train import write_folder

from fastssl.reference import dinov2 as ref
from fastssl.train import checkpoint as ckpt
from fastssl.train.attention import cls_attention
from fastssl.train.cli import main, parse_args, preset_values
from fastssl.train.dinov3 import (
    Dinov3Loss,
    build_dinov3_augment,
    build_dinov3_model,
    dinov3_param_groups,
    train_dinov3,
)
from fastssl.train.dinov3_config import Dinov3Config
from fastssl.train.errors import ConfigError
from fastssl.train.masking import MaskingGenerator, block_masks, max_num_patches
from fastssl.train.methods import METHODS
from fastssl.train.models import ARCH_ALIASES, build_backbone, features_with_masks

TINY = ["--arch", "vit_pico", "--img-size", "16", "--global-crop-size", "16", "--local-crop-size", "8",
        "--local-crops-number", "2", "--dino-out-dim", "64", "--dino-head-hidden-dim", "64",
        "--dino-head-bottleneck-dim", "32", "--ibot-out-dim", "48", "--ibot-head-hidden-dim", "64",
        "--ibot-head-bottleneck-dim", "32", "--batch-size-per-gpu", "8", "--epochs", "2",
        "--official-epoch-length", "0", "--warmup-epochs", "0", "--warmup-teacher-temp-epochs", "1",
        "--lr", "0.01", "--num-workers", "0", "--progress", "false", "--log-freq", "1", "--saveckp-freq", "0",
        "--device", "cpu", "--momentum-teacher", "0.9", "--blur-sigma", "0.1", "0.5", "--blur-kernel-size", "3"]


@pytest.fixture
def folder(tmp_path):
    return write_folder(tmp_path / "data")  # 24 images: 3 iterations of 8 per data pass


@pytest.fixture
def pico_dinov3(monkeypatch):
    """A DINOv3 ViT of vit_pico's size (timm's Eva: RoPE, 4 storage tokens, layer scale, qkv bias) by name, and
    a DINOv2 one with registers (timm's VisionTransformer: 4 register tokens, position embeddings for the
    patches only, layer scale)."""
    monkeypatch.setitem(ARCH_ALIASES, "vit_pico_dinov3", (
        "vit_small_patch16_dinov3_qkvb", dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2)))
    monkeypatch.setitem(ARCH_ALIASES, "vit_pico_reg4", (
        "vit_small_patch14_reg4_dinov2", dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2)))
    return "vit_pico_dinov3"


def cfg_for(data, out, *extra) -> Dinov3Config:
    cfg = parse_args(["dinov3", "--data", str(data), "--output-dir", str(out), *TINY, *extra])
    assert isinstance(cfg, Dinov3Config)
    return cfg


def read_log(out) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------- the authors' definitions

class AuthorsMaskingGenerator:
    """dinov3/data/masking.py's MaskingGenerator as written: Python's and numpy's global generators."""

    def __init__(self, input_size, num_masking_patches=None, min_num_patches=4, max_num_patches=None,
                 min_aspect=0.3, max_aspect=None):
        self.height, self.width = input_size
        self.min_num_patches = min_num_patches
        self.max_num_patches = num_masking_patches if max_num_patches is None else max_num_patches
        max_aspect = max_aspect or 1 / min_aspect
        self.log_aspect_ratio = (math.log(min_aspect), math.log(max_aspect))

    def _mask(self, mask, max_mask_patches):
        delta = 0
        for _ in range(10):
            target_area = random.uniform(self.min_num_patches, max_mask_patches)
            aspect_ratio = math.exp(random.uniform(*self.log_aspect_ratio))
            h = int(round(math.sqrt(target_area * aspect_ratio)))
            w = int(round(math.sqrt(target_area / aspect_ratio)))
            if w < self.width and h < self.height:
                top = random.randint(0, self.height - h)
                left = random.randint(0, self.width - w)
                num_masked = mask[top: top + h, left: left + w].sum()
                if 0 < h * w - num_masked <= max_mask_patches:
                    for i in range(top, top + h):
                        for j in range(left, left + w):
                            if mask[i, j] == 0:
                                mask[i, j] = 1
                                delta += 1
                if delta > 0:
                    break
        return delta

    def __call__(self, num_masking_patches=0):
        mask = np.zeros(shape=(self.height, self.width), dtype=bool)
        mask_count = 0
        while mask_count < num_masking_patches:
            max_mask_patches = min(num_masking_patches - mask_count, self.max_num_patches)
            delta = self._mask(mask, max_mask_patches)
            if delta == 0:
                break
            mask_count += delta
        m2 = mask.flatten()
        to_add = np.random.choice(np.where(~m2)[0], size=num_masking_patches - m2.sum(), replace=False)
        m2[to_add] = True
        return m2.reshape(mask.shape)


def authors_collate_masks(B, N, mask_ratio_tuple, mask_probability, mask_generator, random_circular_shift):
    """The mask part of dinov3/data/collate.py's collate_data_and_cast, as written."""
    n_samples_masked = int(B * mask_probability)
    probs = torch.linspace(*mask_ratio_tuple, n_samples_masked + 1)
    upperbound = 0
    masks_list = []
    for i in range(0, n_samples_masked):
        prob_max = probs[i + 1]
        mask = torch.BoolTensor(mask_generator(int(N * prob_max)))
        if random_circular_shift:
            shift_x, shift_y = (random.randint(0, mask.shape[0] - 1), random.randint(0, mask.shape[1] - 1))
            mask = torch.roll(mask, (shift_x, shift_y), (0, 1))
        masks_list.append(mask)
        upperbound += int(N * prob_max)
    for _ in range(n_samples_masked, B):
        masks_list.append(torch.BoolTensor(mask_generator(0)))
    random.shuffle(masks_list)
    collated_masks = torch.stack(masks_list).flatten(1)
    mask_indices_list = collated_masks.flatten().nonzero().flatten()
    masks_weight = (1 / collated_masks.sum(-1).clamp(min=1.0)).unsqueeze(-1).expand_as(collated_masks)[collated_masks]
    return collated_masks, mask_indices_list, masks_weight, upperbound


def authors_koleo(x, eps=1e-8):
    """dinov3/loss/koleo_loss.py's KoLeoLoss.forward."""
    x = F.normalize(x, eps=eps, p=2, dim=-1)
    dots = torch.mm(x, x.t())
    n = x.shape[0]
    dots.view(-1)[:: (n + 1)].fill_(-1)
    _, indices = torch.max(dots, dim=1)
    distances = torch.nn.PairwiseDistance(2, eps=1e-8)(x, x[indices])
    return -torch.log(distances + eps).mean()


def authors_compute_losses(s_global, s_local, s_masked, g_cls, t_cls, t_masked, masks, masks_weight, temp, *,
                           ignore_diagonal, dino_w, koleo_w, ibot_w, centering, dino_center, ibot_center,
                           student_temp=0.1):
    """get_teacher_output's targets and SSLMetaArch.compute_losses, in the inputs' dtype (float64)."""
    n_g, B = s_global.shape[:2]
    if centering == "sinkhorn_knopp":
        cls_centered = ref.sinkhorn_knopp(t_cls.clone(), temp)
        masked_centered = ref.sinkhorn_knopp(t_masked.clone(), temp)
    else:  # DINOv2's softmax_center_teacher
        cls_centered = ref.softmax_center(t_cls, dino_center, temp)
        masked_centered = ref.softmax_center(t_masked, ibot_center, temp)
    cls_centered = cls_centered.unflatten(0, (n_g, B))
    n_l = s_local.shape[0]
    global_terms = n_g * (n_g - 1) if ignore_diagonal else n_g ** 2
    local_terms = n_g * n_l
    dino_local = ref.cross_entropy_over_pairs(s_local, cls_centered, student_temp)
    dino_global = ref.cross_entropy_over_pairs(s_global, cls_centered, student_temp, ignore_diagonal=ignore_diagonal)
    koleo = sum(authors_koleo(x) for x in g_cls) / n_g
    ibot = ref.ibot_loss_masked(s_masked, masked_centered, masks, student_temp, n_masked_patches=s_masked.shape[0],
                                masks_weight=masks_weight)
    total = (dino_w * local_terms / (global_terms + local_terms) * dino_local
             + dino_w * global_terms / (global_terms + local_terms) * dino_global + koleo_w * n_g * koleo
             + ibot_w * ibot)
    return total, {"dino_local_crops_loss": dino_local, "dino_global_crops_loss": dino_global, "koleo_loss": koleo,
                   "ibot_loss": ibot}


# ----------------------------------------------------------------------------- the objective

@pytest.mark.parametrize("centering", ["sinkhorn_knopp", "softmax"])
@pytest.mark.parametrize("ignore_diagonal", [True, False])
def test_loss_weighting_is_the_authors_compute_losses(backend, centering, ignore_diagonal):
    B, n_local, K, Kp, D, grid = 5, 3, 37, 29, 12, 6
    w = dict(dino_w=float(torch.rand(1)) + 0.5, koleo_w=float(torch.rand(1)) * 0.3, ibot_w=float(torch.rand(1)) + 0.5)
    cfg = Dinov3Config(data="x", dino_out_dim=K, ibot_out_dim=Kp, centering=centering,
                       global_ignore_diagonal=ignore_diagonal, dino_loss_weight=w["dino_w"],
                       koleo_loss_weight=w["koleo_w"], ibot_loss_weight=w["ibot_w"])
    losses = Dinov3Loss(cfg)
    losses.dino_loss.backend = losses.ibot_patch_loss.backend = losses.koleo_loss.backend = backend
    seed = int(torch.randint(0, 2**31, (1,)))
    masks = block_masks(2 * B, MaskingGenerator((grid, grid), max_num_patches=max_num_patches(grid, 1)), (0.1, 0.5),
                        0.5, random.Random(seed), np.random.RandomState(seed))
    n = masks.n_masked
    s_global, s_local = 3 * torch.randn(2, B, K), 3 * torch.randn(n_local, B, K)
    s_masked, g_cls = 3 * torch.randn(n, Kp), torch.randn(2, B, D)
    t_cls, t_masked = torch.randn(2 * B, K), torch.randn(n, Kp)
    temp = 0.04 + 0.03 * float(torch.rand(1))
    dino_center, ibot_center = 0.3 * torch.randn(1, K), 0.3 * torch.randn(1, 1, Kp)
    if centering == "softmax":  # a center that is not zero: the targets must use it
        losses.dino_loss.center, losses.ibot_patch_loss.center = dino_center.clone(), ibot_center.clone()

    leaves = [t.clone().requires_grad_() for t in (s_global, s_local, s_masked, g_cls)]
    targets = losses.teacher_targets(t_cls, t_masked, temp)
    total, parts = losses(*leaves, *targets, masks)
    total.backward()

    want_leaves = [t.double().requires_grad_() for t in (s_global, s_local, s_masked, g_cls)]
    want, want_parts = authors_compute_losses(
        *want_leaves, t_cls.double(), t_masked.double(), masks.masks, masks.weights.double(), temp,
        ignore_diagonal=ignore_diagonal, centering=centering, dino_center=dino_center.double(),
        ibot_center=ibot_center.double().view(1, Kp), **w)
    want.backward()
    assert total.dtype == torch.float32
    assert float(total.detach()) == pytest.approx(float(want.detach()), rel=2e-6)
    for name, value in parts.items():
        assert float(value.detach()) == pytest.approx(float(want_parts[name].detach()), rel=2e-6, abs=1e-7), name
    for what, got, ref_leaf in zip(("global", "local", "masked", "cls"), leaves, want_leaves, strict=True):
        assert_rel_close(got.grad, ref_leaf.grad, 1e-5, f"gradient of the student's {what} outputs")
    if centering == "softmax":  # this batch's center update is queued as the authors' update_center
        losses.dino_loss.apply_center_update()
        torch.testing.assert_close(losses.dino_loss.center, 0.9 * dino_center + 0.1 * t_cls.mean(0, keepdim=True))


# ----------------------------------------------------------------------------- the block masks

@pytest.mark.parametrize("grid,crop_size,patch", [((14, 14), 224, 16), ((16, 16), 256, 16), ((4, 4), 16, 4),
                                                  ((7, 7), 112, 16)])
def test_masking_generator_is_the_authors_for_the_same_generator_states(grid, crop_size, patch):
    most = max_num_patches(crop_size, patch)
    assert most == 0.5 * crop_size // patch * crop_size // patch  # the authors' expression, left to right
    ours = MaskingGenerator(grid, max_num_patches=most)
    theirs = AuthorsMaskingGenerator(grid, max_num_patches=most)
    seed = int(torch.randint(0, 2**31, (1,)))
    rng, np_rng = random.Random(seed), np.random.RandomState(seed)
    random.seed(seed)
    np.random.seed(seed)
    N = grid[0] * grid[1]
    counts = []
    for _ in range(60):
        k = int(torch.randint(0, N // 2 + 1, (1,)))
        got, want = ours(k, rng, np_rng), theirs(k)
        assert got.dtype == bool and got.shape == grid and int(got.sum()) == k  # exactly k patches
        np.testing.assert_array_equal(got, want)
        counts.append(k)
    assert max(counts) > 0


@pytest.mark.parametrize("shift", [False, True])
def test_block_masks_are_the_authors_collate(shift):
    grid, B = (8, 8), 11
    N = grid[0] * grid[1]
    seed = int(torch.randint(0, 2**31, (1,)))
    gen = MaskingGenerator(grid, max_num_patches=0.5 * N)
    got = block_masks(B, gen, (0.1, 0.5), 0.5, random.Random(seed), np.random.RandomState(seed),
                      random_circular_shift=shift)
    random.seed(seed)
    np.random.seed(seed)
    masks, indices, weights, upperbound = authors_collate_masks(
        B, N, (0.1, 0.5), 0.5, AuthorsMaskingGenerator(grid, max_num_patches=0.5 * N), shift)
    assert torch.equal(got.masks, masks) and torch.equal(got.indices, indices)
    assert torch.equal(got.weights, weights.float()) and got.upperbound == upperbound
    # The statistics of the definition: int(B * p) masked crops, with int(N * r_{i+1}) patches each for
    # r = linspace(0.1, 0.5, masked + 1), the others empty; each masked crop's weights sum to 1.
    sizes = sorted(got.masks.sum(1).tolist())
    masked = int(B * 0.5)
    want_sizes = sorted([0] * (B - masked) + [int(N * r) for r in torch.linspace(0.1, 0.5, masked + 1)[1:]])
    assert sizes == want_sizes and got.n_masked == sum(want_sizes) == upperbound
    per_crop = torch.zeros(B).index_add_(0, got.indices // N, got.weights)
    assert torch.allclose(per_crop[got.masks.any(1)], torch.ones(masked))


def test_masking_generator_statistics():
    """Across draws: the block phase places most patches (a block mask, not salt and pepper), and blocks placed
    uniformly by their top-left corner cover the centre more often than the corners, as the definition does."""
    grid, k, draws = (14, 14), 60, 400
    gen = MaskingGenerator(grid, max_num_patches=98)
    seed = int(torch.randint(0, 2**31, (1,)))
    rng, np_rng = random.Random(seed), np.random.RandomState(seed)
    freq = np.zeros(grid)
    isolated = 0
    for _ in range(draws):
        m = gen(k, rng, np_rng)
        freq += m
        padded = np.pad(m, 1)
        neighbours = padded[:-2, 1:-1] | padded[2:, 1:-1] | padded[1:-1, :-2] | padded[1:-1, 2:]
        isolated += int((m & ~neighbours).sum())
    assert isolated / (draws * k) < 0.1  # patches without a masked neighbour: the random completion only
    freq /= draws
    assert freq.mean() == pytest.approx(k / 196)
    corners = freq[[0, 0, -1, -1], [0, -1, 0, -1]].mean()
    assert corners < freq[5:9, 5:9].mean() / 2


# ----------------------------------------------------------------------------- the networks

@pytest.mark.parametrize("arch", ["vit_pico", "vit_pico_dinov3", "vit_pico_reg4"])
def test_mask_token_replaces_exactly_the_masked_patch_embeddings(arch, pico_dinov3):
    cfg = Dinov3Config(data="x", arch=arch, img_size=None if arch == "vit_pico_dinov3" else 16, patch_size=4,
                       dino_out_dim=8, ibot_out_dim=8, dino_head_hidden_dim=8, dino_head_bottleneck_dim=8,
                       ibot_head_hidden_dim=8, ibot_head_bottleneck_dim=8, drop_path_rate=0.0)
    backbone = build_dinov3_model(cfg).backbone.eval()
    assert torch.equal(backbone.mask_token, torch.zeros(1, backbone.embed_dim))  # the authors' zeros
    with torch.no_grad():
        backbone.mask_token.normal_()
    x = torch.randn(3, 3, 16, 16)
    masks = torch.rand(3, 16) < 0.4
    masks[0] = False  # a crop without a masked patch
    caught = []
    hook = backbone.blocks[0].register_forward_pre_hook(lambda mod, args: caught.append(args[0]))
    with torch.no_grad():
        plain = features_with_masks(backbone, x, None)
        masked = features_with_masks(backbone, x, masks)
        none = features_with_masks(backbone, x, torch.zeros_like(masks))
    hook.remove()
    before, after, _ = caught  # the tokens entering the first block: prefix, then patches
    prefix = backbone.num_prefix_tokens
    assert torch.equal(after[:, :prefix], before[:, :prefix])  # CLS and storage tokens untouched
    patches_before, patches_after = before[:, prefix:], after[:, prefix:]
    assert torch.equal(patches_after[~masks], patches_before[~masks])  # unmasked patches untouched
    # Masked: the token in place of the patch embedding, then the position embedding (RoPE models: none).
    pos = backbone.pos_embed[:, -16:].expand(3, -1, -1)[masks] if backbone.pos_embed is not None else 0
    torch.testing.assert_close(patches_after[masks], backbone.mask_token.expand(int(masks.sum()), -1) + pos)
    assert not torch.equal(masked, plain) and torch.equal(none, plain)
    assert torch.equal(backbone(x), plain[:, 0])  # without masks the forward is timm's
    # The gradient reaches the token through the masked patches only.
    backbone.mask_token.grad = None
    features_with_masks(backbone, x, masks).sum().backward()
    assert backbone.mask_token.grad.abs().sum() > 0
    backbone.mask_token.grad = None
    features_with_masks(backbone, x, torch.zeros_like(masks)).sum().backward()
    assert backbone.mask_token.grad is None or not backbone.mask_token.grad.any()
    with pytest.raises(ValueError, match="masks .* must be"):
        features_with_masks(backbone, x, masks[:, :5])


def authors_lr_decay_rate(name, lr_decay_rate, num_layers, force_is_backbone):
    """dinov3/train/param_groups.py's get_vit_lr_decay_rate (chunked_blocks=False), as written."""
    layer_id = num_layers + 1
    if name.startswith("backbone") or force_is_backbone:
        if (".pos_embed" in name or ".patch_embed" in name or ".mask_token" in name or ".cls_token" in name
                or ".storage_tokens" in name):
            layer_id = 0
        elif force_is_backbone and ("pos_embed" in name or "patch_embed" in name or "mask_token" in name
                                    or "cls_token" in name or "storage_tokens" in name):
            layer_id = 0
        elif ".blocks." in name and ".residual." not in name:
            layer_id = int(name[name.find(".blocks."):].split(".")[2]) + 1
        elif "blocks." in name and "residual." not in name:
            layer_id = int(name[name.find("blocks."):].split(".")[1]) + 1
    return lr_decay_rate ** (num_layers + 1 - layer_id)


@pytest.mark.parametrize("arch,head", [("vit_pico", "dinov3"), ("vit_pico_dinov3", "dinov3"),
                                       ("vit_pico_reg4", "dinov2_bn")])
def test_param_groups_are_the_authors(arch, head, pico_dinov3):
    cfg = Dinov3Config(data="x", arch=arch, img_size=None if arch == "vit_pico_dinov3" else 16, patch_size=4,
                       dino_out_dim=8, ibot_out_dim=8, dino_head_hidden_dim=8, dino_head_bottleneck_dim=8,
                       ibot_head_hidden_dim=8, ibot_head_bottleneck_dim=8, head_weight_norm=head == "dinov2_bn",
                       head_use_bn=head == "dinov2_bn")
    model = build_dinov3_model(cfg)
    groups = dinov3_param_groups(model, 0.7, 0.2)
    where = {id(p): g for g in groups for p in g["params"]}
    assert len(where) == sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    for part in ("backbone", "dino_head", "ibot_head"):
        module = getattr(model, part)
        n_blocks = len(module.blocks) if part == "backbone" else 0
        for name, p in module.named_parameters():
            g = where[id(p)]
            # timm names the storage tokens reg_token; the authors' rules name them storage_tokens.
            theirs = name.replace("reg_token", "storage_tokens")
            lr = authors_lr_decay_rate(theirs, 0.7, n_blocks, n_blocks > 0) * (0.2 if "patch_embed" in name else 1.0)
            wd = 0.0 if name.endswith("bias") or "norm" in name or "gamma" in name else 1.0
            assert (g["lr_multiplier"], g["wd_multiplier"], g["is_last_layer"]) == \
                (pytest.approx(lr), wd, "last_layer" in name), f"{part}.{name}"
    last = dict(model.dino_head.named_parameters())
    assert set(n for n in last if "last_layer" in n) == ({"last_layer.weight_g", "last_layer.weight_v"}
                                                         if head == "dinov2_bn" else {"last_layer.weight"})
    names = dict(model.backbone.named_parameters())
    assert where[id(names["blocks.1.attn.qkv.weight"])]["lr_multiplier"] == pytest.approx(0.7)  # 2 blocks
    assert where[id(names["mask_token"])]["lr_multiplier"] == pytest.approx(0.7 ** 3)


def test_uniform_drop_path_and_clipping_per_module(pico_dinov3):
    from timm.layers import DropPath

    from fastssl.train.dinov3 import clip_each_

    cfg = Dinov3Config(data="x", arch=pico_dinov3, patch_size=4, drop_path_rate=0.3, dino_out_dim=8, ibot_out_dim=8,
                       dino_head_hidden_dim=8, dino_head_bottleneck_dim=8, ibot_head_hidden_dim=8,
                       ibot_head_bottleneck_dim=8)
    model = build_dinov3_model(cfg)
    rates = [getattr(b, n).drop_prob for b in model.backbone.blocks for n in ("drop_path1", "drop_path2")]
    assert rates == [0.3] * 4  # every block the same rate (timm's rule would give block 0 none)
    assert all(isinstance(b.drop_path1, DropPath) for b in model.backbone.blocks)
    teacher = build_dinov3_model(cfg, drop_path_rate=0.0)
    assert not any(isinstance(m, DropPath) for m in teacher.modules())
    parts = [model.backbone, model.dino_head, model.ibot_head]
    for scale, part in zip((10.0, 0.001, 5.0), parts, strict=True):
        for p in part.parameters():
            p.grad = torch.randn_like(p) * scale
    before = [torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in m.parameters()])) for m in parts]
    norms = clip_each_(model, 3.0)
    for got, want, part in zip(norms, before, parts, strict=True):
        assert float(got) == pytest.approx(float(want), rel=1e-5)  # each module's own norm
        after = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in part.parameters()]))
        assert float(after) == pytest.approx(min(3.0, float(want)), rel=1e-4)


def test_attention_maps_of_a_rope_model_with_storage_tokens(pico_dinov3):
    """The CLS row of the last block's softmax, with RoPE on the patches and the 4 storage tokens left out:
    the weights that, applied to the block's values, give its attention output."""
    backbone = build_backbone("vit_pico_dinov3").eval()
    assert backbone.num_prefix_tokens == 5
    attn = backbone.blocks[-1].attn
    with torch.no_grad():  # larger q and k than at initialisation: attention far from uniform
        attn.qkv.weight.mul_(10)
    x = torch.randn(2, 3, 16, 16)
    maps = cls_attention(backbone, x)
    assert maps.shape == (2, 2, 4, 4)
    seen = {}
    hooks = [attn.register_forward_pre_hook(lambda mod, args, kwargs: seen.__setitem__("x", args[0]),
                                            with_kwargs=True),
             attn.proj.register_forward_hook(lambda mod, args, out: seen.__setitem__("o", args[0]))]
    with torch.no_grad():
        backbone(x)
    for h in hooks:
        h.remove()
    tokens = seen["x"]
    B, N, C = tokens.shape
    qkv = F.linear(tokens, attn.qkv.weight, torch.cat((attn.q_bias, attn.k_bias, attn.v_bias)))
    v = qkv.reshape(B, N, 3, attn.num_heads, -1)[:, :, 2].transpose(1, 2)  # [B, heads, N, d]
    cls_out = seen["o"][:, 0].reshape(B, attn.num_heads, -1)  # the CLS token's attention output, per head
    # The CLS row over every token: the prefix tokens' weights are those the maps leave out.
    plain = attn.fused_attn
    caught = []
    attn.fused_attn = False
    hook = attn.attn_drop.register_forward_hook(lambda mod, args, out: caught.append(args[0]))
    with torch.no_grad():
        backbone(x)
    hook.remove()
    attn.fused_attn = plain
    row = caught[0][:, :, 0]
    torch.testing.assert_close(maps.flatten(2), row[:, :, 5:])
    torch.testing.assert_close(torch.einsum("bhn,bhnd->bhd", row, v), cls_out, rtol=1e-4, atol=1e-5)
    # Without RoPE (the earlier computation from qkv alone) the maps differ.
    q, k = qkv.reshape(B, N, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)[:2]
    no_rope = ((q[:, :, :1] * attn.scale) @ k.transpose(-2, -1)).softmax(-1)[:, :, 0, 5:]
    assert (no_rope - maps.flatten(2)).abs().max() > 0.1 * maps.max()
    # The CLS row sums to 1 over the CLS token, the 4 storage tokens and the patches: the maps are the patches'.
    torch.testing.assert_close(maps.flatten(2).sum(-1) + row[:, :, :5].sum(-1), torch.ones(2, 2))


# ----------------------------------------------------------------------------- training

def authors_cosine(base, final, total, warmup=0, start_warmup=0.0):
    """dinov3/train/cosine_lr_scheduler.py's CosineScheduler (trunc_extra 0), as a list."""
    warm = np.linspace(start_warmup, base, warmup)
    iters = np.arange(total - warmup)
    return np.concatenate((warm, final + 0.5 * (base - final) * (1 + np.cos(np.pi * iters / len(iters))))).tolist()


def test_steps_schedules_frozen_last_layers_and_the_teacher(folder, tmp_path):
    out = tmp_path / "run"
    cfg = cfg_for(folder, out, "--epochs", "3", "--warmup-epochs", "1", "--freeze-last-layer-epochs", "1",
                  "--stop-after-steps", "5")
    result = train_dinov3(cfg)
    assert result.stopped_early and result.step == 5
    rows = [r for r in read_log(out) if "loss" in r]
    assert [r["step"] for r in rows] == list(range(5))
    assert all(math.isfinite(r[k]) for r in rows for k in ("loss", "dino_local_crops_loss", "dino_global_crops_loss",
                                                            "koleo_loss", "ibot_loss"))
    # The authors' schedules, per iteration: lr scaled by 4 sqrt(8 / 1024), last layers at lr 0 for 1 epoch of
    # 3 iterations, teacher temperature 0.04 -> 0.07 over 1 epoch, momentum 0.9 -> 1 over 9 iterations.
    peak = 0.01 * 4 * math.sqrt(8 / 1024)
    lr = authors_cosine(peak, 1e-6, 9, 3)
    temp = authors_cosine(0.07, 0.07, 3, 3, 0.04) + [0.07] * 6  # their scheduler returns final past its end
    mom = authors_cosine(0.9, 1.0, 9)
    wd = authors_cosine(0.04, 0.4, 9)
    for r in rows:
        s = r["step"]
        assert (r["lr"], r["teacher_temp"], r["momentum"], r["wd"]) == pytest.approx((lr[s], temp[s], mom[s], wd[s]))
        assert r["last_layer_lr"] == (0.0 if s < 3 else pytest.approx(lr[s]))
    # One step from the initialisation: the last layers have not moved (lr 0), the rest has; the teacher is the
    # EMA of the student with the first momentum.
    train_dinov3(cfg_for(folder, tmp_path / "one", "--epochs", "3", "--stop-after-steps", "1"))
    state = ckpt.load_checkpoint(tmp_path / "one" / "checkpoint.pth")
    torch.manual_seed(cfg.seed)
    init = build_dinov3_model(cfg).state_dict()
    for name in ("dino_head.last_layer.weight", "ibot_head.last_layer.weight"):
        assert torch.equal(state["student"][name], init[name])
    assert not torch.equal(state["student"]["backbone.blocks.0.attn.qkv.weight"],
                           init["backbone.blocks.0.attn.qkv.weight"])
    for name, t in state["teacher"].items():
        torch.testing.assert_close(t, 0.9 * init[name] + 0.1 * state["student"][name], rtol=1e-5, atol=1e-7)
    assert set(state["losses"]) == {"dino_loss.center", "ibot_patch_loss.center"}


@pytest.mark.parametrize("stop_at", [2, 5])
def test_resume_is_exact(folder, tmp_path, stop_at):
    """Epochs of 4 iterations over a data pass of 3 (the stream runs across passes); stopped mid-epoch (2) or
    past an epoch end (5), resumed to the end: bitwise the straight run, k-NN rows included."""
    extra = ("--official-epoch-length", "4", "--knn-freq", "1", "--knn-data", str(folder), "--knn-val-data",
             str(folder), "--knn-k", "3")
    straight = train_dinov3(cfg_for(folder, tmp_path / "a", *extra))
    first = train_dinov3(cfg_for(folder, tmp_path / "b", *extra, "--stop-after-steps", str(stop_at)))
    assert first.stopped_early and first.step == stop_at
    second = train_dinov3(cfg_for(folder, tmp_path / "b", *extra))
    assert not second.stopped_early and second.step == straight.step == 8
    a = ckpt.load_checkpoint(tmp_path / "a" / "checkpoint.pth")
    b = ckpt.load_checkpoint(tmp_path / "b" / "checkpoint.pth")
    for key in ("student", "teacher", "losses"):
        for name, t in a[key].items():
            assert torch.equal(t, b[key][name]), f"{key}.{name} differs after resume"
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values(), strict=True):
        assert torch.equal(sa["exp_avg"], sb["exp_avg"]) and torch.equal(sa["exp_avg_sq"], sb["exp_avg_sq"])
    knn = [(r["epoch"], r["knn_top1"]) for r in read_log(tmp_path / "b") if "knn_top1" in r]
    assert knn == [(r["epoch"], r["knn_top1"]) for r in read_log(tmp_path / "a") if "knn_top1" in r]
    assert [e for e, _ in knn] == [1, 2]
    steps = [r["step"] for r in read_log(tmp_path / "b") if "loss" in r]
    assert steps == list(range(8))  # one row per step across the stop


def test_torchrun_resume_is_exact(folder, tmp_path):
    # Each rank draws its own crops, masks and drop-path masks: 2 gloo processes stopped at step 2 and resumed
    # to step 5 (mid-epoch 2) equal a straight run, bit for bit (Sinkhorn-Knopp and KoLeo over both ranks' rows).
    def run(out, stop):
        torchrun("dinov3", "--data", str(folder), "--output-dir", str(out), *TINY, "--batch-size-per-gpu", "4",
                 "--koleo-loss-distributed", "--stop-after-steps", str(stop))
        return ckpt.load_checkpoint(out / "checkpoint.pth")

    straight = run(tmp_path / "a", 5)
    first = run(tmp_path / "b", 2)
    assert isinstance(first["rng"], list) and len(first["rng"]) == 2
    resumed = run(tmp_path / "b", 3)
    assert (straight["epoch"], straight["step"]) == (resumed["epoch"], resumed["step"]) == (1, 2)
    for key in ("student", "teacher", "losses"):
        for name, t in straight[key].items():
            assert torch.equal(t, resumed[key][name]), f"{key}.{name} differs after resume"
    rows = [r for r in read_log(tmp_path / "b") if "loss" in r]
    assert [r["step"] for r in rows] == list(range(5))


def test_sigterm_saves_and_corrupt_images_are_counted(folder, tmp_path):
    (folder / "class0" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    (folder / "class1" / "empty.png").write_bytes(b"")
    cfg = cfg_for(folder, tmp_path / "run", "--epochs", "3")
    real = build_dinov3_augment(cfg)
    calls = []

    def augment(images, generator=None):  # SIGTERM arrives during the 5th step
        calls.append(len(images))
        if len(calls) == 5:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(images, generator=generator)

    with pytest.warns(RuntimeWarning, match="skipping unreadable image"):
        result = train_dinov3(cfg, augment=augment)
    assert result.stopped_early and result.step == 5  # the step finished, then saved
    state = ckpt.load_checkpoint(tmp_path / "run" / "checkpoint.pth")
    assert (state["epoch"], state["step"]) == (1, 2)  # 26 images: 3 iterations per epoch
    rows = read_log(tmp_path / "run")
    epoch0 = [r for r in rows if "epoch_loss" in r]
    last = [r for r in rows if "loss" in r][-1]
    assert [r["epoch"] for r in epoch0] == [0] and last["step"] == 4
    # Every image dropped from a batch is counted: epoch 0's row, and epoch 1's running count. The first 26
    # stream positions hold both unreadable files.
    skipped = sum(8 - n for n in calls)
    assert skipped >= 2 and epoch0[0]["skipped_images"] + last["skipped_images"] == skipped


def test_a_rope_model_with_storage_tokens_trains(folder, tmp_path, pico_dinov3):
    out = tmp_path / "run"
    cfg = cfg_for(folder, out, "--arch", pico_dinov3, "--img-size", "16", "--n-storage-tokens", "2",
                  "--stop-after-steps", "3")
    train_dinov3(cfg)
    state = ckpt.load_checkpoint(out / "checkpoint.pth")
    assert state["student"]["backbone.reg_token"].shape == (1, 2, 32)
    torch.manual_seed(cfg.seed)
    init = build_dinov3_model(cfg).state_dict()
    for name in ("backbone.mask_token", "backbone.reg_token", "backbone.blocks.1.gamma_1"):
        assert not torch.equal(state["student"][name], init[name]), name
    assert all(math.isfinite(r["loss"]) for r in read_log(out) if "loss" in r)


def test_shared_head_softmax_centering_and_bf16(folder, tmp_path):
    out = tmp_path / "run"
    train_dinov3(cfg_for(folder, out, "--ibot-separate-head", "false", "--ibot-out-dim", "64", "--centering",
                         "softmax", "--precision", "bf16", "--stop-after-steps", "3"))
    state = ckpt.load_checkpoint(out / "checkpoint.pth")
    assert not any(k.startswith("ibot_head.") for k in state["student"])
    assert state["losses"]["dino_loss.center"].abs().sum() > 0  # the centers moved
    assert state["losses"]["ibot_patch_loss.center"].abs().sum() > 0
    assert all(math.isfinite(r["loss"]) for r in read_log(out) if "loss" in r)
    with pytest.raises(ckpt.CheckpointError, match="centering: checkpoint 'softmax', now 'sinkhorn_knopp'"):
        train_dinov3(cfg_for(folder, out, "--ibot-separate-head", "false", "--ibot-out-dim", "64", "--precision",
                             "bf16"))


# ----------------------------------------------------------------------------- options

def test_every_option_is_declared_once_with_help_and_round_trips():
    cfg = Dinov3Config(data="x")
    cfg.validate()  # the defaults (the authors') are valid
    flags = [Dinov3Config.flag(f.name) for f in dataclasses.fields(Dinov3Config)]
    assert len(set(flags)) == len(flags)
    assert all(f.metadata["help"] and f.metadata["group"] for f in dataclasses.fields(Dinov3Config))
    plain = json.loads(json.dumps(cfg.to_dict()))
    assert plain["command"] == "dinov3" and Dinov3Config.from_dict(plain) == cfg
    assert METHODS["dinov3"].config is Dinov3Config


def test_presets():
    vitl = parse_args(["dinov3", "--data", "x", "--preset", "dinov3_vitl16_im1k"])
    assert (vitl.arch, vitl.n_storage_tokens, vitl.batch_size_per_gpu, vitl.official_epoch_length, vitl.lr,
            vitl.drop_path_rate, vitl.precision) == ("vit_large_patch16_dinov3_qkvb", 0, 64, 1250, 0.001, 0.3, "bf16")
    for size in ("s", "b"):
        derived = parse_args(["dinov3", "--data", "x", "--preset", f"dinov3_vit{size}16_im1k"])
        # Derived: only the backbone and its stochastic depth differ from the ViT-L recipe.
        assert {k for k, v in preset_values(derived).items() if preset_values(vitl).get(k) != v} == \
            {"arch", "drop_path_rate", "preset"}
    digits = parse_args(["dinov3", "--preset", "dinov3_digits", "--epochs", "17"])
    assert digits.data == "digits" and digits.epochs == 17


def test_the_vitl16_preset_builds_the_authors_model():
    # The ViT-L/16 recipe's model, on the meta device (shapes only, no memory): a ViT-L backbone (24 blocks
    # of 1024, 16 x 16 patches, about 300M parameters, no storage tokens) with the mask token, and the DINO
    # and separate iBOT heads (2048 hidden, 256 bottleneck) onto K = 65,536 prototypes each.
    cfg = parse_args(["dinov3", "--data", "x", "--preset", "dinov3_vitl16_im1k"])
    with torch.device("meta"):
        model = build_dinov3_model(cfg)
    backbone = model.backbone
    assert (backbone.embed_dim, len(backbone.blocks), tuple(backbone.patch_embed.patch_size)) == (1024, 24, (16, 16))
    n_backbone = sum(p.numel() for p in backbone.parameters())
    assert 300e6 < n_backbone < 305e6, n_backbone
    assert tuple(backbone.mask_token.shape) == (1, 1024) and backbone.num_prefix_tokens == 1
    assert cfg.ibot_separate_head and model.ibot_head is not None and model.ibot_head is not model.dino_head
    for head in (model.dino_head, model.ibot_head):
        assert head.mlp[0].in_features == 1024 and head.mlp[0].out_features == 2048
        assert head.mlp[-1].out_features == 256
        assert (head.last_layer.in_features, head.last_layer.out_features) == (256, 65536)
    assert all(p.device.type == "meta" for p in model.parameters())


def test_digits_end_with_a_knn_line_against_random_init(tmp_path, capsys):
    out = tmp_path / "digits"
    result = train_dinov3(parse_args(["dinov3", "--preset", "dinov3_digits", "--output-dir", str(out), "--epochs", "1",
                                      "--warmup-epochs", "0", "--warmup-teacher-temp-epochs", "0",
                                      "--official-epoch-length", "2", "--progress", "false"]))
    said = capsys.readouterr().out
    assert "k-NN top-1 (k=20, T=0.07) on the held-out digits: DINOv3 " in said and "random initialisation" in said
    rows = [r for r in read_log(out) if any(k.startswith("knn_") for k in r)]
    assert [r["epoch"] for r in rows] == [1, 1] and result.knn["top1"] == rows[0]["knn_top1"]
    assert 0 <= rows[1]["knn_random_init_top1"] <= rows[1]["knn_random_init_top5"] <= 100


BAD = [
    (["--lr", "0"], "--lr must be > 0, got 0"),
    (["--arch", "resnet18"], "--arch must be a ViT (the mask token replaces patch embeddings), got resnet18"),
    (["--n-storage-tokens", "2"], "--n-storage-tokens applies to the *_dinov3 archs only, not to --arch vit_pico, "
                                  "got 2"),
    (["--mask-ratio-min-max", "0.5", "0.1"], "--mask-ratio-min-max must be two fractions 0 <= min < max <= 1, got "
                                             "0.5 0.1"),
    (["--mask-sample-probability", "1.5"], "--mask-sample-probability must be in [0, 1], got 1.5"),
    (["--mask-min-aspect", "0"], "--mask-min-aspect must be > 0, got 0"),
    (["--mask-min-num-patches", "0"], "--mask-min-num-patches must be >= 1, got 0"),
    (["--global-blur-p", "0", "2"], "--global-blur-p must be two probabilities in [0, 1], got 0 2"),
    (["--blur-kernel-size", "4"], "--blur-kernel-size must be an odd size, or 0, got 4"),
    (["--local-crops-number", "0"], "--local-crops-number must be >= 1, got 0"),
    (["--layerwise-decay", "0"], "--layerwise-decay must be > 0, got 0"),
    (["--layerwise-decay", "1.5"], "--layerwise-decay must be in [0, 1], got 1.5"),
    (["--patch-embed-lr-mult", "-1"], "--patch-embed-lr-mult must be >= 0, got -1"),
    (["--official-epoch-length", "-1"], "--official-epoch-length must be >= 0, got -1"),
    (["--teacher-temp", "0"], "--teacher-temp must be > 0, got 0"),
    (["--warmup-teacher-temp-epochs", "3"], "--warmup-teacher-temp-epochs must be at most --epochs 2, got 3"),
    (["--freeze-last-layer-epochs", "3"], "--freeze-last-layer-epochs must be at most --epochs 2, got 3"),
    (["--final-momentum-teacher", "2"], "--final-momentum-teacher must be in [0, 1], got 2"),
    (["--koleo-loss-weight", "-0.1"], "--koleo-loss-weight must be >= 0, got -0.1"),
    (["--adamw-beta2", "1"], "--adamw-beta2 must be in [0, 1), got 1"),
    (["--ibot-separate-head", "false"], "--ibot-out-dim must equal --dino-out-dim 64 with a shared head "
                                        "(--ibot-separate-head false), got 48"),
    (["--min-lr", "1"], "--min-lr must be at most the peak learning rate, --lr x 0.353553 (sqrt_wrt_1024, global "
                        "batch 8) = 0.00353553, got 1"),
    (["--knn-freq", "1"], "--knn-freq needs --knn-data and --knn-val-data (or --data digits), got 1"),
    (["--change-world-size"], "--change-world-size is not supported by dinov3 yet"),
    (["--drop-path-rate", "1"], "--drop-path-rate must be in [0, 1), got 1"),
    (["--stop-after-steps", "0"], "--stop-after-steps must be >= 1, got 0"),
    (["--koleo-topk", "2"], "--koleo-topk applies to the distributed KoLeo only (--koleo-loss-distributed), got 2"),
    (["--koleo-loss-distributed", "--koleo-loss-group-size", "0"], "--koleo-loss-group-size must be >= 1, got 0"),
]


@pytest.mark.parametrize("bad,message", BAD, ids=[" ".join(b) for b, _ in BAD])
def test_a_bad_option_is_refused_by_name_before_any_file(tmp_path, monkeypatch, capsys, bad, message):
    data = write_folder(tmp_path / "data")
    argv = ["dinov3", "--data", str(data), "--output-dir", str(tmp_path / "out"), *TINY, *bad]
    monkeypatch.chdir(tmp_path)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"fastssl-train dinov3: error: {message}"), err
    assert "Traceback" not in err and err.count("\n") == 1
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # no file, no folder


CANDIDATES = (-1, 0, 1.5, 2, 4, 1.0, "", (0.9, 0.2), (0.0, 2.0), (-1.0, -1.0), (0, 0), -2)  # -2: --gram-it-load-*


def test_every_option_has_a_bad_value_refused_by_name(tmp_path, monkeypatch, capsys):
    """For every option a value it refuses (found among a few candidates for the checked ones; a word for the
    choices and booleans, which argparse refuses): the command line exits with 2 naming the option, before any
    file."""
    import typing

    from fastssl.train.config import shown, split_optional

    monkeypatch.chdir(tmp_path)
    hints = Dinov3Config.hints()
    tried = []
    for f in dataclasses.fields(Dinov3Config):
        kind, _ = split_optional(hints[f.name])
        flag = Dinov3Config.flag(f.name)
        by_argparse = typing.get_origin(kind) is Literal or kind is bool or f.name == "preset"
        if by_argparse:
            bad = "nonesuch"
        elif f.metadata["checks"]:
            def refused(value, name=f.name, flag=flag):
                try:
                    Dinov3Config(**{"data": "x", name: value}).validate()
                except (ConfigError, TypeError) as e:
                    return str(e).startswith(flag)
                return False

            fits = [c for c in CANDIDATES if isinstance(c, tuple) == (typing.get_origin(kind) is tuple)
                    and (kind is not int or isinstance(c, int)) and (kind is not str or isinstance(c, str))
                    and (kind not in (int, float) or not isinstance(c, str)) and refused(c)]
            assert fits, f"no candidate value is refused for {flag}"
            bad = fits[0]
        else:
            continue
        argv = ["dinov3", "--data", "x", "--output-dir", str(tmp_path / "out"), flag,
                *(shown(bad).split() if shown(bad) != "''" else [""])]
        if f.name == "data":
            argv = ["dinov3", "--output-dir", str(tmp_path / "out"), flag, ""]
        if by_argparse:  # argparse's own error, naming the option
            with pytest.raises(SystemExit) as exit_:
                main(argv)
            assert exit_.value.code == 2
            assert f"argument {flag}: " in capsys.readouterr().err
        else:
            assert main(argv) == 2, flag
            err = capsys.readouterr().err
            assert err.startswith(f"fastssl-train dinov3: error: {flag} "), err
        assert not any(tmp_path.iterdir())  # nothing written
        tried.append(f.name)
    assert set(tried) == {f.name for f in dataclasses.fields(Dinov3Config)}  # every option


def test_config_error_class():
    with pytest.raises(ConfigError, match="--knn-data and --knn-val-data go together"):
        Dinov3Config(data="x", knn_data="a").validate()
