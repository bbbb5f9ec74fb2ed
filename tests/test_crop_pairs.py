"""dino_cross_entropy (the DINO family's loss over crop pairs) against the authors' pair-by-pair
definition in float64, with teacher probabilities given or recomputed from TeacherTargets."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import DEVICE, DTYPES, TOL, assert_rel_close
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastssl.functional import dino_cross_entropy, sinkhorn_knopp, softmax_center
from fastssl.reference import dinov2 as ref

# (S, T, ignore_diagonal, B, K): crops from 1 to 12 either side, K off every block size.
PROBLEMS = [(8, 2, False, 3, 1000), (2, 2, True, 4, 333), (10, 2, True, 2, 1025), (1, 1, False, 7, 100),
            (3, 5, True, 2, 50), (5, 3, True, 3, 4097), (12, 12, True, 1, 77), (1, 12, False, 2, 130),
            (12, 1, True, 2, 65), (4, 4, False, 2, 1)]


def _reference(student, probs64, S, T, diagonal, student_temp=0.1, weights=None, scale=None):
    """Loss and student gradient of the pair-by-pair definition, float64."""
    s = student.detach().double().requires_grad_()
    B, K = s.shape[-2], s.shape[-1]
    log_p = torch.log_softmax(s.view(S, B, K) / student_temp, dim=-1)
    total, pairs = 0.0, 0
    for i in range(S):
        for t in range(T):
            if diagonal and i == t:
                continue
            per_sample = -(probs64.view(T, B, K)[t] * log_p[i]).sum(-1)
            total = total + (per_sample * weights.double() if weights is not None else per_sample).sum()
            pairs += 1
    loss = total * (scale if scale is not None else 1 / (pairs * B))
    (grad,) = torch.autograd.grad(loss, s)
    return loss.detach(), grad


def _teacher(kind, T, B, K, backend, scale=3.0, temp=0.07):
    """Teacher input of each kind (made by ``backend``) and its float64 probabilities from the
    authors' definitions."""
    x = torch.randn(T * B, K, device=DEVICE) * scale
    if kind == "probs":
        q = torch.softmax(torch.randn(T, B, K, device=DEVICE) * 2, dim=-1)
        return q, q.double()
    if kind == "softmax":
        center = torch.randn(K, device=DEVICE)
        return (softmax_center(x, center, temp, backend=backend),
                ref.softmax_center(x.double(), center.double(), temp))
    return sinkhorn_knopp(x, temp, backend=backend), ref.sinkhorn_knopp(x.double(), temp)


@pytest.mark.parametrize("kind", ["probs", "softmax", "sinkhorn"])
@pytest.mark.parametrize("S,T,diagonal,B,K", PROBLEMS)
def test_matches_authors_pairs(backend, kind, S, T, diagonal, B, K):
    teacher, q64 = _teacher(kind, T, B, K, backend)
    student = (torch.randn(S, B, K, device=DEVICE) * 3).requires_grad_()
    loss = dino_cross_entropy(student, teacher, ignore_diagonal=diagonal, backend=backend)
    (grad,) = torch.autograd.grad(loss, student)
    ref_loss, ref_grad = _reference(student, q64, S, T, diagonal)
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert_rel_close(loss, ref_loss, 1e-5, "loss")
    assert_rel_close(grad, ref_grad, 1e-5, "gradient")


@pytest.mark.parametrize("dtype", [*DTYPES, torch.float64], ids=str)
@pytest.mark.parametrize("kind", ["probs", "sinkhorn"])
def test_every_dtype(backend, dtype, kind):
    # Low-precision (and fp64) logits, fp32 math inside: the loss matches the float64 reference of
    # the same rounded inputs to fp32 accuracy; the gradient comes back in the student's dtype.
    S, T, B, K = 10, 2, 3, 700
    x = (torch.randn(T * B, K, device=DEVICE) * 3).to(dtype)
    teacher, q64 = ((sinkhorn_knopp(x, 0.07, backend=backend), ref.sinkhorn_knopp(x.double(), 0.07))
                    if kind == "sinkhorn" else (torch.softmax(x.float(), -1).to(dtype).view(T, B, K), None))
    if q64 is None:
        q64 = teacher.double()
    student = (torch.randn(S, B, K, device=DEVICE) * 3).to(dtype).requires_grad_()
    loss = dino_cross_entropy(student, teacher, ignore_diagonal=True, backend=backend)
    (grad,) = torch.autograd.grad(loss, student)
    ref_loss, ref_grad = _reference(student, q64, S, T, True)
    assert loss.dtype == torch.float32 and grad.dtype == dtype
    assert_rel_close(loss, ref_loss, 1e-5, "loss")
    assert_rel_close(grad, ref_grad, max(TOL.get(dtype, 0), 1e-5), "gradient")


