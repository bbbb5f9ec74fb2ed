"""The launchers' shared checks: an interpreter that cannot run the kernels is named, not a crash inside them."""

import numpy
import pytest
import torch
import triton

from fastssl.kernels import _launch


@pytest.mark.parametrize(("triton_version", "numpy_version", "broken"), [
    ("3.6.0", "2.4.6", True), ("3.6.0", "2.3.5", False), ("3.8.0", "2.4.6", False), ("3.6.0+git1a2b", "2.10.0", True),
])
def test_interpreter_problem_names_the_fix(monkeypatch, triton_version, numpy_version, broken):
    monkeypatch.setattr(triton, "__version__", triton_version)
    monkeypatch.setattr(numpy, "__version__", numpy_version)
    _launch.interpreter_problem.cache_clear()
    try:
        problem = _launch.interpreter_problem()
        assert (problem is not None) == broken
        if broken:
            assert "numpy<2.4" in problem and "triton>=3.7" in problem and numpy_version in problem
            with pytest.raises(_launch.InterpreterUnsupported, match="snn: Triton"):
                _launch.launch_device(torch.zeros(1), "snn")
    finally:
        _launch.interpreter_problem.cache_clear()


def test_recorded_launches_are_described_as_the_jit_specialises_them():
    # A real launch of the DINO kernels, recorded instead of run: the outputs stay unwritten, and
    # each launch carries its pointers' dtypes and alignment, its integers' hints (none for the
    # row counts the kernels do not specialise), its constexprs (None for an absent pointer) and
    # its compile options.
    from fastssl.kernels import dino

    x = torch.randn(7, 96)
    with _launch.record_launches() as launches:
        stats, mean = dino.teacher_row_stats(x, None, torch.zeros(96), 0.07, False)
        dino.teacher_row_stats(torch.randn(8, 97)[:, 1:], None, None, 0.07, True)  # rows off 16 bytes
    assert not _launch.recording()
    assert [launch["kernel"] for launch in launches] == ["_teacher_rows_kernel", "_combine_kernel"] * 2
    first, second = launches[0], launches[2]
    assert first["module"] == "fastssl.kernels.dino"
    assert first["signature"]["X"] == "*fp32:16" and second["signature"]["X"] == "*fp32"
    assert first["signature"]["K"] == "i32:16" and second["signature"]["K"] == "i32:16"
    assert first["signature"]["n_rows"] == "i32"  # do_not_specialize: 7 and 8 rows compile alike
    assert first["signature"]["t_scale2"] == "fp32"
    assert first["constexprs"]["C"] is None and first["constexprs"]["HAS_CENTER"] is False
    assert first["constexprs"]["HAS_OFFSET"] is True and "A" in first["signature"]
    assert first["options"] == dict(num_warps=8, num_stages=1, enable_fp_fusion=False)
    assert launches[1]["signature"]["nsplit"] == "i32" and launches[1]["signature"]["loss_scale"] == "fp32"


def test_the_lease_workloads_cover_every_kernel_and_fp64():
    # What the AOT build compiles for sm_80 / sm_90 and the lease precompiles: every kernel of the
    # package, fp64 inputs included (the interpreter would hide an fp64 compile error), in at most
    # VARIANT_CAP variants (benchmarks/workloads.py says why that many).
    import importlib
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks import workloads

    launches = workloads.record(torch.device("cpu"))
    assert len(launches) <= workloads.VARIANT_CAP
    seen = {(launch["module"], launch["kernel"]) for launch in launches}
    for name in ("dino", "ema", "snn"):
        module = importlib.import_module(f"fastssl.kernels.{name}")
        kernels = {k for k, v in vars(module).items() if k.endswith("_kernel") and hasattr(v, "fn")}
        assert kernels and {(module.__name__, k) for k in kernels} <= seen, f"{name}: a kernel no workload reaches"
    dtypes = {(launch["kernel"], v) for launch in launches for v in launch["signature"].values()}
    # fp64 reaches the DINO kernels as fp64 pointers; PAWS computes fp64 in fp32 before its kernels.
    assert ("_pair_fwd_kernel", "*fp64:16") in dtypes and ("_teacher_rows_kernel", "*fp64:16") in dtypes


def test_kernels_that_promise_no_fused_multiply_add_are_compiled_without():
    # Triton's interpreter never fuses, so only the compile option can show the promise is kept:
    # the DINO family's kernels (a row's statistics and every recomputation round alike), the EMA
    # (the authors' mul_ then add_) and PAWS's dc kernel launch with enable_fp_fusion=False. The AOT
    # build then fails if an fma.rn.f32 appears in their PTX anyway (.rn arithmetic, which ptxas
    # does not contract, is what Triton emits for them).
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks import workloads

    promised = [launch for launch in workloads.record(torch.device("cpu"))
                if launch["module"] in ("fastssl.kernels.dino", "fastssl.kernels.ema")
                or launch["kernel"] == "_bwd_dc_kernel"]
    assert {launch["kernel"] for launch in promised} >= {"_pair_fwd_kernel", "_ema_kernel", "_bwd_dc_kernel"}
    for launch in promised:
        assert launch["options"].get("enable_fp_fusion") is False, f"{launch['kernel']} may fuse multiply-adds"
