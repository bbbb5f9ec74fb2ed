"""The Gram anchoring loss (fastssl.dinov3.GramLoss, fastssl.functional.gram_loss) against the float64
transcription of the authors' GramLoss: loss and both gradients, per image and over the batch, every
negative-removal mode, with and without normalisation, N from 1 to a few hundred, every dtype."""

from __future__ import annotations

import contextlib
import itertools

import pytest
import torch
from helpers import DEVICE, rel_err
from torch.profiler import ProfilerActivity, profile

from fastssl import dinov3
from fastssl.functional import gram_loss
from fastssl.losses import gram as gram_module
from fastssl.reference import dinov3 as ref

MODES = {"remove_neg": (True, False), "only_teacher_neg": (False, True), "keep_neg": (False, False)}
# Row counts around the kernels' 64-row tiles: one row, a partial tile, whole tiles, odd block counts.
NS = [1, 2, 37, 63, 64, 65, 129, 200, 257]
GRAD_TOL = {torch.float32: 1e-5, torch.float64: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _features(B, N, d, dtype, scale=1.0):
    return (torch.randn(B, N, d, device=DEVICE) * scale).to(dtype)


def _run(student, teacher, backend, weight=None, **kw):
    """fastssl's loss and gradients (student, teacher), and the reference's from the same rounded inputs in
    float64. The gradients are those of ``weight`` (default N^2) x the loss, so that 16-bit ones are not
    subnormal."""
    s = student.detach().clone().requires_grad_()
    t = teacher.detach().clone().requires_grad_()
    weight = float(student.shape[-2] ** 2) if weight is None else weight
    loss = gram_loss(s, t, backend=backend, **kw)
    gs, gt = torch.autograd.grad(loss * weight, (s, t))
    s64, t64 = (x.detach().double().requires_grad_() for x in (student, teacher))
    expected = ref.gram_loss(s64, t64, kw.get("img_level", True), kw.get("apply_norm", True),
                             kw.get("remove_neg", True), kw.get("remove_only_teacher_neg", False))
    es, et = torch.autograd.grad(expected * weight, (s64, t64))
    return (loss, gs, gt), (expected, es, et)


CASES = list(itertools.product([True, False], MODES, [True, False]))


@contextlib.contextmanager
def _no_compile_caches():
    """torch.compile without its on-disk caches: they are keyed by the graph, not by the custom ops' fake
    implementations, so an entry from before a change of those would replay stale output shapes."""
    with torch._inductor.config.patch(fx_graph_cache=False), torch._functorch.config.patch(enable_autograd_cache=False):
        yield


@pytest.mark.parametrize(("img_level", "mode", "apply_norm"), CASES)
def test_matches_the_authors(backend, img_level, mode, apply_norm):
    # Each case draws its N from NS (each N in several cases), the batch and both widths at random.
    N = NS[CASES.index((img_level, mode, apply_norm)) % len(NS)]
    if N == 1 and apply_norm:  # one normalised row: the loss is 0 (test_one_normalised_row)
        N = 70
    B = int(torch.randint(1, 4, ()))
    if not img_level:  # one matrix of B N rows: at most ~300 (the interpreter's time grows as its square)
        B = max(1, min(B, 300 // N))
    ds, dt = (int(v) for v in torch.randint(3, 48, (2,)))
    remove_neg, only_teacher = MODES[mode]
    student, teacher = _features(B, N, ds, torch.float32), _features(B, N, dt, torch.float32)
    if not img_level and torch.rand(()) < 0.5:  # [B * N, d] rows at batch level, as the authors accept
        student, teacher = student.flatten(0, 1), teacher.flatten(0, 1)
    got, expected = _run(student, teacher, backend, img_level=img_level, apply_norm=apply_norm,
                         remove_neg=remove_neg, remove_only_teacher_neg=only_teacher)
    assert got[0].dtype == torch.float32 and got[0].shape == ()
    for what, a, e in zip(("loss", "student gradient", "teacher gradient"), got, expected, strict=True):
        assert rel_err(a, e) <= 1e-5, f"{what}: B={B} N={N} d={ds}/{dt}: {rel_err(a, e):.2e}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("img_level", [True, False])
def test_every_dtype(backend, dtype, img_level):
    # fp32 math on the rounded inputs: the loss to fp32 rounding, the gradients to their dtype's.
    B, N, d = 2, int(torch.randint(40, 140, ())), 24
    student, teacher = _features(B, N, d, dtype), _features(B, N, d, dtype)
    got, expected = _run(student, teacher, backend, img_level=img_level, remove_neg=False)
    assert got[1].dtype == dtype and got[2].dtype == dtype
    assert rel_err(got[0], expected[0]) <= 1e-5
    for a, e in zip(got[1:], expected[1:], strict=True):
        assert rel_err(a, e) <= GRAD_TOL[dtype]


@pytest.mark.parametrize(("dtype", "scale"), [(torch.float32, 1e-15), (torch.float32, 1e15), (torch.float16, 1e-3),
                                              (torch.float16, 30.0), (torch.bfloat16, 1e30)])
def test_values_across_the_range(backend, dtype, scale):
    # Normalised, the loss does not depend on the features' scale; unnormalised fp16 features of 30
    # give similarities of 1e4 and squares beyond fp16's range, computed in fp32.
    apply_norm = scale != 30.0
    student, teacher = _features(2, 50, 16, dtype, scale), _features(2, 50, 16, dtype, scale)
    got, expected = _run(student, teacher, backend, weight=None if apply_norm else 1.0, apply_norm=apply_norm,
                         remove_neg=True)
    assert torch.isfinite(got[0])
    assert rel_err(got[0], expected[0]) <= 1e-5
    for a, e in zip(got[1:], expected[1:], strict=True):
        assert rel_err(a, e) <= GRAD_TOL[dtype]


def test_one_normalised_row(backend):
    # Each [1, 1] matrix is |x^|^2 = 1 for student and teacher: the loss and its gradient vanish.
    s = torch.randn(3, 1, 10, device=DEVICE, requires_grad=True)
    loss = gram_loss(s, torch.randn(3, 1, 7, device=DEVICE), backend=backend)
    (g,) = torch.autograd.grad(loss, s)
    assert abs(loss.item()) < 1e-12 and g.abs().max().item() < 1e-5


def test_only_the_teachers_negatives_are_removed(backend):
    # With remove_only_teacher_neg the authors' student mask tests the teacher after it was zeroed:
    # the loss is MSE(S, relu(T)), the student's negative similarities kept.
    s, t = _features(2, 40, 8, torch.float64), _features(2, 40, 8, torch.float64)
    loss = gram_loss(s, t, remove_neg=False, remove_only_teacher_neg=True, backend=backend)
    sn, tn = torch.nn.functional.normalize(s, dim=-1), torch.nn.functional.normalize(t, dim=-1)
    S, T = sn @ sn.mT, tn @ tn.mT
    assert (S < 0).any()
    assert rel_err(loss, ((S - T.clamp_min(0)) ** 2).mean()) <= 1e-5
    assert rel_err(loss, ((S.clamp_min(0) - T.clamp_min(0)) ** 2).mean()) > 1e-3


def test_the_drop_in(backend):
    # The authors' constructor, whose img_level is stored and unused (forward's decides, default True).
    s, t = _features(2, 30, 12, torch.float32), _features(2, 30, 12, torch.float32)
    loss_fn = dinov3.GramLoss(apply_norm=True, img_level=False, remove_neg=False, backend=backend)
    assert list(loss_fn.state_dict()) == []
    image = ref.gram_loss(s.double(), t.double(), True, True, False)
    batch = ref.gram_loss(s.double(), t.double(), False, True, False)
    assert rel_err(loss_fn(s, t), image) <= 1e-5
    assert rel_err(loss_fn(s, t, img_level=False), batch) <= 1e-5
    assert rel_err(image, batch) > 1e-3
    with pytest.raises(ValueError, match="remove_neg and remove_only_teacher_neg are exclusive"):
        dinov3.GramLoss(remove_neg=True, remove_only_teacher_neg=True)


def test_nan_in_nan_out(backend):
    s = _features(2, 70, 8, torch.float32)
    s[1, 5, 3] = float("nan")
    assert torch.isnan(gram_loss(s, _features(2, 70, 8, torch.float32), backend=backend))


def test_bad_inputs_are_named(backend):
    x = torch.randn(2, 5, 4, device=DEVICE)
    cases = [
        (([1.0], x), {}, TypeError, "output_feats must be a torch.Tensor"),
        ((x, x.long()), {}, ValueError, r"target_feats must be a floating-point tensor, got dtype torch.int64"),
        ((x[0], x[0]), {}, ValueError, r"img_level=True output_feats must be \[B, N, dim\].*\(5, 4\)"),
        ((x[None], x[None]), dict(img_level=False), ValueError,
         r"output_feats must be \[B, N, dim\] or .*\(1, 2, 5, 4\)"),
        ((x[:, :0], x[:, :0]), {}, ValueError, r"output_feats \(2, 0, 4\) is empty"),
        ((x, x[:, :, :0]), {}, ValueError, r"target_feats \(2, 5, 0\) is empty"),
        ((x, x[:, :4]), {}, ValueError, r"\[B, N\] differ: output_feats \(2, 5, 4\), target_feats \(2, 4, 4\)"),
        ((x, x[:1]), dict(img_level=False), ValueError, "the student has 10 patches but the teacher 5"),
        ((x, x), dict(remove_neg=True, remove_only_teacher_neg=True), ValueError, "exclusive"),
        ((x, x), dict(backend="cuda"), ValueError, "backend must be one of"),
    ]
    for args, kw, error, match in cases:
        kw = dict(dict(backend=backend), **kw)
        with pytest.raises(error, match=match):
            gram_loss(*args, **kw)


def test_compiles_fullgraph(backend):
    s, t = _features(2, 70, 16, torch.bfloat16), _features(2, 70, 16, torch.bfloat16)

    def step(s, t):
        return gram_loss(s, t, img_level=False, remove_neg=True, backend=backend)

    compiled = torch.compile(step, fullgraph=True)
    s1, s2 = s.clone().requires_grad_(), s.clone().requires_grad_()
    with _no_compile_caches():
        eager, traced = step(s1, t), compiled(s2, t)
        (g1,), (g2,) = torch.autograd.grad(eager, s1), torch.autograd.grad(traced, s2)
    assert rel_err(traced, eager) <= 1e-6
    assert rel_err(g2, g1) <= 1e-2  # bf16 gradients: at most a rounding apart


def test_custom_ops_opcheck():
    s = torch.randn(2, 40, 12, device=DEVICE, requires_grad=True)
    t = torch.randn(2, 40, 9, device=DEVICE, requires_grad=True)
    for flags in ((True, True, True, False), (False, False, True, False)):
        torch.library.opcheck(gram_module._forward_op, (s, t, *flags))
    loss, inv_s, inv_t = gram_module._forward_op(s, t, True, False, True, False)
    torch.library.opcheck(gram_module._backward_op,
                          (torch.ones((), device=DEVICE), s.detach(), t.detach(), inv_s, inv_t, True, False, True,
                           False, True, True))


@pytest.mark.skipif(DEVICE.type != "cpu", reason="the CPU profiler's allocation sizes; on CUDA the benchmark measures")
def test_no_n_by_n_matrix():
    # The largest allocation of a forward and backward: the fused op keeps O(N d) (the gradient's fp32
    # accumulator); the PyTorch path, as the authors', N x N similarity matrices.
    N, d = 300, 8
    s, t = torch.randn(1, N, d, requires_grad=True), torch.randn(1, N, d)

    def largest(backend):
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            gram_loss(s, t, backend=backend).backward()
        return max(e.cpu_memory_usage for e in prof.events())

    assert largest("triton") <= 4 * N * d
    assert largest("torch") >= 4 * N * N


def test_saved_for_backward_is_the_inputs_and_the_norms():
    s, t = torch.randn(3, 80, 16, device=DEVICE, requires_grad=True), torch.randn(3, 80, 16, device=DEVICE)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x) or x, lambda x: x):
        gram_loss(s, t, backend="triton")
    assert sum(x.numel() for x in saved if x.data_ptr() not in (s.data_ptr(), t.data_ptr())) <= 4 * 3 * 80


def test_backward_is_deterministic():
    s, t = torch.randn(2, 70, 16, device=DEVICE, requires_grad=True), torch.randn(2, 70, 16, device=DEVICE)
    grads = [torch.autograd.grad(gram_loss(s, t, img_level=False, backend="triton"), s)[0] for _ in range(2)]
    assert torch.equal(grads[0], grads[1])


def test_tf32_products_run():
    # Triton's interpreter multiplies in fp32 whatever the precision asked: on a GPU allow_tf32 rounds the
    # products to TF32 (the benchmarks' kernel checks measure it there); here it must run and agree.
    s, t = _features(2, 70, 16, torch.float32), _features(2, 70, 16, torch.float32)
    expected = ref.gram_loss(s.double(), t.double())
    assert rel_err(gram_loss(s, t, allow_tf32=True, backend="triton"), expected) <= 2e-3


@pytest.mark.parametrize("img_level", [True, False])
def test_mixed_dtypes_and_strided_features(backend, img_level):
    # The authors cast both to fp32: a bf16 student and an fp32 teacher, the teacher a transposed view and
    # the student every other patch of a larger tensor.
    student = _features(2, 2 * 45, 16, torch.bfloat16)[:, ::2]
    teacher = torch.randn(2, 24, 45, device=DEVICE).transpose(1, 2)
    got, expected = _run(student, teacher, backend, img_level=img_level, remove_neg=True)
    assert got[1].dtype == torch.bfloat16 and got[2].dtype == torch.float32
    assert rel_err(got[0], expected[0]) <= 1e-5
    assert rel_err(got[1], expected[1]) <= GRAD_TOL[torch.bfloat16]
    assert rel_err(got[2], expected[2]) <= 1e-5
