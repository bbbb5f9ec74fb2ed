"""DINOv3's Gram anchoring pieces against the authors' definitions: when the Gram teacher is loaded and
replaced (their training loop's conditions, simulated), the loss weight schedule, the resize of the Gram
teacher's patch grid, the patches selected, and the frozen copy's weights and features."""

from __future__ import annotations

import math
import random

import pytest
import torch
import torch.nn.functional as F

from fastssl.train.gram_anchor import (
    GramRefresh,
    GramTeacher,
    linear_warmup_cosine_decay,
    resize_patches,
    select_patches,
)
from fastssl.train.models import build_backbone


def _authors_loop(refresh: GramRefresh, iterations: int):
    """The decisions of the authors' train loop (dinov3/train/train.py), iteration by iteration:
    ``[(load before it, update after it)]``."""
    decisions, num_gram_updates = [], 0
    for it in range(iterations):
        load = refresh.it_load_ema_teacher == it
        update = (refresh.rep_update and (it + 1) >= refresh.it_first_update
                  and (it + 1) % refresh.update_frequency == 0
                  and (refresh.max_updates is None or num_gram_updates < refresh.max_updates))
        num_gram_updates += update
        decisions.append((load, update))
    return decisions


def test_refresh_follows_the_authors_loop(fresh_seed):
    rng = random.Random(fresh_seed)
    for _ in range(60):
        refresh = GramRefresh(it_load_ema_teacher=rng.randint(-1, 30), rep_update=rng.random() < 0.8,
                              update_frequency=rng.randint(1, 9), it_first_update=rng.randint(0, 25),
                              max_updates=rng.choice([None, 0, 1, 3]))
        done = 0
        for it, (load, update) in enumerate(_authors_loop(refresh, 80)):
            assert refresh.updates_before(it) == done, (refresh, it)
            assert refresh.loads_before(it) == load, (refresh, it)
            assert refresh.updates_after(it, done) == update, (refresh, it)
            done += update
        first, f = refresh.it_first_update, refresh.update_frequency
        if refresh.rep_update and first > 0 and first % f == 0:
            # Where the authors' resume formula is exact (their configs), ours agrees with it.
            plain = GramRefresh(rep_update=True, update_frequency=f, it_first_update=first)
            for s in range(first, first + 3 * f + 1):
                assert plain.updates_before(s) == math.ceil((s + 1 - first) / f), (plain, s)


@pytest.mark.parametrize("kwargs", [dict(update_frequency=0), dict(it_first_update=-1), dict(max_updates=-1),
                                    dict(it_load_ema_teacher=-2)])
def test_refresh_refuses_bad_values_by_name(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        GramRefresh(**kwargs)


@pytest.mark.parametrize("start,peak,end,warmup,total,cosine", [(0.0, 0.0, 2.0, 7, 30, None), (0.1, 1.0, 0.2, 0, 13, 9),
                                                                 (1.0, 3.0, 0.5, 5, 5, 0)])
def test_loss_weight_schedule_is_the_authors(start, peak, end, warmup, total, cosine):
    got = linear_warmup_cosine_decay(start, peak, end, warmup, total, cosine)
    n_cos = total - warmup if cosine is None else cosine
    want = [start + (peak - start) * i / warmup for i in range(warmup)]
    want += [end + (peak - end) * (1 + math.cos(math.pi * (j / (n_cos - 1) if n_cos > 1 else 0.0))) / 2
             for j in range(n_cos)]
    want += [end] * (total - warmup - n_cos)
    assert got.shape == (total,) and got.tolist() == pytest.approx(want, rel=1e-12, abs=1e-12)
    with pytest.raises(ValueError, match="do not fit"):
        linear_warmup_cosine_decay(start, peak, end, warmup, total, total + 1)


@pytest.mark.parametrize("mode", ["bicubic", "bilinear", "nearest", "area"])
def test_resize_keeps_the_grid_layout(mode):
    # Patch features that encode their own (row, column): the resized grid keeps rows as rows (the
    # patches are row-major, as a ViT's), and equals F.interpolate of the [N, D, side, side] image.
    side, grid, n = 8, 5, 3
    rows = torch.arange(side, dtype=torch.float64).repeat_interleave(side)
    cols = torch.arange(side, dtype=torch.float64).repeat(side)
    patches = torch.stack([rows, cols, torch.randn(side * side, dtype=torch.float64)], dim=1).expand(n, -1, -1)
    out = resize_patches(patches, grid, mode)
    assert out.shape == (n, grid * grid, 3)
    out_rows, out_cols = out[0, :, 0].view(grid, grid), out[0, :, 1].view(grid, grid)
    assert (out_rows.diff(dim=0) > 0).all() and (out_rows.diff(dim=1).abs() < 1e-9).all()
    assert (out_cols.diff(dim=1) > 0).all() and (out_cols.diff(dim=0).abs() < 1e-9).all()
    image = patches.permute(0, 2, 1).reshape(n, 3, side, side)
    kw = {} if mode in ("nearest", "area") else {"align_corners": False}
    want = F.interpolate(image, size=(grid, grid), mode=mode, **kw).reshape(n, 3, grid * grid).permute(0, 2, 1)
    assert torch.allclose(out, want, rtol=0, atol=1e-12)
    assert resize_patches(patches, side, mode) is patches
    with pytest.raises(ValueError, match="not a square grid"):
        resize_patches(patches[:, :-1], grid, mode)
    with pytest.raises(ValueError, match="mode must be one of"):
        resize_patches(patches, grid, "bicubc")


def test_select_patches():
    s, t = torch.randn(2, 6, 4), torch.randn(2, 6, 4)
    masks = torch.rand(2, 6) < 0.5
    assert select_patches(s, t, masks, "all") == (s, t)
    ms, mt = select_patches(s, t, masks, "masked")
    us, ut = select_patches(s, t, masks, "unmasked")
    assert torch.equal(ms, s[masks]) and torch.equal(mt, t[masks]) and torch.equal(us, s[~masks])
    assert torch.equal(ut, t[~masks]) and len(ms) + len(us) == 12
    with pytest.raises(ValueError, match="tokens_used"):
        select_patches(s, t, masks, "some")
    with pytest.raises(ValueError, match="masks must be bool"):
        select_patches(s, t, masks.float(), "masked")
    with pytest.raises(ValueError, match="differ"):
        select_patches(s, t[:, :5], masks, "all")


def test_gram_teacher_is_a_frozen_copy_loaded_from_the_teacher():
    torch.manual_seed(0)
    teacher = build_backbone("vit_pico", img_size=16, patch_size=4, reg_tokens=2).eval()  # 3 prefix tokens
    gram = GramTeacher(teacher)
    assert not any(p.requires_grad for p in gram.parameters()) and not gram.train().training
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(torch.randn_like(p))
    x = torch.randn(3, 3, 32, 32)  # the Gram teacher's crops: twice the student's 16 px
    assert not torch.equal(gram.backbone.forward_features(x), teacher.forward_features(x))
    gram.load_(teacher)
    for (name, a), b in zip(gram.backbone.state_dict().items(), teacher.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    feats = gram.patch_features(x, grid=4)  # 8 x 8 patches of 4 px resized to the student's 4 x 4
    tokens = teacher.forward_features(x)[:, teacher.num_prefix_tokens:]
    assert torch.equal(feats, resize_patches(tokens, 4)) and feats.shape == (3, 16, 32)
    other = build_backbone("vit_pico", img_size=16, patch_size=4)
    with pytest.raises(ValueError, match="backbones differ"):
        gram.load_(other)
