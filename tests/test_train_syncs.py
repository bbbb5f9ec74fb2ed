"""Host reads in the trainers' steps, counted on the CPU: at most one per ``--log-freq`` iterations (each is
a wait for the GPU there). A non-finite loss skips its step on the device and stops the run at the next
read; the optimisers' device-side skip."""

from __future__ import annotations

import copy
import json
import math
import re
import traceback
from contextlib import contextmanager

import pytest
import torch
from test_train import TINY as DINO_TINY
from test_train import write_folder
from test_train_dinov3 import TINY as DINOV3_TINY
from test_train_paws import TINY as PAWS_TINY
from torch.utils._python_dispatch import TorchDispatchMode

import fastssl
from fastssl import ema
from fastssl.train import checkpoint as ckpt
from fastssl.train import dino as dino_trainer
from fastssl.train import paws as paws_trainer
from fastssl.train.cli import parse_args
from fastssl.train.dino import build_augment, train_dino
from fastssl.train.dinov3 import build_dinov3_augment, train_dinov3
from fastssl.train.errors import TrainingError
from fastssl.train.optim import Lars, step_unless
from fastssl.train.paws import build_paws_augment, train_paws

LOG_FREQ = 3


# ----------------------------------------------------------------------------- counting host reads

class _LocalScalarDense(TorchDispatchMode):
    """Every ``aten._local_scalar_dense`` (``int()``, ``float()`` of a tensor...) into ``reads``, but those of
    the patched methods below (counted there, once)."""

    def __init__(self, reads: list, inside: list):
        super().__init__()
        self.reads, self.inside = reads, inside

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default and not self.inside:
            self.reads.append(("_local_scalar_dense", _where()))
        return func(*args, **(kwargs or {}))


def _where() -> str:
    """The innermost fastssl frame of the read (or the innermost frame): the test's failure names it."""
    frames = traceback.extract_stack()[:-2]
    ours = [f for f in frames if "/fastssl/" in f.filename] or frames
    return f"{'/'.join(ours[-1].filename.rsplit('/', 2)[-2:])}:{ours[-1].lineno}"


@contextmanager
def host_reads():
    """A list that collects every host read while inside: the dispatch mode, and ``Tensor.tolist``, ``.item``,
    ``.cpu`` and ``__bool__`` (a ``.tolist()`` is no ``_local_scalar_dense``). The list also takes the
    caller's marks."""
    reads: list = []
    inside: list = []
    with pytest.MonkeyPatch.context() as mp:
        for name in ("tolist", "item", "cpu", "__bool__"):
            real = getattr(torch.Tensor, name)

            def patched(self, *args, _real=real, _name=name, **kwargs):
                if not inside:
                    reads.append((_name, _where()))
                inside.append(1)
                try:
                    return _real(self, *args, **kwargs)
                finally:
                    inside.pop()

            mp.setattr(torch.Tensor, name, patched)
        # On a GPU the teacher's tensor momentum is not read (_check_momentum range-checks a CPU one only).
        real_check = ema._check_momentum
        mp.setattr(ema, "_check_momentum", lambda m, device, op="": m.detach() if isinstance(m, torch.Tensor)
                   else real_check(m, device, op))
        with _LocalScalarDense(reads, inside):
            yield reads


def marking(fn, reads: list, epoch_len: int):
    """``fn`` (the augment called once per step) putting a mark ``(epoch, i)`` into ``reads`` before it runs."""
    calls = []

    def augment(images, generator=None):
        n = len(calls)
        calls.append(1)
        reads.append(divmod(n, epoch_len))
        return fn(images, generator=generator)

    return augment


# Reads of tensors on the host on every device: the data's order drawn by a CPU generator, DINOv3's masks
# made with numpy as the authors' collate (moved to the device after). No wait for a GPU.
HOST_DATA = ("fastssl/samplers.py", "train/masking.py")
# Read once per run: the class-id range of PAWS's support labels (one tensor the trainer reuses; the loss
# keeps the range on it).
ONCE = ("losses/paws.py",)


def per_step(reads: list) -> dict[tuple[int, int], list]:
    """The reads from one step's mark to the next step's, for the steps followed by one in the same epoch
    (the epoch's end reads its loss sum and draws the next order); but those of ``HOST_DATA``."""
    marks = [k for k, r in enumerate(reads) if isinstance(r[0], int)]
    return {reads[a]: [r for r in reads[a + 1:b] if not r[1].startswith(HOST_DATA)]
            for a, b in zip(marks, marks[1:], strict=False) if reads[a][0] == reads[b][0]}


