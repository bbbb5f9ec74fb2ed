"""DinoLoss against the authors' per-pair definition evaluated in float64."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import DEVICE, DTYPES, TOL, assert_rel_close
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastssl
from fastssl.functional import dino_loss
from fastssl.reference import AuthorsDINOLoss, dino_loss_pairwise

# (ncrops, B, K): K off every block size, K = 1, B = 1, ncrops from 2 to 12.
SHAPES = [(2, 1, 1), (2, 3, 333), (4, 5, 1000), (10, 2, 1025), (12, 2, 4097), (3, 1, 17), (7, 4, 250)]


def _logits(ncrops, B, K, dtype=torch.float32, scale=3.0):
    student = (torch.randn(ncrops * B, K, device=DEVICE) * scale).to(dtype)
    teacher = (torch.randn(2 * B, K, device=DEVICE) * scale).to(dtype)
    center = torch.randn(1, K, device=DEVICE) * 0.5
    return student, teacher, center


def _reference(student, teacher, center, ncrops, teacher_temp, student_temp=0.1):
    """Loss, gradient and batch center from the authors' per-pair loop in float64."""
    s = student.detach().double().requires_grad_()
    loss = dino_loss_pairwise(s, teacher.double(), center.double(), ncrops, student_temp, teacher_temp)
    (grad,) = torch.autograd.grad(loss, s)
    return loss.detach(), grad, teacher.double().mean(0, keepdim=True)


@pytest.mark.parametrize("ncrops,B,K", SHAPES)
def test_matches_authors_fp32(backend, ncrops, B, K):
    student, teacher, center = _logits(ncrops, B, K)
    student.requires_grad_()
    loss, batch_center = dino_loss(student, teacher, center, ncrops, 0.04, 0.1, backend=backend)
    (grad,) = torch.autograd.grad(loss, student)
    ref_loss, ref_grad, ref_center = _reference(student, teacher, center, ncrops, 0.04)
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert_rel_close(loss, ref_loss, 1e-5, "loss")
    assert_rel_close(grad, ref_grad, 1e-5, "gradient")
    assert_rel_close(batch_center, ref_center, 1e-6, "batch center")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("ncrops,K", [(10, 1000), (10, 1024), (5, 1300), (2, 5000)])
def test_splits_of_several_blocks(backend, monkeypatch, dtype, ncrops, K):
    # One split over all of K: the pair kernels stream several column blocks per program, the
    # last one partial unless K is a multiple of BLOCK_K.
    from fastssl.kernels import dino as kernels

    monkeypatch.setattr(kernels, "_TARGET_PROGRAMS", 1)
    cfg = kernels.pair_config(ncrops, 2, 2, 2, K)
    assert cfg["nsplit"] == 1 and K // cfg["BLOCK_K"] >= 2
    student, teacher, center = _logits(ncrops, 2, K, dtype)
    student.requires_grad_()
    loss, _ = dino_loss(student, teacher, center, ncrops, 0.04, 0.1, backend=backend)
    (grad,) = torch.autograd.grad(loss, student)
    ref_loss, ref_grad, _ = _reference(student, teacher, center, ncrops, 0.04)
    assert_rel_close(loss, ref_loss, 1e-5, "loss")
    assert_rel_close(grad, ref_grad, TOL[dtype], "gradient")


@pytest.mark.parametrize("offset", [-20.0, 20.0])
def test_logits_far_from_zero(backend, offset):
    # Softmax is shift-invariant: student rows all far below (or above) zero (2^z underflows at
    # z = s / 0.1 * log2(e) ~ -290) give the reference's loss and gradient: no running statistic
    # may start from a fixed value like 0. (Much farther, fp32's rounding of z itself shows.)
    student, teacher, center = _logits(10, 2, 700)
    student = (student + offset).requires_grad_()
    loss, _ = dino_loss(student, teacher, center, 10, 0.04, 0.1, backend=backend)
    (grad,) = torch.autograd.grad(loss, student)
    ref_loss, ref_grad, _ = _reference(student, teacher, center, 10, 0.04)
    assert_rel_close(loss, ref_loss, 1e-5, "loss")
    assert_rel_close(grad, ref_grad, 1e-5, "gradient")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("ncrops,B,K", [(10, 3, 1000), (2, 2, 77)])
