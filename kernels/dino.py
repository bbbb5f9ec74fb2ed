r"""Triton kernels for the DINO loss over all crop pairs, and their launchers.

Notation: V = ncrops student crops of B rows each (crop-major, row ``v*B + b``),
2 teacher crops, K = out_dim, tau_s / tau_t the student / teacher temperatures.

    z_vb = s_vb / tau_s                      q_ib = softmax((t_ib - c) / tau_t)
    T(v) = {i in {0, 1} : i != v},  n(v) = |T(v)|,  P = 2V - 2 pairs,  Q_vb = sum_{i in T(v)} q_ib

Because every q_ib sums to one, the authors' mean over pairs of H(q_i, softmax(z_v))
has the closed form

    loss      = 1 / (P B) * sum_{v, b} [ n(v) * lse(z_vb) - <Q_vb, z_vb> ]
    dloss/ds  = ( n(v) * softmax(z_vb) - Q_vb ) / (tau_s P B)

so no per-pair tensor is ever built. Four kernels, all in base-2 units
(``exp2``/``log2``, the logits pre-scaled by log2(e)); a row's softmax statistics are
its max M and its sum L of 2^(x - M), kept apart because M + log2(L) in fp32 loses
the low bits once |x| is large (fp16 logits of 6e4 over tau_s = 0.1):

1. ``_teacher_kernel``: one program per column block reads every teacher row once,
   writing per-(row, block) partial (max, sum) and the column means (the batch
   center).
2. ``_combine_kernel``: merges the partials into each row's (M, L).
3. ``_student_fwd_kernel``: a (b, K-split) grid; a program holds the two teacher rows
   of sample b, its 2 global crops' student rows as a [2, BLOCK_K] tile and its local
   crops' as a [VL_PAD, BLOCK_K] tile (every local crop is scored against both teacher
   crops: Q = q0 + q1, no per-row selects, no padding at 2 + 8 crops), recomputes q from
   the teacher logits and (M, L), and keeps for every element of the tiles (a student
   row's column lane) an online max m, sum of 2^(z - m) and dot <Q, z - m>, and per lane
   the sums of q0 and q1: no reduction across lanes until the split's end, where they
   merge into the row's (max, sum, <Q, z - max>, sum(Q)) (so the loss is
   n * log2(L) - <Q, z - M>, without cancellation). A block's loads are issued before
   the previous block's math, and only the split's last block is masked.
   ``_combine_kernel`` merges the splits and the loss shares.
4. ``_student_bwd_kernel``: a (b, K-split) grid too, its tiles wider (it keeps no
   statistics), writing the gradient directly.

Memory beyond inputs and gradient: the split partials, O(rows * splits), and the
[2, rows] statistics the backward recomputes from.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import aot_int, launch_device, launch_options, rows_contiguous

LOG2E = 1.4426950408889634
FLT_MAX = tl.constexpr(3.4028234663852886e38)  # float32 max: a constexpr, so kernels may read it
LN2 = 0.6931471805599453


@triton.jit
def _teacher_kernel(T, C, PART_M, PART_L, BATCH_CENTER, n_rows, K, stride_t, inv_rows, t_scale2,
                    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    nsplit = tl.num_programs(0)
    cols = pid * BLOCK_K + tl.arange(0, BLOCK_K)
    cmask = cols < K
    c = tl.load(C + cols, mask=cmask, other=0.0).to(tl.float32)
    colsum = tl.zeros([BLOCK_K], dtype=tl.float32)
    for r0 in range(0, n_rows, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        rmask = rows < n_rows
        mask = rmask[:, None] & cmask[None, :]
        t = tl.load(T + rows[:, None].to(tl.int64) * stride_t + cols[None, :], mask=mask, other=0.0)
        t = t.to(tl.float32)
        colsum += tl.sum(t, axis=0)
        y = tl.where(mask, (t - c[None, :]) * t_scale2, float("-inf"))
        m = tl.max(y, axis=1)
        # A block of -inf logits (masked classes) has sum 0, not exp2(-inf - -inf) = NaN.
        l = tl.sum(tl.exp2(y - tl.where(m == float("-inf"), 0.0, m)[:, None]), axis=1)
        tl.store(PART_M + rows * nsplit + pid, m, mask=rmask)
        tl.store(PART_L + rows * nsplit + pid, l, mask=rmask)
    tl.store(BATCH_CENTER + cols, colsum * inv_rows, mask=cmask)


@triton.jit
def _combine_kernel(PART_M, PART_L, PART_D, PART_Q, STATS, LOSS_PART, n_rows, nsplit, B, loss_scale,
                    HAS_DOT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr):
    # Merges split partials into each row's max M and sum L = sum 2^(x - M), kept apart rather
    # than as M + log2(L): at |x| ~ 1e6 an fp32 log-sum-exp is only good to ~0.06. With the
    # dots, each program also writes its rows' share of the loss; the caller sums those shares
    # (a fixed order: deterministic, unlike atomics).
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
        crop = rows // B
        n = (crop != 0).to(tl.float32) + (crop != 1).to(tl.float32)
        # n * lse - <Q, z> = n * log2(L) - <Q, z - M>, as sum(Q) = n: no cancellation.
        share = tl.sum(tl.where(rmask, n * tl.log2(l_row) - dot, 0.0), axis=0)
        tl.store(LOSS_PART + pid, share * loss_scale)


@triton.jit
def _teacher_probs(T, C, row_off, m, inv_l, cols, cmask, t_scale2):
    t = tl.load(T + row_off + cols, mask=cmask, other=0.0).to(tl.float32)
    c = tl.load(C + cols, mask=cmask, other=0.0).to(tl.float32)
    return tl.where(cmask, tl.exp2((t - c) * t_scale2 - m) * inv_l, 0.0)


@triton.jit
def _pair_setup(STATS_T, b, B, ncrops, stride_t, V_PAD: tl.constexpr):
    """What the student backward needs for sample b: which teacher crops each student crop is
    scored against, and the two teacher rows' offsets and softmax statistics."""
    v = tl.arange(0, V_PAD)
    # Student crop v is scored against teacher crop i for every i in {0, 1} other than v.
    w0 = (v != 0).to(tl.float32)
    w1 = (v != 1).to(tl.float32)
    n_t = 2 * B
    t0_off = b.to(tl.int64) * stride_t
    t1_off = (b + B).to(tl.int64) * stride_t
    m_t0, inv_l_t0 = tl.load(STATS_T + b), 1.0 / tl.load(STATS_T + n_t + b)
    m_t1, inv_l_t1 = tl.load(STATS_T + b + B), 1.0 / tl.load(STATS_T + n_t + b + B)
    return v, v < ncrops, w0, w1, t0_off, t1_off, m_t0, inv_l_t0, m_t1, inv_l_t1


