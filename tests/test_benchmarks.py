"""The benchmark harness and a smoke run of the DINO benchmark (CPU, tiny shapes)."""

import importlib
import json
import math
import statistics
import sys
from pathlib import Path

import pytest
import torch

try:
    import benchmarks  # noqa: F401
except ImportError:  # plain `pytest` does not put the repository root on sys.path, `python -m pytest` does
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import dino, harness  # noqa: E402


def test_roofline_pct():
    # 1 GB in 1 ms is 1000 GB/s: half of a 2000 GB/s device.
    assert harness.roofline_pct(1e9, 1.0, 2000.0) == pytest.approx(50.0)
    assert harness.roofline_pct(3e9, 2.0, 1500.0) == pytest.approx(100.0)
    with pytest.raises(ValueError):
        harness.roofline_pct(1e9, 0.0, 1000.0)


def test_markdown_table():
    records = [{"contender": "a", "median_ms": 1.23456, "n": 3, "extra": None},
               {"contender": "b|c", "median_ms": 2e-5, "n": 4}]
    lines = harness.markdown_table(records, ["contender", "median_ms", "n", "extra"]).splitlines()
    assert lines[0] == "| contender | median_ms | n | extra |"
    assert lines[1].startswith("|---|") and lines[1].count("|") == 5
    assert lines[2] == "| a | 1.235 | 3 |  |"
    assert lines[3] == "| b\\|c | 2.00e-05 | 4 |  |"


def test_time_fn_and_combine():
    x = torch.randn(256, 256)
    stats = harness.time_fn(lambda: x @ x, torch.device("cpu"), warmup=1, reps=7)
    assert stats["reps"] == 7
    assert 0 < stats["min_ms"] <= stats["median_ms"] <= stats["max_ms"]
    calls = []
    stats = harness.time_fn(lambda arg: calls.append(arg), "cpu", warmup=2, reps=3, setup=lambda: "fresh")
    assert calls == ["fresh"] * 5 and stats["reps"] == 3
    assert harness.peak_memory_bytes(lambda: x @ x, "cpu") is None

    sets = [{"f": {"median_ms": m, "min_ms": m - 1, "max_ms": m + 1, "reps": 5, "peak_mem_bytes": None}}
            for m in (3.0, 1.0, 2.0)]
    combined = harness.combine_sets(sets)["f"]
    assert combined["median_ms"] == 2.0 and combined["min_ms"] == 0.0 and combined["max_ms"] == 4.0
    assert combined["reps"] == 15 and combined["sets"] == 3


def test_device_info():
    info = harness.device_info(torch.device("cpu"))
    assert info["slug"] == "cpu" and info["torch"] == torch.__version__
    assert info["copy_bandwidth_gbs"] > 0
    assert harness.results_dir(info, root="/x") == Path("/x/cpu")


def test_dino_smoke(tmp_path):
    paths = dino.main(["--preset", "smoke", "--out", str(tmp_path), "--device", "cpu"])
    for kind in ("json", "md", "png"):
        assert paths[kind].exists() and paths[kind].stat().st_size > 0
    data = json.loads(paths["json"].read_text())
    assert data["meta"]["slug"] == "cpu" and data["meta"]["preset"] == "smoke"
    records = data["records"]
    assert {r["contender"] for r in records} == {"fastssl", "authors", "authors+compile"}
    assert {r["mode"] for r in records} == set(dino.MODES)
    assert {r["dtype"] for r in records} == {"fp32", "bf16"}
    for r in records:
        for key in ("median_ms", "min_ms", "max_ms", "speedup"):
            assert math.isfinite(r[key]) and r[key] > 0, (key, r)
        assert r["min_ms"] <= r["median_ms"] <= r["max_ms"]
        assert r["max_rel_err"] <= dino.TOLERANCE[r["dtype"]]
        if r["contender"] == "fastssl":
            assert r["bytes_moved"] > 0 and r["roofline_pct"] > 0
            if r["mode"] == "fwd+bwd":
                assert r["bytes_issue"] > 0 and r["roofline_pct_issue"] > 0
    # The median over input sets of the per-set medians.
    r = records[0]
    assert r["median_ms"] == pytest.approx(statistics.median(r["set_medians_ms"]))
    md = paths["md"].read_text()
    assert "| case | mode | contender |" in md and "commit" in md


def test_dino_bytes():
    case = dino.Case(B=64, K=65536, local=8, dtype="bf16")
    student, teacher = 10 * 64 * 65536 * 2, 2 * 64 * 65536 * 2
    assert dino.design_bytes(case, "fwd") == 2 * teacher + student
    assert dino.design_bytes(case, "bwd") == 2 * student + teacher
    assert dino.design_bytes(case, "fwd+bwd") == 3 * teacher + 3 * student
    assert dino.issue_bytes(case) == 3 * student + teacher