def test_matches_authors_per_dtype(backend, dtype, ncrops, B, K):
    # Low-precision logits, fp32 math inside: the loss matches the float64 reference of the
    # same rounded inputs to fp32 accuracy; the gradient comes back rounded to the dtype.
    student, teacher, center = _logits(ncrops, B, K, dtype)
    student.requires_grad_()
    loss, _ = dino_loss(student, teacher, center, ncrops, 0.07, 0.1, backend=backend)
    (grad,) = torch.autograd.grad(loss, student)
    ref_loss, ref_grad, _ = _reference(student, teacher, center, ncrops, 0.07)
    assert loss.dtype == torch.float32 and grad.dtype == dtype
    assert_rel_close(loss, ref_loss, 1e-5, "loss")
    assert_rel_close(grad, ref_grad, TOL[dtype], "gradient")


def test_student_and_teacher_dtypes_may_differ(backend):
    student, teacher, center = _logits(4, 3, 130)
    student = student.to(torch.bfloat16).requires_grad_()
    loss, _ = dino_loss(student, teacher, center, 4, 0.04, backend=backend)
    ref_loss, _, _ = _reference(student, teacher, center, 4, 0.04)
    assert_rel_close(loss, ref_loss, 1e-5, "loss")


def test_non_contiguous_rows(backend):
    # Logits sliced out of a wider tensor (row stride != K) are read in place.
    ncrops, B, K = 4, 3, 100
    wide_s, wide_t = torch.randn(ncrops * B, K + 9, device=DEVICE), torch.randn(2 * B, K + 5, device=DEVICE)
    student, teacher = wide_s[:, 3:3 + K].requires_grad_(), wide_t[:, :K]
    center = torch.randn(K, device=DEVICE)
    loss, _ = dino_loss(student, teacher, center, ncrops, 0.05, backend=backend)
    # An upstream gradient other than 1 (a loss weight) scales the gradient.
    (grad,) = torch.autograd.grad(loss * 2.5, student)
    ref_loss, ref_grad, _ = _reference(student, teacher, center.view(1, K), ncrops, 0.05)
    assert_rel_close(loss, ref_loss, 1e-5, "loss")
    assert_rel_close(grad, 2.5 * ref_grad, 1e-5, "gradient")


def test_module_several_steps_match_authors(backend):
    # Loss, gradient and the EMA'd center over steps inside and after the temperature warm-up.
    ncrops, B, K, nepochs = 6, 3, 513, 10
    ours = fastssl.DinoLoss(K, ncrops, 0.04, 0.07, 4, nepochs, backend=backend).to(DEVICE)
    theirs = AuthorsDINOLoss(K, ncrops, 0.04, 0.07, 4, nepochs).double().to(DEVICE)
    for epoch in (0, 2, 3, 4, 9):
        student, teacher, _ = _logits(ncrops, B, K)
        student.requires_grad_()
        loss = ours(student, teacher, epoch)
        (grad,) = torch.autograd.grad(loss, student)
        s64 = student.detach().double().requires_grad_()
        ref = theirs(s64, teacher.double(), epoch)
        (ref_grad,) = torch.autograd.grad(ref, s64)
        assert_rel_close(loss, ref, 1e-5, f"loss at epoch {epoch}")
        assert_rel_close(grad, ref_grad, 1e-5, f"gradient at epoch {epoch}")
        assert_rel_close(ours.center, theirs.center, 1e-6, f"center after epoch {epoch}")
    assert ours.center.abs().sum() > 0


