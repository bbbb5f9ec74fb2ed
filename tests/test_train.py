"""The trainer (fastssl.train): DINO steps on tiny images, exact resume, bad data, checkpoints,
k-NN against a brute-force reference, and a 2-process gloo run under torchrun."""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path

import pytest
import torch
from helpers import gpu_only, torchrun

from fastssl.train import checkpoint as ckpt
from fastssl.train.cli import parse_args
from fastssl.train.data import DataError
from fastssl.train.dino import DinoConfig, build_dino_model, train_dino
from fastssl.train.errors import ConfigError
from fastssl.train.knn import knn_classify
from fastssl.train.schedules import cosine_schedule

TINY = ["--arch", "vit_pico", "--img-size", "16", "--global-crop-size", "16", "--local-crop-size", "8",
        "--local-crops-number", "2", "--out-dim", "64", "--head-hidden-dim", "64", "--head-bottleneck-dim", "32",
        "--batch-size-per-gpu", "8", "--epochs", "2", "--warmup-epochs", "0", "--lr", "0.01", "--num-workers", "0",
        "--freeze-last-layer", "0", "--progress", "false", "--log-freq", "1", "--saveckp-freq", "0",
        "--device", "cpu", "--momentum-teacher", "0.9", "--blur-sigma", "0.1", "0.5"]