def test_weights_and_scale(backend):
    # iBOT's case: one crop each, a weight per row, the sum over the images.
    S, T, B, K = 1, 1, 37, 300
    teacher, q64 = _teacher("sinkhorn", T, B, K, backend)
    weights = torch.rand(B, device=DEVICE)
    student = torch.randn(S, B, K, device=DEVICE).requires_grad_()
    loss = dino_cross_entropy(student, teacher, weights=weights, scale=1 / 5, backend=backend)
    (grad,) = torch.autograd.grad(loss * 3.0, student)  # an upstream gradient other than 1
    ref_loss, ref_grad = _reference(student, q64, S, T, False, weights=weights, scale=1 / 5)
    assert_rel_close(loss, ref_loss, 1e-5, "loss")
    assert_rel_close(grad, 3.0 * ref_grad, 1e-5, "gradient")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_logits_across_each_dtypes_range(backend, dtype):
    # Student and teacher logits of each order of magnitude the dtype holds, as long as the scaled
    # logits (s / 0.1 * log2(e), x / 0.07 * log2(e)) fit in fp32: loss, gradient and Sinkhorn
    # targets stay finite and equal the float64 reference. A running max that starts at -FLT_MAX
    # must not turn into -inf * 0 (NaN) on a first column far above it.
    top = min(torch.finfo(dtype).max, 3e38 * 0.07 / 1.45) / 4
    S, T, B, K = 4, 2, 2, 300
    for magnitude in (1.0, 1e4, top ** 0.5, top):
        student = (torch.randn(S, B, K, device=DEVICE) * magnitude / 4).to(dtype).requires_grad_()
        teacher = (torch.randn(T * B, K, device=DEVICE) * magnitude / 4).to(dtype)
        q64 = torch.softmax(teacher.double() / 0.07, dim=-1)
        targets = softmax_center(teacher, torch.zeros(K, device=DEVICE), 0.07, backend=backend)
        loss = dino_cross_entropy(student, targets, ignore_diagonal=True, backend=backend)
        (grad,) = torch.autograd.grad(loss, student)
        ref_loss, ref_grad = _reference(student, q64, S, T, True)
        assert torch.isfinite(loss) and torch.isfinite(grad).all(), f"magnitude {magnitude:.3g}"
        assert_rel_close(targets.batch_mean, teacher.double().mean(0), 1e-6, f"batch center at {magnitude:.3g}")
        assert_rel_close(loss, ref_loss, 1e-5 if magnitude < 1e4 else 1e-4, f"loss at {magnitude:.3g}")
        assert_rel_close(grad, ref_grad, TOL[dtype] if magnitude < 1e4 else 2e-2, f"gradient at {magnitude:.3g}")


@pytest.mark.parametrize("where", ["student", "teacher logits", "teacher probs"])
def test_nan_in_gives_nan_out(backend, where):
    S, T, B, K = 3, 2, 2, 50
    student = torch.randn(S, B, K, device=DEVICE)
    x = torch.randn(T * B, K, device=DEVICE)
    probs = torch.softmax(torch.randn(T, B, K, device=DEVICE), -1)
    if where == "student":
        student[1, 0, 7] = float("nan")
    elif where == "teacher logits":
        x[3, 11] = float("nan")
    else:
        probs[0, 1, 3] = float("nan")
    teacher = probs if where == "teacher probs" else sinkhorn_knopp(x, 0.07, backend=backend)
    assert torch.isnan(dino_cross_entropy(student.requires_grad_(), teacher, backend=backend))


