"""The evaluation commands: ``fastssl-train knn`` on DINO and PAWS checkpoints (ours and the authors'
layouts) and ``fastssl-train attention`` (the CLS attention maps against timm's own softmax)."""

from __future__ import annotations

import pytest
import torch
from test_train import TINY as DINO_TINY
from test_train import write_folder
from test_train_paws import TINY as PAWS_TINY

from fastssl.train import checkpoint as ckpt
from fastssl.train.attention import cls_attention, threshold_masks
from fastssl.train.cli import main, parse_args
from fastssl.train.dino import build_dino_model, train_dino
from fastssl.train.eval_config import KnnCommandConfig
from fastssl.train.evaluate import knn_command
from fastssl.train.paws import train_paws


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    return write_folder(root / "train", 10, classes=4), write_folder(root / "val", 3, classes=4)


def knn_cfg(checkpoint, data, *extra) -> KnnCommandConfig:
    return parse_args(["knn", "--checkpoint", str(checkpoint), "--data", str(data[0]), "--val-data",
                            str(data[1]), "--device", "cpu", "--num-workers", "0", "--knn-k", "5", *extra])


def test_knn_command_on_dino_and_paws_checkpoints(data, tmp_path):
    train_dino(parse_args(["dino", "--data", str(data[0]), "--output-dir", str(tmp_path / "dino"), *DINO_TINY,
                                "--stop-after-steps", "1"]))
    train_paws(parse_args(["paws", "--data", str(data[0]), "--output-dir", str(tmp_path / "paws"), *PAWS_TINY,
                                "--stop-after-steps", "1", "--snn-freq", "0"]))
    for run in ("dino", "paws"):
        result = knn_command(knn_cfg(tmp_path / run / "checkpoint.pth", data))
        assert 0 <= result["top1"] <= result["top5"] <= 100

    # The PAWS authors' layout of the same weights gives the same accuracy (widths read off the weights).
    state = ckpt.load_checkpoint(tmp_path / "paws" / "checkpoint.pth")
    theirs = {"encoder": {f"module.{k.removeprefix('backbone.')}": v for k, v in state["model"].items()}}
    torch.save(theirs, tmp_path / "paws-latest.pth.tar")
    ours = knn_command(knn_cfg(tmp_path / "paws" / "checkpoint.pth", data))
    with pytest.raises(ckpt.CheckpointError, match="give --arch"):
        knn_command(knn_cfg(tmp_path / "paws-latest.pth.tar", data))
    # Their checkpoints carry no config: the backbone's options come from the command line.
    cfg = knn_cfg(tmp_path / "paws-latest.pth.tar", data, "--arch", "vit_pico", "--image-size", "16")
    assert knn_command(cfg) == ours


def test_cls_attention_is_the_last_blocks_softmax(data, tmp_path):
    cfg = parse_args(["dino", "--data", "x", *DINO_TINY])
    backbone = build_dino_model(cfg).backbone.eval()
    x = torch.randn(2, 3, 16, 16)
    maps = cls_attention(backbone, x)
    # Reference: timm's unfused attention, its softmax caught on the way into attn_drop.
    attn = backbone.blocks[-1].attn
    attn.fused_attn = False
    caught = {}
    hook = attn.attn_drop.register_forward_hook(lambda mod, inp, out: caught.__setitem__("p", inp[0]))
    with torch.no_grad():
        backbone(x)
    hook.remove()
    want = caught["p"][:, :, 0, 1:].reshape(2, attn.num_heads, 4, 4)
    torch.testing.assert_close(maps, want, rtol=1e-5, atol=1e-6)


def test_threshold_masks_keep_the_fewest_patches_holding_the_mass():
    maps = torch.rand(3, 5, 7)
    masks = threshold_masks(maps, 0.6)
    for m, keep in zip(maps, masks, strict=True):
        p = (m / m.sum()).flatten()
        kept = p[keep.flatten()]
        assert kept.sum() >= 0.6 - 1e-6  # they hold the mass ...
        assert kept.sum() - kept.min() < 0.6  # ... and none of them could go
        assert p[~keep.flatten()].max() <= kept.min()  # the kept patches are the most attended


def test_attention_command_writes_the_maps(data, tmp_path):
    out = tmp_path / "run"
    train_dino(parse_args(["dino", "--data", str(data[0]), "--output-dir", str(out), *DINO_TINY,
                                "--stop-after-steps", "1"]))
    image = sorted((data[1] / "class0").iterdir())[0]
    assert main(["attention", "--checkpoint", str(out / "checkpoint.pth"), "--image", str(image), "--output-dir",
                 str(tmp_path / "png"), "--image-size", "16"]) == 0
    heads = build_dino_model(parse_args(["dino", "--data", "x", *DINO_TINY])).backbone.blocks[-1].attn.num_heads
    names = sorted(p.name for p in (tmp_path / "png").iterdir())
    assert names == sorted(["image.png", "attn-mean.png", *[f"attn-head{h}.png" for h in range(heads)],
                            *[f"mask-head{h}.png" for h in range(heads)]])
    from torchvision.io import read_image

    assert read_image(str(tmp_path / "png" / "attn-mean.png")).shape[-2:] == (16, 16)  # 4x4 patches of 4 px
    # A PAWS ViT checkpoint shows its maps the same way.
    train_paws(parse_args(["paws", "--data", str(data[0]), "--output-dir", str(tmp_path / "paws"), *PAWS_TINY,
                                "--stop-after-steps", "1", "--snn-freq", "0"]))
    assert main(["attention", "--checkpoint", str(tmp_path / "paws" / "checkpoint.pth"), "--image", str(image),
                 "--output-dir", str(tmp_path / "png2")]) == 0
    assert len(list((tmp_path / "png2").iterdir())) == len(names)


def test_knn_and_attention_read_dinov3_checkpoints(data, tmp_path):
    # A fastssl-train dinov3 run's teacher (its backbone carries the mask token; the heads are
    # DINO's and iBOT's) feeds the k-NN and the attention maps as a DINO run's does; --which student too.
    from test_train_dinov3 import TINY as DINOV3_TINY

    from fastssl.train.dinov3 import train_dinov3

    out = tmp_path / "v3"
    train_dinov3(parse_args(["dinov3", "--data", str(data[0]), "--output-dir", str(out), *DINOV3_TINY,
                             "--stop-after-steps", "1"]))
    for which in ("teacher", "student"):
        result = knn_command(knn_cfg(out / "checkpoint.pth", data, "--which", which))
        assert 0 <= result["top1"] <= result["top5"] <= 100
    image = sorted((data[1] / "class0").iterdir())[0]
    assert main(["attention", "--checkpoint", str(out / "checkpoint.pth"), "--image", str(image), "--output-dir",
                 str(tmp_path / "png")]) == 0
    assert (tmp_path / "png" / "attn-mean.png").exists()
