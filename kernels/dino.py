r"""Triton kernels for the DINO family's soft cross-entropy over crop pairs, and their launchers.

Notation: S student crops and T teacher crops of B samples each, rows crop-major (student
row ``s * B + b``, teacher row ``t * B + b``), K classes (prototypes). Everything is in
base-2 units: the student's z = s * log2(e) / tau_s, and the teacher's probabilities are
either given (q) or made from its logits x as

    y_tbk = (x_tbk - c_k) * log2(e) / tau_t + a_k            q_tbk = 2^(y_tbk - M_tb) / L_tb

with c a center (DINO's softmax centering), a the per-class log2 scale that Sinkhorn-Knopp
leaves (below), M_tb the row max of y and L_tb = sum_k 2^(y_tbk - M_tb).

Pairs (s, t): all of them, or all but s == t for s, t < D = min(S, T) (``ignore_diagonal``,
DINO's "a crop does not predict itself"). With Q_sb the sum of q_tb over the teacher crops
paired with s, n_sb = sum_k Q_sbk, w_b a per-sample weight (1 unless given: iBOT's
1 / masked patches of the image) and ``scale`` the reduction (1 / (pairs * B): a mean), the
authors' -sum over pairs of <q_t, log_softmax(z_s)> has the closed form

    loss     = scale * ln2 * sum_{s,b} w_b * [ n_sb * log2(L^z_sb) - <Q_sb, z_sb - M^z_sb> ]
    dloss/ds = scale * w_b * ( n_sb * softmax(z_sb) - Q_sb ) / tau_s

with M^z, L^z the student row's max and sum of 2^(z - M^z): no per-pair tensor, no
log-softmax, and no cancellation between a large log-sum-exp and a large dot.

Sinkhorn-Knopp (the authors' 3 iterations over the K x R matrix exp(x / tau)) alternately
normalises classes over samples and samples over classes: Q = diag(u) E diag(v). Its last
step normalises each sample, so q_r = softmax_k(x_r / tau + ln u_k): only u matters, and in
base 2 it comes from alternating log-sum-exps (constants such as K, the sample count and the
first global sum cancel in that last normalisation):

    a_k = -log2 sum_r 2^(y_rk + b_r)      (over every rank's rows)      b_r = -log2 sum_k 2^(y_rk + a_k)

starting from b = 0; n iterations are n column passes with n - 1 row passes between them,
each a streaming reduction with its own running max, so no finite input overflows.

Kernels (a program owns a block of columns, or a (sample, K-split) pair):

1. ``_teacher_rows_kernel``: per (row, column block) partial max and sum of 2^(y - max),
   and the column means of x (the batch center).
2. ``_teacher_cols_kernel``: per column the max and sum of 2^(x * log2(e) / tau + b_r - max)
   over rows (a Sinkhorn-Knopp column pass).
3. ``_combine_kernel``: merges row partials into (M, L) and, for the student, sum(Q) and each
   program's share of the loss (summed in a fixed order by the caller: deterministic).
4. ``_pair_fwd_kernel``: program (b, split) holds sample b's teacher rows and student rows
   and streams its columns, keeping per column lane an online max m, sum of 2^(z - m) and
   dot <Q, z - m>, merged across lanes once at the end.
5. ``_pair_bwd_kernel``: the same tiles, recomputing q and the student softmax from the saved
   row statistics and writing the gradient.

Memory beyond inputs and gradient: O(rows * splits + K).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import launch, launch_device, launch_options, rows_contiguous

# Integer arguments that count rows or crops are not specialised (equal to 1, divisible by 16):
# they change nothing in the compiled code but would multiply its variants. K and the strides,
# which decide how the contiguous columns load, are.
LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
FLT_MAX = tl.constexpr(3.4028234663852886e38)  # float32 max: a constexpr, so kernels may read it


@triton.jit
def _teacher_y(x, C, A, cols, cmask, mask, t_scale2, HAS_CENTER: tl.constexpr, HAS_OFFSET: tl.constexpr):
    """y = (x - c) * log2(e) / tau_t + a on a [rows, BLOCK_K] tile; -inf where masked. Centered
    before scaling, as the authors: x - c is exact when x and c are close."""
    y = x
    if HAS_CENTER:
        y = y - tl.load(C + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    y = y * t_scale2
    if HAS_OFFSET:
        y = y + tl.load(A + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    return tl.where(mask, y, float("-inf"))


@triton.jit(do_not_specialize=["n_rows"])
def _teacher_rows_kernel(
    X,                        # teacher logits [n_rows, K], row stride stride_x
    C,                        # center [K], fp32 (HAS_CENTER)
    A,                        # per-class log2 offset [K], fp32 (HAS_OFFSET)
    PART_M,                   # [n_rows, nsplit] out: max of y over this program's columns
    PART_L,                   # [n_rows, nsplit] out: sum of 2^(y - max) over them
    COL_MEAN,                 # [K] out: column means of x (WITH_MEAN)
    n_rows,
    K,
    stride_x,
    inv_rows,                 # 1 / n_rows
    t_scale2,                 # log2(e) / tau_t
    HAS_CENTER: tl.constexpr,
    HAS_OFFSET: tl.constexpr,
    WITH_MEAN: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    nsplit = tl.num_programs(0)
    cols = pid * BLOCK_K + tl.arange(0, BLOCK_K)
    cmask = cols < K
    colsum = tl.zeros([BLOCK_K], dtype=tl.float32)
    for r0 in range(0, n_rows, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        rmask = rows < n_rows
        mask = rmask[:, None] & cmask[None, :]
        x = tl.load(X + rows[:, None].to(tl.int64) * stride_x + cols[None, :], mask=mask, other=0.0)
        x = x.to(tl.float32)
        if WITH_MEAN:  # scaled before the sum: rows near fp32's largest values must not overflow it
            colsum += tl.sum(x * inv_rows, axis=0)
        y = _teacher_y(x, C, A, cols, cmask, mask, t_scale2, HAS_CENTER, HAS_OFFSET)
        m = tl.max(y, axis=1)
        # A block of -inf logits (masked classes) has sum 0, not 2^(-inf - -inf) = NaN.
        l = tl.sum(tl.exp2(y - tl.where(m == float("-inf"), 0.0, m)[:, None]), axis=1)
        tl.store(PART_M + rows * nsplit + pid, m, mask=rmask)
        tl.store(PART_L + rows * nsplit + pid, l, mask=rmask)
    if WITH_MEAN:
        tl.store(COL_MEAN + cols, colsum, mask=cmask)


@triton.jit(do_not_specialize=["n_rows"])
def _teacher_cols_kernel(
    X,                        # teacher logits [n_rows, K], row stride stride_x
    ROW_OFF,                  # [n_rows] fp32: b_r, added to each row (HAS_ROW_OFFSET)
    COL_M,                    # [K] out: column max of y = x * t_scale2 + b
    COL_L,                    # [K] out: column sum of 2^(y - max)
    n_rows,
    K,
    stride_x,
    t_scale2,                 # log2(e) / tau_t
    HAS_ROW_OFFSET: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = pid * BLOCK_K + tl.arange(0, BLOCK_K)
    cmask = cols < K
    # From -FLT_MAX, not -inf: a column of -inf logits keeps sum 0 instead of 2^(-inf - -inf).
    m = tl.full([BLOCK_K], -FLT_MAX, dtype=tl.float32)
    l = tl.zeros([BLOCK_K], dtype=tl.float32)
    for r0 in range(0, n_rows, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        rmask = rows < n_rows
        mask = rmask[:, None] & cmask[None, :]
        x = tl.load(X + rows[:, None].to(tl.int64) * stride_x + cols[None, :], mask=mask, other=0.0)
        y = x.to(tl.float32) * t_scale2
        if HAS_ROW_OFFSET:
            y = y + tl.load(ROW_OFF + rows, mask=rmask, other=0.0)[:, None]
        y = tl.where(mask, y, float("-inf"))
        m_new = tl.maximum(m, tl.max(y, axis=0))
        l = l * tl.exp2(m - m_new) + tl.sum(tl.exp2(y - m_new[None, :]), axis=0)
        m = m_new
    tl.store(COL_M + cols, m, mask=cmask)
    tl.store(COL_L + cols, l, mask=cmask)


@triton.jit(do_not_specialize=["n_rows", "nsplit", "B"])
def _combine_kernel(
    PART_M,                   # [n_rows, nsplit] partial row max
    PART_L,                   # [n_rows, nsplit] partial sum of 2^(x - max)
    PART_D,                   # [n_rows, nsplit] partial <Q, z - max> (HAS_DOT)
    PART_Q,                   # [n_rows, nsplit] partial sum of Q (HAS_DOT)
    STATS,                    # [2 or 3, n_rows] out: max, sum (and sum(Q) with HAS_DOT)
    W,                        # [B] per-sample weights (HAS_WEIGHT)
    LOSS_PART,                # [programs] out: each program's share of the loss (HAS_DOT)
    n_rows,
    nsplit,
    B,                        # samples: row r is sample r % B
    loss_scale,               # scale * ln 2
    HAS_DOT: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    # Max and sum are kept apart rather than as M + log2(L): at |x| ~ 1e6 an fp32
    # log-sum-exp is only good to ~0.06, and the backward needs 2^(x - M) exactly.
    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    splits = tl.arange(0, BLOCK_S)
    rmask = rows < n_rows
    mask = rmask[:, None] & (splits < nsplit)[None, :]
    offs = rows[:, None] * nsplit + splits[None, :]
    m = tl.load(PART_M + offs, mask=mask, other=float("-inf"))
    l = tl.load(PART_L + offs, mask=mask, other=0.0)
    m_row = tl.max(m, axis=1)
    l_row = tl.sum(l * tl.exp2(m - m_row[:, None]), axis=1)
    tl.store(STATS + rows, m_row, mask=rmask)
    tl.store(STATS + n_rows + rows, l_row, mask=rmask)
    if HAS_DOT:
        # <Q, z - M> = sum over splits of <Q, z - m_j> + (m_j - M) * sum(Q)_j
        qs = tl.load(PART_Q + offs, mask=mask, other=0.0)
        shift = tl.where(qs > 0, (m - m_row[:, None]) * qs, 0.0)
        dot = tl.sum(tl.load(PART_D + offs, mask=mask, other=0.0) + shift, axis=1)
        n = tl.sum(qs, axis=1)
        tl.store(STATS + 2 * n_rows + rows, n, mask=rmask)
        # n * lse - <Q, z> = n * log2(L) - <Q, z - M>: no cancellation. Scaled per row, so that a
        # sum of rows whose logits span most of fp32's range does not overflow on the way.
        term = (n * tl.log2(l_row) - dot) * loss_scale
        if HAS_WEIGHT:
            term = term * tl.load(W + rows % B, mask=rmask, other=0.0)
        tl.store(LOSS_PART + pid, tl.sum(tl.where(rmask, term, 0.0), axis=0))


@triton.jit
def _teacher_q(X, C, A, STATS_X, crops, cmask_rows, b, B, n_t, stride_x, cols, cmask, t_scale2,
               TEACHER_PROBS: tl.constexpr, HAS_CENTER: tl.constexpr, HAS_OFFSET: tl.constexpr):
    """Teacher probabilities of sample b's crops ``crops`` on a column block: loaded as given,
    or recomputed from the logits and the row statistics. 0 where masked."""
    rows = crops * B + b
    mask = cmask_rows[:, None] & cmask[None, :]
    x = tl.load(X + rows[:, None].to(tl.int64) * stride_x + cols[None, :], mask=mask, other=0.0)
    x = x.to(tl.float32)
    if TEACHER_PROBS:
        q = x
    else:
        m = tl.load(STATS_X + rows, mask=cmask_rows, other=0.0)
        inv_l = 1.0 / tl.load(STATS_X + n_t * B + rows, mask=cmask_rows, other=1.0)
        y = _teacher_y(x, C, A, cols, cmask, mask, t_scale2, HAS_CENTER, HAS_OFFSET)
        q = tl.where(mask, tl.exp2(y - m[:, None]) * inv_l[:, None], 0.0)
    return q


@triton.jit
def _student_z(Z, crops, rmask, b, B, stride_z, cols, cmask, s_scale2):
    """Student logits of sample b's crops on a column block, in base 2; -inf where masked."""
    mask = rmask[:, None] & cmask[None, :]
    rows = (crops * B + b).to(tl.int64)
    z = tl.load(Z + rows[:, None] * stride_z + cols[None, :], mask=mask, other=0.0)
    return tl.where(mask, z.to(tl.float32) * s_scale2, float("-inf"))


