"""The wheel carries every module of the source tree, kernels/ as fastssl.kernels."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_contains_every_module(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(tmp_path)], check=True, cwd=tmp_path)
    (wheel,) = tmp_path.glob("fastssl-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {f"fastssl/{p.relative_to(ROOT / 'fastssl').as_posix()}" for p in (ROOT / "fastssl").rglob("*.py")}
    expected |= {f"fastssl/kernels/{p.name}" for p in (ROOT / "kernels").glob("*.py")}
    assert expected - names == set(), f"missing from the wheel: {sorted(expected - names)}"
