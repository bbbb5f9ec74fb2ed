r"""Triton kernel for KoLeo's nearest-neighbour search: the top k inner products of each row.

Notation: B local rows x_i and a neighbour set of G rows y_j (both L2-normalised, fp32, d
wide; the local rows are the rows offset .. offset + B - 1 of the set, as in the authors'
``KoLeoLossDistributed``, or the set itself with offset 0). For each local row i, the
kernel returns the indices of the k largest inner products x_i . y_j over j != offset + i
(the row itself excluded), in decreasing order, ties taken by the lowest index:

    order (v, j) before (v', j')  iff  v > v'  or  (v == v' and j < j').

A program owns BLOCK_R rows and streams the set in tiles of BLOCK_C rows: the tile's
products (fp32 accumulation, ``tf32x3`` products: about fp32's accuracy) are merged into the
row's running top k, kept in registers as K_PAD (k rounded up to a power of two) values and
indices, by K_PAD rounds each taking the first entry in that order of the tile and of the
running list that comes after the one taken before. Nothing of size B x G is ever written;
the output is the [B, k] indices (int64). A NaN product is never taken; a row whose products
are all NaN (a NaN input row, whose loss is NaN anyway) gets indices clamped into the set.

Memory beyond inputs and outputs: none.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import launch, launch_device, launch_options, recording, rows_contiguous

# The most neighbours a row keeps in registers (KoLeoLossDistributed's topk is 1 in every
# configuration the DINOv3 authors ship); the Python layer searches more with PyTorch.
MAX_TOPK = 16
_NONE = tl.constexpr(2**31 - 1)  # an index after every real one


@triton.jit
def _first_after(v, idx, prev_v, prev_i, NONE: tl.constexpr):
    """Per row, the first (value, index) in the order of the module docstring among the entries
    that come after (prev_v, prev_i); (-inf, _NONE) when there is none."""
    after = (v < prev_v[:, None]) | ((v == prev_v[:, None]) & (idx > prev_i[:, None]))
    vv = tl.where(after, v, float("-inf"))
    best = tl.max(vv, axis=1)
    first = tl.min(tl.where(after & (vv == best[:, None]), idx, _NONE), axis=1)
    return best, first


@triton.jit(do_not_specialize=["B", "G", "offset"])
def _knn_kernel(
    X,  # local rows [B, d] fp32, unit stride along d
    Y,  # the neighbour set [G, d] fp32, unit stride along d
    IDX,  # out: [B, k] int64 neighbour indices into Y
    B,  # local rows
    G,  # rows of the set
    d,  # width
    offset,  # the set's row of local row 0 (its own, excluded)
    k,  # neighbours per row
    stride_x,  # X's stride between rows
    stride_y,  # Y's stride between rows
    K_PAD: tl.constexpr,  # k rounded up to a power of two: the running list's length
    BLOCK_R: tl.constexpr,  # local rows per program
    BLOCK_C: tl.constexpr,  # rows of the set per tile
    BLOCK_K: tl.constexpr,  # columns of d per step
    PREC: tl.constexpr,  # tl.dot input precision
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < B
    off_x = rows.to(tl.int64) * stride_x
    slots = tl.arange(0, K_PAD)
    best_v = tl.full([BLOCK_R, K_PAD], float("-inf"), dtype=tl.float32)
    best_i = tl.full([BLOCK_R, K_PAD], _NONE, dtype=tl.int32)
    for c0 in range(0, G, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        cmask = cols < G
        off_y = cols.to(tl.int64) * stride_y
        dots = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
        for k0 in range(0, d, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            kmask = ks < d
            x = tl.load(X + off_x[:, None] + ks[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
            y = tl.load(Y + off_y[:, None] + ks[None, :], mask=cmask[:, None] & kmask[None, :], other=0.0)
            dots = tl.dot(x, tl.trans(y), dots, input_precision=PREC)
        valid = cmask[None, :] & (cols[None, :] != rows[:, None] + offset)
        tile_v = tl.where(valid, dots, float("-inf"))
        tile_i = tl.where(valid, cols[None, :], _NONE)
        # Merge: K_PAD rounds, each the first of (tile, running list) after the last one taken.
        new_v = tl.full([BLOCK_R, K_PAD], float("-inf"), dtype=tl.float32)
        new_i = tl.full([BLOCK_R, K_PAD], _NONE, dtype=tl.int32)
        prev_v = tl.full([BLOCK_R], float("inf"), dtype=tl.float32)
        prev_i = tl.full([BLOCK_R], -1, dtype=tl.int32)
        for t in tl.static_range(K_PAD):
            tv, ti = _first_after(tile_v, tile_i, prev_v, prev_i, _NONE)
            lv, li = _first_after(best_v, best_i, prev_v, prev_i, _NONE)
            take_tile = (tv > lv) | ((tv == lv) & (ti < li))
            prev_v = tl.where(take_tile, tv, lv)
            prev_i = tl.where(take_tile, ti, li)
            new_v = tl.where(slots[None, :] == t, prev_v[:, None], new_v)
            new_i = tl.where(slots[None, :] == t, prev_i[:, None], new_i)
        best_v = new_v
        best_i = new_i
    out = tl.minimum(best_i, G - 1).to(tl.int64)
    tl.store(IDX + rows.to(tl.int64)[:, None] * k + slots[None, :], out,
             mask=rmask[:, None] & (slots < k)[None, :])


def knn_config(k: int) -> dict:
    return dict(K_PAD=triton.next_power_of_2(k), BLOCK_R=64, BLOCK_C=64, BLOCK_K=16, num_warps=8, num_stages=1)


def nearest_neighbours(x: torch.Tensor, y: torch.Tensor, offset: int, k: int) -> torch.Tensor:
    """``[B, k]`` int64 indices into ``y`` of each row of ``x``'s k largest inner products, the row
    ``offset + i`` excluded, ties to the lowest index. ``x`` ``[B, d]`` and ``y`` ``[G, d]`` are fp32,
    validated by the caller (``k <= min(MAX_TOPK, G - 1)``)."""
    x, y = rows_contiguous(x), rows_contiguous(y)
    B, d = x.shape
    G = y.shape[0]
    cfg = knn_config(k)
    # Recorded launches (the AOT build) leave it unwritten: zeros keep the caller's indexing in bounds.
    idx = (torch.zeros if recording() else torch.empty)(B, k, device=x.device, dtype=torch.int64)
    with launch_device(x, "koleo_loss"):
        launch(_knn_kernel, (triton.cdiv(B, cfg["BLOCK_R"]),),
               X=x, Y=y, IDX=idx, B=B, G=G, d=d, offset=offset, k=k, stride_x=x.stride(0), stride_y=y.stride(0),
               K_PAD=cfg["K_PAD"], BLOCK_R=cfg["BLOCK_R"], BLOCK_C=cfg["BLOCK_C"], BLOCK_K=cfg["BLOCK_K"],
               PREC="tf32x3", **launch_options(cfg))
    return idx
