r"""Triton kernels for soft nearest neighbours against a support set, forward and backward.

Notation: queries q_i (N rows), supports s_j (M rows), both d wide; labels Y [M, C]
(dense, soft) or class ids y_j in [0, C) with label smoothing eps; temperature tau.

    q^_i = q_i / max(|q_i|, 1e-12)          s^_j likewise (``F.normalize``)
    A    = softmax_j(q^_i . s^_j / tau)     P = A @ Y          (integer ids: Y = (1 - eps) onehot(y) + eps / C)

This is attention (queries q^, keys s^, values Y), so P is computed like flash
attention without the N x M matrix A. The similarity is taken on the raw embeddings
and scaled by the inverse norms, c_ij = (q_i . s_j) n_i m_j, so nothing normalised is
ever written; all exponentials are base 2 (logits pre-scaled by log2(e) / tau).

Forward, for a block of queries and a range of supports: stream support blocks,
keep each row's running max and sum of the online softmax and the unnormalised class
accumulator, then merge the ranges (``_combine_kernel``), saving each row's base-2
log-sum-exp for the backward.

* dense labels (``_fwd_dense_kernel``): the accumulator is [BLOCK_N, BLOCK_C], C tiled
  over the grid in tiles of up to ``_MAX_BLOCK_C`` = 256 classes, updated by p @ Y_block;
  the support ranges are splits of M, merged by a weighted sum of the partial
  accumulators. A 256-class tile leaves room for 64 query rows: the products run on
  64-row tensor-core tiles and Y is read N / 64 times. The dots are then recomputed
  once per class tile, so ``_matmul_kernel`` first writes the raw dots of a chunk of
  supports (an [N, chunk] fp32 scratch, at most 8 N C elements) and the kernel reads
  them instead: from d = 512 on for 16-bit embeddings, at every d for fp32 (whose
  in-kernel tf32x3 dots do not fit beside a 64-row tile). Where the scratch would
  exceed its budget, fp32 computes its dots in the kernel beside an accumulator of half
  the size (64 x 128, 32 x 256, 16 x 1024 classes).
* class ids (``_fwd_ids_kernel``): the supports are visited in class order (a
  permutation, computed by the launcher), so that a program owning a tile of
  BLOCK_C classes only streams the supports of those classes and its accumulator
  is [BLOCK_N, BLOCK_C], written to its own columns: the class sum is a one-hot
  matmul over a narrow tile (C / BLOCK_C times less work than a dense one-hot), and
  no [M, C] matrix exists.

Backward, with G = dL/dP [N, C] and D_i = sum_c G_ic P_ic (= sum_j A_ij dA_ij):

    dA_ij = G_i . Y_j                  (ids: (1 - eps) G[i, y_j] + eps / C sum_c G_ic, a gather)
    dc_ij = A_ij (dA_ij - D_i) / tau   (c the cosine similarity)
    dq^_i = sum_j dc_ij s^_j           ds^_j = sum_i dc_ij q^_i
    dq_i  = (dq^_i - q^_i (q^_i . dq^_i)) / |q_i|    (the normalisation's backward; likewise ds)

Per chunk of supports, ``_bwd_dc_kernel`` recomputes A from the saved log-sum-exp and
writes the chunk's dc (its own [BLOCK_N, BLOCK_M] tiles, the full d and C reduced in
registers); two ``_matmul_kernel`` calls then accumulate dq^ += dc @ S^_chunk (split over
the chunk's supports into partials) and write ds^[chunk] = dc.T @ Q^, normalising the rows
of S and Q on the fly (a row scale by the inverse norms, so 16-bit operands stay within
[-1, 1]); ``_norm_bwd_kernel`` sums the partials and applies the normalisation's backward.
A flash-attention-style backward that keeps dq^ in registers cannot hold a 2048-wide row
(PAWS's projection width) and would recompute the logits once per d tile; here they are
recomputed once, whatever d, and two thirds of the work runs on 128 x 128 matmul tiles.

Precision: bf16/fp16 embeddings go through the tensor cores in their dtype with
fp32 accumulation (p, dc and dense labels rounded to it, as flash attention does; the
fp32 G enters G @ Y.T as two 16-bit parts, since dA_ij - D_i cancels); fp32 embeddings
use ``tf32x3`` (three TF32 products, ~fp32 accurate), never plain TF32.

Memory beyond inputs and outputs: O(N * C * splits) forward partials, O(N + M)
statistics, one chunk of dots (forward, d >= 512: at most 8 N C elements) or of dc
(backward: at most the bytes of the supports' fp32 gradient, or 64 rows of N), and the
backward's fp32 partial gradients (at most
min(8, M / N) x [N, d], and [M, d]; written over by the gradients for fp32 inputs):
O(N * C + M * d) whatever N x M.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import launch, launch_device, launch_options, recording, rows_contiguous

# Integer arguments that only count rows (or offset them) are not specialised (equal to 1,
# divisible by 16): their values change nothing in the compiled code but would multiply its
# variants. Those along a contiguous dimension (d, C, a chunk's supports) and strides are.

LOG2E = 1.4426950408889634
NORM_EPS = 1e-12  # F.normalize's default eps

# fp32 dots: three TF32 products with fp32 accuracy ("ieee" would use no tensor cores).
FP32_PRECISION = "tf32x3"


# ----------------------------------------------------------------------------- shared pieces

@triton.jit
def _mma(a, b, acc, PREC: tl.constexpr, UPCAST: tl.constexpr):
    # UPCAST: Triton's interpreter (CPU tensors) gets bf16 tl.dot wrong; the operands were
    # already rounded to the dot dtype, so fp32 there computes the same products.
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PREC)


@triton.jit
def _raw_dots(Q, S, q_off, s_off, rmask, jmask, d, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
              BLOCK_D: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """[BLOCK_N, BLOCK_M] dot products of raw query and support rows (fp32 accumulate)."""
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    for k0 in range(0, d, BLOCK_D):
        ks = k0 + tl.arange(0, BLOCK_D)
        kmask = ks < d
        q = tl.load(Q + q_off[:, None] + ks[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
        s = tl.load(S + s_off[:, None] + ks[None, :], mask=jmask[:, None] & kmask[None, :], other=0.0)
        acc = _mma(q, tl.trans(s), acc, PREC, UPCAST)
    return acc


@triton.jit
def _label_grads(G, Y, g_off, js, rmask, jmask, C, stride_y, gscale, DENSE: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr,
                 UPCAST: tl.constexpr):
    """dA without its per-row constant: G_i . Y_j (dense) or gscale * G[i, y_j] (class ids)."""
    if DENSE:
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
        y_off = js.to(tl.int64) * stride_y
        for c0 in range(0, C, BLOCK_C):
            cs = c0 + tl.arange(0, BLOCK_C)
            cmask = cs < C
            g = tl.load(G + g_off[:, None] + cs[None, :], mask=rmask[:, None] & cmask[None, :], other=0.0)
            y = tl.load(Y + y_off[:, None] + cs[None, :], mask=jmask[:, None] & cmask[None, :], other=0.0)
            yt = tl.trans(y.to(DT))
            g_hi = g.to(DT)
            acc = _mma(g_hi, yt, acc, PREC, UPCAST)
            if DT != tl.float32:
                # dA - D_i cancels: a second product with G's rounding error keeps G to ~16 bits.
                acc = _mma((g - g_hi.to(tl.float32)).to(DT), yt, acc, PREC, UPCAST)
    else:
        ids = tl.load(Y + js, mask=jmask, other=0)
        # Ids are range-checked before the launch, except under torch.compile: never read past G.
        imask = jmask & (ids >= 0) & (ids < C)
        acc = tl.load(G + g_off[:, None] + ids[None, :], mask=rmask[:, None] & imask[None, :], other=0.0) * gscale
    return acc


@triton.jit
def _inv_norm_rows(X, INV, block, n_rows, d, stride_x, eps, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = block * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < n_rows
    off = rows.to(tl.int64) * stride_x
    ss = tl.zeros([BLOCK_R], dtype=tl.float32)
    for k0 in range(0, d, BLOCK_D):
        ks = k0 + tl.arange(0, BLOCK_D)
        x = tl.load(X + off[:, None] + ks[None, :], mask=rmask[:, None] & (ks < d)[None, :], other=0.0)
        x = x.to(tl.float32)
        ss += tl.sum(x * x, axis=1)
    tl.store(INV + rows, 1.0 / tl.maximum(tl.sqrt(ss), eps), mask=rmask)


@triton.jit(do_not_specialize=["n_rows", "n_rows2", "n_blocks"])
def _inv_norm_kernel(X, INV, n_rows, stride_x, X2, INV2, n_rows2, stride_x2, n_blocks, d, eps,
                     BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    # The inverse norms of two row sets (queries and supports) in one launch: the first
    # n_blocks programs take X's rows, the others X2's.
    pid = tl.program_id(0)
    if pid < n_blocks:
        _inv_norm_rows(X, INV, pid, n_rows, d, stride_x, eps, BLOCK_R, BLOCK_D)
    else:
        _inv_norm_rows(X2, INV2, pid - n_blocks, n_rows2, d, stride_x2, eps, BLOCK_R, BLOCK_D)


# ----------------------------------------------------------------------------- forward

@triton.jit
def _softmax_step(dots, row_scale, inv_s, jmask, m, l):
    """One support block of the online softmax (base 2): the block's probabilities relative to
    the new running max, the factor that rescales what was accumulated so far, and the new
    running max and sum."""
    z = tl.where(jmask[None, :], dots * row_scale[:, None] * inv_s[None, :], float("-inf"))
    m_new = tl.maximum(m, tl.max(z, axis=1))
    alpha = tl.exp2(m - m_new)
    p = tl.exp2(z - m_new[:, None])
    return p, alpha, m_new, l * alpha + tl.sum(p, axis=1)


@triton.jit
def _fwd_dense_kernel(Q, S, Y, INV_Q, INV_S, L, PART_M, PART_L, PART_ACC, N, d, C, stride_q, stride_s, stride_y,
                      j_lo, j_hi, chunk, part_base, scale2, PRE: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr, PREC: tl.constexpr,
                      UPCAST: tl.constexpr):
    # Program (query block, split of the supports [j_lo, j_hi), class tile): the split's online
    # softmax state, written as part part_base + split. PRE: the raw dots come from L, the
    # [N, j_hi - j_lo] product Q @ S[j_lo:j_hi].T computed beforehand by _matmul_kernel.
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    pid_c = tl.program_id(2)
    part = part_base + split
    DT = Q.dtype.element_ty
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    q_off = rows.to(tl.int64) * stride_q
    row_scale = tl.load(INV_Q + rows, mask=rmask, other=0.0) * scale2
    m = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
    l = tl.zeros([BLOCK_N], dtype=tl.float32)
    acc = tl.zeros([BLOCK_N, BLOCK_C], dtype=tl.float32)
    j_start = j_lo + split * chunk
    j_end = tl.minimum(j_start + chunk, j_hi)
    l_off = rows.to(tl.int64) * (j_hi - j_lo) - j_lo
    for j0 in range(j_start, j_end, BLOCK_M):
        js = j0 + tl.arange(0, BLOCK_M)
        jmask = js < j_end
        if PRE:
            dots = tl.load(L + l_off[:, None] + js[None, :], mask=rmask[:, None] & jmask[None, :], other=0.0)
        else:
            dots = _raw_dots(Q, S, q_off, js.to(tl.int64) * stride_s, rmask, jmask, d, BLOCK_N, BLOCK_M, BLOCK_D,
                             PREC, UPCAST)
        inv_s = tl.load(INV_S + js, mask=jmask, other=0.0)
        p, alpha, m_new, l = _softmax_step(dots, row_scale, inv_s, jmask, m, l)
        y = tl.load(Y + js.to(tl.int64)[:, None] * stride_y + cols[None, :], mask=jmask[:, None] & cmask[None, :],
                    other=0.0)
        acc = _mma(p.to(DT), y.to(DT), acc * alpha[:, None], PREC, UPCAST)
        m = m_new
    if pid_c == 0:
        tl.store(PART_M + part * N + rows, m, mask=rmask)
        tl.store(PART_L + part * N + rows, l, mask=rmask)
    out = (part * N + rows).to(tl.int64) * C
    tl.store(PART_ACC + out[:, None] + cols[None, :], acc, mask=rmask[:, None] & cmask[None, :])


@triton.jit(do_not_specialize=["N"])
def _fwd_ids_kernel(Q, S, PERM, SORTED_IDS, CLASS_START, INV_Q, INV_S, PART_M, PART_L, ACC, N, d, C, stride_q,
                    stride_s, scale2, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                    BLOCK_C: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    # Program (query block, class tile): the supports of classes [c0, c0 + BLOCK_C) are the
    # class-sorted positions [CLASS_START[c0], CLASS_START[c0 + BLOCK_C]); PERM maps them to rows of S.
    pid_n = tl.program_id(0)
    tile = tl.program_id(1)
    DT = Q.dtype.element_ty
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    c0 = tile * BLOCK_C
    classes = tl.arange(0, BLOCK_C)
    q_off = rows.to(tl.int64) * stride_q
    row_scale = tl.load(INV_Q + rows, mask=rmask, other=0.0) * scale2
    m = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
    l = tl.zeros([BLOCK_N], dtype=tl.float32)
    acc = tl.zeros([BLOCK_N, BLOCK_C], dtype=tl.float32)
    j_start = tl.load(CLASS_START + c0)
    j_end = tl.load(CLASS_START + tl.minimum(c0 + BLOCK_C, C))
    for j0 in range(j_start, j_end, BLOCK_M):
        js = j0 + tl.arange(0, BLOCK_M)
        jmask = js < j_end
        src = tl.load(PERM + js, mask=jmask, other=0)
        dots = _raw_dots(Q, S, q_off, src.to(tl.int64) * stride_s, rmask, jmask, d, BLOCK_N, BLOCK_M, BLOCK_D, PREC,
                         UPCAST)
        inv_s = tl.load(INV_S + src, mask=jmask, other=0.0)
        p, alpha, m_new, l = _softmax_step(dots, row_scale, inv_s, jmask, m, l)
        local = tl.load(SORTED_IDS + js, mask=jmask, other=-1) - c0
        onehot = tl.where(local[:, None] == classes[None, :], 1.0, 0.0).to(DT)
        acc = _mma(p.to(DT), onehot, acc * alpha[:, None], PREC, UPCAST)
        m = m_new
    tl.store(PART_M + tile * N + rows, m, mask=rmask)
    tl.store(PART_L + tile * N + rows, l, mask=rmask)
    cols = c0 + classes
    tl.store(ACC + rows.to(tl.int64)[:, None] * C + cols[None, :], acc, mask=rmask[:, None] & (cols < C)[None, :])


@triton.jit(do_not_specialize=["N", "nparts"])
def _combine_kernel(PART_M, PART_L, PART_ACC, P, LSE, N, C, nparts, keep, spread, DENSE: tl.constexpr,
                    TILE_C: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    # Merges the per-part (max, sum, accumulator) into P = keep * acc / sum + spread, and each
    # row's base-2 log-sum-exp. Dense: parts are support splits with [nparts, N, C] accumulators;
    # ids: parts are class tiles, each owning TILE_C columns of one [N, C] accumulator.
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < N
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    parts = tl.arange(0, BLOCK_S)
    pmask = rmask[:, None] & (parts < nparts)[None, :]
    offs = parts[None, :] * N + rows[:, None]
    pm = tl.load(PART_M + offs, mask=pmask, other=float("-inf"))
    pl = tl.load(PART_L + offs, mask=pmask, other=0.0)
    m = tl.max(pm, axis=1)
    m = tl.where(rmask, m, 0.0)  # padding rows: keep -inf - -inf out of the arithmetic
    l = tl.sum(pl * tl.exp2(pm - m[:, None]), axis=1)
    if tl.program_id(1) == 0:
        tl.store(LSE + rows, m + tl.log2(l), mask=rmask)
    mask = rmask[:, None] & cmask[None, :]
    if DENSE:
        out = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
        for s in range(0, nparts):
            w = tl.exp2(tl.load(PART_M + s * N + rows, mask=rmask, other=0.0) - m)
            a = tl.load(PART_ACC + (s * N + rows).to(tl.int64)[:, None] * C + cols[None, :], mask=mask, other=0.0)
            out += a * w[:, None]
    else:
        mt = tl.load(PART_M + (cols // TILE_C)[None, :] * N + rows[:, None], mask=mask, other=float("-inf"))
        a = tl.load(PART_ACC + rows.to(tl.int64)[:, None] * C + cols[None, :], mask=mask, other=0.0)
        out = a * tl.exp2(mt - m[:, None])
    out = out * (keep / l)[:, None] + spread
    tl.store(P + rows.to(tl.int64)[:, None] * C + cols[None, :], out, mask=mask)


# ----------------------------------------------------------------------------- backward

@triton.jit(do_not_specialize=["N", "j_lo"])
def _bwd_dc_kernel(Q, S, Y, G, INV_Q, INV_S, LSE, E, F, N, d, C, j_lo, mc, stride_q, stride_s, stride_y, stride_g,
                   stride_f, scale2, inv_tau, gscale, DENSE: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr, PREC: tl.constexpr,
                   UPCAST: tl.constexpr):
    # Program (support block of the chunk [j_lo, j_lo + mc), query block): its tile of dc, A
    # recomputed from the saved log-sum-exp. Support blocks on grid axis 0 (no 65535 limit).
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    DT = Q.dtype.element_ty
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    cols = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    jmask = cols < mc
    js = j_lo + cols
    q_off = rows.to(tl.int64) * stride_q
    row_scale = tl.load(INV_Q + rows, mask=rmask, other=0.0) * scale2
    inv_s = tl.load(INV_S + js, mask=jmask, other=0.0)
    lse = tl.load(LSE + rows, mask=rmask, other=0.0)
    e = tl.load(E + rows, mask=rmask, other=0.0)
    dots = _raw_dots(Q, S, q_off, js.to(tl.int64) * stride_s, rmask, jmask, d, BLOCK_N, BLOCK_M, BLOCK_D, PREC,
                     UPCAST)
    a = tl.exp2(dots * row_scale[:, None] * inv_s[None, :] - lse[:, None])
    a = tl.where(rmask[:, None] & jmask[None, :], a, 0.0)
    da = _label_grads(G, Y, rows.to(tl.int64) * stride_g, js, rmask, jmask, C, stride_y, gscale, DENSE, BLOCK_N,
                      BLOCK_M, BLOCK_C, DT, PREC, UPCAST)
    dc = a * (da + e[:, None]) * inv_tau
    out = rows.to(tl.int64)[:, None] * stride_f + cols[None, :]
    tl.store(F + out, dc.to(F.dtype.element_ty), mask=rmask[:, None] & jmask[None, :])


@triton.jit(do_not_specialize=["R"])
def _matmul_kernel(A, B, B_SCALE, OUT, R, K, Cn, k_split, stride_ar, stride_ak, stride_bk, stride_bc, stride_or,
                   stride_op, HAS_SCALE: tl.constexpr, ACCUMULATE: tl.constexpr, BLOCK_R: tl.constexpr,
                   BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr, GROUP_R: tl.constexpr, PREC: tl.constexpr,
                   UPCAST: tl.constexpr):
    # OUT[p] (+)= A[:, Kp] @ (diag(B_SCALE) B)[Kp, :] for the p-th range Kp of k_split columns of
    # A (split K: program_id(1) = p, partial p at OUT + p * stride_op), fp32 accumulation and
    # output. A and B of any strides (dc transposed is dc with its strides swapped); B's rows
    # scaled in fp32 and rounded back to B's dtype (the inverse norms: S -> S^, so every 16-bit
    # operand stays within [-1, 1] whatever the embeddings' norms). GROUP_R row tiles per column
    # tile, so that neighbouring programs share B's tiles in L2.
    pid = tl.program_id(0)
    split = tl.program_id(1)
    n_r = tl.cdiv(R, BLOCK_R)
    n_c = tl.cdiv(Cn, BLOCK_C)
    per_group = GROUP_R * n_c
    first = (pid // per_group) * GROUP_R
    size = tl.minimum(n_r - first, GROUP_R)
    pid_r = first + (pid % per_group) % size
    pid_c = (pid % per_group) // size
    rs = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    cs = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    k_lo = split * k_split
    k_hi = tl.minimum(k_lo + k_split, K)
    kr = tl.arange(0, BLOCK_K)
    ks = (k_lo + kr).to(tl.int64)
    # Rows and columns past the edge read a valid one (their results are never stored), so
    # only K needs a mask in the loop.
    a_ptr = A + (rs % R).to(tl.int64)[:, None] * stride_ar + ks[None, :] * stride_ak
    b_ptr = B + ks[:, None] * stride_bk + (cs % Cn).to(tl.int64)[None, :] * stride_bc
    acc = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        kmask = kr < k_hi - k0
        a = tl.load(a_ptr, mask=kmask[None, :], other=0.0)
        b = tl.load(b_ptr, mask=kmask[:, None], other=0.0)
        if HAS_SCALE:
            sc = tl.load(B_SCALE + k0 + kr, mask=kmask, other=0.0)
            b = (b.to(tl.float32) * sc[:, None]).to(B.dtype.element_ty)
        acc = _mma(a, b, acc, PREC, UPCAST)
        a_ptr += BLOCK_K * stride_ak
        b_ptr += BLOCK_K * stride_bk
    out = OUT + split.to(tl.int64) * stride_op + rs.to(tl.int64)[:, None] * stride_or + cs[None, :]
    mask = (rs < R)[:, None] & (cs < Cn)[None, :]
    if ACCUMULATE:
        # One add per element and launch, launches in stream order: deterministic, and the
        # old tile never occupies registers.
        tl.atomic_add(out, acc, mask=mask, sem="relaxed")
    else:
        tl.store(out, acc, mask=mask)


@triton.jit
def _sum_parts(GHAT, rows, ks, mask, n_rows, d, nparts, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    g = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    for p in range(0, nparts):
        g += tl.load(GHAT + (p * n_rows + rows).to(tl.int64)[:, None] * d + ks[None, :], mask=mask, other=0.0)
    return g


@triton.jit
def _norm_bwd_rows(X, GHAT, DX, block, n_rows, d, nparts, stride_x, stride_dx, eps, BLOCK_R: tl.constexpr,
                   BLOCK_D: tl.constexpr):
    # dx = (g - x^ (x^ . g)) / |x| with g the sum of the nparts partial gradients of x^; when
    # F.normalize clamped the norm to eps, x^ = x / eps and dx = g / eps. DX may be part 0 of
    # GHAT: a program reads each element of its rows before it writes that element.
    rows = block * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < n_rows
    x_off = rows.to(tl.int64) * stride_x
    ss = tl.zeros([BLOCK_R], dtype=tl.float32)
    xg = tl.zeros([BLOCK_R], dtype=tl.float32)
    for k0 in range(0, d, BLOCK_D):
        ks = k0 + tl.arange(0, BLOCK_D)
        mask = rmask[:, None] & (ks < d)[None, :]
        x = tl.load(X + x_off[:, None] + ks[None, :], mask=mask, other=0.0).to(tl.float32)
        g = _sum_parts(GHAT, rows, ks, mask, n_rows, d, nparts, BLOCK_R, BLOCK_D)
        ss += tl.sum(x * x, axis=1)
        xg += tl.sum(x * g, axis=1)
    norm = tl.sqrt(ss)
    inv = 1.0 / tl.maximum(norm, eps)
    coef = tl.where(norm >= eps, xg * inv * inv * inv, 0.0)
    for k0 in range(0, d, BLOCK_D):
        ks = k0 + tl.arange(0, BLOCK_D)
        mask = rmask[:, None] & (ks < d)[None, :]
        x = tl.load(X + x_off[:, None] + ks[None, :], mask=mask, other=0.0).to(tl.float32)
        g = _sum_parts(GHAT, rows, ks, mask, n_rows, d, nparts, BLOCK_R, BLOCK_D)
        dx = g * inv[:, None] - x * coef[:, None]
        tl.store(DX + rows.to(tl.int64)[:, None] * stride_dx + ks[None, :], dx.to(DX.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["n_rows", "nparts", "n_rows2", "nparts2", "n_blocks"])
def _norm_bwd_kernel(X, GHAT, DX, n_rows, nparts, stride_x, stride_dx, X2, GHAT2, DX2, n_rows2, nparts2, stride_x2,
                     stride_dx2, n_blocks, d, eps, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    # Both row sets' normalisation backward in one launch: the first n_blocks programs take X's
    # rows, the others X2's (none when only one gradient is needed).
    pid = tl.program_id(0)
    if pid < n_blocks:
        _norm_bwd_rows(X, GHAT, DX, pid, n_rows, d, nparts, stride_x, stride_dx, eps, BLOCK_R, BLOCK_D)
    else:
        _norm_bwd_rows(X2, GHAT2, DX2, pid - n_blocks, n_rows2, d, nparts2, stride_x2, stride_dx2, eps, BLOCK_R,
                       BLOCK_D)


@triton.jit(do_not_specialize=["N"])
def _row_e_kernel(G, P, E, N, C, stride_g, stride_p, spread, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    # E_i = sum_c G_ic (spread - P_ic): minus D_i = sum_c G_ic P_ic, plus the label smoothing's
    # eps / C sum_c G_ic for class ids (spread = 0 for dense labels).
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < N
    e = tl.zeros([BLOCK_R], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cs = c0 + tl.arange(0, BLOCK_C)
        mask = rmask[:, None] & (cs < C)[None, :]
        g = tl.load(G + rows.to(tl.int64)[:, None] * stride_g + cs[None, :], mask=mask, other=0.0)
        p = tl.load(P + rows.to(tl.int64)[:, None] * stride_p + cs[None, :], mask=mask, other=0.0)
        e += tl.sum(g * (spread - p), axis=1)
    tl.store(E + rows, e, mask=rmask)


# ----------------------------------------------------------------------------- launchers

# Enough programs to fill any current GPU several times over; a constant rather than the SM
# count, so that the split sums (and so the results) do not depend on the device.
_TARGET_PROGRAMS = 1024
_MAX_BLOCK_C = 256    # widest class tile of a dense-label program: 64 query rows beside it
_MAX_BLOCK_C_FUSED_FP32 = 1024  # fp32, dots computed in the kernel: 16 query rows (spill-free)
_ACC_ELEMS = 16384    # fp32 accumulator elements a program holds: 64 registers a thread at 8 warps
_MIN_BLOCKS_PER_SPLIT = 4
_MIN_MM_PROGRAMS = 256  # a matmul's programs: about two per SM of an H100 (132) or A100 (108)
_MAX_DENSE_SPLITS = 8
# From this embedding width on, the 16-bit dense forward takes its dots from a matmul (fp32: always,
# see fwd_dense_config).
_PRE_MIN_D = 512
_TORCH_TO_TL = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def _pow2(x: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(1, x))))


def _precision(dtype) -> str:
    # Ignored by tl.dot for 16-bit inputs; passed anyway so there is one compiled variant per dtype.
    return FP32_PRECISION if dtype in (torch.float32, "fp32") else "ieee"


def _splits(n_blocks: int, M: int, block_m: int, max_splits: int | None = None):
    """Split the M supports into chunks (multiples of block_m) so the grid has ~_TARGET_PROGRAMS programs."""
    nsplit = max(1, min(triton.cdiv(_TARGET_PROGRAMS, n_blocks), triton.cdiv(M, block_m * _MIN_BLOCKS_PER_SPLIT)))
    if max_splits is not None:
        nsplit = max(1, min(nsplit, max_splits))
    chunk = triton.cdiv(triton.cdiv(M, nsplit), block_m) * block_m
    return triton.cdiv(M, chunk), chunk


def _support_chunk(M: int, budget: int, per_support: int, block: int = 64) -> int:
    """Supports per chunk of a scratch of ``per_support`` elements per support (an [N, chunk]
    dots or dc matrix: N): about ``budget`` elements at most (at least one block of supports),
    the chunks of M balanced to multiples of ``block``."""
    most = max(block, budget // max(per_support, 1) // block * block)
    n_chunks = triton.cdiv(M, most) if M else 1
    return min(M, triton.cdiv(triton.cdiv(M, n_chunks), block) * block)


def _mm_config(fp32: bool, R: int, n_cols: int, K: int, max_splits: int = 1, a_transposed: bool = False) -> dict:
    """_matmul_kernel tiles and K splits for an [R, K] @ [K, n_cols] product.

    128-row tiles (64 when that leaves too few programs), up to 128 columns: spill-free with 8
    warps on sm_80 / sm_90 (AOT build, with the JIT's alignment hints); tf32x3 splits every
    operand, so fp32 takes a quarter of the K step and one stage less. K is split (partial outputs, summed by the
    caller) until there are ~_MIN_MM_PROGRAMS programs, at most ``max_splits`` ways.
    """
    block_k = 16 if fp32 else 64
    block_c = _pow2(n_cols, 32, 128)
    tiles = triton.cdiv(n_cols, block_c)
    block_r = 128 if triton.cdiv(R, 128) * tiles >= _MIN_MM_PROGRAMS else 64
    if fp32 and a_transposed:  # tf32x3 with a column-major A tile: 128 rows spill on sm_80
        block_r = 64
    tiles *= triton.cdiv(R, block_r)
    nsplit = max(1, min(max_splits, triton.cdiv(_MIN_MM_PROGRAMS, tiles), K // (4 * block_k)))
    return dict(BLOCK_R=block_r, BLOCK_K=block_k, BLOCK_C=block_c, GROUP_R=8, nsplit=nsplit, num_warps=8,
                num_stages=2 if fp32 else 3)


def fwd_dense_config(N: int, M: int, d: int, C: int, dtype) -> dict:
    """Block sizes of the dense-label forward: the [BLOCK_N, BLOCK_C] accumulator fits _ACC_ELEMS.

    With ``pre`` the dots are one _matmul_kernel product per support chunk, which the
    kernel then reads (once per class tile) instead of computing them: from d =
    _PRE_MIN_D on for 16-bit embeddings, at any d for fp32, whose tf32x3 dots spill
    beside a 64 x 256 accumulator (sm_80 / sm_90 AOT builds). ``segments`` lists (first
    support, supports, splits, split length, first part). The dots chunk stays within
    the partials' own budget (8 x N x C), and ``pre`` needs at most 8 chunks: the
    forward's memory is O(N x C) either way. fp32 without ``pre`` (the budget would be
    exceeded: M > ~64 C) holds an accumulator of half the size, up to 1024 classes.
    """
    fp32 = dtype in (torch.float32, "fp32")
    mchunk = _support_chunk(M, _MAX_DENSE_SPLITS * N * C, N)
    n_chunks = triton.cdiv(M, mchunk)
    pre = (fp32 or d >= _PRE_MIN_D) and n_chunks <= _MAX_DENSE_SPLITS
    if not pre:
        mchunk, n_chunks = M, 1
    fused_fp32 = fp32 and not pre  # tf32x3 dots beside the accumulator: half as many elements, spill-free
    block_c = _pow2(C, 16, _MAX_BLOCK_C_FUSED_FP32 if fused_fp32 else _MAX_BLOCK_C)
    block_n = _pow2((_ACC_ELEMS // 2 if fused_fp32 else _ACC_ELEMS) // block_c, 16, 64)
    # The label tile [BLOCK_M, BLOCK_C] goes through shared memory: keep it under 64 KiB.
    block_m = 16 if block_c * (4 if fp32 else 2) > 2048 else 32
    n_q, n_c = triton.cdiv(N, block_n), triton.cdiv(C, block_c)
    # At most 8 parts in all: their partials (parts x N x C fp32) stay O(N x C).
    segments, nparts = [], 0
    for j_lo in range(0, M, mchunk):
        mc = min(mchunk, M - j_lo)
        nsplit, chunk = _splits(n_q * n_c, mc, block_m, max_splits=_MAX_DENSE_SPLITS // n_chunks)
        segments.append((j_lo, mc, nsplit, chunk, nparts))
        nparts += nsplit
    return dict(BLOCK_N=block_n, BLOCK_M=block_m, BLOCK_D=32, BLOCK_C=block_c, pre=pre, mchunk=mchunk,
                segments=segments, nparts=nparts, grid=(n_q, n_c), num_warps=8 if block_n * block_c >= 8192 else 4,
                num_stages=1, mm=_mm_config(fp32, N, mchunk, d))


def fwd_ids_config(N: int, M: int, d: int, C: int, dtype) -> dict:
    """Block sizes of the class-id forward: a tile of classes per program, so a wide query block.

    Spill-free on sm_80 and sm_90 (AOT build); 128 query rows halve the support reads at the
    evaluation shape, 64 keep enough programs for a training batch.
    """
    block_c = _pow2(C, 16, 32)
    if dtype in (torch.float32, "fp32"):  # tf32x3 splits every operand: smaller tiles
        block_n, block_m, block_d = 64, 64, 16
    else:
        block_n, block_m, block_d = (128 if N >= 2048 else 64), 64, 32
    block_n = min(block_n, _pow2(N, 16, 128))
    return dict(BLOCK_N=block_n, BLOCK_M=block_m, BLOCK_D=block_d, BLOCK_C=block_c,
                grid=(triton.cdiv(N, block_n), triton.cdiv(C, block_c)),
                num_warps=8 if block_n * block_m >= 4096 else 4, num_stages=1)


def combine_config(N: int, C: int, nparts: int) -> dict:
    block_s = triton.next_power_of_2(nparts)
    block_c = _pow2(C, 16, 128)
    block_r = _pow2(4096 // max(block_c, block_s), 1, 64)
    return dict(BLOCK_R=block_r, BLOCK_C=block_c, BLOCK_S=block_s,
                grid=(triton.cdiv(N, block_r), triton.cdiv(C, block_c)), num_warps=4, num_stages=1)


def bwd_config(N: int, M: int, d: int, C: int, dtype) -> dict:
    """Block sizes of the backward: the dc tiles, the support chunk, and the two matmuls.

    dc exists for one chunk of ``chunk`` supports at a time, in the inputs' dtype: at most the
    bytes of the supports' fp32 gradient [M, d] (or 64 supports), so the memory stays O(N * C + M * d) at
    any N x M. ``mm_q`` (dq^ = dc @ S^, K = the chunk's supports) splits K into at most M / N
    partials, so that they too stay within M x d.
    """
    fp32 = dtype in (torch.float32, "fp32")
    # 16-bit dc: twice the elements in the same bytes. At PAWS's training shape (N = 512 = 2 d
    # at d = 256) the whole of M then fits: one dc pass and two matmuls instead of twice that.
    chunk = _support_chunk(M, M * d * 4 // (4 if fp32 else 2), N)
    # No FMA in dc: A = exp2(z - lse) must round z = dots * scale as the forward did (its
    # tl.where keeps that product apart), so that A is the forward's softmax.
    dc = dict(BLOCK_N=64, BLOCK_M=64, BLOCK_D=16 if fp32 else 32, BLOCK_C=16 if fp32 else 32, num_warps=8,
              num_stages=1, enable_fp_fusion=False)
    mm_q = _mm_config(fp32, N, d, chunk, max_splits=max(1, min(8, M // max(N, 1))))
    mm_s = _mm_config(fp32, chunk, d, N, a_transposed=True)
    return dict(chunk=chunk, dc=dc, mm_q=mm_q, mm_s=mm_s)


def e_config(N: int, C: int) -> dict:
    block_c = _pow2(C, 16, 256)
    block_r = _pow2(4096 // block_c, 1, 64)
    return dict(BLOCK_R=block_r, BLOCK_C=block_c, grid=(triton.cdiv(N, block_r),), num_warps=4, num_stages=1)


def row_config(n_rows: int, d: int) -> dict:
    # At most 32 rows: the fp32 normalisation backward spills at 64 rows of 64 columns (sm_80/90).
    block_d = _pow2(d, 16, 256)
    block_r = _pow2(4096 // block_d, 1, 32)
    return dict(BLOCK_R=block_r, BLOCK_D=block_d, grid=(triton.cdiv(n_rows, block_r),), num_warps=4, num_stages=1)


def _interpreted(x: torch.Tensor) -> bool:
    """The kernels only run on CPU tensors under Triton's interpreter; launches recorded for the
    AOT build take what a GPU compiles."""
    return x.device.type == "cpu" and not recording()


def _inv_norms(query: torch.Tensor, supports: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both row sets' inverse norms (float32), in one launch."""
    (N, d), M = query.shape, supports.shape[0]
    inv_q = torch.empty(N, device=query.device, dtype=torch.float32)
    inv_s = torch.empty(M, device=query.device, dtype=torch.float32)
    rc = row_config(N, d)  # the tiles depend on d alone: one config serves both row sets
    nq = rc["grid"][0]
    launch(_inv_norm_kernel, (nq + triton.cdiv(M, rc["BLOCK_R"]),),
           X=query, INV=inv_q, n_rows=N, stride_x=query.stride(0), X2=supports, INV2=inv_s, n_rows2=M,
           stride_x2=supports.stride(0), n_blocks=nq, d=d, eps=NORM_EPS, BLOCK_R=rc["BLOCK_R"],
           BLOCK_D=rc["BLOCK_D"], **launch_options(rc))
    return inv_q, inv_s


def _matmul(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, mm: dict, prec: str, upcast: bool, *,
            scale: torch.Tensor | None = None, accumulate: bool = False) -> None:
    """out[p] (+)= a[:, K_p] @ (diag(scale) b)[K_p, :] for the mm["nsplit"] ranges K_p of K.

    a, b: 2-D views of any strides; out: fp32 [nsplit, R, Cn] with row-major [R, Cn] parts
    (a 2-D out is one part)."""
    R, K = a.shape
    Cn = b.shape[1]
    nsplit = mm["nsplit"]
    parts = out if out.dim() == 3 else out.unsqueeze(0)
    assert parts.shape[0] == nsplit and parts.stride(2) == 1
    k_split = triton.cdiv(triton.cdiv(K, nsplit), mm["BLOCK_K"]) * mm["BLOCK_K"]
    grid = (triton.cdiv(R, mm["BLOCK_R"]) * triton.cdiv(Cn, mm["BLOCK_C"]), nsplit)
    launch(_matmul_kernel, grid,
           A=a, B=b, B_SCALE=scale if scale is not None else b, OUT=parts, R=R, K=K, Cn=Cn, k_split=k_split,
           stride_ar=a.stride(0), stride_ak=a.stride(1), stride_bk=b.stride(0), stride_bc=b.stride(1),
           stride_or=parts.stride(1), stride_op=parts.stride(0), HAS_SCALE=scale is not None, ACCUMULATE=accumulate,
           BLOCK_R=mm["BLOCK_R"], BLOCK_K=mm["BLOCK_K"], BLOCK_C=mm["BLOCK_C"], GROUP_R=mm["GROUP_R"], PREC=prec,
           UPCAST=upcast, **launch_options(mm))


def _class_order(ids: torch.Tensor, C: int):
    """Supports sorted by class: the permutation (int64), the sorted ids (int16, or int32 for
    C >= 2^15 - 1) and the class start offsets [C + 1] (int32).

    One cast, one sort and a binary search, no host sync: few launches, which is much of a
    training-size problem's time. The ids are sorted as 16-bit keys: a radix sort (what a GPU
    runs past a few thousand keys) then takes 2 digit passes rather than int64's 8."""
    key = ids.to(torch.int16 if C < 2**15 - 1 else torch.int32)
    sorted_ids, perm = torch.sort(key, stable=True)
    start = torch.searchsorted(sorted_ids, torch.arange(C + 1, device=ids.device, dtype=key.dtype), out_int32=True)
    return perm, sorted_ids, start


def _fp32_if_fp64(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """fp64 embeddings and labels are computed in fp32: the kernels accumulate their products in
    fp32, and an fp64 product into an fp32 accumulator does not compile for a GPU."""
    return [t.float() if t.dtype == torch.float64 else t for t in tensors]


def snn_forward(query: torch.Tensor, supports: torch.Tensor, labels: torch.Tensor, tau: float, num_classes: int,
                smoothing: float):
    """Fused forward. Returns ``(probs, lse, inv_q, inv_s)``, all float32.

    ``probs`` is ``[N, C]``; ``lse`` ``[N]`` each row's base-2 log-sum-exp of
    ``c_ij * log2(e) / tau``, and ``inv_q`` / ``inv_s`` the inverse norms: what the
    backward recomputes A from. ``labels`` is a floating ``[M, C]`` matrix or int64
    class ids ``[M]`` (then ``smoothing`` applies). Query and supports share a dtype;
    inputs are assumed validated by the caller.
    """
    query, supports, labels = _fp32_if_fp64(query, supports, labels)
    query, supports = rows_contiguous(query), rows_contiguous(supports)
    N, d = query.shape
    M = supports.shape[0]
    C = num_classes
    dense = labels.is_floating_point()
    dev = query.device
    scale2 = LOG2E / tau
    prec = _precision(query.dtype)
    upcast = _interpreted(query)
    with launch_device(query, "snn"):
        inv_q, inv_s = _inv_norms(query, supports)
        probs = torch.empty(N, C, device=dev, dtype=torch.float32)
        lse = torch.empty(N, device=dev, dtype=torch.float32)
        if dense:
            labels = rows_contiguous(labels)
            fc = fwd_dense_config(N, M, d, C, query.dtype)
            nparts = fc["nparts"]
            part_m, part_l = torch.empty(2, nparts, N, device=dev, dtype=torch.float32)
            part_acc = torch.empty(nparts, N, C, device=dev, dtype=torch.float32)
            dots = torch.empty(N * fc["mchunk"] if fc["pre"] else 0, device=dev, dtype=torch.float32)
            for j_lo, mc, nsplit, chunk, part_base in fc["segments"]:
                if fc["pre"]:
                    _matmul(query, supports[j_lo:j_lo + mc].t(), dots[: N * mc].view(N, mc), fc["mm"], prec, upcast)
                launch(_fwd_dense_kernel, (fc["grid"][0], nsplit, fc["grid"][1]),
                       Q=query, S=supports, Y=labels, INV_Q=inv_q, INV_S=inv_s, L=dots, PART_M=part_m, PART_L=part_l,
                       PART_ACC=part_acc, N=N, d=d, C=C, stride_q=query.stride(0), stride_s=supports.stride(0),
                       stride_y=labels.stride(0), j_lo=j_lo, j_hi=j_lo + mc, chunk=chunk, part_base=part_base,
                       scale2=scale2, PRE=fc["pre"], BLOCK_N=fc["BLOCK_N"], BLOCK_M=fc["BLOCK_M"],
                       BLOCK_D=fc["BLOCK_D"], BLOCK_C=fc["BLOCK_C"], PREC=prec, UPCAST=upcast, **launch_options(fc))
            keep, spread, tile_c = 1.0, 0.0, 1
        else:
            perm, sorted_ids, start = _class_order(labels, C)
            fc = fwd_ids_config(N, M, d, C, query.dtype)
            nparts = fc["grid"][1]
            part_m, part_l = torch.empty(2, nparts, N, device=dev, dtype=torch.float32)
            part_acc = torch.empty(N, C, device=dev, dtype=torch.float32)
            launch(_fwd_ids_kernel, fc["grid"],
                   Q=query, S=supports, PERM=perm, SORTED_IDS=sorted_ids, CLASS_START=start, INV_Q=inv_q, INV_S=inv_s,
                   PART_M=part_m, PART_L=part_l, ACC=part_acc, N=N, d=d, C=C, stride_q=query.stride(0),
                   stride_s=supports.stride(0), scale2=scale2, BLOCK_N=fc["BLOCK_N"], BLOCK_M=fc["BLOCK_M"],
                   BLOCK_D=fc["BLOCK_D"], BLOCK_C=fc["BLOCK_C"], PREC=prec, UPCAST=upcast, **launch_options(fc))
            keep, spread, tile_c = 1.0 - smoothing, smoothing / C, fc["BLOCK_C"]
        cc = combine_config(N, C, nparts)
        launch(_combine_kernel, cc["grid"],
               PART_M=part_m, PART_L=part_l, PART_ACC=part_acc, P=probs, LSE=lse, N=N, C=C, nparts=nparts, keep=keep,
               spread=spread, DENSE=dense, TILE_C=tile_c, BLOCK_R=cc["BLOCK_R"], BLOCK_C=cc["BLOCK_C"],
               BLOCK_S=cc["BLOCK_S"], **launch_options(cc))
    return probs, lse, inv_q, inv_s


def _normalize_backward(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> list[torch.Tensor]:
    """The inputs' gradients, in one launch, for one or two (x, ghat) pairs: ghat [nparts, n, d] the
    fp32 partial gradients of x^ = normalize(x); the inputs share d and dtype."""
    # fp32 inputs: written over part 0 (each program reads an element before it writes it).
    dxs = [g[0] if x.dtype == torch.float32 else torch.empty(x.shape, device=x.device, dtype=x.dtype)
           for x, g in pairs]
    (x, g), (x2, g2) = pairs[0], pairs[-1]
    dx, dx2 = dxs[0], dxs[-1]
    rc = row_config(x.shape[0], x.shape[1])  # the tiles depend on d alone: one config serves both
    n_blocks = rc["grid"][0]
    grid = (n_blocks + (triton.cdiv(x2.shape[0], rc["BLOCK_R"]) if len(pairs) == 2 else 0),)
    launch(_norm_bwd_kernel, grid,
           X=x, GHAT=g, DX=dx, n_rows=x.shape[0], nparts=g.shape[0], stride_x=x.stride(0), stride_dx=dx.stride(0),
           X2=x2, GHAT2=g2, DX2=dx2, n_rows2=x2.shape[0], nparts2=g2.shape[0], stride_x2=x2.stride(0),
           stride_dx2=dx2.stride(0), n_blocks=n_blocks, d=x.shape[1], eps=NORM_EPS, BLOCK_R=rc["BLOCK_R"],
           BLOCK_D=rc["BLOCK_D"], **launch_options(rc))
    return dxs


def snn_backward(grad_probs: torch.Tensor, query: torch.Tensor, supports: torch.Tensor, labels: torch.Tensor,
                 probs: torch.Tensor, lse: torch.Tensor, inv_q: torch.Tensor, inv_s: torch.Tensor, tau: float,
                 num_classes: int, smoothing: float, need_query: bool, need_supports: bool):
    """Gradients ``(d query, d supports)`` in the inputs' dtype (an empty tensor where not needed).

    Per chunk of supports: ``_bwd_dc_kernel`` writes dc, then two matmuls give dq^ += dc @ S^
    (split over the chunk's supports into partials) and ds^[chunk] = dc.T @ Q^, the rows
    normalised on the fly by the matmul's row scales; ``_norm_bwd_kernel`` sums the partials
    and applies the normalisation's backward. The logits are recomputed once, whatever d:
    3 N M d multiply-adds (the authors' backward does 2) and N M C for dA, two thirds of
    them on 128 x 128 matmul tiles.
    """
    dtypes = query.dtype, supports.dtype
    query, supports, labels = _fp32_if_fp64(query, supports, labels)
    query, supports = rows_contiguous(query), rows_contiguous(supports)
    N, d = query.shape
    M = supports.shape[0]
    C = num_classes
    dense = labels.is_floating_point()
    dev = query.device
    g = rows_contiguous(grad_probs.float())
    gscale, spread = 1.0, 0.0
    if dense:
        labels = rows_contiguous(labels)
        stride_y = labels.stride(0)
    else:
        labels = labels.contiguous()
        gscale, spread = 1.0 - smoothing, smoothing / C
        stride_y = 1
    bc = bwd_config(N, M, d, C, query.dtype)
    dc, chunk = bc["dc"], bc["chunk"]
    prec, upcast = _precision(query.dtype), _interpreted(query)
    dq, ds = (torch.empty(0, device=dev, dtype=dt) for dt in dtypes)
    if not (need_query or need_supports) or M == 0:
        return dq, ds
    with launch_device(query, "snn"):
        # E_i: the per-row constant of dA_ij - D_i (D_i = sum_c G_ic P_ic; class ids add eps / C sum_c G_ic).
        e = torch.empty(N, device=dev, dtype=torch.float32)
        ec = e_config(N, C)
        launch(_row_e_kernel, ec["grid"],
               G=g, P=probs, E=e, N=N, C=C, stride_g=g.stride(0), stride_p=probs.stride(0), spread=spread,
               BLOCK_R=ec["BLOCK_R"], BLOCK_C=ec["BLOCK_C"], **launch_options(ec))
        f = torch.empty(N, chunk, device=dev, dtype=query.dtype)
        gq = torch.empty(bc["mm_q"]["nsplit"], N, d, device=dev, dtype=torch.float32) if need_query else None
        gs = torch.empty(1, M, d, device=dev, dtype=torch.float32) if need_supports else None
        for j_lo in range(0, M, chunk):
            mc = min(chunk, M - j_lo)
            f_mc = f[:, :mc]
            grid = (triton.cdiv(mc, dc["BLOCK_M"]), triton.cdiv(N, dc["BLOCK_N"]))
            launch(_bwd_dc_kernel, grid,
                   Q=query, S=supports, Y=labels, G=g, INV_Q=inv_q, INV_S=inv_s, LSE=lse, E=e, F=f_mc, N=N, d=d, C=C,
                   j_lo=j_lo, mc=mc, stride_q=query.stride(0), stride_s=supports.stride(0), stride_y=stride_y,
                   stride_g=g.stride(0), stride_f=f_mc.stride(0), scale2=LOG2E / tau, inv_tau=1.0 / tau,
                   gscale=gscale, DENSE=dense, BLOCK_N=dc["BLOCK_N"], BLOCK_M=dc["BLOCK_M"], BLOCK_D=dc["BLOCK_D"],
                   BLOCK_C=dc["BLOCK_C"], PREC=prec, UPCAST=upcast, **launch_options(dc))
            if need_query:
                _matmul(f_mc, supports[j_lo:j_lo + mc], gq, bc["mm_q"], prec, upcast, scale=inv_s[j_lo:j_lo + mc],
                        accumulate=j_lo > 0)
            if need_supports:
                _matmul(f_mc.t(), query, gs[:, j_lo:j_lo + mc], bc["mm_s"], prec, upcast, scale=inv_q)
        pairs = [(x, gx) for x, gx, need in ((query, gq, need_query), (supports, gs, need_supports)) if need]
        grads = iter(_normalize_backward(pairs))
        dq = next(grads) if need_query else dq
        ds = next(grads) if need_supports else ds
    return dq.to(dtypes[0]), ds.to(dtypes[1])