def write_folder(root: Path, n_per_class: int = 12, classes: int = 2, *, jpeg: bool = False) -> Path:
    """PNG (or JPEG) images of a few sizes, each class with its own brightness pattern."""
    from torchvision.io import encode_jpeg, encode_png

    g = torch.Generator().manual_seed(0)
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            h, w = 20 + (i % 3) * 4, 24 - (i % 2) * 4
            img = torch.randint(0, 60, (3, h, w), generator=g, dtype=torch.uint8)
            img[:, : h // 2] += 120 if c == 0 else 0
            img[:, :, : w // 2] += 120 if c == 1 else 0
            data = encode_jpeg(img, quality=95) if jpeg else encode_png(img)
            (root / f"class{c}" / f"{i:03d}.{'jpg' if jpeg else 'png'}").write_bytes(data.numpy().tobytes())
    return root


@pytest.fixture
def folder(tmp_path):
    return write_folder(tmp_path / "data")


def cfg_for(data, out, *extra) -> DinoConfig:
    return parse_args(["dino", "--data", str(data), "--output-dir", str(out), *TINY, *extra])


def read_log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def test_dino_steps_loss_down_center_and_teacher_move(folder, tmp_path):
    out = tmp_path / "run"
    cfg = cfg_for(folder, out, "--stop-after-steps", "6")
    result = train_dino(cfg)
    assert result.stopped_early and result.step == 6
    losses = [r["loss"] for r in read_log(out) if "loss" in r]
    assert len(losses) == 6 and all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0], losses

    # One step from the same initialisation: the center leaves 0, the teacher moves by the momentum.
    out1 = tmp_path / "one"
    train_dino(cfg_for(folder, out1, "--stop-after-steps", "1"))
    state = ckpt.load_checkpoint(out1 / "checkpoint.pth")
    assert state["dino_loss"]["center"].abs().sum() > 0
    torch.manual_seed(cfg.seed)
    init = build_dino_model(cfg).state_dict()
    m = 0.9  # the cosine schedule's first value is the base momentum
    for name, t in state["teacher"].items():
        if name.endswith(("running_mean", "running_var", "num_batches_tracked")):
            continue
        expected = m * init[name] + (1 - m) * state["student"][name]
        torch.testing.assert_close(t, expected, rtol=1e-5, atol=1e-6, msg=name)
    moved = [n for n, t in state["teacher"].items() if t.is_floating_point() and not torch.equal(t, init[n])]
    assert moved, "the teacher did not move"


@pytest.mark.parametrize("stop_at", [4, 6])
def test_resume_is_exact(folder, tmp_path, stop_at):
    # 3 epochs of 3 iterations; stop mid-epoch (4) or at an epoch's last step (6, its k-NN evaluation
    # runs before the stop) and resume to the end vs. one straight run.
    extra = ("--epochs", "3", "--knn-freq", "1", "--knn-data", str(folder), "--knn-val-data", str(folder))
    straight = train_dino(cfg_for(folder, tmp_path / "a", *extra))
    first = train_dino(cfg_for(folder, tmp_path / "b", *extra, "--stop-after-steps", str(stop_at)))
    assert first.stopped_early and first.step == stop_at
    assert [r["epoch"] for r in read_log(tmp_path / "b") if "knn_top1" in r] == list(range(1, stop_at // 3 + 1))
    second = train_dino(cfg_for(folder, tmp_path / "b", *extra))
    assert not second.stopped_early and second.step == straight.step == 9
    a = ckpt.load_checkpoint(tmp_path / "a" / "checkpoint.pth")
    b = ckpt.load_checkpoint(tmp_path / "b" / "checkpoint.pth")
    for key in ("student", "teacher", "dino_loss"):
        for name, t in a[key].items():
            assert torch.equal(t, b[key][name]), f"{key}.{name} differs after resume"
    assert (a["epoch"], a["step"]) == (b["epoch"], b["step"]) == (3, 0)
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values(), strict=True):
        assert torch.equal(sa["exp_avg"], sb["exp_avg"])
    assert [r["epoch"] for r in read_log(tmp_path / "b") if "knn_top1" in r] == [1, 2, 3]


def test_resume_with_another_config_is_a_clear_error(folder, tmp_path):
    train_dino(cfg_for(folder, tmp_path / "r", "--stop-after-steps", "1"))
    with pytest.raises(ckpt.CheckpointError, match="out_dim: checkpoint 64, now 32"):
        train_dino(cfg_for(folder, tmp_path / "r", "--out-dim", "32"))


def test_auto_precision_is_saved_resolved(folder, tmp_path):
    # "auto" is fp32 on a CPU: the checkpoint says so, and resuming it in bf16 is refused by name.
    train_dino(cfg_for(folder, tmp_path / "r", "--stop-after-steps", "1"))
    assert ckpt.load_checkpoint(tmp_path / "r" / "checkpoint.pth")["config"]["precision"] == "fp32"
    with pytest.raises(ckpt.CheckpointError, match="precision: checkpoint 'fp32', now 'bf16'"):
        train_dino(cfg_for(folder, tmp_path / "r", "--precision", "bf16"))


def test_checkpoint_of_another_architecture_is_a_clear_error(folder, tmp_path):
    cfg = cfg_for(folder, tmp_path / "r", "--stop-after-steps", "1")
    train_dino(cfg)
    other = build_dino_model(cfg.replace(head_bottleneck_dim=16))
    with pytest.raises(ckpt.CheckpointError, match="does not fit this model"):
        ckpt.load_pretrained(other, tmp_path / "r" / "checkpoint.pth")


def test_checkpoints_cannot_run_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    path = tmp_path / "evil.pth"
    torch.save({"student": Evil()}, path)
    with pytest.raises(ckpt.CheckpointError, match="weights_only"):
        ckpt.load_checkpoint(path)


def test_atomic_save_keeps_the_old_checkpoint(tmp_path):
    path = tmp_path / "c.pth"
    ckpt.save_checkpoint({"a": torch.ones(2)}, path)

    class Boom:
        def __reduce__(self):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        ckpt.save_checkpoint({"a": Boom()}, path)
    assert torch.equal(ckpt.load_checkpoint(path)["a"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["c.pth"]  # no temporary file left behind


def test_authors_checkpoint_layout_loads(folder, tmp_path):
    """Their full checkpoints: DDP 'module.' prefixes, head.mlp / head.last_layer.weight_g|v, argparse args."""
    cfg = cfg_for(folder, tmp_path / "x")
    torch.manual_seed(1)
    source = build_dino_model(cfg)
    state = {"student": {f"module.{k}": v for k, v in source.state_dict().items()},
             "teacher": source.state_dict(), "epoch": 3, "args": argparse.Namespace(arch="vit_small", out_dim=64)}
    assert "head.last_layer.weight_g" in state["teacher"] and "head.mlp.0.weight" in state["teacher"]
    torch.save(state, tmp_path / "theirs.pth")
    torch.manual_seed(2)
    target = build_dino_model(cfg)
    assert ckpt.load_pretrained(target, tmp_path / "theirs.pth", "student") == "model"
    for k, v in source.state_dict().items():
        assert torch.equal(target.state_dict()[k], v)
    # A backbone-only release loads into the backbone.
    torch.save(source.backbone.state_dict(), tmp_path / "backbone.pth")
    assert ckpt.load_pretrained(build_dino_model(cfg), tmp_path / "backbone.pth") == "backbone"


def test_missing_and_empty_folders_fail_before_training(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        train_dino(cfg_for(tmp_path / "nope", tmp_path / "o"))
    (tmp_path / "empty" / "class0").mkdir(parents=True)
    with pytest.raises(DataError, match="no images"):
        train_dino(cfg_for(tmp_path / "empty", tmp_path / "o"))
    assert not (tmp_path / "o").exists()


def test_corrupt_images_are_skipped_and_counted(folder, tmp_path):
    (folder / "class0" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    (folder / "class1" / "empty.png").write_bytes(b"")
    out = tmp_path / "run"
    with pytest.warns(RuntimeWarning, match="skipping unreadable image"):
        train_dino(cfg_for(folder, out, "--epochs", "1"))
    epoch = [r for r in read_log(out) if "epoch_loss" in r]
    assert epoch[-1]["skipped_images"] == 2 and math.isfinite(epoch[-1]["epoch_loss"])


def knn_brute_force(train, train_labels, test, test_labels, k, T, C):
    train = torch.nn.functional.normalize(train.double(), dim=1)
    test = torch.nn.functional.normalize(test.double(), dim=1)
    top1 = top5 = 0
    for q, y in zip(test, test_labels, strict=True):
        sims = [(float(q @ t), int(lab)) for t, lab in zip(train, train_labels, strict=True)]
        sims.sort(key=lambda s: -s[0])
        votes = [0.0] * C
        for s, lab in sims[:k]:
            votes[lab] += math.exp(s / T)
        ranked = sorted(range(C), key=lambda c: (-votes[c], c))
        top1 += ranked[0] == int(y)
        top5 += int(y) in ranked[:5]
    return 100 * top1 / len(test), 100 * top5 / len(test)


@pytest.mark.parametrize("k", [1, 5, 20])
def test_knn_matches_brute_force(k):
    C, D = 7, 16
    centers = torch.randn(C, D)
    train_labels = torch.randint(0, C, (200,))
    test_labels = torch.randint(0, C, (60,))
    train = centers[train_labels] + 0.8 * torch.randn(200, D)
    test = centers[test_labels] + 0.8 * torch.randn(60, D)
    got = knn_classify(train, train_labels, test, test_labels, k=k, T=0.07, num_classes=C, chunk_size=16)
    want = knn_brute_force(train, train_labels, test, test_labels, k, 0.07, C)
    assert got == pytest.approx(want)


def test_cosine_schedule_is_the_authors():
    s = cosine_schedule(1.0, 0.1, epochs=4, niter_per_ep=5, warmup_epochs=1, start_warmup_value=0.0)
    assert len(s) == 20 and s[0] == 0.0 and s[4] == 1.0 and s[5] == 1.0  # linspace includes its end
    n = 15
    assert s[5 + 7] == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 7 / n)))


def test_presets_and_overrides():
    args = parse_args(["dino", "--data", "x", "--preset", "dino_vits16", "--teacher-temp", "0.05"])
    assert (args.epochs, args.teacher_temp, args.norm_last_layer, args.preset) == (300, 0.05, False, "dino_vits16")
    assert parse_args(["dino", "--data", "x"]).lr == 0.0005  # main_dino.py's default


def test_torchrun_two_processes_gloo(folder, tmp_path):
    out = tmp_path / "ddp"
    stdout = torchrun("dino", "--data", str(folder), "--output-dir", str(out), *TINY, "--stop-after-steps", "2",
                      "--batch-size-per-gpu", "4")
    assert "x 2 process(es)" in stdout
    state = ckpt.load_checkpoint(out / "checkpoint.pth")
    assert state["step"] == 2 and state["config"]["batch_size_per_gpu"] == 4
    assert len([r for r in read_log(out) if "loss" in r]) == 2  # rank 0 alone writes the log


def test_torchrun_resume_is_exact(folder, tmp_path):
    # Each rank draws its own drop-path masks (seed + rank), so each must resume from its own RNG
    # state: 2 processes stopped at step 2 and resumed to step 5 (mid-epoch 2) equal a straight run.
    def run(out, stop):
        torchrun("dino", "--data", str(folder), "--output-dir", str(out), *TINY, "--batch-size-per-gpu", "4",
                 "--stop-after-steps", str(stop))
        return ckpt.load_checkpoint(out / "checkpoint.pth")

    straight = run(tmp_path / "a", 5)
    first = run(tmp_path / "b", 2)
    assert isinstance(first["rng"], list) and len(first["rng"]) == 2
    assert not torch.equal(first["rng"][0]["torch"], first["rng"][1]["torch"])
    resumed = run(tmp_path / "b", 3)  # --stop-after-steps counts this invocation's iterations
    assert (straight["epoch"], straight["step"]) == (resumed["epoch"], resumed["step"]) == (1, 2)
    for key in ("student", "teacher"):
        for name, t in straight[key].items():
            assert torch.equal(t, resumed[key][name]), f"{key}.{name} differs after resume"


def test_knn_during_training_and_bf16(folder, tmp_path):
    """--knn-freq evaluates the teacher after each epoch (and at the end); bf16 autocast trains on CPU too."""
    out = tmp_path / "run"
    result = train_dino(cfg_for(folder, out, "--knn-freq", "1", "--knn-data", str(folder), "--knn-val-data",
                                str(folder), "--knn-k", "5", "--precision", "bf16"))
    evals = [r for r in read_log(out) if "knn_top1" in r]
    assert [r["epoch"] for r in evals] == [1, 2]
    assert all(0 <= r["knn_top1"] <= r["knn_top5"] <= 100 for r in evals)
    assert result.knn == {"top1": evals[-1]["knn_top1"], "top5": evals[-1]["knn_top5"]}
    assert all(math.isfinite(r["loss"]) for r in read_log(out) if "loss" in r)


@gpu_only("page-locked memory needs a CUDA device")
def test_batches_are_pinned_by_the_loader(folder):
    from torch.utils.data import DataLoader

    from fastssl.train.data import ImageFolder, collate

    loader = DataLoader(ImageFolder(folder), batch_size=4, collate_fn=collate, pin_memory=True)
    batch = next(iter(loader))
    images = batch.images if isinstance(batch.images, list) else [batch.images]
    assert all(im.is_pinned() for im in images) and batch.labels.is_pinned()


def test_tensorboard_needs_its_package(folder, tmp_path):
    """--tensorboard writes scalars when tensorboard is installed, else says what to install (an option error,
    before any file)."""
    args = (folder, tmp_path / "tb", "--tensorboard", "true", "--stop-after-steps", "2")
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match="--tensorboard needs the tensorboard package: pip install tensorboard"):
            cfg_for(*args)
        assert not (tmp_path / "tb").exists()
        return
    train_dino(cfg_for(*args))
    assert any((tmp_path / "tb" / "tensorboard").iterdir())


@pytest.mark.parametrize("mode", ["per_param", "global"])
def test_gradient_clipping_is_the_authors(mode):
    """per_param: the DINO authors' utils.clip_gradients (each gradient on its own to norm <= clip);
    global: all gradients together, as clip_grad_norm_."""
    from fastssl.train.runtime import clip_gradients_

    model = torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.Linear(5, 3))
    scales = [10.0, 0.01, 3.0, 0.5]  # some gradients above the clip, some below
    for p, s in zip(model.parameters(), scales, strict=True):
        p.grad = torch.randn_like(p) * s
    grads = [p.grad.double().clone() for p in model.parameters()]
    clip_gradients_(model, 1.5, mode)
    if mode == "per_param":
        want = []
        for g in grads:
            coef = 1.5 / (g.norm() + 1e-6)
            want.append(g * coef if coef < 1 else g)
    else:
        total = torch.stack([g.norm() for g in grads]).norm()
        want = [g * min(1.0, 1.5 / (total + 1e-6)) for g in grads]
    for p, w in zip(model.parameters(), want, strict=True):
        torch.testing.assert_close(p.grad.double(), w, rtol=1e-5, atol=1e-7)
