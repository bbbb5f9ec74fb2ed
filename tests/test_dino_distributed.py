"""DinoLoss over 2 gloo processes equals one process on the concatenated batch."""

from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as mp
from helpers import DEVICE, assert_rel_close, gloo_worker

import fastssl

NCROPS, B, K, WORLD, STEPS = 4, 3, 70, 2, 3


def _batches(seed):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(NCROPS, WORLD * B, K, generator=g).to(DEVICE),
             torch.randn(2, WORLD * B, K, generator=g).to(DEVICE)) for _ in range(STEPS)]


def _shard(x, rank):
    # Crop-major rows [crop, sample]: each rank holds its samples of every crop.
    return x[:, rank * B:(rank + 1) * B].reshape(-1, K)


def _work(rank, seed, backend, out_dir):
    loss_fn = fastssl.DinoLoss(K, NCROPS, 0.04, 0.07, 2, 5, backend=backend).to(DEVICE)
    losses, centers = [], []
    for epoch, (student, teacher) in enumerate(_batches(seed)):
        losses.append(loss_fn(_shard(student, rank), _shard(teacher, rank), epoch))
        centers.append(loss_fn.center.clone())
    torch.save({"losses": torch.stack(losses), "centers": torch.stack(centers)}, f"{out_dir}/rank{rank}.pt")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_two_gloo_processes_match_one_process(tmp_path, fresh_seed, backend):
    mp.spawn(gloo_worker, args=(WORLD, str(tmp_path / "init"), _work, fresh_seed, backend, str(tmp_path)), nprocs=WORLD)
    single = fastssl.DinoLoss(K, NCROPS, 0.04, 0.07, 2, 5, backend=backend).to(DEVICE)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    for step, (student, teacher) in enumerate(_batches(fresh_seed)):
        loss = single(student.reshape(-1, K), teacher.reshape(-1, K), step)
        # Same center on every rank, equal to the single process's; the ranks' losses average to its loss.
        for r in range(WORLD):
            assert_rel_close(ranks[r]["centers"][step], single.center, 1e-6, f"center of rank {r}, step {step}")
        mean_loss = sum(ranks[r]["losses"][step] for r in range(WORLD)) / WORLD
        assert_rel_close(mean_loss, loss, 1e-5, f"mean loss over ranks, step {step}")