def test_dino_mismatch_is_an_error():
    case = dino.Case(B=2, K=64, local=2, dtype="fp32")
    student, teacher = dino.make_inputs(case, torch.device("cpu"), 0)
    wrong = dino.build("authors", dino.Case(B=2, K=64, local=2, dtype="fp32"), torch.device("cpu"))
    wrong.student_temp = 0.2
    with pytest.raises(dino.CorrectnessError, match="authors loss"):
        dino.check({"authors": wrong}, case, student, teacher)


def test_entry_point_passes_preset_and_out(tmp_path, monkeypatch, capsys):
    from benchmarks import __main__ as entry

    seen = []

    def fake_main(argv):
        seen.append(argv)
        return {"json": tmp_path / "x.json"}

    # Every benchmark faked: this tests the dispatch, not the benchmarks (their own tests run them).
    for name in entry.BENCHMARKS:
        monkeypatch.setattr(importlib.import_module(f"benchmarks.{name}"), "main", fake_main)
    entry.main(["--only", "dino", "--preset", "smoke", "--out", str(tmp_path)])
    entry.main(["--preset", "no-such-preset"])  # unknown to every benchmark: their defaults, with a note
    assert seen == [["--preset", "smoke", "--out", str(tmp_path)]] + [[]] * len(entry.BENCHMARKS)
    out = capsys.readouterr()
    assert f"Results written to {tmp_path}" in out.out and "no-such-preset" in out.err


def test_write_results_default_plot(tmp_path):
    info = {"slug": "cpu", "name": "test CPU", "device": "cpu", "torch": torch.__version__, "date": "today",
            "copy_bandwidth_gbs": 10.0, "commit": None}
    records = [{"case": "n=1", "contender": c, "median_ms": m, "min_ms": m / 2, "max_ms": m * 2}
               for c, m in (("ours", 1.0), ("theirs", 3.0))]
    paths = harness.write_results(records, info, tmp_path / "sub", "toy",
                                  columns=["case", "contender", "median_ms"])
    assert json.loads(paths["json"].read_text()) == {"meta": info, "records": records}
    assert "| n=1 | theirs | 3 |" in paths["md"].read_text()
    assert paths["png"].read_bytes().startswith(b"\x89PNG")


def _train_step():
    pytest.importorskip("timm")
    pytest.importorskip("torchvision")
    from benchmarks import train_step

    return train_step


def test_train_step_smoke(tmp_path):
    train_step = _train_step()
    paths = train_step.main(["--preset", "smoke", "--out", str(tmp_path), "--device", "cpu"])
    for kind in ("json", "md", "png"):
        assert paths[kind].exists() and paths[kind].stat().st_size > 0
    data = json.loads(paths["json"].read_text())
    assert data["meta"]["benchmark"] == "train_step" and data["meta"]["preset"] == "smoke"
    rows = {r["contender"]: r for r in data["records"]}
    assert set(rows) == {"fastssl", "authors"}
    for name, r in rows.items():
        assert math.isfinite(r["images_per_s"]) and r["images_per_s"] > 0, r
        assert r["steps"] == train_step.PRESETS["smoke"].steps and math.isfinite(r["loss"])
        assert r["peak_mem_mb"] is None  # CPU: no allocator statistics
        for phase in train_step.PHASES:
            assert f"{phase}_ms" in r, (phase, r)
            if phase != "augment" or name == "fastssl":
                assert r[f"{phase}_ms"] >= 0
        assert r["profiled_step_ms"] > 0
    assert rows["authors"]["augment_ms"] is None  # the authors' crops are made in the loader
    ours, theirs = rows["fastssl"], rows["authors"]
    assert ours["speedup"] == pytest.approx(ours["images_per_s"] / theirs["images_per_s"])
    assert ours["loss_rel_err"] <= 1e-4 and ours["ema_rel_err"] <= 1e-6
    md = paths["md"].read_text()
    assert "| contender |" in md and "data_ms" in md and "instrumented pass" in md


def test_train_step_check_catches_a_wrong_ema(tmp_path, monkeypatch):
    train_step = _train_step()
    preset = train_step.PRESETS["smoke"]
    case = preset.cases[0]
    train_step.write_images(tmp_path, preset, seed=0)
    # The authors' loop replaced by one that leaves the teacher as it was.
    monkeypatch.setattr(train_step.ema_bench, "_authors", lambda teacher, student, m: None)
    with pytest.raises(train_step.CorrectnessError, match="MomentumTeacher's update differs"):
        train_step.check(train_step.make_config(case), case, torch.device("cpu"), None, tmp_path, seed=0)


