"""A smoke run of the DINOv3 objective benchmark (CPU, tiny shapes): every contender checked and
timed, the records and target lines written."""

import json
import math
import sys
from pathlib import Path

try:
    import benchmarks  # noqa: F401
except ImportError:  # plain `pytest` does not put the repository root on sys.path, `python -m pytest` does
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import dinov3  # noqa: E402


def test_dinov3_smoke(tmp_path):
    paths = dinov3.main(["--preset", "smoke", "--out", str(tmp_path), "--device", "cpu"])
    data = json.loads(paths["json"].read_text())
    records = data["records"]
    assert {r["kind"] for r in records} == {"cls", "ibot"}
    assert {r["contender"] for r in records} == {"fastssl", "authors", "authors+compile"}
    for r in records:
        assert math.isfinite(r["median_ms"]) and r["min_ms"] <= r["median_ms"] <= r["max_ms"]
        assert r["max_rel_err"] <= dinov3.TOLERANCE[r["dtype"]]
    # The target lines are the GPU's: a CPU run reports no verdict, and the smoke sizes have none.
    assert "PASS" not in paths["md"].read_text() and "FAIL" not in paths["md"].read_text()


def test_target_lines_judge_only_on_cuda():
    rows = [dict(case="cls B=64 K=65536 2+8 crops bf16", B=64, dtype="bf16", contender=name, median_ms=ms,
                 mem_over_grad=mem) for name, ms, mem in (("fastssl", 1.0, 1.05), ("authors", 4.0, 3.0),
                                                          ("authors+compile", 1.2, 2.0))]
    cuda = "\n".join(dinov3.target_lines(rows, on_cuda=True))
    assert ">= 3.0x faster than authors: 4.00x PASS" in cuda
    assert ">= 1.5x faster than authors+compile: 1.20x FAIL" in cuda
    assert "extra memory <= 1.1x the gradient: 1.05x PASS" in cuda
    assert "PASS" not in "\n".join(dinov3.target_lines(rows, on_cuda=False))