@triton.jit
def _lane_update(z, Q, A, m, l, d):
    """One column of each lane: the running max m, sum l of 2^(z - m) and dot d = <Q, z - m>
    moved to the new max (A: the lane's sum of Q so far), plus this column's terms. m starts at
    -FLT_MAX; the products are guarded where a factor is 0 and the other infinite (a first
    column far above -FLT_MAX, a masked column of z = -inf)."""
    m_new = tl.maximum(m, z)
    shift = m - m_new
    l = l * tl.exp2(shift) + tl.exp2(z - m_new)
    d += tl.where(A > 0, shift * A, 0.0) + tl.where(Q > 0, Q * (z - m_new), 0.0)
    return m_new, l, d


@triton.jit
def _lanes_store(m, l, d, A, crops, rmask, b, B, nsplit, split, PART_M, PART_L, PART_D, PART_Q):
    """A tile's lanes merged into its rows' partials of this split: max M, sum l * 2^(m - M),
    <Q, z - M> = sum d + (m - M) * A, and sum(Q)."""
    m_row = tl.max(m, axis=1)
    l_row = tl.sum(l * tl.exp2(m - m_row[:, None]), axis=1)
    d_row = tl.sum(d + tl.where(A > 0, (m - m_row[:, None]) * A, 0.0), axis=1)
    offs = (crops * B + b) * nsplit + split
    tl.store(PART_M + offs, m_row, mask=rmask)
    tl.store(PART_L + offs, l_row, mask=rmask)
    tl.store(PART_D + offs, d_row, mask=rmask)
    tl.store(PART_Q + offs, tl.sum(A, axis=1), mask=rmask)