def test_teacher_temp_schedule_and_override(backend):
    loss_fn = fastssl.DinoLoss(8, 2, 0.04, 0.07, 3, 5, backend=backend).to(DEVICE)
    np.testing.assert_allclose(loss_fn.teacher_temp_schedule, [0.04, 0.055, 0.07, 0.07, 0.07])
    assert [loss_fn.teacher_temp_at(e) for e in range(5)] == pytest.approx([0.04, 0.055, 0.07, 0.07, 0.07])
    for bad in (5, 17, -1):
        with pytest.raises(ValueError, match="outside the teacher temperature schedule"):
            loss_fn(torch.randn(4, 8, device=DEVICE), torch.randn(4, 8, device=DEVICE), bad)
    # teacher_temp= overrides the schedule, and needs no epoch.
    student, teacher, _ = _logits(2, 2, 8)
    center = loss_fn.center.clone()
    loss = loss_fn(student, teacher, teacher_temp=0.123)
    ref_loss, _, _ = _reference(student, teacher, center, 2, 0.123)
    assert_rel_close(loss, ref_loss, 1e-5, "loss with teacher_temp override")
    with pytest.raises(ValueError, match="pass the epoch"):
        loss_fn(student, teacher)


def test_state_dict_round_trip_and_authors_checkpoint():
    ours = fastssl.DinoLoss(300, 10, 0.04, 0.04, 0, 100)
    assert list(ours.state_dict()) == ["center"] and ours.state_dict()["center"].shape == (1, 300)
    theirs = AuthorsDINOLoss(300, 10, 0.04, 0.04, 0, 100)
    theirs.center = torch.randn(1, 300)  # what a checkpoint's "dino_loss" entry holds (CPU is fine)
    ours.load_state_dict(theirs.state_dict())
    assert torch.equal(ours.center, theirs.center)
    again = fastssl.DinoLoss(300, 10, 0.04, 0.04, 0, 100)
    again.load_state_dict(ours.state_dict())
    assert torch.equal(again.center, theirs.center)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_extreme_half_precision_logits_stay_finite(backend, dtype):
    # fp16's largest values: naive fp16 math overflows (60000 / 0.1); fp32 inside must not.
    ncrops, B, K = 4, 2, 300
    student = (torch.randint(0, 2, (ncrops * B, K), device=DEVICE) * 120000.0 - 60000.0).to(dtype)
    student.requires_grad_()
    teacher = (torch.randint(0, 2, (2 * B, K), device=DEVICE) * 120000.0 - 60000.0).to(dtype)
    center = torch.full((1, K), -60000.0, device=DEVICE)
    loss, batch_center = dino_loss(student, teacher, center, ncrops, 0.04, backend=backend)
    (grad,) = torch.autograd.grad(loss, student)
    assert torch.isfinite(loss) and torch.isfinite(grad).all() and torch.isfinite(batch_center).all()
    ref_loss, ref_grad, _ = _reference(student, teacher, center, ncrops, 0.04)
    assert_rel_close(loss, ref_loss, 1e-5, "loss")
    assert_rel_close(grad, ref_grad, TOL[dtype], "gradient")


@pytest.mark.parametrize("where", ["student", "teacher"])
def test_nan_in_gives_nan_out(backend, where):
    student, teacher, center = _logits(4, 2, 50)
    (student if where == "student" else teacher)[1, 7] = float("nan")
    loss, _ = dino_loss(student, teacher, center, 4, 0.04, backend=backend)
    assert torch.isnan(loss)


def test_no_gradient_to_teacher(backend):
    student, teacher, center = _logits(3, 2, 40)
    student.requires_grad_()
    teacher.requires_grad_()
    loss, _ = dino_loss(student, teacher, center, 3, 0.04, backend=backend)
    loss.backward()
    assert teacher.grad is None and student.grad is not None


def test_triton_path_keeps_only_row_statistics():
    # The authors' loop keeps ~2 x (2 * ncrops - 2) B x K tensors for its backward; the fused
    # op keeps its inputs and O(rows + K) floats (the rows' max, sum and, for the student,
    # sum(Q); this step's center).
    ncrops, B, K = 10, 4, 2000
    student, teacher, center = _logits(ncrops, B, K)
    student.requires_grad_()
    inputs = {student.data_ptr(), teacher.data_ptr()}
    extra = []

    def pack(t):
        if t.data_ptr() not in inputs:
            extra.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        dino_loss(student, teacher, center, ncrops, 0.04, backend="triton")
    assert sum(extra) <= 3 * ncrops * B + 2 * 2 * B + K, f"saved {extra} elements beyond the inputs"