def test_goal_line_judges_on_cuda_only():
    from benchmarks.harness import goal_line

    assert goal_line("fast", 12.345, "x", 10, True).endswith("12.35x PASS")
    assert goal_line("fast", 9.0, "x", 10, True).endswith("9.00x FAIL")
    assert goal_line("lean", 0.7, "x", 0.8, True, higher=False).endswith("PASS")
    assert goal_line("lean", 0.9, "x", 0.8, True, higher=False).endswith("FAIL")
    assert "not judged" in goal_line("fast", 99.0, "x", 10, False)
    assert goal_line("fast", None, "x", 10, True) == "- fast: not measured on this device"


def test_cpu_goal_line_judges_on_cpu_only():
    from benchmarks.harness import cpu_goal_line

    assert cpu_goal_line("fast", 1.234, "x", 1.0, True).endswith("1.23x PASS")
    assert cpu_goal_line("fast", 0.97, "x", 1.0, True).endswith("0.97x FAIL")
    assert "not judged" in cpu_goal_line("fast", 0.5, "x", 1.0, False)


def test_cpu_results_go_where_the_readme_says_and_git_ignores_them():
    import subprocess

    root = Path(__file__).resolve().parents[1]
    folder = harness.results_dir({"slug": "cpu"}).relative_to(root).as_posix()
    assert f"`{folder}/<name>-cpu.{{json,md,png}}`" in (root / "benchmarks" / "README.md").read_text()
    for name in ("ema-cpu.md", "paws-cpu.json", "multicrop-cpu.png"):
        ignored = subprocess.run(["git", "check-ignore", "-q", f"{folder}/{name}"], cwd=root)
        assert ignored.returncode == 0, f"{folder}/{name} is not ignored by git"
    gpu = subprocess.run(["git", "check-ignore", "-q", "benchmarks/results/nvidia-h100-80gb-hbm3/ema-target.md"],
                         cwd=root)
    assert gpu.returncode == 1, "GPU results must stay committable"


@pytest.mark.parametrize("name", ["dino", "paws", "ema"])
def test_tune_candidates_set_real_constants(name):
    # A candidate that named a constant its module no longer has would silently time shipped again.
    from benchmarks import tune

    module = importlib.import_module(f"fastssl.kernels.{tune.MODULES[name]}")
    for label, values in tune.CANDIDATES[name]:
        for const, value in values.items():
            assert hasattr(module, const), (label, const)
            if isinstance(value, dict):
                assert set(value) <= set(getattr(module, const)), (label, const)


def test_tune_patched_restores_the_constants():
    from benchmarks import tune
    from fastssl.kernels import dino as kernels

    before = (kernels._TILE, dict(kernels._OPTIONS))
    with pytest.raises(RuntimeError), tune.patched(kernels, {"_TILE": 64, "_OPTIONS": {"num_warps": 2}}):
        assert kernels.teacher_config(10, 4096)["BLOCK_R"] == 1  # 64 elements of 64 columns
        assert kernels._OPTIONS["num_warps"] == 2 and kernels._OPTIONS["enable_fp_fusion"] is False
        raise RuntimeError("a candidate failed")
    assert (kernels._TILE, kernels._OPTIONS) == before
    with pytest.raises(AttributeError):
        with tune.patched(kernels, {"_NO_SUCH_CONSTANT": 1}):
            pass


def test_tune_smoke(tmp_path):
    # The GPU sweep on tiny problems, the kernels under the interpreter: every candidate runs and
    # matches the shipped constants' outputs.
    from benchmarks import tune

    paths = tune.main(["ema", "--smoke", "--out", str(tmp_path)])
    records = json.loads(paths["json"].read_text())["records"]
    assert [r["candidate"] for r in records] == [c for c, _ in tune.CANDIDATES["ema"]] * 2
    assert all(r["ok"] and r["median_ms"] > 0 for r in records)


def test_gpu_checks_workloads_run(capsys):
    # What `gpu_session.sh profile` and `sanitize` run under ncu and compute-sanitizer, as a smoke run here.
    from benchmarks import gpu_checks

    assert gpu_checks.main(["sanitize", "--device", "cpu"]) == 0
    assert gpu_checks.main(["counters", "--device", "cpu", "--reps", "1"]) == 0
    out = capsys.readouterr().out
    for line in ("crops: both programs", "losses: DINO", "ema: odd shapes", "ran fastssl-op 1x", "M warp instructions"):
        assert line in out
