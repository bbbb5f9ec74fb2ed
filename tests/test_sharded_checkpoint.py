"""Sharded checkpoints over 2 gloo processes with FSDP2: saved and loaded back bitwise (model and
optimiser shards, per-rank values), replaced atomically, consolidated into one file of the full tensors;
a folder that is not a checkpoint is never replaced."""

from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as mp
from helpers import gloo_worker
from torch import nn

from fastssl.train import sharded_checkpoint as sc
from fastssl.train.checkpoint import CheckpointError, load_checkpoint

fsdp = pytest.importorskip("torch.distributed.fsdp", reason="FSDP2 needs torch.distributed")
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict  # noqa: E402

WORLD = 2


def _model(seed):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 13), nn.GELU(), nn.Linear(13, 5))
    for layer in model:
        if isinstance(layer, nn.Linear):
            fsdp.fully_shard(layer)
    fsdp.fully_shard(model)
    return model


def _step(model, opt, seed):
    x = torch.randn(6, 8, generator=torch.Generator().manual_seed(seed))
    model(x).square().mean().backward()
    opt.step()
    opt.zero_grad()


def _state(model, opt, rank, rng):
    model_sd, opt_sd = get_state_dict(model, opt)
    return {"model": model_sd, "optimizer": opt_sd, "epoch": 3, sc.rank_key("rng", rank): rng}


def _work(rank, seed, out_dir):
    model = _model(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    _step(model, opt, seed)
    path = f"{out_dir}/ckpt"
    sc.save_sharded(_state(model, opt, rank, torch.tensor([rank, seed])), path)
    _step(model, opt, seed + 1)  # the run goes on, then saves again over the first checkpoint
    saved_params = [p.full_tensor().clone() for p in model.parameters()]
    saved_moments = [opt.state[p]["exp_avg"].full_tensor().clone() for p in model.parameters()]
    sc.save_sharded(_state(model, opt, rank, torch.tensor([rank, seed])), path)

    # A fresh run (other weights, one step of other data) loads it back.
    other = _model(seed + 7)
    other_opt = torch.optim.AdamW(other.parameters(), lr=1e-2)
    _step(other, other_opt, seed + 9)
    state = _state(other, other_opt, rank, torch.zeros(2, dtype=torch.long))
    state["epoch"] = 0
    sc.load_sharded(state, path)
    set_state_dict(other, other_opt, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    out = {"params_equal": all(torch.equal(a, p.full_tensor()) for a, p in zip(saved_params, other.parameters(),
                                                                                strict=True)),
           "moments_equal": all(torch.equal(a, other_opt.state[p]["exp_avg"].full_tensor())
                                for a, p in zip(saved_moments, other.parameters(), strict=True)),
           "epoch": state["epoch"], "rng": state[sc.rank_key("rng", rank)].tolist(),
           "full": {n: p.full_tensor() for n, p in model.named_parameters()}}
    torch.save(out, f"{out_dir}/rank{rank}.pt")


def test_save_load_and_consolidate(tmp_path, fresh_seed):
    mp.spawn(gloo_worker, args=(WORLD, str(tmp_path / "init"), _work, fresh_seed, str(tmp_path)), nprocs=WORLD)
    for rank in range(WORLD):
        out = torch.load(tmp_path / f"rank{rank}.pt")
        assert out["params_equal"] and out["moments_equal"], rank
        assert out["epoch"] == 3 and out["rng"] == [rank, fresh_seed]
    # Only the checkpoint is left: no temporary or old folder.
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith((".", "ckpt"))) == ["ckpt"]
    single = sc.consolidate(tmp_path / "ckpt", tmp_path / "consolidated.pth")
    state = load_checkpoint(single)
    for name, full in torch.load(tmp_path / "rank0.pt")["full"].items():
        assert torch.equal(state["model"][name], full), name
    assert state["epoch"] == 3 and state["rng.rank1"].tolist() == [1, fresh_seed]
    with pytest.raises(CheckpointError, match="exists"):
        sc.consolidate(tmp_path / "ckpt", single)


def test_a_folder_that_is_not_a_checkpoint_is_kept(tmp_path):
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "mine.txt").write_text("a user's notes")
    with pytest.raises(CheckpointError, match="not a sharded checkpoint"):
        sc.save_sharded({"x": torch.ones(2)}, folder)
    with pytest.raises(CheckpointError, match="not a sharded checkpoint"):
        sc.load_sharded({"x": torch.ones(2)}, folder)
    assert (folder / "mine.txt").read_text() == "a user's notes" and len(list(folder.iterdir())) == 1


class _Payload:
    """Unpickled, it would write a file: what a malicious checkpoint could do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path):
    # A value that unpickles to a call (an index or a plain value), as a folder from elsewhere could hold:
    # refused before torch's full unpickler sees it, by every reader; nothing runs.
    import pickle

    from fastssl.train.sharded_checkpoint import checkpoint_keys, read_values

    marker = tmp_path / "ran"
    value_ckpt = tmp_path / "value"
    sc.save_sharded({"w": torch.ones(3), "note": _Payload(str(marker))}, value_ckpt)
    assert not marker.exists()
    index_ckpt = tmp_path / "index"
    sc.save_sharded({"w": torch.ones(3)}, index_ckpt)
    with open(index_ckpt / ".metadata", "wb") as f:
        pickle.dump(_Payload(str(marker)), f)
    for load in (lambda: sc.load_sharded({"w": torch.zeros(3), "note": None}, value_ckpt),
                 lambda: read_values(value_ckpt), lambda: sc.consolidate(value_ckpt, tmp_path / "v.pth"),
                 lambda: sc.load_sharded({"w": torch.zeros(3)}, index_ckpt), lambda: checkpoint_keys(index_ckpt),
                 lambda: sc.consolidate(index_ckpt, tmp_path / "i.pth")):
        with pytest.raises(CheckpointError, match="could run code"):
            load()
        assert not marker.exists()
    assert not (tmp_path / "v.pth").exists() and not (tmp_path / "i.pth").exists()
    # Plain values still load.
    assert read_values(index_ckpt.parent / "value", {"w"})["w"].tolist() == [1.0, 1.0, 1.0]