BAD_INPUTS = [
    (lambda s, t, c: (s[:-1], t, c, 4), "not a positive multiple of ncrops=4"),
    (lambda s, t, c: (s, t[:-1], c, 4), "teacher rows"),
    (lambda s, t, c: (s, t[:, :-1], c, 4), "has K=40 columns but teacher_output"),
    (lambda s, t, c: (s, t, c[:, :-1], 4), "center must hold K=40"),
    (lambda s, t, c: (s.long(), t, c, 4), "floating-point"),
    (lambda s, t, c: (s, t.int(), c, 4), "floating-point"),
    (lambda s, t, c: (s, t, c, 1), "ncrops must be at least 2"),
    (lambda s, t, c: (s.view(4, 3, 40), t, c, 4), "2-D logits"),
    (lambda s, t, c: (s, t, c.to("meta"), 4), "different devices"),
    (lambda s, t, c: (s[:0], t[:0], c, 4), "not a positive multiple"),
]


@pytest.mark.parametrize("make,message", BAD_INPUTS)
def test_bad_inputs_name_the_problem(backend, make, message):
    student, teacher, center = _logits(4, 3, 40)
    s, t, c, ncrops = make(student, teacher, center)
    with pytest.raises(ValueError, match=message):
        dino_loss(s, t, c, ncrops, 0.04, backend=backend)


def test_module_bad_inputs():
    loss_fn = fastssl.DinoLoss(40, 4, 0.04, 0.04, 0, 10)
    with pytest.raises(ValueError, match="out_dim=40"):
        loss_fn(torch.randn(12, 41), torch.randn(6, 41), 0)
    with pytest.raises(ValueError, match="temperatures must be positive"):
        loss_fn(torch.randn(12, 40), torch.randn(6, 40), teacher_temp=0.0)
    with pytest.raises(ValueError, match="center is on"):
        loss_fn(torch.randn(12, 40, device="meta"), torch.randn(6, 40, device="meta"), 0)
    for kwargs, message in [(dict(ncrops=1), "ncrops"), (dict(center_momentum=1.5), "center_momentum"),
                            (dict(warmup_teacher_temp_epochs=11), "warmup_teacher_temp_epochs"),
                            (dict(backend="cuda"), "backend must be one of")]:
        args = dict(out_dim=40, ncrops=4, warmup_teacher_temp=0.04, teacher_temp=0.04,
                    warmup_teacher_temp_epochs=0, nepochs=10) | kwargs
        with pytest.raises(ValueError, match=message):
            fastssl.DinoLoss(**args)


def test_backend_selection(monkeypatch):
    student, teacher, center = (x.cpu() for x in _logits(2, 2, 8))
    with pytest.raises(ValueError, match="backend must be one of"):
        dino_loss(student, teacher, center, 2, 0.04, backend="cuda")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        dino_loss(student, teacher, center, 2, 0.04, backend="triton")
    # "auto" on CPU tensors is the PyTorch path: no interpreter needed.
    loss, _ = dino_loss(student, teacher, center, 2, 0.04, backend="auto")
    assert math.isfinite(loss.item())


def test_autocast(backend):
    # A head run under autocast gives bf16 logits; the loss is computed in fp32 all the same.
    ncrops, B, K = 4, 3, 96
    head = torch.nn.Linear(32, K).to(DEVICE)
    x_s, x_t = torch.randn(ncrops * B, 32, device=DEVICE), torch.randn(2 * B, 32, device=DEVICE)
    center = torch.randn(1, K, device=DEVICE)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        student, teacher = head(x_s), head(x_t)
        loss, _ = dino_loss(student, teacher, center, ncrops, 0.04, backend=backend)
    assert student.dtype == torch.bfloat16 and loss.dtype == torch.float32
    (grad,) = torch.autograd.grad(loss, student)
    ref_loss, ref_grad, _ = _reference(student, teacher, center, ncrops, 0.04)
    assert_rel_close(loss, ref_loss, 1e-5, "loss under autocast")
    assert_rel_close(grad, ref_grad, TOL[torch.bfloat16], "gradient under autocast")