def assert_one_read_per_log_interval(reads: list, epoch_len: int):
    steps = per_step(reads)
    once = [r for seen in steps.values() for r in seen if r[1].startswith(ONCE)]
    assert len(once) <= 1, once
    steps = {step: [r for r in seen if r not in once] for step, seen in steps.items()}
    assert len(steps) == 2 * (epoch_len - 1), steps.keys()  # two epochs' worth of steps
    bad = {step: seen for step, seen in steps.items() if len(seen) > int((step[1] + 1) % LOG_FREQ == 0)}
    assert not bad, f"more reads than one per --log-freq {LOG_FREQ} iterations: {bad}"
    logged_reads = [len(seen) for (_, i), seen in steps.items() if (i + 1) % LOG_FREQ == 0]
    assert logged_reads and all(n == 1 for n in logged_reads), steps  # the logged steps read (one transfer)


def with_log_freq(args: list[str], batch: int) -> list[str]:
    args = list(args)
    args[args.index("--log-freq") + 1] = str(LOG_FREQ)
    args[args.index("--batch-size-per-gpu") + 1] = str(batch)
    return args


def test_dino_steps_read_once_per_log_interval(tmp_path):
    folder = write_folder(tmp_path / "data")  # 24 images: 6 iterations of 4
    cfg = parse_args(["dino", "--data", str(folder), "--output-dir", str(tmp_path / "run"),
                      *with_log_freq(DINO_TINY, 4)])
    real = build_augment(cfg)
    with host_reads() as reads:
        train_dino(cfg, augment=marking(real, reads, 6))
    assert_one_read_per_log_interval(reads, 6)


def test_dino_sgd_steps_read_once_per_log_interval(tmp_path):
    folder = write_folder(tmp_path / "data")
    cfg = parse_args(["dino", "--data", str(folder), "--output-dir", str(tmp_path / "run"),
                      *with_log_freq(DINO_TINY, 4), "--optimizer", "sgd", "--precision", "bf16"])
    real = build_augment(cfg)
    with host_reads() as reads:
        train_dino(cfg, augment=marking(real, reads, 6))
    assert_one_read_per_log_interval(reads, 6)


def test_paws_steps_read_once_per_log_interval(tmp_path):
    train, val = write_folder(tmp_path / "train", 10, classes=4), write_folder(tmp_path / "val", 3, classes=4)
    cfg = parse_args(["paws", "--data", str(train), "--val-data", str(val), "--output-dir", str(tmp_path / "run"),
                      *with_log_freq(PAWS_TINY, 4)])  # 40 images: 10 iterations of 4
    views, supports = build_paws_augment(cfg)
    with host_reads() as reads:
        train_paws(cfg, augment=(marking(views, reads, 10), supports))
    assert_one_read_per_log_interval(reads, 10)


def test_dinov3_steps_read_once_per_log_interval(tmp_path):
    folder = write_folder(tmp_path / "data")  # 24 images: 6 iterations of 4
    cfg = parse_args(["dinov3", "--data", str(folder), "--output-dir", str(tmp_path / "run"),
                      *with_log_freq(DINOV3_TINY, 4), "--clip-grad", "3.0"])
    real = build_dinov3_augment(cfg)
    with host_reads() as reads:
        train_dinov3(cfg, augment=marking(real, reads, 6))
    assert_one_read_per_log_interval(reads, 6)


def test_dino_augment_reads_nothing():
    aug = fastssl.DinoAugment(global_size=16, local_size=8, n_local=2, jitter_p=0.8, hue=0.5)
    g = torch.Generator().manual_seed(0)
    images = [torch.randint(0, 256, (3, 20 + k, 24 - k), dtype=torch.uint8, generator=g) for k in range(6)]
    floats = [im.float() / 255 for im in images]
    with host_reads() as reads:
        aug(images, generator=torch.Generator().manual_seed(1))  # the 8-bit path
        aug(floats, generator=torch.Generator().manual_seed(1))  # the float one
    assert reads == []


# ----------------------------------------------------------------------------- a non-finite loss

def _snapshot(modules: dict, optimizer: torch.optim.Optimizer) -> dict:
    return {**{k: copy.deepcopy(m.state_dict()) for k, m in modules.items()},
            "optimizer": copy.deepcopy(optimizer.state_dict()["state"])}  # not the groups' scheduled lr


