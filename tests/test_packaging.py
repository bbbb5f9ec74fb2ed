"""The wheel carries every module of the source tree: kernels/ as fastssl.kernels, csrc/ as fastssl/csrc."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_contains_every_module(tmp_path):
    # No extension build here (make test's install already compiled it): the sources must ship
    # anyway, for the just-in-time build of an install that did not compile them.
    env = dict(os.environ, FASTSSL_NO_EXTENSION="1")
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(tmp_path)], check=True, cwd=tmp_path, env=env)
    (wheel,) = tmp_path.glob("fastssl-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {f"fastssl/{p.relative_to(ROOT / 'fastssl').as_posix()}" for p in (ROOT / "fastssl").rglob("*.py")}
    expected |= {f"fastssl/kernels/{p.name}" for p in (ROOT / "kernels").glob("*.py")}
    expected |= {f"fastssl/csrc/{p.name}" for p in (ROOT / "csrc").iterdir() if p.suffix in (".h", ".cpp", ".cu")}
    assert expected - names == set(), f"missing from the wheel: {sorted(expected - names)}"