@triton.jit
def _fwd_load(S, T, C, g_rows, l_rows, lmask, t0_off, t1_off, cols, k_end):
    """One block's loads for the student forward: global and local student rows, the two
    teacher rows and the center, masked to the split (nothing past k_end is read)."""
    cmask = cols < k_end
    sg = tl.load(S + g_rows[:, None] + cols[None, :], mask=cmask[None, :], other=0.0)
    sl = tl.load(S + l_rows[:, None] + cols[None, :], mask=lmask[:, None] & cmask[None, :], other=0.0)
    t0 = tl.load(T + t0_off + cols, mask=cmask, other=0.0)
    t1 = tl.load(T + t1_off + cols, mask=cmask, other=0.0)
    c = tl.load(C + cols, mask=cmask, other=0.0)
    return sg, sl, t0, t1, c


@triton.jit
def _lane_update(z, Q, A, m, l, d, mask, MASKED: tl.constexpr):
    """One column of each lane: the new max, the sum of 2^(z - m) and <Q, z - m> moved to it (A:
    the lane's sum of Q so far), plus this column's terms. m starts at -FLT_MAX, so every shift
    is finite; a lane of -inf logits keeps m = -FLT_MAX and l = 0."""
    m_new = tl.maximum(m, z)
    shift = m - m_new
    l = l * tl.exp2(shift) + tl.exp2(z - m_new)
    if MASKED:
        d += shift * A + tl.where(mask, Q * (z - m_new), 0.0)
    else:
        d += shift * A + Q * (z - m_new)
    return m_new, l, d