def _assert_bitwise_equal(a, b, path="state"):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, path
        assert torch.equal(a, b) or (a.isnan() == b.isnan()).all() and torch.equal(a.nan_to_num(), b.nan_to_num()), \
            path
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            _assert_bitwise_equal(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for k, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_bitwise_equal(x, y, f"{path}[{k}]")
    else:
        assert a == b, path


def run_with_a_nan_step(trainer, train, cfg, augment, bad: int, monkeypatch):
    """``train(cfg)`` with step ``bad``'s (0-based) first crops NaN: the TrainingError, and the states of the
    trainer's modules and optimiser before each step and at the end."""
    held: dict = {}
    before: list = []
    real_restore = trainer.restore

    def restore(start, modules, opt, *args):  # the trainer's modules and optimiser, to compare after
        held.update(modules=modules, optimizer=opt)
        return real_restore(start, modules, opt, *args)

    def poisoned(images, generator=None):  # before the step's forward: the state the step starts from
        before.append(_snapshot(held["modules"], held["optimizer"]))
        first, rest = augment(images, generator=generator)
        return (first * math.nan, rest) if len(before) == bad + 1 else (first, rest)

    monkeypatch.setattr(trainer, "restore", restore)
    with pytest.raises(TrainingError) as error:
        train(cfg, augment=poisoned)
    return error.value, before, _snapshot(held["modules"], held["optimizer"])


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_a_non_finite_loss_skips_its_step_and_every_later_one_then_stops(tmp_path, monkeypatch, optimizer):
    """The 4th step's crops are NaN (epoch 2, iteration 0 of 3); with --log-freq 3 the run trains on to the
    read at iteration 2: the steps from the bad one on leave the student, the teacher, the center and the
    optimiser as they were (bitwise), the run raises naming the bad step, and no checkpoint is written."""
    folder = write_folder(tmp_path / "data")  # 3 iterations of 8
    out = tmp_path / "run"
    args = list(DINO_TINY)
    args[args.index("--log-freq") + 1] = str(LOG_FREQ)
    cfg = parse_args(["dino", "--data", str(folder), "--output-dir", str(out), *args, "--optimizer", optimizer])
    error, before, end = run_with_a_nan_step(dino_trainer, train_dino, cfg, build_augment(cfg), 3, monkeypatch)
    assert re.match(r"the loss is not finite \(nan on rank 0\) at epoch 2, iteration 0: stopped without saving",
                    str(error)), error
    _assert_bitwise_equal(end, before[3])
    assert len(before) == 6  # the run trained on to iteration 2 of epoch 2, skipping
    # the state had moved in the steps before (the comparison can fail)
    assert not torch.equal(before[3]["student"]["head.mlp.0.weight"], before[2]["student"]["head.mlp.0.weight"])
    assert not torch.equal(before[3]["dino_loss"]["center"], before[2]["dino_loss"]["center"])
    assert not torch.equal(before[3]["teacher"]["head.mlp.0.weight"], before[2]["teacher"]["head.mlp.0.weight"])
    assert ckpt.load_checkpoint(out / "checkpoint.pth")["global_step"] == 3  # epoch 1's, as it was
    rows = [json.loads(r) for r in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [2, 5]  # the row of the read that raised, then nothing


def test_a_non_finite_paws_loss_skips_the_lars_step(tmp_path, monkeypatch):
    """PAWS (LARS): the 2nd step's views are NaN; the read at the 3rd raises, the model (its BatchNorm
    statistics too) and LARS's momentum as after the 1st step, no checkpoint."""
    train, val = write_folder(tmp_path / "train", 10, classes=4), write_folder(tmp_path / "val", 3, classes=4)
    out = tmp_path / "run"
    args = list(PAWS_TINY)
    args[args.index("--log-freq") + 1] = str(LOG_FREQ)
    cfg = parse_args(["paws", "--data", str(train), "--val-data", str(val), "--output-dir", str(out), *args])
    views, supports = build_paws_augment(cfg)

    def train_with_supports(cfg, augment):
        return train_paws(cfg, augment=(augment, supports))

    error, before, end = run_with_a_nan_step(paws_trainer, train_with_supports, cfg, views, 1, monkeypatch)
    assert re.match(r"the loss is not finite \(nan on rank 0\) at epoch 1, iteration 1: stopped without saving",
                    str(error)), error
    _assert_bitwise_equal(end, before[1])
    assert len(before) == 3 and before[1]["optimizer"] and not before[0]["optimizer"]  # LARS's momentum
    for name in ("pred.fc2.weight", "pred.bn2.running_mean"):  # a weight and a BatchNorm statistic had moved
        assert not torch.equal(before[1]["model"][name], before[0]["model"][name]), name
    assert not (out / "checkpoint.pth").exists()


# ----------------------------------------------------------------------------- the optimisers' skip

def _optimizers():
    return {
        "adamw": lambda ps: torch.optim.AdamW(ps, lr=0.1, weight_decay=0.05, fused=True),
        "sgd": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=0.05, fused=True),
        "lars": lambda ps: Lars([{"params": ps[:1]}, {"params": ps[1:], "lars_exclude": True}], lr=0.1,
                                weight_decay=0.05),
        "lars_nesterov": lambda ps: Lars([{"params": ps[:1]}, {"params": ps[1:], "lars_exclude": True}], lr=0.1,
                                         weight_decay=0.05, nesterov=True),
    }


@pytest.mark.parametrize("name", list(_optimizers()))
def test_step_unless_skips_on_the_device_and_else_is_the_step(name):
    make = _optimizers()[name]
    g = torch.Generator().manual_seed(0)
    init = [torch.randn(7, 5, generator=g), torch.randn(5, generator=g)]
    grads = [[torch.randn(p.shape, generator=g) for p in init] for _ in range(4)]
    a = [torch.nn.Parameter(p.clone()) for p in init]
    b = [torch.nn.Parameter(p.clone()) for p in init]
    opt_a, opt_b = make(a), make(b)
    for k in range(3):  # not skipped: the same numbers as step()
        for p, q, gr in zip(a, b, grads[k], strict=True):
            p.grad, q.grad = gr.clone(), gr.clone()
        opt_a.step()
        step_unless(opt_b, torch.tensor(False))
        assert all(torch.equal(p, q) for p, q in zip(a, b, strict=True)), k
    _assert_bitwise_equal(opt_b.state_dict(), opt_a.state_dict())
    params, state = [p.detach().clone() for p in b], copy.deepcopy(opt_b.state_dict())
    for bad in (math.nan, 1.0):  # skipped: a NaN gradient, and a finite one after it (the skip is sticky)
        for q, gr in zip(b, grads[3], strict=True):
            q.grad = gr * bad
        step_unless(opt_b, torch.tensor(True))
        assert all(torch.equal(p, q) for p, q in zip(params, b, strict=True))
        _assert_bitwise_equal(opt_b.state_dict(), state)
    for p, q, gr in zip(a, b, grads[3], strict=True):  # a step after a skipped one: from the state before it
        p.grad, q.grad = gr.clone(), gr.clone()
    opt_a.step()
    step_unless(opt_b, torch.tensor(False))
    assert all(torch.equal(p, q) for p, q in zip(a, b, strict=True))


def test_step_unless_refuses_an_optimiser_that_cannot_skip_on_the_device():
    p = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(TypeError, match="cannot skip a step on the device"):
        step_unless(torch.optim.SGD([p], lr=0.1), torch.tensor(False))


def test_a_checkpoint_of_an_unfused_optimiser_resumes_fused(tmp_path):
    """Runs saved before the trainers' optimisers were fused resume (the checkpoint's groups say fused=None;
    the resumed optimiser keeps this build's fused, which its device-side skip needs) and go on as a run
    that never stopped."""
    folder = write_folder(tmp_path / "data")
    whole, out = tmp_path / "whole", tmp_path / "run"
    train_dino(parse_args(["dino", "--data", str(folder), "--output-dir", str(whole), *DINO_TINY,
                           "--stop-after-steps", "4"]))
    train_dino(parse_args(["dino", "--data", str(folder), "--output-dir", str(out), *DINO_TINY,
                           "--stop-after-steps", "2"]))
    state = ckpt.load_checkpoint(out / "checkpoint.pth")
    for group in state["optimizer"]["param_groups"]:
        group["fused"] = None
    ckpt.save_checkpoint(state, out / "checkpoint.pth")
    train_dino(parse_args(["dino", "--data", str(folder), "--output-dir", str(out), *DINO_TINY,
                           "--stop-after-steps", "2"]))
    a, b = ckpt.load_checkpoint(whole / "checkpoint.pth"), ckpt.load_checkpoint(out / "checkpoint.pth")
    assert all(g["fused"] for g in b["optimizer"]["param_groups"])
    _assert_bitwise_equal(a["student"], b["student"])
    _assert_bitwise_equal(a["optimizer"]["state"], b["optimizer"]["state"])
