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


# ----------------------------------------------------------------------------- the just-in-time build

def test_jit_plan_compiles_what_the_machine_can_run(monkeypatch):
    import fastssl._build as build

    monkeypatch.delenv("FASTSSL_CUDA_ARCHS", raising=False)
    monkeypatch.setattr(build, "cuda_plan", lambda version: ("/opt/cuda", "CUDA 13.0 at /opt/cuda"))
    cpu = build.jit_plan("13.0", [])  # a CUDA build of torch, no visible device: a login node
    assert (cpu.cuda_home, cpu.archs, cpu.tag) == (None, (), "cpu") and "no CUDA device" in cpu.why
    assert "minute" in cpu.expect
    gpu = build.jit_plan("13.0", ["90"])
    assert (gpu.cuda_home, gpu.archs, gpu.tag) == ("/opt/cuda", ("90",), "sm90")
    assert build.jit_plan("13.0", ["90", "80", "90"]).tag == "sm80-90"
    monkeypatch.setattr(build, "cuda_plan", lambda version: (None, "no CUDA toolkit (nvcc) found"))
    assert build.jit_plan("13.0", ["90"]).tag == "cpu"  # a GPU but no toolkit: CPU kernels, and said why
    assert build.jit_plan(None, []).why == "torch is not a CUDA build"
    # Only the present GPU's code, no PTX, in the just-in-time nvcc flags.
    nvcc = build.extra_compile_args("/opt/cuda", ["90"], ptx=False)["nvcc"]
    assert [f for f in nvcc if f.startswith("-gencode")] == ["-gencode=arch=compute_90,code=sm_90"]


def test_jit_build_cache_and_message_say_which(monkeypatch, tmp_path, capsys):
    # A CPU-only build (made where no GPU is visible) and a CUDA one live in different folders, so
    # that the first is never loaded where a GPU is; the message says which and how long it takes.
    import torch.utils.cpp_extension as cpp

    import fastssl._build as build
    from fastssl import _ext

    calls = []
    monkeypatch.setattr(cpp, "load", lambda **kw: calls.append(kw))
    monkeypatch.setenv("FASTSSL_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setattr(build, "cuda_plan", lambda version: ("/opt/cuda", "CUDA 13.0 at /opt/cuda"))
    monkeypatch.setattr(build, "use_cuda_home", lambda home: None)
    monkeypatch.setattr(build, "wheel_cuda_include_dirs", lambda home: [])
    for archs in ([], ["90"]):
        monkeypatch.setattr(_ext, "gpu_archs", lambda archs=archs: archs)
        _ext._jit_build()
    cpu, gpu = calls
    message = capsys.readouterr().err
    assert "CPU kernels only: no CUDA device is visible" in message and "about a minute" in message
    assert "CUDA kernels for sm_90" in message and "several minutes" in message
    assert cpu["build_directory"].endswith("-cpu") and gpu["build_directory"].endswith("-sm90")
    assert not any(s.endswith(".cu") for s in cpu["sources"]) and any(s.endswith(".cu") for s in gpu["sources"])
    assert cpu["extra_cuda_cflags"] is None and "-gencode=arch=compute_90,code=sm_90" in gpu["extra_cuda_cflags"]


def test_extension_state_has_one_owner():
    # fastssl._ext loads the extension, registers every op's fake and holds the state; the crop op
    # imports it, never the other way round (no import circle).
    import ast

    import torch

    from fastssl import _ext
    from fastssl.ops import _crops

    tree = ast.parse((ROOT / "fastssl" / "_ext.py").read_text())
    imported = {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert not any("ops" in m or "_crops" in m or "augment" in m for m in imported), imported
    assert not hasattr(_crops, "_op_ready") and not hasattr(_crops, "_register_fake")
    _ext.load_extension()
    assert _ext.loaded() is not None
    for op in ("resized_crops", "_resized_crops_program", "ema_update_", "dino_color_u8"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fastssl::{op}", "CPU"), op
    # The fake implementation torch finds (in the module the extension names with set_python_module).
    data, info, boxes = torch.rand(3 * 10 * 12), torch.tensor([[0, 10, 12]]), torch.tensor([[0, 1, 2, 8, 9.0]])
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
        data, info, boxes = (mode.from_tensor(t) for t in (data, info, boxes))
        out = torch.ops.fastssl.resized_crops(data, info, boxes, None, 3, 6, "bilinear", True, None, None, 1.0,
                                              torch.float32, False)
    assert out.shape == (1, 3, 6, 6)