def test_opcheck():
    # The custom ops' schemas, fake (meta) implementations and autograd registration, as DinoLoss
    # calls them: softmax-centered targets, 4 student crops against 2 teacher crops, no diagonal.
    student, teacher, center = _logits(4, 3, 70)
    student.requires_grad_()
    torch.library.opcheck(torch.ops.fastssl.teacher_row_stats.default, (teacher, center.view(-1), None, 0.04, True))
    stats_t, _ = torch.ops.fastssl.teacher_row_stats(teacher, center.view(-1), None, 0.04, True)
    args = (student, teacher, center.view(-1), None, stats_t, None, 4, 2, 2, 0.1, 0.04, 1 / 18)
    torch.library.opcheck(torch.ops.fastssl.dino_ce_forward.default, args)
    _, stats_s = torch.ops.fastssl.dino_ce_forward(*args)
    grad_loss = torch.tensor(1.5, device=DEVICE)
    torch.library.opcheck(torch.ops.fastssl.dino_ce_backward.default,
                          (grad_loss, student.detach(), teacher, center.view(-1), None, stats_t, stats_s, None,
                           4, 2, 2, 0.1, 0.04, 1 / 18))


def test_torch_compile_fullgraph(backend):
    # A model with the loss inside compiles without a graph break and matches eager.
    torch._dynamo.reset()
    ncrops, B, K = 4, 2, 64
    head = torch.nn.Linear(16, K).to(DEVICE)
    loss_eager = fastssl.DinoLoss(K, ncrops, 0.04, 0.04, 0, 3, backend=backend).to(DEVICE)
    loss_comp = fastssl.DinoLoss(K, ncrops, 0.04, 0.04, 0, 3, backend=backend).to(DEVICE)

    def step(loss_fn, x_s, x_t):
        return loss_fn(head(x_s), head(x_t).detach(), 1)

    compiled = torch.compile(step, fullgraph=True)
    for _ in range(2):
        x_s, x_t = torch.randn(ncrops * B, 16, device=DEVICE), torch.randn(2 * B, 16, device=DEVICE)
        eager = step(loss_eager, x_s, x_t)
        g_eager = torch.autograd.grad(eager, head.weight)[0]
        comp = compiled(loss_comp, x_s, x_t)
        g_comp = torch.autograd.grad(comp, head.weight)[0]
        assert_rel_close(comp, eager, 1e-5, "compiled loss")
        assert_rel_close(g_comp, g_eager, 1e-4, "compiled gradient")
        assert_rel_close(loss_comp.center, loss_eager.center, 1e-6, "compiled center")


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ncrops=st.integers(2, 12), B=st.integers(1, 4), K=st.integers(1, 300),
       teacher_temp=st.floats(0.02, 0.2), student_temp=st.floats(0.05, 0.5), scale=st.floats(0.1, 20.0))
def test_random_problems_match_authors(backend, ncrops, B, K, teacher_temp, student_temp, scale):
    student, teacher, center = _logits(ncrops, B, K, scale=scale)
    student.requires_grad_()
    loss, _ = dino_loss(student, teacher, center, ncrops, teacher_temp, student_temp, backend=backend)
    (grad,) = torch.autograd.grad(loss, student)
    ref_loss, ref_grad, _ = _reference(student, teacher, center, ncrops, teacher_temp, student_temp)
    assert_rel_close(loss, ref_loss, 1e-5, "loss")
    assert_rel_close(grad, ref_grad, 1e-5, "gradient")