def test_no_sample_is_an_empty_sum(backend):
    # iBOT on a batch without a masked patch: loss 0, still part of the graph.
    student = torch.randn(1, 0, 64, device=DEVICE, requires_grad=True)
    loss = dino_cross_entropy(student, torch.empty(1, 0, 64, device=DEVICE), backend=backend)
    loss.backward()
    assert loss.item() == 0.0 and student.grad.shape == student.shape


def test_no_gradient_to_the_teacher(backend):
    student = torch.randn(3, 2, 40, device=DEVICE, requires_grad=True)
    probs = torch.softmax(torch.randn(2, 2, 40, device=DEVICE), -1).requires_grad_()
    dino_cross_entropy(student, probs, backend=backend).backward()
    assert probs.grad is None and student.grad is not None


BAD = [
    (dict(student=torch.randn(2, 3, 4, 5)), "student_logits must be \\[crops, B, K\\]"),
    (dict(student=torch.randn(2, 3, 40).long()), "floating-point"),
    (dict(teacher=torch.randn(2, 4, 40)), "teacher_probs \\(2, 4, 40\\) must be \\[T, B, K\\] with B=3"),
    (dict(teacher=torch.randn(2, 3, 41)), "K=40"),
    (dict(student=torch.randn(1, 3, 40), teacher=torch.randn(1, 3, 40), ignore_diagonal=True), "no pair"),
    (dict(weights=torch.ones(4)), "weights must be a \\[B\\] tensor with B=3"),
    (dict(student_temp=0.0), "student_temp must be a positive number"),
    (dict(student=torch.randn(2, 3, 0), teacher=torch.randn(2, 3, 0)), "no class"),
]


@pytest.mark.parametrize("change,message", BAD)
def test_bad_inputs_name_the_problem(backend, change, message):
    args = dict(student=torch.randn(2, 3, 40), teacher=torch.softmax(torch.randn(2, 3, 40), -1),
                ignore_diagonal=False, weights=None, student_temp=0.1) | change
    with pytest.raises(ValueError, match=message):
        dino_cross_entropy(args["student"].to(DEVICE), args["teacher"].to(DEVICE),
                           ignore_diagonal=args["ignore_diagonal"], student_temp=args["student_temp"],
                           weights=None if args["weights"] is None else args["weights"].to(DEVICE), backend=backend)


def test_targets_with_rows_that_do_not_split_into_crops(backend):
    targets = sinkhorn_knopp(torch.randn(7, 40, device=DEVICE), 0.07, backend=backend)
    with pytest.raises(ValueError, match="not \\[T, B, K\\] or \\[T \\* B, K\\] rows for B=3"):
        dino_cross_entropy(torch.randn(2, 3, 40, device=DEVICE), targets, backend=backend)


def test_triton_path_keeps_only_row_statistics():
    # Beyond its inputs the op keeps 3 floats per student row, 2 per teacher row and K for the
    # offset: never an [S, B, K] log-softmax nor a [T, B, K] probability tensor.
    S, T, B, K = 8, 2, 4, 2000
    x = torch.randn(T * B, K, device=DEVICE)
    targets = sinkhorn_knopp(x, 0.07, backend="triton")
    student = torch.randn(S, B, K, device=DEVICE, requires_grad=True)
    inputs = {student.data_ptr(), x.data_ptr()}
    extra = []

    def pack(t):
        if t.data_ptr() not in inputs:
            extra.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        dino_cross_entropy(student, targets, backend="triton")
    assert sum(extra) <= 3 * S * B + 2 * T * B + K, f"saved {extra} elements beyond the inputs"


