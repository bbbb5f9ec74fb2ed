"""Sinkhorn-Knopp targets and the asynchronous centers over 2 gloo processes equal one process on
the gathered batch (fastssl.dinov3 / dinov2)."""

from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as mp
from helpers import DEVICE, assert_rel_close, gloo_worker

from fastssl import dinov2, dinov3

WORLD, B, K, STEPS = 2, 3, 90, 3
IBOT_ROWS = (7, 12)  # masked patches differ per rank


def _data(seed):
    g = torch.Generator().manual_seed(seed)
    return [dict(cls=torch.randn(2, WORLD * B, K, generator=g) * 2,
                 student=torch.randn(8, WORLD * B, K, generator=g),
                 patches=[torch.randn(n, K, generator=g) * 2 for n in IBOT_ROWS]) for _ in range(STEPS)]


def _shard(x, rank):
    return x[:, rank * B:(rank + 1) * B]


def _work(rank, seed, backend, out_dir):
    dino = dinov3.DINOLoss(K, backend=backend).to(DEVICE)
    dino.init_weights()
    ibot = dinov3.iBOTPatchLoss(K, backend=backend).to(DEVICE)
    ibot.init_weights()
    centered = dinov2.DINOLoss(K, backend=backend).to(DEVICE)
    out = dict(probs=[], ibot_probs=[], losses=[], centers=[], ibot_centers=[])
    for step in _data(seed):
        x = _shard(step["cls"], rank).to(DEVICE)
        targets = dino.teacher_targets(x.reshape(-1, K), teacher_temp=0.07)
        out["probs"].append(targets.probs())
        assert_rel_close(dino.sinkhorn_knopp_teacher(x.reshape(-1, K), 0.07), out["probs"][-1], 1e-6,
                         "drop-in and fused Sinkhorn-Knopp")
        out["losses"].append(dino(_shard(step["student"], rank).to(DEVICE), targets))
        patches = step["patches"][rank].to(DEVICE)
        out["ibot_probs"].append(ibot.sinkhorn_knopp_teacher(patches, 0.07, torch.tensor(len(patches))))
        ibot.update_center(patches[None])
        ibot.apply_center_update()
        out["ibot_centers"].append(ibot.center.clone())
        centered.softmax_center_teacher(x.reshape(-1, K), 0.05)
        centered.update_center(x.reshape(-1, K))
        centered.apply_center_update()
        out["centers"].append(centered.center.clone())
    torch.save(out, f"{out_dir}/rank{rank}.pt")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_two_gloo_processes_match_one_process(tmp_path, fresh_seed, backend):
    mp.spawn(gloo_worker, args=(WORLD, str(tmp_path / "init"), _work, fresh_seed, backend, str(tmp_path)), nprocs=WORLD)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    dino = dinov3.DINOLoss(K, backend=backend).to(DEVICE)
    ibot = dinov3.iBOTPatchLoss(K, backend=backend).to(DEVICE)
    centered = dinov2.DINOLoss(K, backend=backend).to(DEVICE)
    ibot_center = torch.zeros(1, 1, K, dtype=torch.float64)
    for i, step in enumerate(_data(fresh_seed)):
        # Sinkhorn-Knopp over the gathered batch: each rank holds its rows of it.
        x = step["cls"].to(DEVICE)
        probs = dino.sinkhorn_knopp_teacher(x.reshape(-1, K), 0.07).view(2, WORLD * B, K)
        for r in range(WORLD):
            assert_rel_close(ranks[r]["probs"][i].view(2, B, K), _shard(probs, r), 1e-5, f"rank {r} targets, step {i}")
        # Each rank's loss is its mean; with equal batches they average to the gathered batch's.
        loss = dino(step["student"].to(DEVICE), probs)
        assert_rel_close(sum(ranks[r]["losses"][i] for r in range(WORLD)) / WORLD, loss, 1e-5, f"loss, step {i}")
        # iBOT: every rank's masked rows normalised together, whatever their counts.
        patches = torch.cat(step["patches"]).to(DEVICE)
        q = ibot.sinkhorn_knopp_teacher(patches, 0.07, torch.tensor(len(patches)))
        assert_rel_close(torch.cat([ranks[r]["ibot_probs"][i] for r in range(WORLD)]), q, 1e-5, f"iBOT targets {i}")
        # Centers: the CLS sum over every rank's rows over their count; iBOT's mean of the ranks' means.
        centered.softmax_center_teacher(x.reshape(-1, K), 0.05)
        centered.update_center(x.reshape(-1, K))
        centered.apply_center_update()
        ibot_center = ibot_center * 0.9 + 0.1 * sum(p.double().mean(0) for p in step["patches"]) / WORLD
        for r in range(WORLD):
            assert_rel_close(ranks[r]["centers"][i], centered.center, 1e-6, f"rank {r} center, step {i}")
            assert_rel_close(ranks[r]["ibot_centers"][i], ibot_center, 1e-6, f"rank {r} iBOT center, step {i}")
