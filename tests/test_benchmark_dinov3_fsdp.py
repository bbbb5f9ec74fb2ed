"""A smoke run of issue 21's FSDP2 benchmark (CPU, the digits preset): the trainer run with and without
--fsdp, images/s read from its own log, the records and target lines written."""

import json
import sys
from pathlib import Path

try:
    import benchmarks  # noqa: F401
except ImportError:  # plain `pytest` does not put the repository root on sys.path, `python -m pytest` does
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import dinov3_fsdp  # noqa: E402


def test_dinov3_fsdp_smoke(tmp_path):
    paths = dinov3_fsdp.main(["--preset", "smoke", "--out", str(tmp_path), "--device", "cpu"])
    assert {p.name for p in paths.values()} == {f"dinov3_fsdp-smoke.{ext}" for ext in ("json", "md", "png")}
    records = json.loads(paths["json"].read_text())["records"]
    assert [r["contender"] for r in records] == ["fsdp", "plain"]
    for r in records:
        assert r["fits"] and r["images_per_s"] > 0 and r["logged_intervals"] == 4 and r["peak_mem_gb"] is None
    assert "not measured (CPU run)" in paths["md"].read_text()


def test_target_lines_report_both_runs_on_cuda():
    rows = [dict(case="dinov3_vitl16_im1k B=64 bf16", contender="fsdp", fits=True, images_per_s=101.5,
                 peak_mem_gb=41.2),
            dict(case="dinov3_vitl16_im1k B=64 bf16", contender="plain", fits=False, error="CUDA out of memory.")]
    text = "\n".join(dinov3_fsdp.target_lines(rows, on_cuda=True))
    assert "FSDP2 on one GPU 101.5 images/s, peak 41.2 GB" in text
    assert "without FSDP2: did not fit (CUDA out of memory.)" in text
    assert dinov3_fsdp.PRESETS["lease"].cases[0] == dinov3_fsdp.Case("dinov3_vitl16_im1k", 64, "bf16")
