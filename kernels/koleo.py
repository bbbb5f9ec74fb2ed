r"""Triton kernel for KoLeo's nearest-neighbour search: the top k inner products of each row.

Notation: a neighbour set of G rows y_j (d wide, as the features come: fp32, fp16 or bf16),
normalised as ``F.normalize(y, eps=eps)``: y^_j = (p_j y_j) n_j, with p_j the power of two that
brings the row's largest entry into [0.5, 1) and n_j = 1 / max(|p_j y_j|, p_j eps)
(``fastssl.kernels.gram``'s ``_row_scales_kernel`` computes them). The local rows are the set's
rows offset .. offset + B - 1, as in the authors' ``KoLeoLossDistributed`` (or the whole set,
offset 0). For each local row i, the kernel returns the indices of the k largest inner
products y^_(offset + i) . y^_j over j != offset + i (the row itself excluded), in decreasing
order, ties taken by the lowest index:

    order (v, j) before (v', j')  iff  v > v'  or  (v == v' and j < j').

The inner products are those of the scaled rows, (p_i y_i) . (p_j y_j) n_i n_j: 16-bit rows are
multiplied in their dtype on the tensor cores, whose products of 16-bit values are exact, with
fp32 accumulation, fp32 rows as ``tf32x3`` (three TF32 products, about fp32's accuracy), so
the ordering is fp32's whatever the dtype and TF32 settings; rows that are exact copies (or
copies scaled by a power of two) get equal inner products, so ties are exact.

A program owns BLOCK_R local rows and streams the set in tiles of BLOCK_C rows, merging each
tile's products into the row's running top k, kept in registers as K_PAD (k rounded up to a
power of two) values and indices, by K_PAD rounds each taking the first entry in that order of
the tile and of the running list that comes after the one taken before. Nothing of size B x G
is ever written; the output is the [B, k] indices (int64). A NaN product is never taken; a row
whose products are all NaN (a NaN input row, whose loss is NaN anyway) gets indices clamped
into the set.

Memory beyond inputs and outputs: the set's row factors (2 G floats).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import launch, launch_device, launch_options, recording, rows_contiguous
from .gram import row_factors

# The most neighbours a row keeps in registers (KoLeoLossDistributed's topk is 1 in every
# configuration the DINOv3 authors ship); the Python layer searches more with PyTorch.
MAX_TOPK = 16
_NONE = tl.constexpr(2**31 - 1)  # an index after every real one


@triton.jit
def _first_after(v, idx, prev_v, prev_i, NONE: tl.constexpr):
    """Per row, the first (value, index) in the order of the module docstring among the entries
    that come after (prev_v, prev_i); (-inf, NONE) when there is none."""
    after = (v < prev_v[:, None]) | ((v == prev_v[:, None]) & (idx > prev_i[:, None]))
    vv = tl.where(after, v, float("-inf"))
    best = tl.max(vv, axis=1)
    first = tl.min(tl.where(after & (vv == best[:, None]), idx, NONE), axis=1)
    return best, first


@triton.jit
def _scaled_rows(Y, off, ks, mask, p, UPCAST: tl.constexpr):
    """Rows of Y at ``off`` (columns ks) times their powers of two p (exact in Y's dtype)."""
    y = tl.load(Y + off[:, None] + ks[None, :], mask=mask, other=0.0)
    y = (y.to(tl.float32) * p[:, None]).to(Y.dtype.element_ty)
    if UPCAST:  # Triton's interpreter gets 16-bit tl.dot wrong: fp32 computes the same exact products
        y = y.to(tl.float32)
    return y


@triton.jit(do_not_specialize=["B", "G", "offset"])
def _knn_kernel(
    Y,  # the neighbour set's rows [G, d], unit stride along d; local row i is row offset + i
    P,  # [G] fp32: each row's power of two
    INV,  # [G] fp32: 1 / max(|p y|, p eps), so that y / max(|y|, eps) = (p y) INV
    IDX,  # out: [B, k] int64 neighbour indices into Y
    B,  # local rows
    G,  # rows of the set
    d,  # width
    offset,  # the set's row of local row 0 (its own, excluded)
    k,  # neighbours per row
    stride_y,  # Y's stride between rows
    K_PAD: tl.constexpr,  # k rounded up to a power of two: the running list's length
    BLOCK_R: tl.constexpr,  # local rows per program
    BLOCK_C: tl.constexpr,  # rows of the set per tile
    BLOCK_K: tl.constexpr,  # columns of d per step
    PREC: tl.constexpr,  # tl.dot input precision for fp32 rows
    UPCAST: tl.constexpr,  # interpreter: 16-bit dots in fp32
):
    local = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = local < B
    rows = offset + local
    off_r = rows.to(tl.int64) * stride_y
    p_r = tl.load(P + rows, mask=rmask, other=0.0)
    inv_r = tl.load(INV + rows, mask=rmask, other=0.0)
    slots = tl.arange(0, K_PAD)
    best_v = tl.full([BLOCK_R, K_PAD], float("-inf"), dtype=tl.float32)
    best_i = tl.full([BLOCK_R, K_PAD], _NONE, dtype=tl.int32)
    for c0 in range(0, G, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        cmask = cols < G
        off_c = cols.to(tl.int64) * stride_y
        p_c = tl.load(P + cols, mask=cmask, other=0.0)
        dots = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
        for k0 in range(0, d, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            kmask = ks < d
            x = _scaled_rows(Y, off_r, ks, rmask[:, None] & kmask[None, :], p_r, UPCAST)
            y = _scaled_rows(Y, off_c, ks, cmask[:, None] & kmask[None, :], p_c, UPCAST)
            dots = tl.dot(x, tl.trans(y), dots, input_precision=PREC)
        dots = dots * inv_r[:, None] * tl.load(INV + cols, mask=cmask, other=0.0)[None, :]
        valid = cmask[None, :] & (cols[None, :] != rows[:, None])
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
    tl.store(IDX + local.to(tl.int64)[:, None] * k + slots[None, :], out,
             mask=rmask[:, None] & (slots < k)[None, :])


def knn_config(k: int, dtype: torch.dtype) -> dict:
    """64 x 64 tiles; d in steps of 16 for fp32 rows (tf32x3: three parts of each operand in registers),
    32 for 16-bit ones (no spill on sm_80 / sm_90 up to k = 16, which the AOT build checks)."""
    return dict(K_PAD=triton.next_power_of_2(k), BLOCK_R=64, BLOCK_C=64, BLOCK_K=16 if dtype == torch.float32 else 32,
                num_warps=8, num_stages=1)


def nearest_neighbours(y: torch.Tensor, offset: int, B: int, k: int, eps: float) -> torch.Tensor:
    """``[B, k]`` int64 indices into ``y`` of the k largest inner products of the normalised rows
    ``offset + i`` with the others (``F.normalize(y, eps=eps)``), the row itself excluded, ties to the
    lowest index. ``y`` ``[G, d]`` (raw features) is validated by the caller (``k <= min(MAX_TOPK,
    G - 1)``); fp64 rows are searched in fp32."""
    y = rows_contiguous(y.float() if y.dtype == torch.float64 else y)
    G, d = y.shape
    cfg = knn_config(k, y.dtype)
    # Recorded launches (the AOT build) leave it unwritten: zeros keep the caller's indexing in bounds.
    idx = (torch.zeros if recording() else torch.empty)(B, k, device=y.device, dtype=torch.int64)
    with launch_device(y, "koleo_loss"):
        factors = row_factors(y.unsqueeze(0), True, eps)
        launch(_knn_kernel, (triton.cdiv(B, cfg["BLOCK_R"]),),
               Y=y, P=factors[0], INV=factors[1], IDX=idx, B=B, G=G, d=d, offset=offset, k=k,
               stride_y=y.stride(0), K_PAD=cfg["K_PAD"], BLOCK_R=cfg["BLOCK_R"], BLOCK_C=cfg["BLOCK_C"],
               BLOCK_K=cfg["BLOCK_K"], PREC="tf32x3", UPCAST=y.device.type == "cpu" and not recording(),
               **launch_options(cfg))
    return idx
