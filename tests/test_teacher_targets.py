"""Teacher targets (Sinkhorn-Knopp in the log domain, softmax centering) against the authors'
formulas evaluated in float64, including where the authors' fp32 overflows."""

from __future__ import annotations

import pytest
import torch
from helpers import DEVICE, assert_rel_close

from fastssl.functional import sinkhorn_knopp, softmax_center
from fastssl.reference import dinov2 as ref


@pytest.mark.parametrize("n_iterations", [1, 2, 3, 5])
@pytest.mark.parametrize("R,K", [(16, 100), (37, 1000), (5, 333), (1, 17), (130, 65)])
def test_sinkhorn_matches_authors(backend, R, K, n_iterations):
    # Logits where the authors' fp32 is finite (x / tau < 88): the same numbers as theirs, to fp32.
    x = torch.randn(R, K, device=DEVICE).clamp(-5, 5)
    q = sinkhorn_knopp(x, 0.07, n_iterations, backend=backend).probs()
    expected = ref.sinkhorn_knopp(x.double(), 0.07, n_iterations)
    assert torch.isfinite(ref.sinkhorn_knopp(x, 0.07, n_iterations)).all()
    assert q.dtype == torch.float32 and q.shape == (R, K)
    assert_rel_close(q, expected, 1e-5, "probabilities")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64], ids=str)
def test_sinkhorn_input_dtypes(backend, dtype):
    # Any float dtype in, fp32 math (the authors cast to fp32 first).
    x = (torch.randn(3, 4, 250, device=DEVICE) * 2).to(dtype)
    q = sinkhorn_knopp(x, 0.05, backend=backend).probs()
    assert q.shape == (3, 4, 250) and q.dtype == torch.float32
    assert_rel_close(q, ref.sinkhorn_knopp(x.double().reshape(12, 250), 0.05).view(3, 4, 250), 1e-5, "probabilities")


def test_sinkhorn_beyond_the_authors_overflow(backend):
    # x / tau > 88.7: the authors' fp32 exp is inf and their result NaN; this one is the float64
    # evaluation of their formula.
    x = torch.randn(24, 300, device=DEVICE) * 3 + 5.0  # x / 0.04 up to ~550
    assert not torch.isfinite(ref.sinkhorn_knopp(x, 0.04)).all()
    q = sinkhorn_knopp(x, 0.04, backend=backend).probs()
    assert_rel_close(q, ref.sinkhorn_knopp(x.double(), 0.04), 1e-5, "probabilities")


def test_sinkhorn_spread_beyond_fp32_exponent_range(backend):
    # Prototypes whose logits all lie far below the others' (2^-200: below any fp32): in the
    # authors' fp32 those rows of Q are zeros, then 0 / 0. Each column pass here keeps its own
    # running max, so they get their share, as in float64.
    x = torch.randn(40, 200, device=DEVICE)
    x[:, :50] -= 10.0  # exp(-10 / 0.07) ~ 1e-62
    assert torch.isnan(ref.sinkhorn_knopp(x, 0.07)).any()
    q = sinkhorn_knopp(x, 0.07, backend=backend).probs()
    expected = ref.sinkhorn_knopp(x.double(), 0.07)
    assert torch.isfinite(q).all()
    assert_rel_close(q, expected, 1e-5, "probabilities")
    # Sinkhorn-Knopp gives the low prototypes their share of the batch all the same.
    assert_rel_close(q[:, :50].sum(0), expected[:, :50].sum(0), 1e-5, "the low prototypes' mass")


def test_sinkhorn_rows_sum_to_one_and_columns_balance(backend):
    # The last step normalises the samples; many iterations balance the prototypes too.
    x = torch.randn(64, 512, device=DEVICE)
    q = sinkhorn_knopp(x, 0.1, n_iterations=50, backend=backend).probs()
    assert_rel_close(q.sum(1), torch.ones(64), 1e-6, "row sums")
    assert_rel_close(q.sum(0), torch.full((512,), 64 / 512), 1e-3, "column sums after 50 iterations")


def test_sinkhorn_without_rows(backend):
    targets = sinkhorn_knopp(torch.empty(0, 30, device=DEVICE), 0.07, backend=backend)
    assert targets.probs().shape == (0, 30)


def test_softmax_center_matches_authors(backend):
    x = torch.randn(2, 5, 333, device=DEVICE) * 3
    center = torch.randn(1, 333, device=DEVICE)
    targets = softmax_center(x, center, 0.04, backend=backend)
    assert_rel_close(targets.probs(), ref.softmax_center(x.double(), center.double(), 0.04), 1e-5, "probabilities")
    assert_rel_close(targets.batch_mean, x.double().reshape(10, 333).mean(0), 1e-6, "batch mean")
    # The targets keep a copy of the center: the caller may move its own in place.
    center.add_(1.0)
    assert_rel_close(targets.probs(), ref.softmax_center(x.double(), center.double() - 1.0, 0.04), 1e-5,
                     "probabilities after the caller's center moved")


@pytest.mark.parametrize("where", ["teacher", "center"])
def test_nan_in_gives_nan_out(backend, where):
    x = torch.randn(6, 40, device=DEVICE)
    center = torch.zeros(40, device=DEVICE)
    (x if where == "teacher" else center)[..., 3] = float("nan")
    assert torch.isnan(softmax_center(x, center, 0.1, backend=backend).probs()).any()
    if where == "teacher":
        assert torch.isnan(sinkhorn_knopp(x, 0.1, backend=backend).probs()).any()


def test_backends_agree():
    # Targets made by one backend serve the other: the same statistics, base 2, either way.
    x = torch.randn(9, 700, device=DEVICE) * 2
    a = sinkhorn_knopp(x, 0.07, backend="torch")
    b = sinkhorn_knopp(x, 0.07, backend="triton")
    assert_rel_close(a.offset, b.offset, 1e-5, "offsets")
    assert_rel_close(a.stats, b.stats, 1e-5, "row statistics")


@pytest.mark.parametrize("call,message", [
    (lambda: sinkhorn_knopp(torch.randn(4, 10), 0.07, 0), "n_iterations must be an integer >= 1"),
    (lambda: sinkhorn_knopp(torch.randn(4, 10), 0.0), "teacher_temp must be a positive number"),
    (lambda: sinkhorn_knopp(torch.randn(4, 10).long(), 0.07), "floating-point"),
    (lambda: sinkhorn_knopp(torch.randn(4, 0), 0.07), "K >= 1"),
    (lambda: softmax_center(torch.randn(4, 10), torch.zeros(9), 0.07), "center must hold K=10 values"),
    (lambda: softmax_center(torch.randn(4, 10), torch.zeros(10, device="meta"), 0.07), "center on meta"),
])
def test_bad_inputs_name_the_problem(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_batch_center_of_logits_near_fp32s_largest(backend):
    # 300 rows of logits whose scaled values (x / 0.07 * log2(e)) still fit fp32: their sum does
    # not, their mean does. The center is the mean, finite, as the authors' formula in float64.
    x = (torch.rand(300, 50, device=DEVICE) + 0.5) * 1.2e37
    targets = softmax_center(x, torch.zeros(50, device=DEVICE), 0.07, backend=backend)
    assert torch.isfinite(targets.batch_mean).all()
    assert_rel_close(targets.batch_mean, x.double().mean(0), 1e-6, "batch center")