@triton.jit
def _fwd_step(sg, sl, t0, t1, c, cols, k_end, g0, lmask, m_t0, inv_l_t0, m_t1, inv_l_t1, s_scale2, t_scale2,
              mg, lg, dg, ml, ll, dl, a0, a1, MASKED: tl.constexpr):
    """One block of the student forward. Only a split's last block is MASKED: in the others
    every column is real, and padded local rows (never stored) may hold any value."""
    cmask = cols < k_end
    q0 = tl.exp2((t0.to(tl.float32) - c) * t_scale2 - m_t0) * inv_l_t0
    q1 = tl.exp2((t1.to(tl.float32) - c) * t_scale2 - m_t1) * inv_l_t1
    zg = sg.to(tl.float32) * s_scale2
    zl = sl.to(tl.float32) * s_scale2
    lm = lmask[:, None] & cmask[None, :]
    if MASKED:
        q0 = tl.where(cmask, q0, 0.0)
        q1 = tl.where(cmask, q1, 0.0)
        zg = tl.where(cmask[None, :], zg, float("-inf"))
        zl = tl.where(lm, zl, float("-inf"))
    # Global crop g is scored against teacher crop 1 - g only, a local crop against both.
    mg, lg, dg = _lane_update(zg, tl.where(g0[:, None], q1[None, :], q0[None, :]),
                              tl.where(g0[:, None], a1[None, :], a0[None, :]), mg, lg, dg, cmask[None, :], MASKED)
    ml, ll, dl = _lane_update(zl, (q0 + q1)[None, :], (a0 + a1)[None, :], ml, ll, dl, lm, MASKED)
    return mg, lg, dg, ml, ll, dl, a0 + q0, a1 + q1


@triton.jit
def _lanes_merge_store(m, l, d, A, qs, crops, rmask, PART_M, PART_L, PART_D, PART_Q, B, b, nsplit, split):
    """The lanes of each row merged: M the row max, L = sum l * 2^(m - M), <Q, z - M> =
    sum d + (m - M) * A; stored with sum(Q) as the row's partials of this split."""
    m_row = tl.max(m, axis=1)
    l_row = tl.sum(l * tl.exp2(m - m_row[:, None]), axis=1)
    d_row = tl.sum(d + (m - m_row[:, None]) * A, axis=1)
    offs = (crops * B + b) * nsplit + split
    tl.store(PART_M + offs, m_row, mask=rmask)
    tl.store(PART_L + offs, l_row, mask=rmask)
    tl.store(PART_D + offs, d_row, mask=rmask)
    tl.store(PART_Q + offs, qs, mask=rmask)


