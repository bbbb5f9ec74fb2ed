"""The Gram and KoLeo kernels in the lease's record and the AOT build: every kernel reached, fp64 included,
and their kernel checks passing on fixed sizes (here under Triton's interpreter)."""

import importlib
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import kernel_checks, workloads  # noqa: E402


def test_the_workloads_reach_every_kernel():
    launches = workloads.record(torch.device("cpu"), ("gram", "koleo"))
    seen = {(launch["module"], launch["kernel"]) for launch in launches}
    for name in ("gram", "koleo"):
        module = importlib.import_module(f"fastssl.kernels.{name}")
        kernels = {k for k, v in vars(module).items() if k.endswith("_kernel") and hasattr(v, "fn")}
        assert kernels and {(module.__name__, k) for k in kernels} <= seen, f"{name}: a kernel no workload reaches"
    # fp64 features are computed in fp32: their launches take fp32 pointers, which compile for a GPU.
    assert not any("fp64" in v for launch in launches for v in launch["signature"].values())
    # Both backward precisions and the TF32 option are among the variants the AOT build compiles.
    precisions = {launch["constexprs"].get("PREC_BWD") for launch in launches} - {None}
    assert precisions == {"bf16x2", "tf32x3", "tf32"}


def test_the_kernel_checks_pass():
    records = kernel_checks.run(torch.device("cpu"), only=("gram", "koleo"))
    assert {r["op"] for r in records} == {"gram", "koleo"}
    failed = [r for r in records if not r["ok"]]
    assert not failed, failed
