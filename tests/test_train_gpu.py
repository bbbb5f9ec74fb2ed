"""The trainers on a GPU: JPEGs decoded by nvJPEG, the augmentation and kernels on the device, bf16
autocast, fp16 with a grad scaler, torch.compile. On CPU these paths do not exist (the other
trainer tests pass ``--device cpu``), so every test here needs a GPU and says so.

Also, on any machine: what nvJPEG refuses is decoded on the host instead of being dropped.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import pytest
import torch
from helpers import gpu_only
from test_train import cfg_for, read_log, write_folder
from test_train_paws import cfg_for as paws_cfg_for

from fastssl.train import checkpoint as ckpt
from fastssl.train.data import _decode_on_cpu
from fastssl.train.dino import build_dino_model, train_dino
from fastssl.train.paws import train_paws

needs_gpu = gpu_only("trains on a CUDA device: needs a GPU")


def write_jpegs(root: Path, n_per_class: int = 12, classes: int = 2) -> Path:
    """JPEGs (what nvJPEG decodes) and one PNG named .jpg (what it refuses)."""
    from torchvision.io import decode_image, encode_png

    write_folder(root, n_per_class, classes, jpeg=True)
    first = root / "class0" / "000.jpg"
    first.write_bytes(encode_png(decode_image(str(first))).numpy().tobytes())
    return root


def test_what_nvjpeg_refuses_is_decoded_on_the_host():
    from torchvision.io import encode_png

    img = torch.randint(0, 256, (3, 5, 7), dtype=torch.uint8)
    decoded = _decode_on_cpu(encode_png(img), "#0", torch.device("cpu"))
    assert torch.equal(decoded, img)
    with pytest.warns(RuntimeWarning, match="skipping unreadable image #1"):
        assert _decode_on_cpu(torch.tensor([1, 2, 3], dtype=torch.uint8), "#1", torch.device("cpu")) is None


@needs_gpu
@pytest.mark.parametrize("precision,gpu_decode,compile_", [("bf16", True, False), ("fp16", True, False),
                                                          ("fp32", False, False), ("bf16", True, True)])
def test_dino_trains_on_the_gpu(tmp_path, precision, gpu_decode, compile_):
    data = write_jpegs(tmp_path / "data")
    out = tmp_path / "run"
    cfg = cfg_for(data, out, "--device", "cuda", "--precision", precision, "--gpu-decode", str(gpu_decode).lower(),
                  "--compile", str(compile_).lower(), "--epochs", "6", "--stop-after-steps", "15")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = train_dino(cfg)
    # No image is skipped: nvJPEG refuses the PNG named .jpg, the host decodes it.
    assert not [w for w in caught if "skipping unreadable image" in str(w.message)]
    assert result.stopped_early and result.step == 15
    rows = [r for r in read_log(out) if "loss" in r]
    losses = [r["loss"] for r in rows]
    # That it learns is tested on CPU, and by `make demo`; here the GPU paths run and stay finite, and
    # the weights move (fp16: once the grad scaler has backed off from 65536, a few skipped steps).
    assert len(losses) == 15 and all(math.isfinite(v) for v in losses), losses
    assert rows[-1]["skipped_images"] == 0
    state = ckpt.load_checkpoint(out / "checkpoint.pth")
    assert torch.isfinite(state["dino_loss"]["center"]).all() and state["dino_loss"]["center"].abs().sum() > 0
    torch.manual_seed(cfg.seed)
    init = build_dino_model(cfg).state_dict()
    for key in ("student", "teacher"):
        moved = [name for name, t in state[key].items() if t.is_floating_point() and not torch.equal(t, init[name])]
        assert len(moved) > len(init) // 2, f"{key}: only {len(moved)} of {len(init)} tensors moved"
        assert all(torch.isfinite(t).all() for t in state[key].values() if t.is_floating_point())


@needs_gpu
def test_paws_trains_on_the_gpu(tmp_path):
    data = write_jpegs(tmp_path / "train", 10, classes=4), write_jpegs(tmp_path / "val", 3, classes=4)
    out = tmp_path / "run"
    cfg = paws_cfg_for(data, out, "--device", "cuda", "--precision", "bf16", "--stop-after-steps", "4")
    result = train_paws(cfg)
    assert result.step == 4
    losses = [r["loss"] for r in read_log(out) if "loss" in r]
    assert len(losses) == 4 and all(math.isfinite(v) for v in losses), losses
