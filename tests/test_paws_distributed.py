"""The PAWS loss over 2 gloo processes (supports gathered inside) equals one process on the whole batch."""

from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as mp
from helpers import DEVICE, assert_rel_close, gloo_worker

import fastssl
from fastssl.reference import make_labels_matrix

MULTICROP, B, D, CPB, SPC, WORLD = 2, 3, 20, 3, 2, 2
M_LOCAL = CPB * SPC


def _batch(seed):
    g = torch.Generator().manual_seed(seed)
    return dict(anchors=torch.randn(2 + MULTICROP, WORLD * B, D, generator=g).to(DEVICE),
                targets=torch.randn(2, WORLD * B, D, generator=g).to(DEVICE),
                a_supports=torch.randn(WORLD * M_LOCAL, D, generator=g).to(DEVICE),
                t_supports=torch.randn(WORLD * M_LOCAL, D, generator=g).to(DEVICE))


def _labels(kind, rank=None):
    """Unique classes per rank: dense labels of every rank's supports (the authors' matrix, not
    gathered), or this rank's class ids (gathered inside the op); rank None: all of them."""
    if kind == "dense":
        return make_labels_matrix(CPB, SPC, WORLD, DEVICE, unique_classes=True, smoothing=0.1)
    samplers = [fastssl.ClassStratifiedSampler(torch.arange(8).repeat(4), CPB, SPC, world_size=WORLD, rank=r,
                                               unique_classes=True) for r in range(WORLD)]
    if rank is None:
        return samplers[0].labels(gathered=True).to(DEVICE)
    return samplers[rank].labels().to(DEVICE)


def _options(kind, backend):
    options = dict(multicrop=MULTICROP, backend=backend)
    return options | (dict(num_classes=CPB * WORLD, smoothing=0.1) if kind == "ids" else {})


def _loss_and_grads(loss_fn, anchors, a_supports, labels, targets, t_supports):
    anchors, a_supports = anchors.clone().requires_grad_(), a_supports.clone().requires_grad_()
    loss, rloss = loss_fn(anchors, a_supports, labels, targets, t_supports, labels)
    ga, gs = torch.autograd.grad(loss + rloss, (anchors, a_supports))
    return dict(loss=loss.detach(), rloss=rloss.detach(), ga=ga, gs=gs)


def _work(rank, seed, kind, backend, out_dir):
    data = _batch(seed)
    rows = slice(rank * B, (rank + 1) * B)
    supports = slice(rank * M_LOCAL, (rank + 1) * M_LOCAL)
    loss_fn = fastssl.PawsLoss(**_options(kind, backend))
    out = _loss_and_grads(loss_fn, data["anchors"][:, rows].reshape(-1, D), data["a_supports"][supports],
                          _labels(kind, rank), data["targets"][:, rows].reshape(-1, D),
                          data["t_supports"][supports])
    torch.save(out, f"{out_dir}/rank{rank}.pt")


@pytest.mark.parametrize("backend,kind", [("torch", "dense"), ("triton", "ids"), ("triton", "dense")])
def test_two_gloo_processes_match_one_process(tmp_path, fresh_seed, backend, kind):
    mp.spawn(gloo_worker, args=(WORLD, str(tmp_path / "init"), _work, fresh_seed, kind, backend, str(tmp_path)),
             nprocs=WORLD)
    data = _batch(fresh_seed)
    single = _loss_and_grads(fastssl.PawsLoss(**_options(kind, backend)), data["anchors"].reshape(-1, D),
                             data["a_supports"], _labels(kind), data["targets"].reshape(-1, D), data["t_supports"])
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    # The ranks' losses average to the single loss; the regulariser (all-reduced) is the same on
    # every rank. Each rank's gradients (supports' summed over ranks, as the authors' AllGather)
    # are WORLD times the single process's: DDP's mean over ranks gives the single gradient.
    assert_rel_close(sum(r["loss"] for r in ranks) / WORLD, single["loss"], 1e-5, "mean loss over ranks")
    ga = single["ga"].view(2 + MULTICROP, WORLD, B, D)
    for r, out in enumerate(ranks):
        assert_rel_close(out["rloss"], single["rloss"], 1e-5, f"regulariser on rank {r}")
        assert_rel_close(out["ga"], WORLD * ga[:, r].reshape(-1, D), 1e-4, f"anchor gradient on rank {r}")
        assert_rel_close(out["gs"], WORLD * single["gs"][r * M_LOCAL:(r + 1) * M_LOCAL], 1e-4,
                         f"support gradient on rank {r}")