def test_opcheck():
    S, T, B, K = 3, 2, 2, 70
    student = torch.randn(S * B, K, device=DEVICE, requires_grad=True)
    x = torch.randn(T * B, K, device=DEVICE)
    offset = torch.randn(K, device=DEVICE)
    torch.library.opcheck(torch.ops.fastssl.teacher_col_lse.default, (x, torch.randn(T * B, device=DEVICE), 0.07))
    stats, _ = torch.ops.fastssl.teacher_row_stats(x, None, offset, 0.07, False)
    weights = torch.rand(B, device=DEVICE)
    for teacher, st_ in ((x, stats), (torch.softmax(x, -1), None)):
        args = (student, teacher, None, offset if st_ is not None else None, st_, weights, S, T, 2, 0.1, 0.07, 0.3)
        torch.library.opcheck(torch.ops.fastssl.dino_ce_forward.default, args)
        _, stats_s = torch.ops.fastssl.dino_ce_forward(*args)
        torch.library.opcheck(torch.ops.fastssl.dino_ce_backward.default,
                              (torch.tensor(1.5, device=DEVICE), student.detach(), *args[1:5], stats_s, *args[5:]))


def test_torch_compile_fullgraph(backend):
    # Sinkhorn-Knopp targets and both DINOv3 terms inside one compiled function: no graph break.
    torch._dynamo.reset()
    head = torch.nn.Linear(16, 64).to(DEVICE)

    def step(x_local, x_global, x_teacher):
        targets = sinkhorn_knopp(head(x_teacher).detach(), 0.07, backend=backend)
        local = dino_cross_entropy(head(x_local), targets, backend=backend)
        glob = dino_cross_entropy(head(x_global), targets, ignore_diagonal=True, backend=backend)
        return local + glob

    compiled = torch.compile(step, fullgraph=True)
    for _ in range(2):
        xs = (torch.randn(6, 2, 16, device=DEVICE), torch.randn(2, 2, 16, device=DEVICE),
              torch.randn(4, 16, device=DEVICE))
        eager = step(*xs)
        g_eager = torch.autograd.grad(eager, head.weight)[0]
        comp = compiled(*xs)
        g_comp = torch.autograd.grad(comp, head.weight)[0]
        assert_rel_close(comp, eager, 1e-5, "compiled loss")
        assert_rel_close(g_comp, g_eager, 1e-4, "compiled gradient")


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(S=st.integers(1, 12), T=st.integers(1, 12), diagonal=st.booleans(), B=st.integers(1, 4),
       K=st.integers(1, 300), student_temp=st.floats(0.05, 0.5), scale=st.floats(0.1, 20.0))
def test_random_problems_match_authors(backend, S, T, diagonal, B, K, student_temp, scale):
    if diagonal and S == T == 1:
        diagonal = False
    # Teacher logits within the float64 reference's reach (exp(x / 0.07) finite).
    x = torch.randn(T * B, K, device=DEVICE) * min(scale, 8.0)
    targets = sinkhorn_knopp(x, 0.07, backend=backend)
    student = (torch.randn(S, B, K, device=DEVICE) * scale).requires_grad_()
    loss = dino_cross_entropy(student, targets, student_temp=student_temp, ignore_diagonal=diagonal, backend=backend)
    (grad,) = torch.autograd.grad(loss, student)
    ref_loss, ref_grad = _reference(student, ref.sinkhorn_knopp(x.double(), 0.07), S, T, diagonal, student_temp)
    # Sinkhorn-Knopp's offsets are sums of log-sum-exps of |x / tau| up to ~1000 here: fp32 keeps
    # them to ~1e-7 relative, a few 1e-5 of a probability at the largest scales.
    tol = 1e-5 if scale < 5 else 1e-4
    assert_rel_close(loss, ref_loss, tol, "loss")
    assert_rel_close(grad, ref_grad, tol, "gradient")


def test_scale_default_is_the_mean_over_pairs_and_samples(backend):
    S, T, B, K = 3, 2, 5, 30
    probs = torch.softmax(torch.randn(T, B, K, device=DEVICE), -1)
    student = torch.randn(S, B, K, device=DEVICE)
    mean = dino_cross_entropy(student, probs, ignore_diagonal=True, backend=backend)
    total = dino_cross_entropy(student, probs, ignore_diagonal=True, scale=1.0, backend=backend)
    assert math.isclose(total.item(), mean.item() * (S * T - 2) * B, rel_tol=1e-6)
