"""``fastssl-train dinov3 --fsdp`` (FSDP2) on 2 gloo processes under torchrun: the same training as DDP on
the same data (losses per step, final student, teacher and loss centers to float tolerance), an exact
(bitwise) resume of a sharded run, its checkpoint folder exported, bad combinations refused by name."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import torchrun
from test_train import write_folder
from test_train_dinov3 import TINY, cfg_for, read_log

from fastssl.train import checkpoint as ckpt
from fastssl.train.cli import main
from fastssl.train.dinov3 import train_dinov3
from fastssl.train.sharded_checkpoint import consolidate, is_sharded_checkpoint

pytest.importorskip("torch.distributed.fsdp", reason="FSDP2 needs torch.distributed")

STEPS = 4  # 3 iterations per epoch (24 images, 2 x 4 per step): across an epoch end
# FSDP2 reduce-scatters the gradients where DDP all-reduces them (the same two ranks' fp32 summands, other
# kernels): a gradient may differ in its last bit. AdamW turns such a difference of a near-zero gradient into a
# step of up to the lr (its update is about g / (|g| + eps)), so from the second step a few weights differ by a
# fraction of the lr, which the losses hardly see. Measured (seed 0, 4 steps, 2 gloo processes): the first
# step's loss and gradient norms the same to 1.6e-7, every loss within 7.6e-8 relative, gradient norms within
# 3.7e-4, weights at most 1.0e-3 apart (the peak lr is 3.5e-3), at most 3.2% of any tensor's entries by more
# than 1e-4; the tolerances leave a margin.
LOSS_RTOL, NORM_RTOL = 1e-6, 2e-3
OFF, OFF_SHARE = 1e-4, 0.1  # at most this share of a tensor's entries more than OFF apart


def _run(folder, out, stop: int, *extra: str) -> None:
    torchrun("dinov3", "--data", str(folder), "--output-dir", str(out), *TINY, "--batch-size-per-gpu", "4",
             "--koleo-loss-distributed", "--stop-after-steps", str(stop), *extra)


def _rows(out) -> list[dict]:
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """2 processes x 4 images: DDP 4 steps, FSDP2 4 steps, FSDP2 2 steps then resumed for 2."""
    root = tmp_path_factory.mktemp("fsdp")
    folder = write_folder(root / "data")
    _run(folder, root / "ddp", STEPS)
    _run(folder, root / "fsdp", STEPS, "--fsdp")
    _run(folder, root / "resumed", 2, "--fsdp")
    _run(folder, root / "resumed", STEPS - 2, "--fsdp")
    for name in ("fsdp", "resumed"):
        consolidate(root / name / "checkpoint", root / f"{name}.pth")
    return root


def test_fsdp_trains_as_ddp(runs):
    ddp = ckpt.load_checkpoint(runs / "ddp" / "checkpoint.pth")
    fsdp = ckpt.load_checkpoint(runs / "fsdp.pth")
    assert (ddp["epoch"], ddp["step"]) == (fsdp["epoch"], fsdp["step"]) == (1, 1)
    assert fsdp["config"]["fsdp"] and not ddp["config"]["fsdp"] and fsdp["world_size"] == 2
    a, b = _rows(runs / "ddp"), _rows(runs / "fsdp")
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(STEPS))
    assert a[0]["loss"] == b[0]["loss"]  # the same first step, bitwise
    norms = ("backbone_grad_norm", "dino_head_grad_norm", "ibot_head_grad_norm")
    for x, y in zip(a, b, strict=True):
        assert y["loss"] == pytest.approx(x["loss"], rel=LOSS_RTOL), f"loss at step {x['step']}"
        for name in norms:
            rel = NORM_RTOL if x["step"] else 1e-6
            assert y[name] == pytest.approx(x[name], rel=rel), f"{name} at step {x['step']}"
    lr = max(r["lr"] for r in a)  # the peak step size
    for key in ("student", "teacher", "losses"):
        assert set(ddp[key]) == set(fsdp[key]), key
        for name, t in ddp[key].items():
            diff = (fsdp[key][name] - t).abs()
            assert diff.max() <= lr, f"{key}.{name}: {diff.max():.3g} apart, more than the lr {lr:.3g}"
            assert (diff > OFF).float().mean() <= OFF_SHARE, f"{key}.{name}: {(diff > OFF).float().mean():.1%} off"
    # ...and the comparison can fail: training moved most of the student far beyond those bounds.
    from fastssl.train.dinov3 import build_dinov3_model
    from fastssl.train.dinov3_config import Dinov3Config

    torch.manual_seed(0)
    init = build_dinov3_model(Dinov3Config.from_dict(ddp["config"])).state_dict()
    moved = [n for n, t in ddp["student"].items() if ((t - init[n]).abs() > OFF).float().mean() > 0.5]
    assert len(moved) > 0.5 * len(init), f"only {len(moved)} of {len(init)} student tensors moved"


def test_a_sharded_run_resumes_exactly(runs):
    straight = ckpt.load_checkpoint(runs / "fsdp.pth")
    resumed = ckpt.load_checkpoint(runs / "resumed.pth")
    assert (straight["epoch"], straight["step"]) == (resumed["epoch"], resumed["step"]) == (1, 1)
    for key in ("student", "teacher", "losses"):
        for name, t in straight[key].items():
            assert torch.equal(t, resumed[key][name]), f"{key}.{name} differs after resume"
    for name, s in straight["optimizer"]["state"].items():
        for what in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(s[what], resumed["optimizer"]["state"][name][what]), f"{name}.{what}"
    for rank in range(2):  # each rank's RNG states are in the folder
        assert isinstance(resumed[f"rng.rank{rank}"], bytes)
    drop = ("images_per_s",)  # one row per step across the stop, the same
    assert [{k: v for k, v in r.items() if k not in drop} for r in _rows(runs / "resumed")] == \
        [{k: v for k, v in r.items() if k not in drop} for r in _rows(runs / "fsdp")]
    # The folder is the only checkpoint: no single file, no temporary left.
    assert sorted(p.name for p in (runs / "resumed").iterdir()) == ["checkpoint", "config.json", "log.jsonl"]


def test_the_sharded_folder_exports(runs, tmp_path):
    out = tmp_path / "teacher.safetensors"
    assert main(["export", "--checkpoint", str(runs / "fsdp" / "checkpoint"), "--output", str(out)]) == 0
    from safetensors.torch import load_file

    weights = load_file(out)
    teacher = ckpt.load_checkpoint(runs / "fsdp.pth")["teacher"]
    for name, t in weights.items():
        assert torch.equal(t, teacher[f"backbone.{name}"]), name


def test_one_process_fsdp_resumes_exactly_and_checkpoints_activations(tmp_path):
    # Without torchrun --fsdp makes a process group of its own: a one-process sharded run, stopped and resumed.
    folder = write_folder(tmp_path / "data")
    train_dinov3(cfg_for(folder, tmp_path / "a", "--fsdp", "--stop-after-steps", "4"))
    train_dinov3(cfg_for(folder, tmp_path / "b", "--fsdp", "--stop-after-steps", "2"))
    result = train_dinov3(cfg_for(folder, tmp_path / "b", "--fsdp", "--stop-after-steps", "2"))
    assert result.step == 4 and is_sharded_checkpoint(tmp_path / "b" / "checkpoint")
    assert not torch.distributed.is_initialized()  # the group it made is gone
    a = ckpt.load_checkpoint(consolidate(tmp_path / "a" / "checkpoint", tmp_path / "a.pth"))
    b = ckpt.load_checkpoint(consolidate(tmp_path / "b" / "checkpoint", tmp_path / "b.pth"))
    for key in ("student", "teacher", "losses"):
        for name, t in a[key].items():
            assert torch.equal(t, b[key][name]), f"{key}.{name} differs after resume"
    # Activation checkpointing recomputes each block (its drop-path draws restored): the same training, bitwise.
    train_dinov3(cfg_for(folder, tmp_path / "c", "--fsdp", "--activation-checkpointing", "--stop-after-steps", "4"))
    c = ckpt.load_checkpoint(consolidate(tmp_path / "c" / "checkpoint", tmp_path / "c.pth"))
    for key in ("student", "teacher"):
        for name, t in a[key].items():
            assert torch.equal(t, c[key][name]), f"{key}.{name} differs with --activation-checkpointing"



def test_bf16_gathers_bf16_parameters(tmp_path, monkeypatch):
    # --precision bf16: the authors' policy (parameters gathered in bf16, gradients reduced in fp32), fp32 shards.
    from torch.distributed.fsdp import MixedPrecisionPolicy

    from fastssl.train import fsdp

    policies = []
    real = fsdp.shard_

    def spy(model, amp_dtype, **kw):
        out = real(model, amp_dtype, **kw)
        policies.append((out.backbone.blocks[0]._get_fsdp_state()._mp_policy, {p.dtype for p in out.parameters()}))
        return out

    monkeypatch.setattr("fastssl.train.dinov3.shard_", spy)
    folder = write_folder(tmp_path / "data")
    result = train_dinov3(cfg_for(folder, tmp_path / "b", "--fsdp", "--precision", "bf16", "--stop-after-steps", "2"))
    assert result.step == 2
    want = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    assert policies == [(want, {torch.float32})] * 2  # the student and the teacher

BAD = [
    (["--fsdp", "--change-world-size"], "--change-world-size cannot resume a sharded checkpoint (--fsdp)"),
    (["--activation-checkpointing"], "--activation-checkpointing needs --fsdp, got true"),
    (["--fsdp", "--precision", "fp16"], "--precision fp16 is not supported with --fsdp"),
]


@pytest.mark.parametrize("bad,message", BAD, ids=[" ".join(b) for b, _ in BAD])
def test_bad_combinations_are_refused_by_name(tmp_path, monkeypatch, capsys, bad, message):
    data = write_folder(tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    assert main(["dinov3", "--data", str(data), "--output-dir", str(tmp_path / "out"), *TINY, *bad]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"fastssl-train dinov3: error: {message}"), err
    assert not (tmp_path / "out").exists()


def test_a_checkpoint_of_the_other_kind_is_refused(tmp_path, capsys):
    # --fsdp is no resumable option: a run resumes with or without it as it was written, and says so.
    folder = write_folder(tmp_path / "data")
    train_dinov3(cfg_for(folder, tmp_path / "ddp", "--stop-after-steps", "1"))
    train_dinov3(cfg_for(folder, tmp_path / "fsdp", "--fsdp", "--stop-after-steps", "1"))
    base = ["dinov3", "--data", str(folder), *TINY]
    cases = [
        (["--output-dir", str(tmp_path / "ddp"), "--fsdp"], "was written by a run without --fsdp"),
        (["--output-dir", str(tmp_path / "fsdp")], "is the sharded checkpoint of an --fsdp run: resume it with --fsdp"),
        (["--output-dir", str(tmp_path / "x"), "--fsdp", "--resume", str(tmp_path / "ddp" / "checkpoint.pth")],
         "is a single-file checkpoint"),
        (["--output-dir", str(tmp_path / "y"), "--resume", str(tmp_path / "fsdp" / "checkpoint")],
         "is a sharded checkpoint (an --fsdp run's): resume it with --fsdp"),
    ]
    for argv, message in cases:  # CheckpointError: exit code 1, nothing trained
        capsys.readouterr()
        assert main(base + argv) == 1, argv
        assert message in capsys.readouterr().err, argv


# ----------------------------------------------------------------------------- fastssl-train dino --fsdp

def test_dino_fsdp_trains_as_ddp_and_resumes_exactly(tmp_path):
    import test_train

    from fastssl.train.dino import train_dino

    folder = write_folder(tmp_path / "data")
    for name, extra in (("ddp", ()), ("fsdp", ("--fsdp",))):
        torchrun("dino", "--data", str(folder), "--output-dir", str(tmp_path / name), *test_train.TINY,
                 "--batch-size-per-gpu", "4", "--stop-after-steps", str(STEPS), *extra)
    ddp = ckpt.load_checkpoint(tmp_path / "ddp" / "checkpoint.pth")
    fsdp = ckpt.load_checkpoint(consolidate(tmp_path / "fsdp" / "checkpoint", tmp_path / "fsdp.pth"))
    a, b = _rows(tmp_path / "ddp"), _rows(tmp_path / "fsdp")
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(STEPS))
    # As DINOv3's (see STEPS), but no weight was seen pushed apart by AdamW here: measured (seed 0, 4 steps, 2 gloo
    # processes) losses within 7.4e-7 relative, weights within 7.5e-6, the center 1.5e-8.
    assert a[0]["loss"] == b[0]["loss"]
    for x, y in zip(a, b, strict=True):
        assert y["loss"] == pytest.approx(x["loss"], rel=5e-6), f"loss at step {x['step']}"
    for key in ("student", "teacher", "dino_loss"):
        assert set(ddp[key]) == set(fsdp[key]), key
        for name, t in ddp[key].items():
            torch.testing.assert_close(fsdp[key][name], t, rtol=0, atol=1e-4, msg=f"{key}.{name}")

    # One process, stopped and resumed: bitwise the straight run.
    train_dino(test_train.cfg_for(folder, tmp_path / "a", "--fsdp", "--stop-after-steps", "5"))
    train_dino(test_train.cfg_for(folder, tmp_path / "b", "--fsdp", "--stop-after-steps", "2"))
    train_dino(test_train.cfg_for(folder, tmp_path / "b", "--fsdp", "--stop-after-steps", "3"))
    one = ckpt.load_checkpoint(consolidate(tmp_path / "a" / "checkpoint", tmp_path / "a.pth"))
    two = ckpt.load_checkpoint(consolidate(tmp_path / "b" / "checkpoint", tmp_path / "b.pth"))
    for key in ("student", "teacher", "dino_loss"):
        for name, t in one[key].items():
            assert torch.equal(t, two[key][name]), f"{key}.{name} differs after resume"


def test_dino_fsdp_refuses_bad_combinations_by_name(tmp_path, monkeypatch, capsys):
    import test_train

    data = write_folder(tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    tiny = list(test_train.TINY)
    i = tiny.index("--img-size")
    convnet = tiny[:i] + tiny[i + 2:]  # --img-size is a ViT's
    convnet[convnet.index("vit_pico")] = "resnet18"
    for base, bad, message in (
            (convnet, ["--fsdp"], "--fsdp shards a ViT's transformer blocks, not --arch resnet18, got true"),
            (tiny, ["--fsdp", "--change-world-size"], "--change-world-size cannot resume a sharded checkpoint"),
            (tiny, ["--activation-checkpointing"], "--activation-checkpointing needs --fsdp, got true"),
            (tiny, ["--fsdp", "--precision", "fp16"], "--precision fp16 is not supported with --fsdp")):
        capsys.readouterr()
        assert main(["dino", "--data", str(data), "--output-dir", str(tmp_path / "out"), *base, *bad]) == 2, bad
        err = capsys.readouterr().err
        assert err.startswith(f"fastssl-train dino: error: {message}"), err
    assert not (tmp_path / "out").exists()


def test_knn_of_a_sharded_teacher(tmp_path):
    # The k-NN evaluation runs on a gathered copy of the sharded teacher: on one process the same accuracy as
    # the plain run's teacher, and the run's RNG is left as it was (the straight and the resumed run agree).
    from fastssl.train.cli import parse_args

    def run(out, *extra):
        return train_dinov3(parse_args(["dinov3", "--preset", "dinov3_digits", "--output-dir", str(out), "--epochs",
                                        "2", "--warmup-epochs", "0", "--warmup-teacher-temp-epochs", "0",
                                        "--official-epoch-length", "2", "--knn-freq", "1", "--progress", "false",
                                        *extra]))

    plain, sharded = run(tmp_path / "plain"), run(tmp_path / "sharded", "--fsdp")
    assert sharded.knn is not None and plain.knn is not None
    assert sharded.knn["top1"] == pytest.approx(plain.knn["top1"], abs=1.0)
    run(tmp_path / "resumed", "--fsdp", "--stop-after-steps", "2")  # stops after epoch 1 and its k-NN
    resumed = run(tmp_path / "resumed", "--fsdp")
    assert resumed.knn == sharded.knn
    a = ckpt.load_checkpoint(consolidate(tmp_path / "sharded" / "checkpoint", tmp_path / "a.pth"))
    b = ckpt.load_checkpoint(consolidate(tmp_path / "resumed" / "checkpoint", tmp_path / "b.pth"))
    for name, t in a["student"].items():
        assert torch.equal(t, b["student"][name]), name


def test_one_process_fsdp_compiles_each_block(tmp_path, monkeypatch):
    # --fsdp --compile: every block compiled on its own (state-dict keys unchanged), the same losses as eager to
    # compiled-code rounding. Checked by what the blocks' forwards are.
    from fastssl.train import fsdp

    compiled = []
    real = fsdp.shard_

    def spy(model, amp_dtype, **kw):
        out = real(model, amp_dtype, **kw)
        compiled.append([getattr(b, "_compiled_call_impl", None) is not None for b in out.backbone.blocks])
        return out

    monkeypatch.setattr("fastssl.train.dinov3.shard_", spy)
    folder = write_folder(tmp_path / "data")
    with torch._inductor.config.patch(fx_graph_cache=False):
        train_dinov3(cfg_for(folder, tmp_path / "c", "--fsdp", "--compile", "--stop-after-steps", "2"))
    train_dinov3(cfg_for(folder, tmp_path / "e", "--fsdp", "--stop-after-steps", "2"))
    assert compiled[0] and all(compiled[0])  # the student's blocks
    eager = [r["loss"] for r in read_log(tmp_path / "e") if "loss" in r]
    comp = [r["loss"] for r in read_log(tmp_path / "c") if "loss" in r]
    assert len(eager) == len(comp) == 2
    assert all(abs(a - b) <= 1e-5 * abs(a) for a, b in zip(eager, comp, strict=True)), (eager, comp)
