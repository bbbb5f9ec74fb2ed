"""Shared test helpers: comparisons against float64 references, a gloo process group for spawned workers,
a 2-process torchrun launcher."""

from __future__ import annotations

import faulthandler
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.distributed as dist

# The device every test puts its tensors on: CUDA when there is a GPU and the kernels are
# not being interpreted, else the CPU (set up in conftest.py).
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
DEVICE = torch.device("cuda" if torch.cuda.is_available() and not INTERPRETED else "cpu")

# Relative-norm tolerances for a result returned in each dtype (fp32 math inside).
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float64: 1e-12}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def gpu_only(reason: str):
    """Marks a test only a CUDA device can run: skipped elsewhere with ``reason``, and selected by the
    lease command's GPU stage (``pytest -m gpu``)."""
    def mark(fn):
        return pytest.mark.gpu(pytest.mark.skipif(not torch.cuda.is_available(), reason=reason)(fn))
    return mark


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| in float64 (absolute error when expected is 0)."""
    actual = torch.as_tensor(actual).detach().double().cpu()
    expected = torch.as_tensor(expected).detach().double().cpu()
    assert actual.shape == expected.shape, f"shape {tuple(actual.shape)} != expected {tuple(expected.shape)}"
    diff = (actual - expected).norm().item()
    scale = expected.norm().item()
    return diff / scale if scale > 0 else diff


def assert_rel_close(actual, expected, tol: float, what: str = "value") -> None:
    err = rel_err(actual, expected)
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.1e}"


def gloo_worker(rank: int, world_size: int, init_file: str, work: Callable[..., None], *args: Any) -> None:
    """The target of ``torch.multiprocessing.spawn``: ``work(rank, *args)`` inside a gloo process group of the
    spawned processes (rendezvous on ``init_file``). After a ``work`` that ran through, every rank waits for
    the others before leaving the group (one that tears its connections down while a peer still finishes
    its last collective can make gloo abort that peer, as ``fastssl.train.runtime`` knows), then the
    process ends with ``os._exit(0)``, without the interpreter's finalisation: the group outlives
    ``destroy_process_group`` (FSDP2's state keeps it, even after a garbage collection), so its C++
    teardown would run during finalisation, the likeliest place of an abort seen in 2 of 5 runs of the
    whole suite and never alone (SIGABRT, "terminate called without an active exception"). An abort
    anywhere else prints its Python stack (faulthandler), shown with the failure."""
    faulthandler.enable(all_threads=True)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        work(rank, *args)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def torchrun(*args: str, nproc: int = 2, timeout: float = 300, script: str | None = None) -> str:
    """``torchrun --standalone -m fastssl.train ARGS`` (or ``torchrun --standalone SCRIPT ARGS``) on the CPU
    (gloo); returns its stdout, fails the test on a non-zero exit or a timeout (then the workers are killed
    with it: a session of their own)."""
    target = [script] if script is not None else ["-m", "fastssl.train"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *target, *args]
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"torchrun did not finish in {timeout} s:\n" + stdout[-3000:] + stderr[-3000:])
    assert proc.returncode == 0, stdout[-3000:] + stderr[-3000:]
    return stdout
