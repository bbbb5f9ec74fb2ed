"""The EMA on FSDP2-sharded models over 2 gloo processes: each rank updates its own shards, and the
gathered teacher equals the authors' loop on the full tensors (bitwise on the PyTorch path, within one
ulp on the kernel's); a teacher and student sharded differently are refused by name."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.multiprocessing as mp
from helpers import gloo_worker
from test_ema import assert_updated, authors_update
from torch import nn

from fastssl import MomentumTeacher, ema_update_

fsdp = pytest.importorskip("torch.distributed.fsdp", reason="FSDP2 needs torch.distributed")
from torch.distributed.tensor import DTensor, Shard  # noqa: E402

WORLD = 2
MOMENTA = (0.9, 0.99, 0.996)  # a float, a 0-dim tensor, then MomentumTeacher's schedule


def _model(seed):
    # Odd sizes: shards of unequal length (FSDP2 pads the last rank's), 1-D and 2-D parameters.
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 13), nn.GELU(), nn.Linear(13, 5), nn.LayerNorm(5))


def _shard(model, placement=None):
    for layer in model:
        if isinstance(layer, nn.Linear):
            fsdp.fully_shard(layer, shard_placement_fn=placement)
    fsdp.fully_shard(model, shard_placement_fn=placement)
    return model


def _work(rank, seed, backend, t_dtype, out_dir):
    student = _model(seed)
    teacher = copy.deepcopy(student).to(t_dtype)
    with torch.no_grad():  # a teacher that differs from the student
        for p in teacher.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(seed + p.numel())))
    _shard(student)
    _shard(teacher)
    assert all(isinstance(p, DTensor) for p in teacher.parameters())
    student_full = [p.full_tensor() for p in student.parameters()]
    local_before = [p.to_local().clone() for p in teacher.parameters()]
    schedule = MomentumTeacher(student, [0.5, MOMENTA[2]], teacher=teacher, backend=backend)
    updates = (lambda: ema_update_(teacher, student, MOMENTA[0], backend=backend),
               lambda: ema_update_(teacher, student, torch.tensor(MOMENTA[1]), backend=backend),
               lambda: schedule.update(1))
    steps = []  # (the gathered teacher before, after, momentum): each update checked on its own
    for update, m in zip(updates, (MOMENTA[0], torch.tensor(MOMENTA[1]), MOMENTA[2]), strict=True):
        before = [p.full_tensor() for p in teacher.parameters()]
        update()
        steps.append((before, [p.full_tensor() for p in teacher.parameters()], m))
    out = dict(steps=steps, student=student_full,
               local_shapes=[tuple(p.to_local().shape) for p in teacher.parameters()],
               local_changed=[not torch.equal(a, p.to_local()) for a, p in zip(local_before, teacher.parameters(),
                                                                                 strict=True)])

    errors = {}
    plain = _model(seed)
    try:
        ema_update_(teacher, plain, 0.9, backend=backend)
    except ValueError as e:
        errors["unsharded student"] = str(e)
    # The first weight [13, 8] by its columns (FSDP2 shards a dimension other than 0 only evenly).
    by_columns = _shard(_model(seed), placement=lambda p: Shard(1) if p.shape == (13, 8) else None)
    try:
        MomentumTeacher(by_columns, 0.9, teacher=teacher, backend=backend)
    except ValueError as e:
        errors["other placements"] = str(e)
    out["errors"] = errors
    torch.save(out, f"{out_dir}/rank{rank}.pt")


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("t_dtype", [torch.float32, torch.bfloat16])
def test_shards_updated_in_place_equal_the_full_update(tmp_path, fresh_seed, backend, t_dtype):
    mp.spawn(gloo_worker, args=(WORLD, str(tmp_path / "init"), _work, fresh_seed, backend, t_dtype, str(tmp_path)),
             nprocs=WORLD)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    for r, out in enumerate(ranks):
        for k, (before, after, m) in enumerate(out["steps"]):
            # 1 - m of a tensor momentum in its own dtype, as the op documents
            assert_updated(after, authors_update(before, out["student"], m), backend,
                           what=f"rank {r}'s gathered teacher after update {k + 1}")
        # Each rank held a part (the 13-row weight: 7 and 6 rows) and changed it.
        assert out["local_shapes"][0] == ((7, 8) if r == 0 else (6, 8)), out["local_shapes"]
        assert all(out["local_changed"]), out["local_changed"]
        assert "'0.weight' is sharded (a DTensor) in the teacher but not in the student" in \
            out["errors"].get("unsharded student", ""), out["errors"]
        assert "'0.weight' is sharded as (Shard(dim=0),)" in out["errors"].get("other placements", ""), out["errors"]