def test_own_center_updated_in_place_before_backward(backend):
    # Code that keeps its own center may move it in place between forward and backward.
    student, teacher, center = _logits(4, 3, 90)
    student.requires_grad_()
    ref_loss, ref_grad, _ = _reference(student, teacher, center, 4, 0.04)
    loss, batch_center = dino_loss(student, teacher, center, 4, 0.04, backend=backend)
    center.mul_(0.9).add_(batch_center, alpha=0.1)
    (grad,) = torch.autograd.grad(loss, student)
    assert_rel_close(grad, ref_grad, 1e-5, "gradient")


def test_masked_teacher_classes(backend):
    # -inf teacher logits (masked classes) get probability 0, as softmax gives them, even when they
    # fill whole column blocks of the kernels.
    ncrops, B, K = 4, 2, 1000
    student, teacher, center = _logits(ncrops, B, K)
    teacher[0, :300] = float("-inf")
    teacher[1, 500:] = float("-inf")
    student.requires_grad_()
    loss, _ = dino_loss(student, teacher, center, ncrops, 0.04, backend=backend)
    (grad,) = torch.autograd.grad(loss, student)
    ref_loss, ref_grad, _ = _reference(student, teacher, center, ncrops, 0.04)
    assert_rel_close(loss, ref_loss, 1e-5, "loss")
    assert_rel_close(grad, ref_grad, 1e-5, "gradient")


def test_torch_path_compiled_matches_authors(monkeypatch):
    # Outside the test suite (FASTSSL_COMPILE unset) the PyTorch path is one compiled function:
    # teacher softmax, the closed form and the batch center fused; the same numbers.
    from fastssl.losses import dino as dino_module

    monkeypatch.setenv("FASTSSL_COMPILE", "1")
    state = dino_module._torch_path.compile_state
    saved = dict(state)
    state.clear()
    torch._dynamo.reset()
    try:
        student, teacher, center = _logits(10, 3, 500)
        student.requires_grad_()
        loss, batch_center = dino_loss(student, teacher, center, 10, 0.04, backend="torch")
        (grad,) = torch.autograd.grad(loss, student)
        assert "compiled" in state and not state.get("failed")
    finally:
        state.clear()
        state.update(saved)
    ref_loss, ref_grad, ref_center = _reference(student, teacher, center, 10, 0.04)
    assert_rel_close(loss, ref_loss, 1e-5, "loss")
    assert_rel_close(grad, ref_grad, 1e-5, "gradient")
    assert_rel_close(batch_center, ref_center, 1e-6, "batch center")


def test_compiled_torch_path_with_changing_batches_and_a_failed_compile(monkeypatch):
    # Static shapes: a new batch size compiles again (8, 8, then 7 rows a crop, each with its
    # backward); a compile that fails leaves the eager path, said once, with the same numbers.
    from fastssl.losses import dino as dino_module

    monkeypatch.setenv("FASTSSL_COMPILE", "1")
    state = dino_module._torch_path.compile_state
    saved = dict(state)
    state.clear()
    torch._dynamo.reset()
    try:
        for B in (8, 8, 7):
            student, teacher, center = _logits(4, B, 64)
            student.requires_grad_()
            loss, _ = dino_loss(student, teacher, center, 4, 0.04, backend="torch")
            loss.backward()
            ref_loss, ref_grad, _ = _reference(student, teacher, center, 4, 0.04)
            assert_rel_close(loss, ref_loss, 1e-5, f"loss, B={B}")
            assert_rel_close(student.grad, ref_grad, 1e-5, f"gradient, B={B}")
        assert not state.get("failed")

        def broken(*args):
            raise RuntimeError("no C++ compiler")

        state["compiled"] = broken
        student, teacher, center = _logits(4, 3, 40)
        with pytest.warns(RuntimeWarning, match="runs eagerly from now on"):
            loss, _ = dino_loss(student, teacher, center, 4, 0.04, backend="torch")
        assert_rel_close(loss, _reference(student, teacher, center, 4, 0.04)[0], 1e-5, "eager loss")
        assert state["failed"]
    finally:
        state.clear()
        state.update(saved)
