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