@triton.jit
def _student_fwd_kernel(S, T, C, STATS_T, PART_M, PART_L, PART_D, PART_Q, ncrops, B, K, stride_s, stride_t,
                        chunk, s_scale2, t_scale2, VL_PAD: tl.constexpr, BLOCK_K: tl.constexpr):
    b = tl.program_id(0)
    split = tl.program_id(1)
    nsplit = tl.num_programs(1)
    n_t = 2 * B
    t0_off = b.to(tl.int64) * stride_t
    t1_off = (b + B).to(tl.int64) * stride_t
    m_t0, inv_l_t0 = tl.load(STATS_T + b), 1.0 / tl.load(STATS_T + n_t + b)
    m_t1, inv_l_t1 = tl.load(STATS_T + b + B), 1.0 / tl.load(STATS_T + n_t + b + B)
    vg = tl.arange(0, 2)  # the global crops
    g0 = vg == 0
    vl = 2 + tl.arange(0, VL_PAD)  # the local crops
    lmask = vl < ncrops
    g_rows = (vg * B + b).to(tl.int64) * stride_s
    l_rows = (vl * B + b).to(tl.int64) * stride_s
    mg = tl.full([2, BLOCK_K], -FLT_MAX, dtype=tl.float32)
    lg = tl.zeros([2, BLOCK_K], dtype=tl.float32)
    dg = tl.zeros([2, BLOCK_K], dtype=tl.float32)
    ml = tl.full([VL_PAD, BLOCK_K], -FLT_MAX, dtype=tl.float32)
    ll = tl.zeros([VL_PAD, BLOCK_K], dtype=tl.float32)
    dl = tl.zeros([VL_PAD, BLOCK_K], dtype=tl.float32)
    a0 = tl.zeros([BLOCK_K], dtype=tl.float32)  # per lane, the sums of q0 and q1 so far
    a1 = tl.zeros([BLOCK_K], dtype=tl.float32)
    k_start = split * chunk
    k_end = tl.minimum(k_start + chunk, K)
    k_full = k_start + (k_end - k_start) // BLOCK_K * BLOCK_K
    ar = tl.arange(0, BLOCK_K)
    # Block i + 1's loads are issued before block i's math, so that they are in flight during it
    # (the last iteration's read the tail block, or nothing).
    sg, sl, t0, t1, c = _fwd_load(S, T, C, g_rows, l_rows, lmask, t0_off, t1_off, k_start + ar, k_end)
    for k0 in range(k_start, k_full, BLOCK_K):
        cols = k0 + ar
        sg_c, sl_c, t0_c, t1_c, c_c = sg, sl, t0, t1, c
        sg, sl, t0, t1, c = _fwd_load(S, T, C, g_rows, l_rows, lmask, t0_off, t1_off, cols + BLOCK_K, k_end)
        mg, lg, dg, ml, ll, dl, a0, a1 = _fwd_step(
            sg_c, sl_c, t0_c, t1_c, c_c, cols, k_end, g0, lmask, m_t0, inv_l_t0, m_t1, inv_l_t1, s_scale2,
            t_scale2, mg, lg, dg, ml, ll, dl, a0, a1, False)
    if k_full < k_end:
        mg, lg, dg, ml, ll, dl, a0, a1 = _fwd_step(
            sg, sl, t0, t1, c, k_full + ar, k_end, g0, lmask, m_t0, inv_l_t0, m_t1, inv_l_t1, s_scale2,
            t_scale2, mg, lg, dg, ml, ll, dl, a0, a1, True)
    s0 = tl.sum(a0, axis=0)
    s1 = tl.sum(a1, axis=0)
    _lanes_merge_store(mg, lg, dg, tl.where(g0[:, None], a1[None, :], a0[None, :]), tl.where(g0, s1, s0), vg,
                       vg < 2, PART_M, PART_L, PART_D, PART_Q, B, b, nsplit, split)
    _lanes_merge_store(ml, ll, dl, (a0 + a1)[None, :], tl.zeros([VL_PAD], dtype=tl.float32) + (s0 + s1), vl,
                       lmask, PART_M, PART_L, PART_D, PART_Q, B, b, nsplit, split)


