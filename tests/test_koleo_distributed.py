"""KoLeoLossDistributed over 2 gloo processes equals the authors' definition evaluated on the gathered
batch in float64: every rank's loss and gradient, for every topk and group layout, and the authors' errors
for group sizes that do not divide."""

from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as mp
from helpers import DEVICE, gloo_worker, rel_err

from fastssl import dinov3
from fastssl.reference import dinov3 as ref

WORLD, B, D = 2, 4, 10
# (loss_group_size, topk): the global batch (None, and 8 spelt out) with every topk it allows, and one
# group per rank (4) with every topk it allows.
LAYOUTS = [(None, k) for k in range(1, WORLD * B)] + [(WORLD * B, 1)] + [(B, k) for k in range(1, B)]
ERRORS = {3: "Loss group size size 3 must be a multiple of local batch size 4.",
          16: "Global batch size 8 must be divisible by loss group size 16.",
          (4, 4): "topk=4 neighbours need a neighbour set of at least 5 rows, it has 4"}


def _batch(seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(WORLD * B, D, generator=g)
    x[2] = x[0] * 4  # a copy on rank 0, scaled by a power of two: ties and the copies' distance
    return x


def _work(rank, seed, backend, out_dir):
    x = _batch(seed)[rank * B:(rank + 1) * B].to(DEVICE)
    out = {}
    for size, topk in LAYOUTS:
        xr = x.clone().requires_grad_()
        loss = dinov3.KoLeoLossDistributed(topk, size, backend=backend)(xr)
        (grad,) = torch.autograd.grad(loss, xr)
        out[(size, topk)] = (loss.detach().cpu(), grad.cpu())
    for key in ERRORS:
        size, topk = key if isinstance(key, tuple) else (key, 1)
        try:
            dinov3.KoLeoLossDistributed(topk, size, backend=backend)(x)
            out[key] = None
        except ValueError as e:
            out[key] = str(e)
    torch.save(out, f"{out_dir}/rank{rank}.pt")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_two_gloo_processes_match_the_gathered_batch(tmp_path, fresh_seed, backend):
    mp.spawn(gloo_worker, args=(WORLD, str(tmp_path / "init"), _work, fresh_seed, backend, str(tmp_path)), nprocs=WORLD)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    for size, topk in LAYOUTS:
        x64 = _batch(fresh_seed).double().requires_grad_()
        losses = ref.koleo_loss_distributed(x64, WORLD, topk, size)
        # Each rank's gradient is its rows' share of the sum of every rank's loss (the all-gather's backward).
        (grad,) = torch.autograd.grad(sum(losses), x64)
        for r in range(WORLD):
            loss, g = ranks[r][(size, topk)]
            what = f"rank {r}, loss_group_size={size}, topk={topk}"
            # The terms are logs of distances between unit rows (order 1 here) and their mean can cancel to
            # near 0 (-0.0018 on one seed): the error is judged against the terms' scale, not the mean's.
            scale = max(abs(losses[r].item()), 1.0)
            assert abs(loss.item() - losses[r].item()) <= 1e-5 * scale, \
                f"{what}: loss {loss.item()} vs {losses[r].item()}"
            assert rel_err(g, grad[r * B:(r + 1) * B]) <= 1e-5, f"{what}: gradient"
    for key, message in ERRORS.items():
        for r in range(WORLD):
            assert ranks[r][key] is not None and message in ranks[r][key], f"rank {r}, {key}: {ranks[r][key]}"
