"""The GPU stage's kernel checks: every Triton op at fixed sizes against its float64 reference.

    python -m benchmarks.kernel_checks [--device cuda] [--only dino ema snn gram koleo] [--json PATH]

The test suite draws its sizes at random and sweeps many of them, which on a GPU means
hundreds of compiled variants. These checks use fixed sizes instead, chosen to reach each
code path once (every tile layout of the DINO-family kernels, dense labels and class ids,
the EMA's dtype pairs and an unaligned tensor) in every dtype the ops accept, fp64 included:
the set the lease compiles, and the set CI compiles ahead of time (``benchmarks.workloads``).
The values are fresh random draws every run.

Each check gives a record ``{op, case, what, rel_err, tol, ok}``; the command prints them and
exits non-zero when one fails. Inside :func:`fastssl.kernels._launch.record_launches` (the
AOT build's and the lease's record passes) nothing runs and the records are meaningless.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

import fastssl
from fastssl import dinov3
from fastssl.functional import dino_cross_entropy, dino_loss, gram_loss, koleo_loss, sinkhorn_knopp, snn
from fastssl.reference import dino_loss_pairwise, snn_reference
from fastssl.reference import dinov2 as ref
from fastssl.reference import dinov3 as ref3

TRITON = dict(backend="triton")
# Relative tolerance of a gradient returned in each dtype (fp32 math inside); losses and
# probabilities are fp32 whatever the inputs: 1e-5.
GRAD_TOL = {torch.float32: 1e-5, torch.float64: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    scale = expected.norm().item()
    return (actual - expected).norm().item() / scale if scale > 0 else (actual - expected).norm().item()


def _record(op: str, case: str, what: str, actual, expected, tol: float) -> dict:
    err = _rel_err(actual, expected)
    return dict(op=op, case=case, what=what, rel_err=err, tol=tol, ok=bool(err <= tol))  # NaN fails


def _grad(loss, x):
    (g,) = torch.autograd.grad(loss, x)
    return g


# ----------------------------------------------------------------------------- DINO family

def dino_family(device: torch.device) -> list[dict]:
    """DINO (v1), the crop-pair loss from probabilities and from Sinkhorn-Knopp / softmax targets
    (every tile layout: diagonal and other crops, more teacher crops than student ones, one
    crop each with weights), the DINOv3 drop-in, each dtype."""
    out = []
    # DINO v1 (2 global crops, diagonal out): fp32 and bf16 at the benchmark's crops, fp64.
    for ncrops, B, K, dtype in ((10, 3, 1000, torch.float32), (10, 3, 1000, torch.bfloat16),
                                (4, 2, 333, torch.float64)):
        s = (torch.randn(ncrops * B, K, device=device) * 3).to(dtype).requires_grad_()
        t = (torch.randn(2 * B, K, device=device) * 3).to(dtype)
        c = torch.randn(1, K, device=device)
        loss, center = dino_loss(s, t, c, ncrops, 0.04, **TRITON)
        s64 = s.detach().double().requires_grad_()
        expected = dino_loss_pairwise(s64, t.double(), c.double(), ncrops, 0.1, 0.04)
        case = f"dino_loss {ncrops} crops B={B} K={K} {dtype}"
        out += [_record("dino", case, "loss", loss, expected, 1e-5),
                _record("dino", case, "gradient", _grad(loss, s), _grad(expected, s64), GRAD_TOL[dtype]),
                _record("dino", case, "batch center", center, t.double().mean(0, keepdim=True), 1e-6)]
    # The crop-pair op: (S, T, diagonal, B, K, teacher kind, dtype).
    for S, T, diagonal, B, K, kind, dtype in ((8, 2, False, 3, 777, "sinkhorn", torch.bfloat16),
                                              (2, 2, True, 4, 1025, "sinkhorn", torch.float32),
                                              (3, 5, True, 2, 300, "probs", torch.float32),
                                              (8, 2, False, 2, 500, "softmax", torch.float16),
                                              (2, 2, True, 3, 200, "sinkhorn", torch.float64)):
        x = (torch.randn(T * B, K, device=device) * 2).to(dtype)
        if kind == "sinkhorn":
            teacher, q64 = sinkhorn_knopp(x, 0.07, **TRITON), ref.sinkhorn_knopp(x.double(), 0.07)
        elif kind == "softmax":
            c = torch.randn(K, device=device)
            teacher = fastssl.functional.softmax_center(x, c, 0.07, **TRITON)
            q64 = ref.softmax_center(x.double(), c.double(), 0.07)
        else:
            teacher = torch.softmax(x.float(), -1).view(T, B, K)
            q64 = teacher.double()
        s = (torch.randn(S, B, K, device=device) * 3).to(dtype).requires_grad_()
        loss = dino_cross_entropy(s, teacher, ignore_diagonal=diagonal, **TRITON)
        s64 = s.detach().double().requires_grad_()
        expected = ref.cross_entropy_over_pairs(s64, q64.view(T, B, K), 0.1, diagonal)
        case = f"dino_cross_entropy {S}x{T}{' no diagonal' if diagonal else ''} B={B} K={K} {kind} {dtype}"
        if kind != "probs":
            out.append(_record("dino", case, "teacher probabilities", teacher.probs(), q64, 1e-5))
        out += [_record("dino", case, "loss", loss, expected, 1e-5),
                _record("dino", case, "gradient", _grad(loss, s), _grad(expected, s64), GRAD_TOL[dtype])]
    # iBOT through the DINOv3 drop-in: masked rows with weights, Sinkhorn-Knopp targets.
    ibot = dinov3.iBOTPatchLoss(300, backend="triton").to(device)
    masks = torch.rand(6, 49, device=device) < 0.4
    masks[0] = False
    n = int(masks.sum())
    x = torch.randn(n, 300, device=device).to(torch.bfloat16)
    s = torch.randn(n, 300, device=device).to(torch.bfloat16).requires_grad_()
    loss = ibot.forward_masked(s, ibot.teacher_targets(x, 0.07), masks)
    s64 = s.detach().double().requires_grad_()
    expected = ref.ibot_loss_masked(s64, ref.sinkhorn_knopp(x.double(), 0.07), masks, 0.1)
    case = f"iBOTPatchLoss.forward_masked {n} rows K=300 bf16"
    out += [_record("dino", case, "loss", loss, expected, 1e-5),
            _record("dino", case, "gradient", _grad(loss, s), _grad(expected, s64), GRAD_TOL[torch.bfloat16])]
    return out


# ----------------------------------------------------------------------------- EMA

def ema(device: torch.device) -> list[dict]:
    """The EMA update for each (teacher, student) dtype pair the trainers use, one unaligned
    tensor, a float and a device momentum: the teacher after the update against the authors'
    ``mul_(m).add_((1 - m) * s)`` in fp32, rounded once (rel_err is the largest error in ulps of
    the teacher's dtype; the kernel rounds to nearest, so 0 is expected, 1 allowed)."""
    out = []
    shapes = [(4097,), (3, 4099), (), (8192,)]
    for t_dtype, s_dtype in ((torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                             (torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16),
                             (torch.float16, torch.float16)):
        for momentum in (0.996, torch.tensor(0.75, device=device)):
            teacher = [torch.randn(s, device=device).to(t_dtype) for s in shapes]
            if t_dtype == torch.float32 and s_dtype == torch.float32 and isinstance(momentum, float):
                teacher.append(torch.randn(5001, device=device)[1:])  # an address off 16 bytes
            student = [torch.randn(t.shape, device=device).to(s_dtype) for t in teacher]
            m = momentum.item() if isinstance(momentum, torch.Tensor) else momentum
            expected = [(t.float() * m + (1 - m) * s.float()).to(t_dtype) for t, s in zip(teacher, student,
                                                                                          strict=True)]
            fastssl.ema_update_(teacher, student, momentum, backend="triton")
            worst = 0.0
            for a, e in zip(teacher, expected, strict=True):
                fi = torch.finfo(t_dtype)
                a64, e64 = a.double().cpu(), e.double().cpu()
                ulp = torch.exp2(torch.floor(torch.log2(e64.abs().clamp_min(fi.tiny)))) * fi.eps
                worst = max(worst, ((a64 - e64).abs() / ulp).max().item() if a64.numel() else 0.0)
            kind = "device momentum" if isinstance(momentum, torch.Tensor) else "float momentum"
            out.append(dict(op="ema", case=f"ema_update_ {t_dtype} teacher, {s_dtype} student, {kind}",
                            what="teacher (ulps)", rel_err=worst, tol=1.0, ok=bool(worst <= 1.0)))
    return out


# ----------------------------------------------------------------------------- PAWS

def paws(device: torch.device) -> list[dict]:
    """The soft nearest neighbours, forward and backward, with dense labels and class ids, in each
    dtype, at a small odd size and at one whose supports span several chunks."""
    out = []
    for N, M, d, C, dense, dtype in ((24, 77, 19, 10, True, torch.float32), (24, 77, 19, 10, False, torch.bfloat16),
                                     (37, 300, 64, 12, True, torch.float16), (20, 90, 33, 7, False, torch.float64),
                                     (64, 2000, 128, 50, True, torch.bfloat16)):
        q = torch.randn(N, d, device=device).to(dtype).requires_grad_()
        s = torch.randn(M, d, device=device).to(dtype).requires_grad_()
        ids = torch.randint(0, C, (M,), device=device)
        y = torch.nn.functional.one_hot(ids, C).float()
        probs = snn(q, s, y if dense else ids, 0.1, num_classes=None if dense else C, **TRITON)
        w = torch.randn(N, C, device=device)
        gq, gs = torch.autograd.grad((probs * w).sum(), (q, s))
        q64, s64 = (x.detach().double().requires_grad_() for x in (q, s))
        expected = snn_reference(q64, s64, y.double(), 0.1)
        eq, es = torch.autograd.grad((expected * w.double()).sum(), (q64, s64))
        case = f"snn N={N} M={M} d={d} C={C} {'dense labels' if dense else 'class ids'} {dtype}"
        # 16-bit embeddings are multiplied in their dtype (fp32 accumulation): the tolerance of that.
        tol = 1e-5 if dtype in (torch.float32, torch.float64) else 2e-2
        out += [_record("paws", case, "probabilities", probs, expected, tol),
                _record("paws", case, "query gradient", gq, eq, tol),
                _record("paws", case, "support gradient", gs, es, tol)]
    return out


# ----------------------------------------------------------------------------- Gram anchoring, KoLeo

def gram(device: torch.device) -> list[dict]:
    """The Gram loss and both gradients at odd sizes (partial tiles, odd and even block counts) per image and
    over the batch, every negative-removal mode, with and without normalisation, each dtype, and TF32
    products (fp32 features, allow_tf32: tolerance 5e-3)."""
    out = []
    for B, N, ds, dt, img_level, norm, mode, dtype, tf32 in (
            (2, 77, 40, 24, True, True, "remove_neg", torch.bfloat16, False),
            (1, 130, 64, 64, False, True, "only_teacher_neg", torch.float32, False),
            (3, 65, 33, 33, True, False, "keep_neg", torch.float16, False),
            (2, 50, 20, 20, False, True, "keep_neg", torch.float64, False),
            (2, 70, 32, 32, True, True, "keep_neg", torch.float32, True)):
        s = torch.randn(B, N, ds, device=device).to(dtype).requires_grad_()
        t = torch.randn(B, N, dt, device=device).to(dtype).requires_grad_()
        flags = dict(img_level=img_level, apply_norm=norm, remove_neg=mode == "remove_neg",
                     remove_only_teacher_neg=mode == "only_teacher_neg")
        loss = gram_loss(s, t, allow_tf32=tf32, **flags, **TRITON)
        gs, gt = torch.autograd.grad(loss * N * N, (s, t))  # N^2: 16-bit gradients not subnormal
        s64, t64 = (x.detach().double().requires_grad_() for x in (s, t))
        expected = ref3.gram_loss(s64, t64, img_level, norm, flags["remove_neg"], flags["remove_only_teacher_neg"])
        es, et = torch.autograd.grad(expected * N * N, (s64, t64))
        case = (f"gram_loss B={B} N={N} d={ds}/{dt} {'image' if img_level else 'batch'} "
                f"{'normalised ' if norm else ''}{mode} {dtype}{' tf32' if tf32 else ''}")
        tol, grad_tol = (5e-3, 5e-3) if tf32 else (1e-5, GRAD_TOL[dtype])
        out += [_record("gram", case, "loss", loss, expected, tol),
                _record("gram", case, "student gradient", gs, es, grad_tol),
                _record("gram", case, "teacher gradient", gt, et, grad_tol)]
    return out


def koleo(device: torch.device) -> list[dict]:
    """KoLeo through the Triton top-k search: one neighbour and several (up to the kernel's 16), each dtype,
    rows in several tiles; with two exact copies (the copies' distance, ties to the lowest index)."""
    out = []
    for B, D, topk, dtype in ((100, 48, 1, torch.float32), (70, 33, 3, torch.bfloat16), (40, 20, 16, torch.float16),
                              (30, 24, 1, torch.float64)):
        x = torch.randn(B, D, device=device)
        x[B // 2] = x[1] * 2
        x = x.to(dtype).requires_grad_()
        loss = koleo_loss(x, topk=topk, loss_group_size=B, **TRITON)
        x64 = x.detach().double().requires_grad_()
        expected = ref3.koleo_loss_distributed(x64, 1, topk, B)[0]
        case = f"koleo_loss B={B} D={D} topk={topk} {dtype}"
        out += [_record("koleo", case, "loss", loss, expected, 1e-5),
                _record("koleo", case, "gradient", _grad(loss, x), _grad(expected, x64), GRAD_TOL[dtype])]
    return out


CHECKS = {"dino": dino_family, "ema": ema, "snn": paws, "gram": gram, "koleo": koleo}


def run(device: torch.device, only=None) -> list[dict]:
    records = []
    for name, check in CHECKS.items():
        if only and name not in only:
            continue
        try:
            records += check(device)
        except Exception as exc:  # one op's failure must not hide the others' results
            records.append(dict(op=name, case="(the check itself)", what=f"{type(exc).__name__}: {exc}"[:300],
                                rel_err=None, tol=None, ok=False))
    return records


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--only", nargs="+", choices=sorted(CHECKS))
    parser.add_argument("--json", help="also write the records here")
    args = parser.parse_args(argv)
    torch.manual_seed(torch.seed())
    records = run(torch.device(args.device), args.only)
    for r in records:
        err = "" if r["rel_err"] is None else f"{r['rel_err']:.2e} (tol {r['tol']:.0e})"
        print(f"{'PASS' if r['ok'] else 'FAIL'} {r['op']:<5} {r['case']}: {r['what']} {err}")
    failed = sum(not r["ok"] for r in records)
    print(f"\n{len(records) - failed} passed, {failed} failed")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