@triton.jit
def _student_bwd_kernel(GRAD_LOSS, S, T, C, STATS_S, STATS_T, DS, ncrops, B, K, stride_s, stride_t, stride_ds,
                        chunk, s_scale2, t_scale2, grad_scale, V_PAD: tl.constexpr, BLOCK_K: tl.constexpr):
    b = tl.program_id(0)
    split = tl.program_id(1)
    v, vmask, w0, w1, t0_off, t1_off, m_t0, inv_l_t0, m_t1, inv_l_t1 = _pair_setup(
        STATS_T, b, B, ncrops, stride_t, V_PAD)
    g = tl.load(GRAD_LOSS).to(tl.float32) * grad_scale
    row = (v * B + b).to(tl.int64)
    n_s = ncrops * B
    m_s = tl.load(STATS_S + row, mask=vmask, other=0.0)
    # n(v) / L folded into one factor: softmax(z) * n = 2^(z - M) * (n / L)
    p_scale = (w0 + w1) / tl.load(STATS_S + n_s + row, mask=vmask, other=1.0)
    k_start = split * chunk
    k_end = tl.minimum(k_start + chunk, K)
    for k0 in range(k_start, k_end, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        cmask = cols < k_end
        q0 = _teacher_probs(T, C, t0_off, m_t0, inv_l_t0, cols, cmask, t_scale2)
        q1 = _teacher_probs(T, C, t1_off, m_t1, inv_l_t1, cols, cmask, t_scale2)
        mask = vmask[:, None] & cmask[None, :]
        z = tl.load(S + row[:, None] * stride_s + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        p = tl.exp2(z * s_scale2 - m_s[:, None]) * p_scale[:, None]
        ds = g * (p - (w0[:, None] * q0[None, :] + w1[:, None] * q1[None, :]))
        tl.store(DS + row[:, None] * stride_ds + cols[None, :], ds.to(DS.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- launchers

# Enough programs to fill any current GPU several times over; a constant rather than the
# SM count so that results (the order of the split-K sums) do not depend on the device.
_TARGET_PROGRAMS = 1024
# Elements per [rows, BLOCK_K] tile of the streaming kernels, over 8 warps. The student forward
# keeps three state tiles (max, sum, dot) per element; the backward, elementwise, streams its
# tile so that every load of an iteration is issued before the first result is needed. Both
# take 4096 elements, whatever the dtype (16-bit logits gain nothing from wider tiles: the
# state is fp32), spill-free at <= 128 registers (sm_80/sm_90 AOT builds, Triton 3.6 and 3.8).
_TILE = 4096
_STUDENT_FWD_TILE = 4096
_STUDENT_BWD_TILE = 4096
_STREAM_WARPS = 8
_NUM_STAGES = 1
# No FMA: a row's max M and sum L are taken over rounded logits x * scale, so each value's
# exp2(x * scale - M) must round x * scale too, or the largest probability is off by up to
# half an ulp of |x * scale| in the exponent (1e-2 relative for fp16 logits of 6e4).
_OPTIONS = dict(num_warps=_STREAM_WARPS, num_stages=_NUM_STAGES, enable_fp_fusion=False)


def teacher_config(n_rows: int, K: int) -> dict:
    """Block sizes of the teacher pass: ~4 column blocks per SM of an H100."""
    block_k = min(512, max(64, triton.next_power_of_2(triton.cdiv(K, 528))))
    block_r = min(max(1, _TILE // block_k), triton.next_power_of_2(n_rows))
    return dict(BLOCK_R=block_r, BLOCK_K=block_k, nsplit=triton.cdiv(K, block_k), **_OPTIONS)


def student_config(ncrops: int, B: int, K: int, backward: bool = False) -> dict:
    """Block sizes and the K-split of a student pass. The forward's rows are the 2 global crops
    and VL_PAD padded local crops; the backward's V_PAD padded crops. The backward needs no
    split partials, so its split is its own."""
    if backward:
        pads = dict(V_PAD=triton.next_power_of_2(ncrops))
        rows, tile = pads["V_PAD"], _STUDENT_BWD_TILE
    else:
        pads = dict(VL_PAD=triton.next_power_of_2(max(ncrops - 2, 1)))
        rows, tile = triton.next_power_of_2(2 + pads["VL_PAD"]), _STUDENT_FWD_TILE
    block_k = min(max(16, tile // rows), max(16, triton.next_power_of_2(K)))
    nsplit = max(1, min(triton.cdiv(_TARGET_PROGRAMS, B), triton.cdiv(K, block_k)))
    chunk = triton.cdiv(triton.cdiv(K, nsplit), block_k) * block_k
    return dict(**pads, BLOCK_K=block_k, nsplit=triton.cdiv(K, chunk), chunk=chunk, **_OPTIONS)


def combine_config(n_rows: int, nsplit: int) -> dict:
    """Rows per program of the combine: [BLOCK_R, BLOCK_S] tiles of ~1k partials, many programs."""
    block_s = triton.next_power_of_2(nsplit)
    block_r = min(max(1, 1024 // block_s), triton.next_power_of_2(n_rows))
    return dict(BLOCK_R=block_r, BLOCK_S=block_s, grid=triton.cdiv(n_rows, block_r),
                **{**_OPTIONS, "num_warps": 4})


def _combine(part_m, part_l, part_d, part_q, n_rows, nsplit, B, loss_scale, device):
    """Row statistics ``[2, n_rows]`` (max, sum; base 2) and, given the dots, the loss."""
    stats = torch.empty(2, n_rows, device=device, dtype=torch.float32)
    cfg = combine_config(n_rows, nsplit)
    has_dot = part_d is not None
    loss_part = torch.empty(cfg["grid"], device=device, dtype=torch.float32) if has_dot else stats
    if not has_dot:
        part_d = part_q = part_m  # unused
    _combine_kernel[(cfg["grid"],)](part_m, part_l, part_d, part_q, stats, loss_part, n_rows, nsplit, max(B, 1),
                                    loss_scale, HAS_DOT=has_dot, BLOCK_R=cfg["BLOCK_R"], BLOCK_S=cfg["BLOCK_S"],
                                    **launch_options(cfg))
    return stats, (loss_part.sum() if has_dot else None)


def dino_loss_forward(student: torch.Tensor, teacher: torch.Tensor, center: torch.Tensor, ncrops: int,
                      student_temp: float, teacher_temp: float):
    """Fused forward. Returns ``(loss, batch_center, stats_student, stats_teacher)``.

    ``loss`` is a float32 scalar, ``batch_center`` the float32 ``[1, K]`` mean of the
    teacher rows; the statistics (float32 ``[2, rows]``: each row's max and sum of
    2^(x - max) of its base-2 logits) are what the backward recomputes from. Inputs
    are assumed validated by the caller.
    """
    student, teacher, center = rows_contiguous(student), rows_contiguous(teacher), center.contiguous()
    n_s, K = student.shape
    n_t = teacher.shape[0]
    B = n_t // 2
    dev = student.device
    s_scale2 = LOG2E / student_temp
    t_scale2 = LOG2E / teacher_temp
    with launch_device(student, "dino_loss"):
        tc = teacher_config(n_t, K)
        part_m = torch.empty(n_t, tc["nsplit"], device=dev, dtype=torch.float32)
        part_l = torch.empty_like(part_m)
        batch_center = torch.empty(1, K, device=dev, dtype=torch.float32)
        _teacher_kernel[(tc["nsplit"],)](
            teacher, center, part_m, part_l, batch_center, n_t, K, teacher.stride(0), 1.0 / n_t, t_scale2,
            BLOCK_R=tc["BLOCK_R"], BLOCK_K=tc["BLOCK_K"], **launch_options(tc))
        stats_t, _ = _combine(part_m, part_l, None, None, n_t, tc["nsplit"], B, 1.0, dev)

        sc = student_config(ncrops, B, K)
        part_m, part_l, part_d, part_q = torch.empty(4, n_s, sc["nsplit"], device=dev, dtype=torch.float32)
        _student_fwd_kernel[(B, sc["nsplit"])](
            student, teacher, center, stats_t, part_m, part_l, part_d, part_q, ncrops, B, K,
            student.stride(0), teacher.stride(0), sc["chunk"], s_scale2, t_scale2,
            VL_PAD=sc["VL_PAD"], BLOCK_K=sc["BLOCK_K"], **launch_options(sc))
        n_pairs = 2 * ncrops - 2
        stats_s, loss = _combine(part_m, part_l, part_d, part_q, n_s, sc["nsplit"], B, LN2 / (n_pairs * B), dev)
    return loss, batch_center, stats_s, stats_t


def dino_loss_backward(grad_loss: torch.Tensor, student: torch.Tensor, teacher: torch.Tensor,
                       center: torch.Tensor, stats_s: torch.Tensor, stats_t: torch.Tensor, ncrops: int,
                       student_temp: float, teacher_temp: float) -> torch.Tensor:
    """Gradient of the loss with respect to the student logits, in the student's dtype."""
    student, teacher, center = rows_contiguous(student), rows_contiguous(teacher), center.contiguous()
    n_s, K = student.shape
    B = teacher.shape[0] // 2
    grad = torch.empty(n_s, K, device=student.device, dtype=student.dtype)
    sc = student_config(ncrops, B, K, backward=True)
    n_pairs = 2 * ncrops - 2
    with launch_device(student, "dino_loss"):
        _student_bwd_kernel[(B, sc["nsplit"])](
            grad_loss.reshape(()), student, teacher, center, stats_s, stats_t, grad, ncrops, B, K,
            student.stride(0), teacher.stride(0), grad.stride(0), sc["chunk"], LOG2E / student_temp,
            LOG2E / teacher_temp, 1.0 / (student_temp * n_pairs * B),
            V_PAD=sc["V_PAD"], BLOCK_K=sc["BLOCK_K"], **launch_options(sc))
    return grad


# ----------------------------------------------------------------------------- ahead-of-time specs

def aot_specs(ncrops: int, B: int, K: int, dtype: str = "fp32"):
    """What the launchers above compile for this problem: ``(kernel, signature, constexprs, options)``.

    Used by ``fastssl.kernels.aot`` to build every kernel for real GPUs without one.
    """
    n_t, n_s = 2 * B, ncrops * B
    tc = teacher_config(n_t, K)
    fc, bc = student_config(ncrops, B, K), student_config(ncrops, B, K, backward=True)
    f32 = "*fp32"
    # Integers as the JIT specialises them (divisible by 16, or 1): its loads vectorise by them.
    yield (_teacher_kernel,
           dict(T=f"*{dtype}", C=f32, PART_M=f32, PART_L=f32, BATCH_CENTER=f32, n_rows=aot_int(n_t), K=aot_int(K),
                stride_t=aot_int(K), inv_rows="fp32", t_scale2="fp32"),
           dict(BLOCK_R=tc["BLOCK_R"], BLOCK_K=tc["BLOCK_K"]), tc)
    for rows, nsplit, has_dot in ((n_t, tc["nsplit"], False), (n_s, fc["nsplit"], True)):
        cc = combine_config(rows, nsplit)
        yield (_combine_kernel,
               dict(PART_M=f32, PART_L=f32, PART_D=f32, PART_Q=f32, STATS=f32, LOSS_PART=f32, n_rows=aot_int(rows),
                    nsplit=aot_int(nsplit), B=aot_int(B), loss_scale="fp32"),
               dict(HAS_DOT=has_dot, BLOCK_R=cc["BLOCK_R"], BLOCK_S=cc["BLOCK_S"]), cc)
    scalars = dict(ncrops=aot_int(ncrops), B=aot_int(B), K=aot_int(K), stride_s=aot_int(K), stride_t=aot_int(K))
    yield (_student_fwd_kernel,
           dict(S=f"*{dtype}", T=f"*{dtype}", C=f32, STATS_T=f32, PART_M=f32, PART_L=f32, PART_D=f32, PART_Q=f32,
                **scalars, chunk=aot_int(fc["chunk"]), s_scale2="fp32", t_scale2="fp32"),
           dict(VL_PAD=fc["VL_PAD"], BLOCK_K=fc["BLOCK_K"]), fc)
    yield (_student_bwd_kernel,
           dict(GRAD_LOSS=f32, S=f"*{dtype}", T=f"*{dtype}", C=f32, STATS_S=f32, STATS_T=f32, DS=f"*{dtype}",
                **scalars, stride_ds=aot_int(K), chunk=aot_int(bc["chunk"]), s_scale2="fp32", t_scale2="fp32",
                grad_scale="fp32"),
           dict(V_PAD=bc["V_PAD"], BLOCK_K=bc["BLOCK_K"]), bc)


# The shapes the AOT check builds for: the benchmark's target problem (2+8 and 2+10
# crops), the fewest crops, and an odd small problem, in each logits dtype.
AOT_PROBLEMS = [
    dict(ncrops=10, B=64, K=65536, dtype="fp32"),
    dict(ncrops=10, B=64, K=65536, dtype="bf16"),
    dict(ncrops=12, B=256, K=131072, dtype="fp32"),
    dict(ncrops=12, B=32, K=4096, dtype="fp16"),
    dict(ncrops=2, B=3, K=1000, dtype="fp32"),
]
