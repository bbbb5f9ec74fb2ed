"""Smoke runs of the Gram anchoring and KoLeo benchmarks (CPU, tiny shapes): every contender checked and
timed, the records and target lines written; the target lines judged on CUDA only."""

import json
import math
import sys
from pathlib import Path

try:
    import benchmarks  # noqa: F401
except ImportError:  # plain `pytest` does not put the repository root on sys.path, `python -m pytest` does
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pytest  # noqa: E402

from benchmarks import gram, koleo  # noqa: E402


@pytest.mark.parametrize("bench", [gram, koleo], ids=["gram", "koleo"])
def test_smoke(tmp_path, bench):
    paths = bench.main(["--preset", "smoke", "--out", str(tmp_path), "--device", "cpu"])
    records = json.loads(paths["json"].read_text())["records"]
    assert {r["contender"] for r in records} == {"fastssl", "authors", "authors+compile"}
    assert {r["case"] for r in records} == {c.label for c in bench.PRESETS["smoke"].cases}
    for r in records:
        assert math.isfinite(r["median_ms"]) and r["min_ms"] <= r["median_ms"] <= r["max_ms"]
        assert r["max_rel_err"] <= bench.TOLERANCE[r["dtype"]] or r["contender"] != "fastssl"
    # The target lines are the GPU's: a CPU run reports no verdict, and the smoke sizes have none.
    assert "PASS" not in paths["md"].read_text() and "FAIL" not in paths["md"].read_text()


def test_gram_target_lines_judge_only_on_cuda():
    def row(name, ms, mem):
        return dict(case="image B=16 N=4096 d=1024 bf16", B=16, N=4096, d=1024, dtype="bf16", img_level=True,
                    contender=name, median_ms=ms, mem_over_feats=mem)

    rows = [row("fastssl", 2.0, 2.5), row("authors+tf32", 3.2, 40.0), row("authors", 9.0, 40.0)]
    cuda = "\n".join(gram.target_lines(rows, on_cuda=True))
    assert ">= 1.5x faster than authors+tf32: 1.60x PASS" in cuda
    assert "no N x N matrix: peak memory <= 3.0x the fp32 features: 2.50x PASS" in cuda
    rows[0]["median_ms"] = 2.5
    assert ">= 1.5x faster than authors+tf32: 1.28x FAIL" in "\n".join(gram.target_lines(rows, on_cuda=True))
    assert "PASS" not in "\n".join(gram.target_lines(rows, on_cuda=False))


def test_koleo_target_lines_judge_only_on_cuda():
    rows = [dict(case="B=4096 D=1024 bf16", B=4096, D=1024, dtype="bf16", contender=name, median_ms=ms)
            for name, ms in (("fastssl", 1.0), ("authors", 0.9))]
    cuda = "\n".join(koleo.target_lines(rows, on_cuda=True))
    assert ">= 1.0x the authors' speed: 0.90x FAIL" in cuda
    assert "FAIL" not in "\n".join(koleo.target_lines(rows, on_cuda=False))
