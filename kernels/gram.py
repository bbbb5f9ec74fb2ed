r"""Triton kernels for the Gram anchoring loss (DINOv3), forward and backward, without its matrices.

Notation: G matrices (the B images at image level; one at batch level, its B N rows), each
of N rows; the student's rows a_i (d_a wide) and the Gram teacher's rows b_i (d_b wide).
With ``apply_norm`` (``F.normalize``, a^_i = a_i / max(|a_i|, 1e-12)) each row is first scaled
by a power of two p_i that brings its largest entry into [0.5, 1) (exact, and fp32 sums of
squares and dot products then do not overflow, where the authors' fp32 ``F.normalize`` gives
zeros beyond ~1e19), and n_i = 1 / max(|p_i a_i|, p_i 1e-12),
so that a^_i = (p_i a_i) n_i; likewise q_i and m_i for b. Without it p = n = 1. Per matrix g,

    S_ij = ((p_i a_i) . (p_j a_j)) n_i n_j          T_ij = ((q_i b_i) . (q_j b_j)) m_i m_j

(the dot products of the scaled rows times their factors, so nothing normalised is written;
``_row_scales_kernel`` computes p and n, a pass over the rows),
with the authors' removal of negative values: T'_ij = 0 where T_ij < 0 (``remove_neg`` or
``remove_only_teacher_neg``), S'_ij = 0 where S_ij < 0 (``remove_neg`` only), else S' = S,
T' = T. The loss is the mean over the G N^2 entries,

    L = (1 / (G N^2)) sum_g sum_ij (S'_ij - T'_ij)^2.

Both matrices are symmetric, so only the tiles (I, J) with I <= J of BLOCK x BLOCK entries
are computed, the tiles off the diagonal counted twice.

Forward (``_gram_fwd_kernel``): a program owns the row blocks q and nb - 1 - q of one matrix
(nb + 1 tiles in all, so every program has the same work) and, for each tile (I, J >= I),
accumulates both tiles' dot products over d, then the squared differences, summed per row
of the tile into an fp32 accumulator; it writes one partial sum (already divided by G N^2), which the
launcher sums in a fixed order: deterministic.

Backward. With D_ij = S'_ij - T'_ij, the gradient to the normalised student rows is

    dL/da^_i = (4 / (G N^2)) sum_j D_ij [S_ij >= 0 or not removed] a^_j         (a^_j = n_j a_j)

(a sum over both (i, j) and (j, i), equal by symmetry), and the teacher's the same with the
roles swapped (the sign of D flips). A tile (I, J) with I < J adds W a^_J to the rows of
block I and W^T a^_I to those of block J (W the tile of coefficients), so a program that
owns a tile writes two row blocks: ``_gram_bwd_kernel`` runs in rounds (a round-robin
tournament's: in each of nb' - 1 rounds every block is in exactly one pair, nb' = nb rounded
up to even, a block nb' - 1 = nb being a bye; then a round of the nb diagonal tiles), one
launch a round, so that within a launch no two programs write one block and the fp32
accumulator [G, N, d_a] is read, added to and written without atomics, in the same order
every run. Each program recomputes its tile's S and T (2 tile products over d), then adds
the two products of W with the rows over d in slices of BLOCK_D. The launcher applies the
normalisation's backward, dL/da_i = p_i n_i (g_i - a^_i (a^_i . g_i)) (g_i / 1e-12 below the
norm's eps), in PyTorch.

Precision: 16-bit rows are multiplied in their dtype on the tensor cores, whose products of
16-bit values are exact, with fp32 accumulation: S and T are fp32-accurate. fp32 rows use
``tf32x3`` (three TF32 products, about fp32's accuracy) by default, plain TF32 products
(about 10 bits, ~5e-4 relative) with ``allow_tf32``. The backward's products of the fp32
coefficients W with the rows are, for bf16 rows, two bf16 products of W's high and low bf16
parts (16 bits of W, ~1.5e-5 relative, 250 times below the returned bf16 gradient's
rounding), else ``tf32x3`` (TF32 with ``allow_tf32``). fp64 rows are computed in fp32.

Memory beyond inputs and outputs: the row factors (2 G N floats each), one partial sum per
forward program, and the backward's fp32 accumulator of the gradient (G N d): O(G N d),
never an N x N matrix nor a tile per pair.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import launch, launch_device, launch_options, recording, rows_contiguous

NORM_EPS = 1e-12  # F.normalize's default eps, as the authors call it


# ----------------------------------------------------------------------------- shared pieces

@triton.jit
def _mma(a, b, acc, PREC: tl.constexpr, UPCAST: tl.constexpr):
    # UPCAST: Triton's interpreter (CPU tensors) gets 16-bit tl.dot wrong; fp32 there computes
    # the same exact products of the 16-bit values.
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PREC)


@triton.jit
def _coef_dot(w, x, acc, PREC_BWD: tl.constexpr, UPCAST: tl.constexpr):
    """acc + w @ x for fp32 coefficients w and rows x: "bf16x2", two bf16 products of w's high and low
    bf16 parts with bf16 rows (16 bits of w, ~1.5e-5); else tl.dot in fp32 at that input precision."""
    if PREC_BWD == "bf16x2":
        hi = w.to(tl.bfloat16)
        acc = _mma(hi, x, acc, "ieee", UPCAST)
        acc = _mma((w - hi.to(tl.float32)).to(tl.bfloat16), x, acc, "ieee", UPCAST)
    else:
        acc = tl.dot(w, x.to(tl.float32), acc, input_precision=PREC_BWD)
    return acc


@triton.jit
def _scaled_rows(X, off, ks, mask, p, NORM: tl.constexpr):
    """Rows of X at ``off`` (columns ks), times their powers of two p with NORM (exact in X's dtype)."""
    x = tl.load(X + off[:, None] + ks[None, :], mask=mask, other=0.0)
    if NORM:
        x = (x.to(tl.float32) * p[:, None]).to(X.dtype.element_ty)
    return x


@triton.jit
def _tile_dots(X, rows_i, rows_j, mask_i, mask_j, p_i, p_j, d, stride_n, NORM: tl.constexpr, BLOCK: tl.constexpr,
               BLOCK_K: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """The [BLOCK, BLOCK] dot products of rows_i with rows_j of X, each row scaled by its p with NORM
    (fp32 accumulation)."""
    acc = tl.zeros([BLOCK, BLOCK], dtype=tl.float32)
    off_i = rows_i.to(tl.int64) * stride_n
    off_j = rows_j.to(tl.int64) * stride_n
    for k0 in range(0, d, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        kmask = ks < d
        xi = _scaled_rows(X, off_i, ks, mask_i[:, None] & kmask[None, :], p_i, NORM)
        xj = _scaled_rows(X, off_j, ks, mask_j[:, None] & kmask[None, :], p_j, NORM)
        acc = _mma(xi, tl.trans(xj), acc, PREC, UPCAST)
    return acc


@triton.jit
def _row_factors(P, INV, rows, mask, NORM: tl.constexpr):
    """The rows' powers of two and inverse norms (1 and 1 without normalisation; 0 past the last row)."""
    if NORM:
        p = tl.load(P + rows, mask=mask, other=0.0)
        inv = tl.load(INV + rows, mask=mask, other=0.0)
    else:
        p = tl.where(mask, 1.0, 0.0)
        inv = p
    return p, inv


@triton.jit(do_not_specialize=["n_rows", "N"])
def _row_scales_kernel(
    X,  # rows [G, N, d], unit stride along d
    P,  # out: [G * N] fp32, the power of two bringing each row's largest |entry| into [0.5, 1)
    INV,  # out: [G * N] fp32, 1 / max(|p x|, p eps): x / max(|x|, eps) = (p x) * INV
    n_rows,  # G * N
    N,  # rows per matrix
    d,  # width
    stride_g,  # X's stride between matrices
    stride_n,  # X's stride between rows
    eps,  # F.normalize's eps
    BLOCK_R: tl.constexpr,  # rows per program
    BLOCK_D: tl.constexpr,  # columns per step
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < n_rows
    off = (rows // N).to(tl.int64) * stride_g + (rows % N).to(tl.int64) * stride_n
    amax = tl.zeros([BLOCK_R], dtype=tl.float32)
    for k0 in range(0, d, BLOCK_D):
        ks = k0 + tl.arange(0, BLOCK_D)
        x = tl.load(X + off[:, None] + ks[None, :], mask=rmask[:, None] & (ks < d)[None, :], other=0.0)
        amax = tl.maximum(amax, tl.max(tl.abs(x.to(tl.float32)), axis=1))
    # amax in [2^(E - 127), 2^(E - 126)) for its biased exponent E: p = 2^(126 - E), within 2^+-126
    # (zero and subnormal rows scale up by 2^126, infinite ones down by 2^-126).
    e = tl.minimum(tl.maximum(((amax.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 126, -126), 126)
    p = ((127 - e) << 23).to(tl.float32, bitcast=True)
    ss = tl.zeros([BLOCK_R], dtype=tl.float32)
    for k0 in range(0, d, BLOCK_D):
        ks = k0 + tl.arange(0, BLOCK_D)
        x = tl.load(X + off[:, None] + ks[None, :], mask=rmask[:, None] & (ks < d)[None, :], other=0.0)
        x = x.to(tl.float32) * p[:, None]
        ss += tl.sum(x * x, axis=1)
    tl.store(P + rows, p, mask=rmask)
    tl.store(INV + rows, 1.0 / tl.maximum(tl.sqrt(ss), p * eps), mask=rmask)


# ----------------------------------------------------------------------------- forward

@triton.jit
def _row_block_loss(acc, bi, XS, XT, P_S, INV_S, P_T, INV_T, N, ds, dt, stride_sn, stride_tn, nb,
                    NORM: tl.constexpr, REMOVE_S: tl.constexpr, REMOVE_T: tl.constexpr, PREC: tl.constexpr,
                    UPCAST: tl.constexpr, BLOCK: tl.constexpr, BLOCK_K: tl.constexpr):
    """acc (per row of a tile) plus the squared differences of the tiles (bi, bj >= bi), those off the
    diagonal twice."""
    offs = tl.arange(0, BLOCK)
    rows_i = bi * BLOCK + offs
    mask_i = rows_i < N
    p_si, inv_si = _row_factors(P_S, INV_S, rows_i, mask_i, NORM)
    p_ti, inv_ti = _row_factors(P_T, INV_T, rows_i, mask_i, NORM)
    for bj in range(bi, nb):
        rows_j = bj * BLOCK + offs
        mask_j = rows_j < N
        p_sj, inv_sj = _row_factors(P_S, INV_S, rows_j, mask_j, NORM)
        p_tj, inv_tj = _row_factors(P_T, INV_T, rows_j, mask_j, NORM)
        s = _tile_dots(XS, rows_i, rows_j, mask_i, mask_j, p_si, p_sj, ds, stride_sn, NORM, BLOCK, BLOCK_K, PREC,
                       UPCAST)
        t = _tile_dots(XT, rows_i, rows_j, mask_i, mask_j, p_ti, p_tj, dt, stride_tn, NORM, BLOCK, BLOCK_K, PREC,
                       UPCAST)
        if NORM:
            s = s * inv_si[:, None] * inv_sj[None, :]
            t = t * inv_ti[:, None] * inv_tj[None, :]
        if REMOVE_S:
            s = tl.where(s < 0, 0.0, s)
        if REMOVE_T:
            t = tl.where(t < 0, 0.0, t)
        diff = s - t
        sq = tl.where(mask_i[:, None] & mask_j[None, :], diff * diff, 0.0)
        acc += tl.sum(sq, axis=1) * tl.where(bj == bi, 1.0, 2.0)  # a tile off the diagonal stands for its mirror
    return acc


@triton.jit(do_not_specialize=["N", "nb"])
def _gram_fwd_kernel(
    XS,  # student rows [G, N, ds], unit stride along ds
    XT,  # teacher rows [G, N, dt], unit stride along dt
    P_S,  # [G, N] fp32 powers of two of the student rows (read with NORM)
    INV_S,  # [G, N] fp32 inverse norms of the scaled student rows (read with NORM)
    P_T,  # [G, N] fp32 powers of two of the teacher rows (read with NORM)
    INV_T,  # [G, N] fp32 inverse norms of the scaled teacher rows (read with NORM)
    PART,  # out: [G, programs] fp32, each program's share of the loss
    N,  # rows per matrix
    ds,  # student width
    dt,  # teacher width
    stride_sg,  # student stride between matrices
    stride_sn,  # student stride between rows
    stride_tg,  # teacher stride between matrices
    stride_tn,  # teacher stride between rows
    nb,  # row blocks per matrix, cdiv(N, BLOCK)
    scale,  # 1 / (G N^2), the mean's divisor
    NORM: tl.constexpr,  # scale the dots by the inverse norms (apply_norm)
    REMOVE_S: tl.constexpr,  # zero the student's negative similarities
    REMOVE_T: tl.constexpr,  # zero the teacher's negative similarities
    PREC: tl.constexpr,  # tl.dot input precision for fp32 rows
    UPCAST: tl.constexpr,  # interpreter: 16-bit dots in fp32
    BLOCK: tl.constexpr,  # rows of a tile side
    BLOCK_K: tl.constexpr,  # columns of d per step
):
    q = tl.program_id(0)
    g = tl.program_id(1).to(tl.int64)
    XS += g * stride_sg
    XT += g * stride_tg
    if NORM:
        P_S += g * N
        INV_S += g * N
        P_T += g * N
        INV_T += g * N
    # Row block q, then row block nb - 1 - q (unless it is q): nb + 1 tiles together.
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    acc = _row_block_loss(acc, q, XS, XT, P_S, INV_S, P_T, INV_T, N, ds, dt, stride_sn, stride_tn, nb, NORM,
                          REMOVE_S, REMOVE_T, PREC, UPCAST, BLOCK, BLOCK_K)
    mirror = nb - 1 - q
    if mirror != q:
        acc = _row_block_loss(acc, mirror, XS, XT, P_S, INV_S, P_T, INV_T, N, ds, dt, stride_sn, stride_tn, nb,
                              NORM, REMOVE_S, REMOVE_T, PREC, UPCAST, BLOCK, BLOCK_K)
    tl.store(PART + g * tl.num_programs(0) + q, tl.sum(acc, axis=0) * scale)


# ----------------------------------------------------------------------------- backward

@triton.jit(do_not_specialize=["N", "rnd", "teams"])
def _gram_bwd_kernel(
    XA,  # rows whose gradient is accumulated [G, N, da], unit stride along da
    XB,  # the other operand's rows [G, N, db], unit stride along db
    P_A,  # [G, N] fp32 powers of two of XA's rows (read with NORM)
    INV_A,  # [G, N] fp32 inverse norms of XA's scaled rows (read with NORM)
    P_B,  # [G, N] fp32 powers of two of XB's rows (read with NORM)
    INV_B,  # [G, N] fp32 inverse norms of XB's scaled rows (read with NORM)
    GA,  # in/out: [G, N, da] fp32 contiguous, dL / d(normalised XA rows), accumulated
    GRAD_LOSS,  # [1] fp32: the loss's incoming gradient
    N,  # rows per matrix
    da,  # XA's width
    db,  # XB's width
    stride_ag,  # XA's stride between matrices
    stride_an,  # XA's stride between rows
    stride_bg,  # XB's stride between matrices
    stride_bn,  # XB's stride between rows
    rnd,  # the round: pairs in rounds 0 .. teams - 2, the diagonal tiles in round teams - 1
    teams,  # row blocks rounded up to even (the last one a bye when the count is odd)
    coef,  # 4 / (G N^2)
    NORM: tl.constexpr,  # scale the dots by the inverse norms (apply_norm)
    REMOVE_A: tl.constexpr,  # XA's negative similarities were zeroed (no gradient through them)
    REMOVE_B: tl.constexpr,  # XB's negative similarities were zeroed
    PREC: tl.constexpr,  # tl.dot input precision of the similarity products for fp32 rows
    PREC_BWD: tl.constexpr,  # the coefficients' products with the rows: "bf16x2" (bf16 rows) or a tl.dot precision
    UPCAST: tl.constexpr,  # interpreter: 16-bit dots in fp32
    BLOCK: tl.constexpr,  # rows of a tile side
    BLOCK_K: tl.constexpr,  # columns of d per step of the similarity products
    BLOCK_D: tl.constexpr,  # columns of da per step of the gradient products
):
    p = tl.program_id(0)
    g = tl.program_id(1).to(tl.int64)
    XA += g * stride_ag
    XB += g * stride_bg
    if NORM:
        P_A += g * N
        INV_A += g * N
        P_B += g * N
        INV_B += g * N
    GA += g * N * da
    # The circle method: block teams - 1 meets block rnd, and block (rnd + p) meets (rnd - p), mod teams - 1.
    last = teams - 1
    diagonal = rnd == last
    bi = tl.where(diagonal, p, tl.where(p == 0, last, (rnd + p) % last))
    bj = tl.where(diagonal, p, tl.where(p == 0, rnd, (rnd - p + last) % last))
    offs = tl.arange(0, BLOCK)
    rows_i = bi * BLOCK + offs
    rows_j = bj * BLOCK + offs
    mask_i = rows_i < N  # all false for the bye
    mask_j = rows_j < N
    p_ai, inv_ai = _row_factors(P_A, INV_A, rows_i, mask_i, NORM)
    p_aj, inv_aj = _row_factors(P_A, INV_A, rows_j, mask_j, NORM)
    p_bi, inv_bi = _row_factors(P_B, INV_B, rows_i, mask_i, NORM)
    p_bj, inv_bj = _row_factors(P_B, INV_B, rows_j, mask_j, NORM)
    a = _tile_dots(XA, rows_i, rows_j, mask_i, mask_j, p_ai, p_aj, da, stride_an, NORM, BLOCK, BLOCK_K, PREC, UPCAST)
    b = _tile_dots(XB, rows_i, rows_j, mask_i, mask_j, p_bi, p_bj, db, stride_bn, NORM, BLOCK, BLOCK_K, PREC, UPCAST)
    if NORM:
        a = a * inv_ai[:, None] * inv_aj[None, :]
        b = b * inv_bi[:, None] * inv_bj[None, :]
    if REMOVE_B:
        b = tl.where(b < 0, 0.0, b)
    diff = a - b
    if REMOVE_A:
        diff = tl.where(a < 0, 0.0, diff)  # where a was zeroed its gradient is 0 (a NaN is kept, as theirs)
    w = tl.where(mask_i[:, None] & mask_j[None, :], diff, 0.0) * (coef * tl.load(GRAD_LOSS))
    w_i = w * inv_aj[None, :]  # rows of block I gather the normalised rows (p a) n of block J
    w_j = w * inv_ai[:, None]  # and those of block J the normalised rows of block I
    w_jt = tl.trans(w_j)
    off_i = rows_i.to(tl.int64) * stride_an
    off_j = rows_j.to(tl.int64) * stride_an
    out_i = rows_i.to(tl.int64) * da
    out_j = rows_j.to(tl.int64) * da
    for k0 in range(0, da, BLOCK_D):
        ks = k0 + tl.arange(0, BLOCK_D)
        kmask = ks < da
        mik = mask_i[:, None] & kmask[None, :]
        mjk = mask_j[:, None] & kmask[None, :]
        xj = _scaled_rows(XA, off_j, ks, mjk, p_aj, NORM)
        acc_i = tl.load(GA + out_i[:, None] + ks[None, :], mask=mik, other=0.0)
        acc_i = _coef_dot(w_i, xj, acc_i, PREC_BWD, UPCAST)
        tl.store(GA + out_i[:, None] + ks[None, :], acc_i, mask=mik)
        if rnd != last:
            xi = _scaled_rows(XA, off_i, ks, mik, p_ai, NORM)
            acc_j = tl.load(GA + out_j[:, None] + ks[None, :], mask=mjk, other=0.0)
            acc_j = _coef_dot(w_jt, xi, acc_j, PREC_BWD, UPCAST)
            tl.store(GA + out_j[:, None] + ks[None, :], acc_j, mask=mjk)


# ----------------------------------------------------------------------------- launchers

def gram_config(dtype: torch.dtype, allow_tf32: bool) -> dict:
    """The forward's and the backward's tiles: 64 x 64 entries, 32 x 32 where the products are
    ``tf32x3`` (fp32 rows; fp16 rows' coefficient products), whose split operands take the
    registers of three; the largest steps along d that compile without a spill on sm_80 and
    sm_90 (the AOT build checks it)."""
    fp32 = dtype == torch.float32
    if fp32:
        fwd = dict(BLOCK=64, BLOCK_K=16, num_warps=8) if allow_tf32 else dict(BLOCK=32, BLOCK_K=16, num_warps=4)
    else:
        fwd = dict(BLOCK=64, BLOCK_K=32, num_warps=8)
    if dtype == torch.bfloat16:
        bwd = dict(BLOCK=64, BLOCK_K=32, BLOCK_D=32, num_warps=8)
    elif fp32 and allow_tf32:
        bwd = dict(BLOCK=64, BLOCK_K=16, BLOCK_D=16, num_warps=8)
    else:
        bwd = dict(BLOCK=32, BLOCK_K=16 if fp32 else 32, BLOCK_D=16, num_warps=4)
    return dict(fwd=dict(fwd, num_stages=1), bwd=dict(bwd, num_stages=1))


def _interpreted(x: torch.Tensor) -> bool:
    """The kernels only run on CPU tensors under Triton's interpreter; launches recorded for the
    AOT build take what a GPU compiles."""
    return x.device.type == "cpu" and not recording()


def _operands(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One dtype for both (fp64 computed in fp32: an fp64 product into an fp32 accumulator does not
    compile for a GPU), rows with a unit stride along d."""
    dtype = torch.promote_types(a.dtype, b.dtype)
    if dtype == torch.float64:
        dtype = torch.float32
    return rows_contiguous(a.to(dtype)), rows_contiguous(b.to(dtype))


def row_config(d: int) -> dict:
    block_d = min(max(triton.next_power_of_2(d), 16), 128)
    return dict(BLOCK_R=32, BLOCK_D=block_d, num_warps=4, num_stages=1)


def row_factors(x: torch.Tensor, apply_norm: bool, eps: float = NORM_EPS) -> torch.Tensor:
    """``[2, G * N]`` fp32: each row's power of two p and ``1 / max(|p x|, p eps)`` (an empty tensor
    without normalisation). Also KoLeo's search's (``fastssl.kernels.koleo``)."""
    if not apply_norm:
        return torch.empty(0, device=x.device, dtype=torch.float32)
    G, N, d = x.shape
    factors = torch.empty(2, G * N, device=x.device, dtype=torch.float32)
    cfg = row_config(d)
    launch(_row_scales_kernel, (triton.cdiv(G * N, cfg["BLOCK_R"]),),
           X=x, P=factors[0], INV=factors[1], n_rows=G * N, N=N, d=d, stride_g=x.stride(0), stride_n=x.stride(1),
           eps=eps, BLOCK_R=cfg["BLOCK_R"], BLOCK_D=cfg["BLOCK_D"], **launch_options(cfg))
    return factors


def _precisions(dtype: torch.dtype, allow_tf32: bool) -> tuple[str, str]:
    """The similarity products' input precision (fp32 rows), and the backward's coefficient products':
    two bf16 parts with bf16 rows, else fp32 products as the similarities' (fp16 rows exact in fp32)."""
    prec = "tf32" if allow_tf32 else "tf32x3"
    return prec, "bf16x2" if dtype == torch.bfloat16 else prec


def gram_forward(student: torch.Tensor, teacher: torch.Tensor, apply_norm: bool, remove_student: bool,
                 remove_teacher: bool, allow_tf32: bool):
    """The loss over ``[G, N, d]`` student and teacher rows (validated by the caller), and the row
    factors the backward reuses: ``(loss, factors_student, factors_teacher)``, all fp32 (the
    factors ``[2, G * N]``, empty without ``apply_norm``)."""
    a, b = _operands(student, teacher)
    G, N, da = a.shape
    db = b.shape[2]
    cfg = gram_config(a.dtype, allow_tf32)["fwd"]
    prec, _ = _precisions(a.dtype, allow_tf32)
    nb = triton.cdiv(N, cfg["BLOCK"])
    programs = triton.cdiv(nb, 2)
    with launch_device(a, "gram_loss"):
        fa, fb = row_factors(a, apply_norm), row_factors(b, apply_norm)
        pa, inv_a = (fa[0], fa[1]) if apply_norm else (fa, fa)
        pb, inv_b = (fb[0], fb[1]) if apply_norm else (fb, fb)
        part = torch.empty(G, programs, device=a.device, dtype=torch.float32)
        launch(_gram_fwd_kernel, (programs, G),
               XS=a, XT=b, P_S=pa, INV_S=inv_a, P_T=pb, INV_T=inv_b, PART=part, N=N, ds=da, dt=db,
               stride_sg=a.stride(0), stride_sn=a.stride(1), stride_tg=b.stride(0), stride_tn=b.stride(1), nb=nb,
               scale=1.0 / (G * N * N), NORM=apply_norm, REMOVE_S=remove_student, REMOVE_T=remove_teacher, PREC=prec,
               UPCAST=_interpreted(a), BLOCK=cfg["BLOCK"], BLOCK_K=cfg["BLOCK_K"], **launch_options(cfg))
        loss = part.sum()
    return loss, fa, fb


def _normalize_backward(x: torch.Tensor, ghat: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """dL/dx from g = dL/dx^ (fp32, overwritten) for x^ = x / max(|x|, eps) = (p x) n:
    ``p n (g - x^ (x^ . g))``, and ``g / eps`` below eps (where the norm is the constant eps)."""
    p, inv = factors.view(2, *x.shape[:2], 1).unbind(0)
    xs = x.float() * p  # exact: p is a power of two (a new tensor: x may be fp32 already)
    below = torch.linalg.vector_norm(xs, dim=-1, keepdim=True) < p * NORM_EPS
    xhat = xs.mul_(inv)
    coef = torch.linalg.vecdot(xhat, ghat, dim=-1).unsqueeze(-1).masked_fill_(below, 0.0)
    return ghat.sub_(xhat.mul_(coef)).mul_(p * inv)


def _finish(x: torch.Tensor, operand: torch.Tensor, ghat: torch.Tensor, factors: torch.Tensor,
            apply_norm: bool) -> torch.Tensor:
    """The gradient to ``x`` (in its dtype) from dL / d(normalised rows), ``operand`` being x as the
    kernels read it; while launches are recorded, an unwritten tensor of its shape."""
    if recording():
        return torch.empty_like(x)
    return (_normalize_backward(operand, ghat, factors) if apply_norm else ghat).to(x.dtype)


def _accumulate(xa, xb, fa, fb, grad_loss, apply_norm, remove_a, remove_b, allow_tf32) -> torch.Tensor:
    """dL / d(normalised xa rows), fp32 ``[G, N, da]``, over the rounds of tiles."""
    G, N, da = xa.shape
    cfg = gram_config(xa.dtype, allow_tf32)["bwd"]
    prec, prec_bwd = _precisions(xa.dtype, allow_tf32)
    nb = triton.cdiv(N, cfg["BLOCK"])
    teams = nb + nb % 2
    # Recorded launches (the AOT build) write nothing: no need to clear gigabytes.
    ga = (torch.empty if recording() else torch.zeros)(G, N, da, device=xa.device, dtype=torch.float32)
    pa, inv_a = (fa[0], fa[1]) if apply_norm else (fa, fa)
    pb, inv_b = (fb[0], fb[1]) if apply_norm else (fb, fb)
    args = dict(XA=xa, XB=xb, P_A=pa, INV_A=inv_a, P_B=pb, INV_B=inv_b, GA=ga,
                GRAD_LOSS=grad_loss, N=N, da=da, db=xb.shape[2], stride_ag=xa.stride(0), stride_an=xa.stride(1),
                stride_bg=xb.stride(0), stride_bn=xb.stride(1), teams=teams, coef=4.0 / (G * N * N),
                NORM=apply_norm, REMOVE_A=remove_a, REMOVE_B=remove_b, PREC=prec, PREC_BWD=prec_bwd,
                UPCAST=_interpreted(xa), BLOCK=cfg["BLOCK"], BLOCK_K=cfg["BLOCK_K"], BLOCK_D=cfg["BLOCK_D"],
                **launch_options(cfg))
    for rnd in range(teams - 1 if nb > 1 else 0):
        launch(_gram_bwd_kernel, (teams // 2, G), rnd=rnd, **args)
    launch(_gram_bwd_kernel, (nb, G), rnd=teams - 1, **args)
    return ga


def gram_backward(grad_loss: torch.Tensor, student: torch.Tensor, teacher: torch.Tensor, factors_student: torch.Tensor,
                  factors_teacher: torch.Tensor, apply_norm: bool, remove_student: bool, remove_teacher: bool,
                  allow_tf32: bool, need_student: bool, need_teacher: bool):
    """Gradients ``(d student, d teacher)`` in the inputs' dtypes (an empty tensor where not needed)."""
    a, b = _operands(student, teacher)
    g = grad_loss.reshape(1).float()
    ds = torch.empty(0, device=student.device, dtype=student.dtype)
    dt = torch.empty(0, device=teacher.device, dtype=teacher.dtype)
    with launch_device(a, "gram_loss"):
        if need_student:
            ga = _accumulate(a, b, factors_student, factors_teacher, g, apply_norm, remove_student, remove_teacher,
                             allow_tf32)
            ds = _finish(student, a, ga, factors_student, apply_norm)
        if need_teacher:  # the roles swapped: the difference's sign flips, as the gradient's must
            gb = _accumulate(b, a, factors_teacher, factors_student, g, apply_norm, remove_teacher, remove_student,
                             allow_tf32)
            dt = _finish(teacher, b, gb, factors_teacher, apply_norm)
    return ds, dt