@triton.jit(do_not_specialize=["n_diag", "n_s", "n_t", "B"])
def _pair_fwd_kernel(
    Z,                        # student logits, row (s, b) at (s * B + b) * stride_z
    X,                        # teacher logits, or probabilities (TEACHER_PROBS), row (t, b)
    C,                        # center [K], fp32 (HAS_CENTER)
    A,                        # per-class log2 offset [K], fp32 (HAS_OFFSET)
    STATS_X,                  # [2, n_t * B] teacher rows' max and sum (logits only)
    PART_M,                   # [n_s * B, nsplit] out: the student rows' partials of each split
    PART_L,
    PART_D,
    PART_Q,
    n_diag,                   # D: the pairs (s, s), s < D, are left out
    n_s,                      # student crops S
    n_t,                      # teacher crops T
    B,
    K,
    stride_z,
    stride_x,
    chunk,                    # columns per split
    s_scale2,                 # log2(e) / tau_s
    t_scale2,                 # log2(e) / tau_t
    TEACHER_PROBS: tl.constexpr,
    HAS_CENTER: tl.constexpr,
    HAS_OFFSET: tl.constexpr,
    D_PAD: tl.constexpr,      # D padded to a power of two; 0 when every pair counts
    SS_PAD: tl.constexpr,     # the S - D other student crops, padded; 0 when there are none
    TT_PAD: tl.constexpr,     # the T - D other teacher crops, padded; 0 when there are none
    BLOCK_K: tl.constexpr,
):
    # Student crop s < D is scored against every teacher crop but its own, Q = sum(q) - q_s;
    # the others against all, Q = sum(q). Diagonal crops are one tile of each, the rest another.
    b = tl.program_id(0)
    split = tl.program_id(1)
    nsplit = tl.num_programs(1)
    k_start = split * chunk
    k_end = tl.minimum(k_start + chunk, K)
    a_all = tl.zeros([BLOCK_K], dtype=tl.float32)  # per lane, the sum of every teacher q so far
    if D_PAD > 0:
        hc = tl.arange(0, D_PAD)
        hmask = hc < n_diag
        m_h = tl.full([D_PAD, BLOCK_K], -FLT_MAX, dtype=tl.float32)
        l_h = tl.zeros([D_PAD, BLOCK_K], dtype=tl.float32)
        d_h = tl.zeros([D_PAD, BLOCK_K], dtype=tl.float32)
        a_h = tl.zeros([D_PAD, BLOCK_K], dtype=tl.float32)  # per lane, the sum of q_s so far
    if SS_PAD > 0:
        sc = n_diag + tl.arange(0, SS_PAD)
        smask = sc < n_s
        m_s = tl.full([SS_PAD, BLOCK_K], -FLT_MAX, dtype=tl.float32)
        l_s = tl.zeros([SS_PAD, BLOCK_K], dtype=tl.float32)
        d_s = tl.zeros([SS_PAD, BLOCK_K], dtype=tl.float32)
    if TT_PAD > 0:
        tc = n_diag + tl.arange(0, TT_PAD)
        tmask = tc < n_t
    for k0 in range(k_start, k_end, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        cmask = cols < k_end
        q_sum = tl.zeros([BLOCK_K], dtype=tl.float32)
        if D_PAD > 0:
            q_h = _teacher_q(X, C, A, STATS_X, hc, hmask, b, B, n_t, stride_x, cols, cmask, t_scale2,
                             TEACHER_PROBS, HAS_CENTER, HAS_OFFSET)
            q_sum += tl.sum(q_h, axis=0)
        if TT_PAD > 0:
            q_t = _teacher_q(X, C, A, STATS_X, tc, tmask, b, B, n_t, stride_x, cols, cmask, t_scale2,
                             TEACHER_PROBS, HAS_CENTER, HAS_OFFSET)
            q_sum += tl.sum(q_t, axis=0)
        if D_PAD > 0:
            z = _student_z(Z, hc, hmask, b, B, stride_z, cols, cmask, s_scale2)
            m_h, l_h, d_h = _lane_update(z, q_sum[None, :] - q_h, a_all[None, :] - a_h, m_h, l_h, d_h)
            a_h += q_h
        if SS_PAD > 0:
            z = _student_z(Z, sc, smask, b, B, stride_z, cols, cmask, s_scale2)
            m_s, l_s, d_s = _lane_update(z, q_sum[None, :], a_all[None, :], m_s, l_s, d_s)
        a_all += q_sum
    if D_PAD > 0:
        _lanes_store(m_h, l_h, d_h, a_all[None, :] - a_h, hc, hmask, b, B, nsplit, split,
                     PART_M, PART_L, PART_D, PART_Q)
    if SS_PAD > 0:
        _lanes_store(m_s, l_s, d_s, a_all[None, :] + tl.zeros([SS_PAD, BLOCK_K], dtype=tl.float32), sc, smask,
                     b, B, nsplit, split, PART_M, PART_L, PART_D, PART_Q)


@triton.jit
def _student_grad(GRAD_Z, Z, STATS_Z, crops, rmask, Q, g, b, B, n_rows, stride_z, stride_dz, cols, cmask, s_scale2):
    """g * (n * softmax(z) - Q) for sample b's crops on a column block, stored in GRAD_Z's dtype."""
    rows = crops * B + b
    m = tl.load(STATS_Z + rows, mask=rmask, other=0.0)
    # n / L folded into one factor: n * softmax(z) = 2^(z - M) * (n / L)
    f = tl.load(STATS_Z + 2 * n_rows + rows, mask=rmask, other=0.0) / tl.load(STATS_Z + n_rows + rows,
                                                                              mask=rmask, other=1.0)
    mask = rmask[:, None] & cmask[None, :]
    offs = rows[:, None].to(tl.int64)
    z = tl.load(Z + offs * stride_z + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    p = tl.exp2(z * s_scale2 - m[:, None]) * f[:, None]
    tl.store(GRAD_Z + offs * stride_dz + cols[None, :], (g * (p - Q)).to(GRAD_Z.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["n_diag", "n_s", "n_t", "B"])
def _pair_bwd_kernel(
    GRAD_LOSS,                # [] upstream gradient of the loss
    Z,                        # student logits, row (s, b) at (s * B + b) * stride_z
    X,                        # teacher logits, or probabilities (TEACHER_PROBS)
    C,                        # center [K], fp32 (HAS_CENTER)
    A,                        # per-class log2 offset [K], fp32 (HAS_OFFSET)
    STATS_X,                  # [2, n_t * B] teacher rows' max and sum (logits only)
    STATS_Z,                  # [3, n_s * B] student rows' max, sum and sum(Q), from the forward
    W,                        # [B] per-sample weights (HAS_WEIGHT)
    GRAD_Z,                   # out: gradient of the student logits, row stride stride_dz
    n_diag,
    n_s,
    n_t,
    B,
    K,
    stride_z,
    stride_x,
    stride_dz,
    chunk,
    s_scale2,
    t_scale2,
    grad_scale,               # scale / tau_s
    TEACHER_PROBS: tl.constexpr,
    HAS_CENTER: tl.constexpr,
    HAS_OFFSET: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    D_PAD: tl.constexpr,
    SS_PAD: tl.constexpr,
    TT_PAD: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    b = tl.program_id(0)
    split = tl.program_id(1)
    g = tl.load(GRAD_LOSS).to(tl.float32) * grad_scale
    if HAS_WEIGHT:
        g = g * tl.load(W + b)
    n_rows = n_s * B
    k_start = split * chunk
    k_end = tl.minimum(k_start + chunk, K)
    if D_PAD > 0:
        hc = tl.arange(0, D_PAD)
        hmask = hc < n_diag
    if SS_PAD > 0:
        sc = n_diag + tl.arange(0, SS_PAD)
        smask = sc < n_s
    if TT_PAD > 0:
        tc = n_diag + tl.arange(0, TT_PAD)
        tmask = tc < n_t
    for k0 in range(k_start, k_end, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        cmask = cols < k_end
        q_sum = tl.zeros([BLOCK_K], dtype=tl.float32)
        if D_PAD > 0:
            q_h = _teacher_q(X, C, A, STATS_X, hc, hmask, b, B, n_t, stride_x, cols, cmask, t_scale2,
                             TEACHER_PROBS, HAS_CENTER, HAS_OFFSET)
            q_sum += tl.sum(q_h, axis=0)
        if TT_PAD > 0:
            q_t = _teacher_q(X, C, A, STATS_X, tc, tmask, b, B, n_t, stride_x, cols, cmask, t_scale2,
                             TEACHER_PROBS, HAS_CENTER, HAS_OFFSET)
            q_sum += tl.sum(q_t, axis=0)
        if D_PAD > 0:
            _student_grad(GRAD_Z, Z, STATS_Z, hc, hmask, q_sum[None, :] - q_h, g, b, B, n_rows, stride_z, stride_dz,
                          cols, cmask, s_scale2)
        if SS_PAD > 0:
            _student_grad(GRAD_Z, Z, STATS_Z, sc, smask, q_sum[None, :], g, b, B, n_rows, stride_z, stride_dz,
                          cols, cmask, s_scale2)


# ----------------------------------------------------------------------------- launchers

# Enough programs to fill any current GPU several times over; a constant rather than the
# SM count so that results (the order of the split-K sums) do not depend on the device.
_TARGET_PROGRAMS = 1024
# Elements of a streaming kernel's [rows, BLOCK_K] tile over 8 warps, whatever the dtype
# (the state is fp32): the student forward keeps three state tiles per student row.
_TILE = 4096
# No FMA: a row's max M and sum L are taken over rounded values (x - c) * scale + a, so every
# recomputation of 2^(y - M) must round y alike, or the largest probability is off by up to
# half an ulp of |y| in the exponent (1e-2 relative for fp16 logits of 6e4).
_OPTIONS = dict(num_warps=8, num_stages=1, enable_fp_fusion=False)


def teacher_config(n_rows: int, K: int) -> dict:
    """Column blocks of the teacher passes (~4 per SM of an H100) and rows per step (a tile of
    _TILE elements, whatever the row count: few rows only mask some)."""
    block_k = min(512, max(64, triton.next_power_of_2(triton.cdiv(K, 528))))
    block_r = _TILE // block_k
    return dict(BLOCK_R=block_r, BLOCK_K=block_k, nsplit=triton.cdiv(K, block_k), **_OPTIONS)


def pair_config(n_s: int, n_t: int, n_diag: int, B: int, K: int) -> dict:
    """Tiles and K-split of the pair kernels: the D diagonal crops and the others, each padded
    to a power of two (0: none); BLOCK_K so that the tiles live at once (teacher and student
    rows of the diagonal, the other student and teacher rows) hold ~_TILE elements."""
    pad = lambda n: triton.next_power_of_2(n) if n > 0 else 0
    d_pad, ss_pad, tt_pad = pad(n_diag), pad(n_s - n_diag), pad(n_t - n_diag)
    rows = triton.next_power_of_2(2 * d_pad + ss_pad + tt_pad)
    block_k = max(16, _TILE // rows)  # from the layout alone: a small K only masks more
    nsplit = max(1, min(triton.cdiv(_TARGET_PROGRAMS, B), triton.cdiv(K, block_k)))
    chunk = triton.cdiv(triton.cdiv(K, nsplit), block_k) * block_k
    return dict(D_PAD=d_pad, SS_PAD=ss_pad, TT_PAD=tt_pad, BLOCK_K=block_k, nsplit=triton.cdiv(K, chunk),
                chunk=chunk, **_OPTIONS)


def combine_config(n_rows: int, nsplit: int) -> dict:
    """Rows per program of the combine: [BLOCK_R, BLOCK_S] tiles of ~1k partials, many programs."""
    block_s = triton.next_power_of_2(nsplit)
    block_r = min(max(1, 1024 // block_s), triton.next_power_of_2(max(n_rows, 1)))
    return dict(BLOCK_R=block_r, BLOCK_S=block_s, grid=triton.cdiv(n_rows, block_r),
                **{**_OPTIONS, "num_warps": 4})


def _vector(t: torch.Tensor | None) -> torch.Tensor | None:
    """An optional per-class or per-sample vector as the kernels read it: contiguous fp32."""
    return None if t is None else t.detach().reshape(-1).to(torch.float32).contiguous()


def _combine(part_m, part_l, part_d, part_q, weights, n_rows, nsplit, B, loss_scale):
    """Row statistics ``[2, n_rows]`` (max, sum; base 2), or with the dots ``[3, n_rows]`` (and
    sum(Q)) and the loss."""
    has_dot = part_d is not None
    stats = torch.empty(3 if has_dot else 2, n_rows, device=part_m.device, dtype=torch.float32)
    cfg = combine_config(n_rows, nsplit)
    loss_part = torch.empty(cfg["grid"], device=part_m.device, dtype=torch.float32)
    launch(_combine_kernel, (cfg["grid"],),
           PART_M=part_m, PART_L=part_l, PART_D=part_d, PART_Q=part_q, STATS=stats, W=weights,
           LOSS_PART=loss_part if has_dot else None,
           n_rows=n_rows, nsplit=nsplit, B=max(B, 1), loss_scale=loss_scale,
           HAS_DOT=has_dot, HAS_WEIGHT=weights is not None, BLOCK_R=cfg["BLOCK_R"], BLOCK_S=cfg["BLOCK_S"],
           **launch_options(cfg))
    return stats, (loss_part.sum() if has_dot else None)


def teacher_row_stats(x: torch.Tensor, center: torch.Tensor | None, offset: torch.Tensor | None,
                      teacher_temp: float, with_mean: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's max and sum of 2^(y - max) of y = (x - center) * log2(e) / tau + offset,
    ``[2, R]`` fp32, and (``with_mean``) the ``[K]`` column means of x, else an empty tensor.
    ``x``: ``[R, K]`` logits; ``center``, ``offset``: ``[K]`` or None."""
    x = rows_contiguous(x)
    R, K = x.shape
    center, offset = _vector(center), _vector(offset)
    cfg = teacher_config(R, K)
    part_m = torch.empty(R, cfg["nsplit"], device=x.device, dtype=torch.float32)
    part_l = torch.empty_like(part_m)
    mean = torch.empty(K if with_mean else 0, device=x.device, dtype=torch.float32)
    with launch_device(x, "teacher_row_stats"):
        launch(_teacher_rows_kernel, (cfg["nsplit"],),
               X=x, C=center, A=offset, PART_M=part_m, PART_L=part_l, COL_MEAN=mean if with_mean else None,
               n_rows=R, K=K, stride_x=x.stride(0), inv_rows=1.0 / max(R, 1), t_scale2=LOG2E / teacher_temp,
               HAS_CENTER=center is not None, HAS_OFFSET=offset is not None, WITH_MEAN=with_mean,
               BLOCK_R=cfg["BLOCK_R"], BLOCK_K=cfg["BLOCK_K"], **launch_options(cfg))
        stats, _ = _combine(part_m, part_l, None, None, None, R, cfg["nsplit"], 1, 1.0)
    return stats, mean


def teacher_col_lse(x: torch.Tensor, row_offset: torch.Tensor | None, teacher_temp: float
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Each column's max and sum of 2^(y - max) of y = x * log2(e) / tau + row_offset (a
    Sinkhorn-Knopp column pass): two ``[K]`` fp32 tensors. ``x``: ``[R, K]``; ``row_offset``:
    ``[R]`` or None."""
    x = rows_contiguous(x)
    R, K = x.shape
    row_offset = _vector(row_offset)
    cfg = teacher_config(R, K)
    col_m = torch.empty(K, device=x.device, dtype=torch.float32)
    col_l = torch.empty_like(col_m)
    with launch_device(x, "sinkhorn_knopp"):
        launch(_teacher_cols_kernel, (cfg["nsplit"],),
               X=x, ROW_OFF=row_offset, COL_M=col_m, COL_L=col_l,
               n_rows=R, K=K, stride_x=x.stride(0), t_scale2=LOG2E / teacher_temp,
               HAS_ROW_OFFSET=row_offset is not None, BLOCK_R=cfg["BLOCK_R"], BLOCK_K=cfg["BLOCK_K"],
               **launch_options(cfg))
    return col_m, col_l


def _pair_args(z, x, center, offset, stats_x, weights, n_s, n_t, n_diag, student_temp, teacher_temp):
    """The arguments both pair kernels take, and their config."""
    B, K = z.shape[0] // n_s, z.shape[1]
    cfg = pair_config(n_s, n_t, n_diag, B, K)
    probs = stats_x is None
    if not probs:  # [2, rows] read as one buffer (a slice of rows is not)
        stats_x = stats_x.contiguous()
    args = dict(Z=z, X=x, C=center, A=offset, STATS_X=stats_x, n_diag=n_diag, n_s=n_s, n_t=n_t, B=B, K=K,
                stride_z=z.stride(0), stride_x=x.stride(0), chunk=cfg["chunk"], s_scale2=LOG2E / student_temp,
                t_scale2=1.0 if probs else LOG2E / teacher_temp, TEACHER_PROBS=probs,
                HAS_CENTER=center is not None, HAS_OFFSET=offset is not None, D_PAD=cfg["D_PAD"],
                SS_PAD=cfg["SS_PAD"], TT_PAD=cfg["TT_PAD"], BLOCK_K=cfg["BLOCK_K"], **launch_options(cfg))
    return B, cfg, args


def pair_forward(z: torch.Tensor, x: torch.Tensor, center: torch.Tensor | None, offset: torch.Tensor | None,
                 stats_x: torch.Tensor | None, weights: torch.Tensor | None, n_s: int, n_t: int, n_diag: int,
                 student_temp: float, teacher_temp: float, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss over crop pairs (float32 scalar) and the student rows' ``[3, S * B]`` statistics
    (max, sum, sum(Q)) that the backward recomputes from.

    ``z``: ``[S * B, K]`` student logits; ``x``: ``[T * B, K]`` teacher logits with their row
    statistics ``stats_x`` (from :func:`teacher_row_stats`, same center and offset), or teacher
    probabilities when ``stats_x`` is None; ``weights``: ``[B]`` or None; ``scale``: the
    reduction. Inputs are assumed validated by the caller.
    """
    z, x = rows_contiguous(z), rows_contiguous(x)
    center, offset, weights = _vector(center), _vector(offset), _vector(weights)
    B, cfg, args = _pair_args(z, x, center, offset, stats_x, weights, n_s, n_t, n_diag, student_temp, teacher_temp)
    n_rows = n_s * B
    # Four allocations, not one [4, ...] tensor: each part's address stays aligned for the loads.
    part_m, part_l, part_d, part_q = (torch.empty(n_rows, cfg["nsplit"], device=z.device, dtype=torch.float32)
                                      for _ in range(4))
    with launch_device(z, "dino_cross_entropy"):
        launch(_pair_fwd_kernel, (B, cfg["nsplit"]), **args,
               PART_M=part_m, PART_L=part_l, PART_D=part_d, PART_Q=part_q)
        stats_z, loss = _combine(part_m, part_l, part_d, part_q, weights, n_rows, cfg["nsplit"], B, scale * LN2)
    return loss, stats_z


def pair_backward(grad_loss: torch.Tensor, z: torch.Tensor, x: torch.Tensor, center: torch.Tensor | None,
                  offset: torch.Tensor | None, stats_x: torch.Tensor | None, stats_z: torch.Tensor,
                  weights: torch.Tensor | None, n_s: int, n_t: int, n_diag: int, student_temp: float,
                  teacher_temp: float, scale: float) -> torch.Tensor:
    """Gradient of :func:`pair_forward`'s loss with respect to the student logits, in their dtype."""
    z, x = rows_contiguous(z), rows_contiguous(x)
    center, offset, weights = _vector(center), _vector(offset), _vector(weights)
    B, cfg, args = _pair_args(z, x, center, offset, stats_x, weights, n_s, n_t, n_diag, student_temp, teacher_temp)
    grad = torch.empty(z.shape, device=z.device, dtype=z.dtype)
    with launch_device(z, "dino_cross_entropy"):
        launch(_pair_bwd_kernel, (B, cfg["nsplit"]), **args,
               GRAD_LOSS=grad_loss.reshape(()), STATS_Z=stats_z, W=weights,
               GRAD_Z=grad, stride_dz=grad.stride(0), grad_scale=scale / student_temp, HAS_WEIGHT=weights is not None)
    return grad
