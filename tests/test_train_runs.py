"""A training run as a demanding user meets it: stopped (SIGTERM, kill -9, --stop-after-steps) and resumed,
with one log row per step and epoch; a second run in the same folder refused, a stale lock taken over,
leftover temporary files removed; a finished run extended; resumed on another number of processes; a
folder of unreadable images or a diverging loss failing instead of "succeeding"; the demo keeping a user's
folder; the Python, numpy and fp16 grad scaler states kept; checkpoints of the previous version resumed."""

from __future__ import annotations

import json
import math
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import torchrun
from test_train import TINY, cfg_for, write_folder

from fastssl.train import checkpoint as ckpt
from fastssl.train import log as train_log
from fastssl.train.cli import main
from fastssl.train.dino import build_augment, train_dino
from fastssl.train.errors import CheckpointError, ConfigError, TrainingError
from fastssl.train.run_folder import LOCK_NAME, STALE_AFTER_S, _start_time, rewind_log
from fastssl.train.schedules import cosine_schedule

NITER = 3  # test_train.write_folder: 24 images, batch 8


def _no_constant(name):
    raise ValueError(f"{name} is not JSON")


def rows(out: Path, name: str = "log.jsonl") -> list[dict]:
    """The log's rows, read as strict JSON (NaN / Infinity tokens are errors)."""
    return [json.loads(line, parse_constant=_no_constant) for line in (out / name).read_text().splitlines()]


def step_rows(out: Path) -> list[dict]:
    return [r for r in rows(out) if "loss" in r]


