"""KoLeo (fastssl.dinov2 / dinov3 KoLeoLoss, KoLeoLossDistributed on one process, functional koleo_loss)
against the float64 transcription of the authors' code: loss and gradient, duplicates, scaled copies,
ties to the lowest index, every topk and group size, every dtype; the batch-of-one error."""

from __future__ import annotations

import contextlib

import pytest
import torch
from helpers import DEVICE, rel_err

from fastssl import dinov2, dinov3
from fastssl.functional import koleo_loss
from fastssl.losses import koleo as koleo_module
from fastssl.reference import dinov3 as ref

GRAD_TOL = {torch.float32: 1e-5, torch.float64: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


@contextlib.contextmanager
def _no_compile_caches():
    """torch.compile without its on-disk caches: they are keyed by the graph, not by the custom ops' fake
    implementations, so an entry from before a change of those would replay stale output shapes."""
    with torch._inductor.config.patch(fx_graph_cache=False), torch._functorch.config.patch(enable_autograd_cache=False):
        yield


def _grad(loss, x):
    (g,) = torch.autograd.grad(loss, x)
    return g


def _compare(x, backend, tol=1e-5, grad_tol=1e-5, **kw):
    """koleo_loss and its gradient against the reference on the same (rounded) rows in float64: the
    distributed reference on one rank for topk / loss_group_size, KoLeoLoss's otherwise."""
    xg = x.detach().clone().requires_grad_()
    loss = koleo_loss(xg, backend=backend, **kw)
    x64 = x.detach().double().requires_grad_()
    if kw:
        expected = ref.koleo_loss_distributed(x64, 1, kw.get("topk", 1), kw.get("loss_group_size"))[0]
    else:
        expected = ref.koleo_loss(x64)
    assert loss.dtype == torch.float32 and loss.shape == ()
    # The terms are logs of distances between unit rows (order 1) whose mean can cancel to near 0: the
    # error is judged against the terms' scale, not the mean's.
    scale = max(abs(expected.item()), 1.0)
    assert abs(loss.item() - expected.item()) <= tol * scale, f"loss {loss.item()} vs {expected.item()}"
    got, want = _grad(loss, xg), _grad(expected, x64)
    assert got.dtype == x.dtype
    assert rel_err(got, want) <= grad_tol, f"gradient: {rel_err(got, want):.2e}"
    return loss


def _tie_rows(n, d):
    """Rows of four entries +-0.5 (norm 1): every inner product a multiple of 1/4 in any precision,
    so that rows tie exactly."""
    x = torch.zeros(n, d, device=DEVICE)
    for i in range(n):
        x[i, torch.randperm(d)[:4]] = (torch.randint(0, 2, (4,)).float() - 0.5).to(DEVICE)
    return x


def test_matches_the_authors(backend):
    B, d = int(torch.randint(2, 90, ())), int(torch.randint(3, 70, ()))
    _compare(torch.randn(B, d, device=DEVICE), backend)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_every_dtype(backend, dtype):
    # fp32 math on the rounded inputs; the gradient returned in the inputs' dtype.
    _compare(torch.randn(50, 33, device=DEVICE).to(dtype), backend, grad_tol=GRAD_TOL[dtype])


@pytest.mark.parametrize(("dtype", "scale"), [(torch.float32, 1e-4), (torch.float32, 1e30), (torch.bfloat16, 1e35),
                                              (torch.float16, 1e-6)])
def test_values_across_the_range(backend, dtype, scale):
    # Beyond ~1e19 the authors' fp32 F.normalize gives zeros (an infinite norm): the rows are normalised
    # here after a power-of-two scaling. fp16 rows of 1e-6 are subnormal. (Rows whose norm is under eps,
    # 1e-8, are divided by eps, as the authors': their inner products underflow fp32 and tie.)
    x = (torch.randn(40, 24, device=DEVICE) * scale).to(dtype)
    _compare(x, backend, grad_tol=GRAD_TOL[dtype])


def test_duplicates(backend):
    # Exact copies are sqrt(d) 1e-8 apart (the authors' distance, not 0), with the gradient of that
    # distance (rows 0 and 25, each other's neighbours, get opposite ones of ~1e6 that cancel); a row with
    # several copies takes the first of them.
    x = torch.randn(30, 16, device=DEVICE)
    x[[3, 11, 20]] = x[7].clone()
    x[25] = x[0]
    loss = _compare(x, backend)
    nn = dinov3.KoLeoLoss(backend=backend).pairwise_NNs_inner(torch.nn.functional.normalize(x, dim=-1))
    assert nn[7] == 3 and nn[3] == 7 and nn[11] == 3 and nn[20] == 3 and nn[0] == 25 and nn[25] == 0
    assert loss.item() > 0  # the copies' -log(sqrt(16) 1e-8 + 1e-8) ~ 17.1 dominate


def test_scaled_copies(backend):
    # Copies scaled by powers of two normalise to the same rows exactly: duplicates of their originals.
    x = torch.randn(24, 20, device=DEVICE)
    x[5], x[9], x[17] = x[2] * 8, x[2] * 0.25, x[13] * 2.0**-20
    _compare(x, backend)
    nn = dinov2.KoLeoLoss(backend=backend).pairwise_NNs_inner(torch.nn.functional.normalize(x, dim=-1))
    assert nn[2] == 5 and nn[5] == 2 and nn[9] == 2 and nn[13] == 17 and nn[17] == 13


@pytest.mark.parametrize(("topk", "dtype"), [(1, torch.float32), (2, torch.bfloat16), (5, torch.float32),
                                             (3, torch.float16)])
def test_ties_go_to_the_lowest_index(backend, topk, dtype):
    # Every inner product of these rows is a multiple of 1/4 (in every dtype): many exact ties.
    x = _tie_rows(40, 6).to(dtype)
    expected = ref.koleo_neighbours(x.double(), x.double(), 0, topk)
    got = dinov3.KoLeoLossDistributed(topk, backend=backend).pairwise_NNs_inner(x, x, 0)
    assert torch.equal(got.cpu(), expected)
    _compare(x, backend, topk=topk, grad_tol=GRAD_TOL[dtype])


def test_every_topk_and_group_layout_on_one_process(backend):
    # One process: the group is the batch (loss_group_size None or B); every topk it allows. The
    # layouts of several ranks are tests/test_koleo_distributed.py's.
    B = 9
    x = torch.randn(B, 12, device=DEVICE)
    for size in (None, B):
        for topk in range(1, B):
            _compare(x, backend, topk=topk, loss_group_size=size)


def test_more_neighbours_than_the_kernel_keeps(backend):
    # Above 16 neighbours the search is PyTorch's, on either backend.
    x = _tie_rows(30, 5)
    _compare(x, backend, topk=koleo_module._MAX_KERNEL_TOPK + 3)


def test_the_kernels_limit_is_the_python_layers():
    from fastssl.kernels.koleo import MAX_TOPK

    assert koleo_module._MAX_KERNEL_TOPK == MAX_TOPK


def test_a_neighbour_set_of_one_is_an_error(backend):
    x = torch.randn(1, 8, device=DEVICE, requires_grad=True)
    for loss_fn in (dinov2.KoLeoLoss(backend=backend), dinov3.KoLeoLoss(backend=backend),
                    dinov3.KoLeoLossDistributed(backend=backend)):
        with pytest.raises(ValueError, match=r"neighbour set has one member \(a batch of 1, student_output \[1, D\]"):
            loss_fn(x)
    with pytest.raises(ValueError, match="one member"):
        koleo_loss(x, topk=1, loss_group_size=1, gather=True, backend=backend)


def test_the_authors_group_size_errors(backend):
    x = torch.randn(6, 8, device=DEVICE)
    with pytest.raises(ValueError, match=r"^Loss group size size 4 must be a multiple of local batch size 6\.$"):
        dinov3.KoLeoLossDistributed(loss_group_size=4, backend=backend)(x)
    with pytest.raises(ValueError, match=r"^Global batch size 6 must be divisible by loss group size 12\.$"):
        dinov3.KoLeoLossDistributed(loss_group_size=12, backend=backend)(x)


def test_bad_inputs_are_named(backend):
    x = torch.randn(6, 8, device=DEVICE)
    cases = [
        (([[1.0]],), {}, TypeError, "student_output must be a torch.Tensor"),
        ((x.long(),), {}, ValueError, "student_output must be a floating-point tensor, got dtype torch.int64"),
        ((x[0],), {}, ValueError, r"student_output must be \[B, D\] features, got shape \(8,\)"),
        ((x[None],), {}, ValueError, r"student_output must be \[B, D\] features, got shape \(1, 6, 8\)"),
        ((x[:, :0],), {}, ValueError, r"got shape \(6, 0\)"),
        ((x,), dict(topk=0), ValueError, "topk must be a positive integer, got 0"),
        ((x,), dict(topk=True), ValueError, "topk must be a positive integer, got True"),
        ((x,), dict(topk=6), ValueError, "topk=6 neighbours need a neighbour set of at least 7 rows, it has 6"),
        ((x,), dict(loss_group_size=0), ValueError, "loss_group_size must be positive, got 0"),
        ((x,), dict(backend="gpu"), ValueError, "backend must be one of"),
    ]
    for args, kw, error, match in cases:
        with pytest.raises(error, match=match):
            koleo_loss(*args, **dict(dict(backend=backend), **kw))
    with pytest.raises(ValueError, match="backend must be one of"):
        dinov3.KoLeoLoss(backend="gpu")


def test_nan_in_nan_out(backend):
    x = torch.randn(20, 8, device=DEVICE)
    x[4, 2] = float("nan")
    assert torch.isnan(koleo_loss(x, backend=backend))


def test_autocast_is_off_inside(backend):
    # The authors turn autocast off: a bf16 autocast around the call changes nothing.
    x = torch.randn(64, 48, device=DEVICE)
    plain = koleo_loss(x, topk=3, loss_group_size=64, backend=backend)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        assert torch.equal(koleo_loss(x, topk=3, loss_group_size=64, backend=backend), plain)


def test_compiles_fullgraph(backend):
    x = torch.randn(50, 32, device=DEVICE)

    def step(x):
        return koleo_loss(x, topk=2, loss_group_size=50, backend=backend) + koleo_loss(x, backend=backend)

    compiled = torch.compile(step, fullgraph=True)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    with _no_compile_caches():
        eager, traced = step(x1), compiled(x2)
        g1, g2 = _grad(eager, x1), _grad(traced, x2)
    assert rel_err(traced, eager) <= 1e-6
    assert rel_err(g2, g1) <= 1e-5


def test_search_op_opcheck():
    x = torch.randn(70, 24, device=DEVICE)
    for offset, rows, k in ((0, 70, 1), (0, 70, 3), (30, 25, 2)):
        torch.library.opcheck(koleo_module._neighbours_op, (x, offset, rows, k, 1e-8))
    torch.library.opcheck(koleo_module._neighbours_op, (x.to(torch.bfloat16), 0, 70, 1, 1e-8))
