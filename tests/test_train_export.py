"""``fastssl-train export``: a DINO or DINOv3 run's backbone as a safetensors file that timm loads with the
JSON arguments written beside it, giving the trained network's features; nothing of a user's replaced
without --overwrite."""

from __future__ import annotations

import json

import pytest
import timm
import torch
from test_train import TINY as DINO_TINY
from test_train import write_folder
from test_train_dinov3 import TINY as DINOV3_TINY
from test_train_paws import TINY as PAWS_TINY

from fastssl.train.cli import main, parse_args
from fastssl.train.dino import train_dino
from fastssl.train.dinov3 import train_dinov3
from fastssl.train.eval_config import KnnCommandConfig
from fastssl.train.evaluate import model_from_checkpoint
from fastssl.train.paws import train_paws


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    data = write_folder(root / "train", 6, classes=2)
    train_dino(parse_args(["dino", "--data", str(data), "--output-dir", str(root / "dino"), *DINO_TINY,
                           "--stop-after-steps", "1"]))
    train_dinov3(parse_args(["dinov3", "--data", str(data), "--output-dir", str(root / "dinov3"), *DINOV3_TINY,
                             "--stop-after-steps", "1"]))
    train_paws(parse_args(["paws", "--data", str(data), "--output-dir", str(root / "paws"), *PAWS_TINY,
                           "--stop-after-steps", "1", "--snn-freq", "0"]))
    return root


def _trained_backbone(checkpoint, which):
    cfg = KnnCommandConfig(checkpoint=str(checkpoint), data="x", val_data="y", which=which)
    model, train_cfg = model_from_checkpoint(cfg, torch.device("cpu"))
    return model.backbone.eval(), train_cfg


@pytest.mark.parametrize("run,which,left_out", [("dino", "teacher", []), ("dinov3", "teacher", ["mask_token"]),
                                                ("dinov3", "student", ["mask_token"]), ("paws", "teacher", [])])
def test_timm_loads_the_exported_backbone(runs, tmp_path, run, which, left_out):
    checkpoint = runs / run / "checkpoint.pth"
    out = tmp_path / "sub" / "backbone.safetensors"
    assert main(["export", "--checkpoint", str(checkpoint), "--which", which, "--output", str(out)]) == 0
    info = json.loads(out.with_suffix(".json").read_text())
    assert info["left_out"] == left_out and info["which"] == which and info["weights"] == out.name
    model = timm.create_model(**info["timm_create_model"], pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(out))).eval()
    trained, train_cfg = _trained_backbone(checkpoint, which)
    size = train_cfg.global_crop_size
    x = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(x), trained(x))
        # Not the network at initialisation: the weights came from the file.
        fresh = timm.create_model(**info["timm_create_model"], pretrained=False).eval()
        assert not torch.equal(fresh(x), trained(x))


def test_existing_files_are_kept_unless_overwrite(runs, tmp_path, capsys):
    checkpoint = str(runs / "dino" / "checkpoint.pth")
    out = tmp_path / "mine.safetensors"
    out.write_bytes(b"a user's file")
    assert main(["export", "--checkpoint", checkpoint, "--output", str(out)]) == 2
    assert "--output" in capsys.readouterr().err and out.read_bytes() == b"a user's file"
    assert not out.with_suffix(".json").exists()
    # The JSON beside it counts too.
    other = tmp_path / "other.safetensors"
    other.with_suffix(".json").write_text("notes")
    assert main(["export", "--checkpoint", checkpoint, "--output", str(other)]) == 2
    assert not other.exists() and other.with_suffix(".json").read_text() == "notes"
    assert main(["export", "--checkpoint", checkpoint, "--output", str(out), "--overwrite"]) == 0
    assert out.read_bytes() != b"a user's file" and json.loads(out.with_suffix(".json").read_text())["which"] == \
        "teacher"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.json", "mine.safetensors", "other.json"]  # no temp


def test_bad_options_are_refused_by_name(runs, tmp_path, capsys):
    checkpoint = str(runs / "dino" / "checkpoint.pth")
    assert main(["export", "--checkpoint", checkpoint, "--output", str(tmp_path / "x.pt")]) == 2
    assert "--output must name a .safetensors file" in capsys.readouterr().err
    assert main(["export", "--checkpoint", str(tmp_path / "none.pth"), "--output", str(tmp_path / "x.safetensors")]) \
        != 0
    assert "none.pth" in capsys.readouterr().err and not list(tmp_path.iterdir())


def test_a_sharded_checkpoint_exports_as_its_single_file(runs, tmp_path):
    # The same run's state as an FSDP2 run's sharded folder (written on one process here): consolidated on the
    # way, the export is the single file's, tensor for tensor.
    from safetensors.torch import load_file

    from fastssl.train.checkpoint import load_checkpoint
    from fastssl.train.sharded_checkpoint import save_sharded

    checkpoint = runs / "dinov3" / "checkpoint.pth"
    save_sharded(load_checkpoint(checkpoint), tmp_path / "sharded")
    for source, out in ((checkpoint, tmp_path / "file.safetensors"),
                        (tmp_path / "sharded", tmp_path / "dir.safetensors")):
        assert main(["export", "--checkpoint", str(source), "--output", str(out)]) == 0
    a, b = load_file(tmp_path / "file.safetensors"), load_file(tmp_path / "dir.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir.json", "dir.safetensors", "file.json",
                                                          "file.safetensors", "sharded"]


def test_a_sharded_checkpoint_consolidates_into_one_file(runs, tmp_path, capsys):
    # --consolidated keeps the folder's whole state as one checkpoint file, which knn / attention / export read.
    from fastssl.train.checkpoint import load_checkpoint
    from fastssl.train.sharded_checkpoint import save_sharded

    checkpoint = runs / "dinov3" / "checkpoint.pth"
    state = load_checkpoint(checkpoint)
    save_sharded(state, tmp_path / "sharded")
    single = tmp_path / "whole.pth"
    args = ["export", "--checkpoint", str(tmp_path / "sharded"), "--consolidated", str(single)]
    assert main([*args, "--output", str(tmp_path / "a.safetensors")]) == 0
    whole = load_checkpoint(single)
    assert whole.keys() == state.keys() and whole["epoch"] == state["epoch"]
    assert all(torch.equal(whole["teacher"][k], v) for k, v in state["teacher"].items())
    assert main(["export", "--checkpoint", str(single), "--output", str(tmp_path / "b.safetensors")]) == 0
    # An existing file is kept without --overwrite; --consolidated needs a folder.
    before = single.read_bytes()
    assert main([*args, "--output", str(tmp_path / "c.safetensors")]) == 2
    assert "--consolidated" in capsys.readouterr().err and single.read_bytes() == before
    assert not (tmp_path / "c.safetensors").exists()
    assert main([*args, "--output", str(tmp_path / "c.safetensors"), "--overwrite"]) == 0
    assert main(["export", "--checkpoint", str(checkpoint), "--consolidated", str(tmp_path / "x.pth"), "--output",
                 str(tmp_path / "d.safetensors")]) == 2
    assert "--consolidated applies to a sharded checkpoint folder" in capsys.readouterr().err