def assert_one_row_per_step_and_epoch(out: Path, steps: int) -> None:
    """Steps 0..steps-1 logged once each (--log-freq 1), each complete epoch once, its loss the mean of its
    steps' losses (also when the run stopped and resumed within it)."""
    by_step = step_rows(out)
    assert [r["step"] for r in by_step] == list(range(steps))
    epochs = [r for r in rows(out) if "epoch_loss" in r]
    assert [r["epoch"] for r in epochs] == list(range(steps // NITER))
    for r in epochs:
        losses = [s["loss"] for s in by_step if s["epoch"] == r["epoch"]]
        assert len(losses) == NITER and r["epoch_loss"] == pytest.approx(sum(losses) / NITER, rel=1e-12)


def start(out: Path, folder: Path, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "fastssl.train", "dino", "--data", str(folder), "--output-dir", str(out), *TINY,
           "--epochs", "200", *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"), start_new_session=True)


def wait_for_steps(proc: subprocess.Popen, out: Path, n: int, *, past_an_epoch_end: bool = False) -> int:
    """Wait until ``out/log.jsonl`` has ``n`` step rows (and, if asked, a number that is not a whole number of
    epochs: rows past the last checkpoint). Returns how many."""
    deadline = time.monotonic() + 240
    while True:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "training did not get there"
        text = (out / "log.jsonl").read_text() if (out / "log.jsonl").exists() else ""
        count = text.count('"loss"')
        if count >= n and (not past_an_epoch_end or count % NITER):
            return count
        time.sleep(0.05)


def stop(proc: subprocess.Popen, sig: int) -> tuple[str, str]:
    try:
        os.killpg(proc.pid, sig)
        return proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture
def folder(tmp_path):
    return write_folder(tmp_path / "data")


def test_sigterm_resume_a_second_run_refused_and_rows_unique(folder, tmp_path, capsys):
    out = tmp_path / "run"
    proc = start(out, folder)
    try:
        wait_for_steps(proc, out, 4, past_an_epoch_end=True)
        # The folder is taken: a second run says by whom, and changes nothing.
        log_before = (out / "log.jsonl").read_text()
        assert main(["dino", "--data", str(folder), "--output-dir", str(out), *TINY, "--epochs", "200"]) == 1
        err = capsys.readouterr().err
        assert f"{out} is in use by another run: pid {proc.pid} on {socket.gethostname()}" in err
        assert (out / "log.jsonl").read_text().startswith(log_before)
    finally:
        stdout, stderr = stop(proc, signal.SIGTERM)  # what a cluster sends before pre-empting the job
    assert proc.returncode == 0, stdout[-2000:] + stderr[-2000:]
    assert f"stopped by signal {int(signal.SIGTERM)}" in stdout and "rerun the same command to go on" in stdout
    assert not (out / LOCK_NAME).exists()
    state = ckpt.load_checkpoint(out / "checkpoint.pth")
    done = state["global_step"]
    assert done == state["epoch"] * NITER + state["step"]
    assert len(step_rows(out)) == done  # the step the signal arrived in is the last logged
    assert not [r for r in rows(out) if r.get("epoch") == state["epoch"] and "epoch_loss" in r]  # no partial row

    # Rerunning the command goes on: --stop-after-steps counts this invocation's iterations, twice.
    for k in (1, 2):
        resumed = train_dino(cfg_for(folder, out, "--epochs", "200", "--stop-after-steps", "3"))
        assert resumed.steps_run == 3 and resumed.step == done + 3 * k
    assert_one_row_per_step_and_epoch(out, done + 6)
    resumes = [r for r in rows(out) if r.get("event") == "resume"]
    assert [r["at_step"] for r in resumes] == [done, done + 3]


def test_kill_9_stale_lock_leftovers_and_rows_past_the_checkpoint(folder, tmp_path, capsys):
    out = tmp_path / "run"
    proc = start(out, folder)
    try:
        wait_for_steps(proc, out, 5, past_an_epoch_end=True)
    finally:
        stop(proc, signal.SIGKILL)
    logged = (out / "log.jsonl").read_text().count('"loss"')
    assert (out / LOCK_NAME).exists()  # left behind
    # What a checkpoint write killed mid-way leaves, and files of the user's that only look alike.
    leftover = out / ".checkpoint.pth.k1ll3d_x.tmp"
    leftover.write_bytes(b"\0" * 4096)
    mine = [out / "notes.txt", out / ".checkpoint.pth.notes", out / "checkpoint.pth.tmp"]
    for p in mine:
        p.write_text("keep me")
    state = ckpt.load_checkpoint(out / "checkpoint.pth")
    done = state["global_step"]
    assert state["step"] == 0 and logged > done  # rows past the last checkpoint (an epoch end)

    resumed = train_dino(cfg_for(folder, out, "--epochs", "200", "--stop-after-steps", "4"))
    said = capsys.readouterr().out
    assert f"removed the stale lock {out / LOCK_NAME} of an earlier run: its process {proc.pid} is gone" in said
    assert "temporary file(s)" in said and "left by an interrupted write: " in said and leftover.name in said
    assert "moved to log.superseded.jsonl" in said
    assert resumed.step == done + 4 and not leftover.exists() and all(p.read_text() == "keep me" for p in mine)
    assert_one_row_per_step_and_epoch(out, done + 4)
    superseded = [r["step"] for r in rows(out, "log.superseded.jsonl") if "loss" in r]
    assert superseded and min(superseded) == done  # the killed run's rows past its checkpoint, kept aside
    assert not (out / LOCK_NAME).exists()


def _lock(out: Path, **record) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    base = {"pid": os.getpid(), "host": socket.gethostname(), "start": _start_time(os.getpid()), "token": "x",
            "since": "then", "argv": ["fastssl-train", "dino"]}
    (out / LOCK_NAME).write_text(json.dumps({**base, **record}))
    return out / LOCK_NAME


def test_lock_live_and_stale(folder, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["dino", "--data", str(folder), "--output-dir", str(out), *TINY, "--stop-after-steps", "1"]
    # A live holder (this very process): refused, and nothing written.
    _lock(out)
    assert main(argv) == 1
    assert "is in use by another run: pid" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]
    # Another host, refreshed lately: refused; not refreshed for STALE_AFTER_S: stale.
    lock = _lock(out, host="elsewhere", pid=1)
    assert main(argv) == 1
    os.utime(lock, (time.time() - STALE_AFTER_S - 60,) * 2)
    assert main(argv) == 0
    assert "it was not refreshed for" in capsys.readouterr().out
    # Its pid now names another process (another start time): stale.
    _lock(out, start="0")
    assert main(argv) == 0
    assert f"pid {os.getpid()} now names another process" in capsys.readouterr().out
    # Its process is gone.
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    _lock(out, pid=gone.pid)
    assert main(argv) == 0
    assert f"its process {gone.pid} is gone" in capsys.readouterr().out
    assert not (out / LOCK_NAME).exists()
    assert ckpt.load_checkpoint(out / "checkpoint.pth")["global_step"] == 3


def test_a_users_config_json_is_never_replaced(folder, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "config.json").write_text('{"my": "settings"}')
    assert main(["dino", "--data", str(folder), "--output-dir", str(out), *TINY]) == 1
    assert "holds a config.json that fastssl-train did not write" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["config.json"]
    assert (out / "config.json").read_text() == '{"my": "settings"}'


def test_extend_a_finished_run(folder, tmp_path, capsys):
    out = tmp_path / "run"
    train_dino(cfg_for(folder, out))  # 2 epochs
    capsys.readouterr()
    files = {p.name: p.read_bytes() for p in out.iterdir()}
    again = train_dino(cfg_for(folder, out))
    assert again.complete and again.steps_run == 0
    assert f"{out}: the run is complete (2 epochs" in capsys.readouterr().out
    assert {p.name: p.read_bytes() for p in out.iterdir()} == files  # nothing written
    with pytest.raises(CheckpointError, match=r"epochs: checkpoint 2, now 3 \(to train a run longer, add "
                                              r"--extend-epochs\)"):
        train_dino(cfg_for(folder, out, "--epochs", "3"))
    with pytest.raises(ConfigError, match="--extend-epochs lengthens a run: --epochs 1 is fewer than"):
        train_dino(cfg_for(folder, out, "--epochs", "1", "--extend-epochs"))

    longer = train_dino(cfg_for(folder, out, "--epochs", "4", "--extend-epochs"))
    assert "--extend-epochs: 2 -> 4 epochs; the per-iteration schedules are recomputed" in capsys.readouterr().out
    assert longer.epoch == 4 and longer.step == 4 * NITER and longer.steps_run == 2 * NITER
    assert_one_row_per_step_and_epoch(out, 4 * NITER)
    events = [r for r in rows(out) if r.get("event") == "extend_epochs"]
    assert events == [{"event": "extend_epochs", "at_step": 6, "epoch": 2, "from_epochs": 2, "to_epochs": 4}]
    # The schedules over 4 epochs from where the run went on (TINY: lr 0.01 per 256 images, no warm-up).
    new_lr = cosine_schedule(0.01 * 8 / 256, 1e-6, 4, NITER)
    old_lr = cosine_schedule(0.01 * 8 / 256, 1e-6, 2, NITER)
    lrs = [r["lr"] for r in step_rows(out)]
    assert lrs[:6] == pytest.approx(old_lr) and lrs[6:] == pytest.approx(new_lr[6:])
    assert ckpt.load_checkpoint(out / "checkpoint.pth")["config"]["epochs"] == 4
    assert train_dino(cfg_for(folder, out, "--epochs", "4")).complete


def test_resume_on_another_number_of_processes(folder, tmp_path, capsys):
    """2 gloo processes x 4 images stop after 2 iterations (16 of the epoch's 24 images); 1 process x 4 images
    goes on at iteration 4 of 6, with the lr of its global batch, each logged step once."""
    out = tmp_path / "run"
    torchrun("dino", "--data", str(folder), "--output-dir", str(out), *TINY, "--batch-size-per-gpu", "4",
             "--stop-after-steps", "2")
    saved = ckpt.load_checkpoint(out / "checkpoint.pth")
    assert (saved["world_size"], saved["niter"], saved["epoch"], saved["step"]) == (2, 3, 0, 2)
    with pytest.raises(CheckpointError, match=r"a run on 2 process\(es\), this one has 1: .* add --change-world-size"):
        train_dino(cfg_for(folder, out, "--batch-size-per-gpu", "4"))

    resumed = train_dino(cfg_for(folder, out, "--batch-size-per-gpu", "4", "--change-world-size",
                                 "--stop-after-steps", "3"))
    said = capsys.readouterr().out
    assert ("--change-world-size: 2 -> 1 process(es), 4 -> 4 images each (global batch 8 -> 4, the lr scaled by it); "
            "3 -> 6 iterations per epoch") in said and "epoch 1 goes on at iteration 4 (16 of its images done, 0 " \
           "seen again)" in said
    assert resumed.step == 7  # iterations 4, 5, 6 (epoch 2's first) of the new numbering
    logged = step_rows(out)
    assert [r["step"] for r in logged] == [0, 1, 2, 3, 4]  # 2 before, 3 after: the logged step goes on
    lr2 = cosine_schedule(0.01 * 8 / 256, 1e-6, 2, 3)
    lr1 = cosine_schedule(0.01 * 4 / 256, 1e-6, 2, 6)
    assert [r["lr"] for r in logged] == pytest.approx([lr2[0], lr2[1], lr1[4], lr1[5], lr1[6]])
    event = next(r for r in rows(out) if r.get("event") == "change_world_size")
    assert (event["from_world_size"], event["to_world_size"], event["from_step"], event["to_step"]) == (2, 1, 2, 4)
    state = ckpt.load_checkpoint(out / "checkpoint.pth")
    assert (state["world_size"], state["niter"], state["global_step"], state["epoch"], state["step"]) == (1, 6, 5, 1, 1)


def test_a_folder_of_unreadable_images_fails(tmp_path, capsys, monkeypatch):
    bad = tmp_path / "bad"
    for c in range(2):
        (bad / f"class{c}").mkdir(parents=True)
        for i in range(12):
            (bad / f"class{c}" / f"{i}.png").write_bytes(b"not an image")
    out = tmp_path / "run"
    with pytest.warns(RuntimeWarning, match="skipping unreadable image"):
        assert main(["dino", "--data", str(bad), "--output-dir", str(out), *TINY]) == 1
    assert "error: epoch 1: none of its 3 batches had a readable image" in capsys.readouterr().err
    assert not (out / "checkpoint.pth").exists() and rows(out) == []
    # A long epoch fails sooner: after UNREADABLE_BATCHES_LIMIT batches in a row.
    monkeypatch.setattr(train_log, "UNREADABLE_BATCHES_LIMIT", 2)
    with pytest.warns(RuntimeWarning, match="skipping unreadable image"):
        assert main(["dino", "--data", str(bad), "--output-dir", str(out), *TINY]) == 1
    assert "error: 2 batches in a row without one readable image (epoch 1, iterations 1-2)" in capsys.readouterr().err


def test_a_non_finite_loss_stops_the_run_and_the_log_stays_json(folder, tmp_path):
    out = tmp_path / "run"
    cfg = cfg_for(folder, out)
    real = build_augment(cfg)
    calls = []

    def poisoned(images, generator=None):  # the 5th step's crops are NaN: so is its loss
        calls.append(1)
        g, loc = real(images, generator=generator)
        return (g * math.nan, loc) if len(calls) == 5 else (g, loc)

    with pytest.raises(TrainingError, match="the loss is not finite .* at epoch 2, iteration 1: stopped without "
                                            "saving"):
        train_dino(cfg, augment=poisoned)
    logged = step_rows(out)  # strict JSON
    assert [r["step"] for r in logged] == [0, 1, 2, 3, 4] and logged[-1]["loss"] == "nan"
    assert ckpt.load_checkpoint(out / "checkpoint.pth")["global_step"] == NITER  # epoch 1's, as it was


def test_demo_never_deletes_a_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    small = ["--arch", "vit_pico", "--out-dim", "32", "--head-hidden-dim", "32", "--head-bottleneck-dim", "16",
             "--local-crops-number", "2", "--epochs", "1", "--warmup-epochs", "0", "--batch-size-per-gpu", "256",
             "--device", "cpu", "--progress", "false"]
    users = tmp_path / "mine"
    users.mkdir()
    (users / "notes.txt").write_text("my notes")
    assert main(["demo", "--output-dir", str(users), *small]) == 2
    assert "--output-dir" in capsys.readouterr().err and sorted(users.iterdir()) == [users / "notes.txt"]

    finished = tmp_path / "runs" / "demo-1"  # an earlier demo's folder is not reused either
    finished.mkdir(parents=True)
    (finished / "notes.txt").write_text("my notes")
    assert main(["demo", *small]) == 0
    said = capsys.readouterr().out
    assert "demo: training in runs/demo-2" in said and "kNN top-1" in said
    assert sorted(p.name for p in finished.iterdir()) == ["notes.txt"]
    assert (tmp_path / "runs" / "demo-2" / "checkpoint.pth").is_file()


def test_python_and_numpy_rngs_are_seeded_and_resume(folder, tmp_path):
    """Draws from Python's and numpy's global RNGs inside the steps (what an augmentation or a library might
    make) come from the run's seed, and a stopped and resumed run draws what a straight one draws."""

    def run(out: Path, *extra: str) -> list:
        cfg = cfg_for(folder, out, "--epochs", "2", *extra)
        real, draws = build_augment(cfg), []

        def drawing(images, generator=None):
            draws.append((random.random(), float(np.random.rand())))
            return real(images, generator=generator)

        train_dino(cfg, augment=drawing)
        return draws

    straight = run(tmp_path / "a")
    assert straight[0] == (random.Random(0).random(), float(np.random.RandomState(0).rand()))  # seed + rank 0
    assert run(tmp_path / "b", "--stop-after-steps", "4") + run(tmp_path / "b") == straight
    assert run(tmp_path / "c", "--seed", "1")[0] != straight[0]
    python = ckpt.load_checkpoint(tmp_path / "a" / "checkpoint.pth")["rng"]["python"]
    assert isinstance(python, tuple) and python[1] != random.Random(0).getstate()[1]


def test_fp16_grad_scaler_state_round_trips(folder, tmp_path):
    """fp16 on the CPU: the scaler backs off (inf gradients from 65536 down to a few hundred, here) and counts
    clean steps; a run stopped and resumed ends with the straight run's scaler state and weights."""
    extra = ("--precision", "fp16", "--epochs", "5")
    train_dino(cfg_for(folder, tmp_path / "a", *extra))
    train_dino(cfg_for(folder, tmp_path / "b", *extra, "--stop-after-steps", "10"))
    half = ckpt.load_checkpoint(tmp_path / "b" / "checkpoint.pth")["scaler"]
    assert half is not None and half["scale"] < 65536.0
    train_dino(cfg_for(folder, tmp_path / "b", *extra))
    a = ckpt.load_checkpoint(tmp_path / "a" / "checkpoint.pth")
    b = ckpt.load_checkpoint(tmp_path / "b" / "checkpoint.pth")
    assert a["scaler"] == b["scaler"] and a["scaler"]["_growth_tracker"] > half["_growth_tracker"]
    for name, t in a["student"].items():
        assert torch.equal(t, b["student"][name]), name
    scaler = torch.amp.GradScaler("cpu")
    scaler.load_state_dict(half)
    assert scaler.state_dict() == half


def test_a_checkpoint_of_the_previous_version_resumes(folder, tmp_path):
    """Checkpoints and logs written before the typed config (no global step, iterations per epoch, world size or
    epoch sums; a config dict without the newer options; NaN in log.jsonl) resume exactly."""
    straight = tmp_path / "a"
    train_dino(cfg_for(folder, straight, "--epochs", "2"))
    out = tmp_path / "b"
    train_dino(cfg_for(folder, out, "--epochs", "2", "--stop-after-steps", "4"))
    state = ckpt.load_checkpoint(out / "checkpoint.pth")
    for key in ("global_step", "niter", "world_size", "epoch_meter"):
        del state[key]
    for key in ("extend_epochs", "change_world_size"):
        del state["config"][key]
    ckpt.save_checkpoint(state, out / "checkpoint.pth")
    with open(out / "log.jsonl", "a") as f:  # what the old version wrote when it stopped within epoch 2
        f.write('{"epoch": 1, "epoch_loss": NaN, "skipped_images": 0, "epoch_time_s": 0.1}\n')
    train_dino(cfg_for(folder, out, "--epochs", "2"))
    a = ckpt.load_checkpoint(straight / "checkpoint.pth")
    b = ckpt.load_checkpoint(out / "checkpoint.pth")
    for key in ("student", "teacher", "dino_loss"):
        for name, t in a[key].items():
            assert torch.equal(t, b[key][name]), f"{key}.{name}"
    assert [r["step"] for r in step_rows(out)] == list(range(6))  # strict JSON
    assert [r["epoch"] for r in rows(out) if "epoch_loss" in r] == [0, 1]
    assert "NaN" in (out / "log.superseded.jsonl").read_text()


def test_rewind_log_keeps_the_rows_up_to_the_checkpoint(tmp_path):
    lines = [{"epoch": 0, "step": 0, "loss": 1.0}, {"epoch": 0, "step": 1, "loss": 1.0},
             {"epoch": 0, "epoch_loss": 1.0}, {"epoch": 1, "knn_top1": 5.0}, {"event": "resume", "at_step": 2},
             {"epoch": 1, "step": 2, "loss": 1.0}, {"epoch": 1, "step": 3, "loss": 1.0},
             {"epoch": 1, "epoch_loss": 1.0}, {"epoch": 2, "knn_top1": 6.0}, {"event": "resume", "at_step": 4}]
    (tmp_path / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"epoch": 2, "st')
    assert rewind_log(tmp_path, steps_done=3, epochs_done=1) is not None
    assert rows(tmp_path) == lines[:6]
    assert len((tmp_path / "log.superseded.jsonl").read_text().splitlines()) == 5
    assert rewind_log(tmp_path, steps_done=3, epochs_done=1) is None  # nothing more to move
