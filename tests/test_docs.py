"""The ``>>>`` examples in the public modules' docstrings run and give what they show."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = ["fastssl.losses.targets", "fastssl.losses.crop_pairs", "fastssl.losses.ibot", "fastssl.dinov2.loss",
           "fastssl.dinov3.loss", "fastssl.losses.gram", "fastssl.losses.koleo"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0, f"{name} has no example"
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples of {name} failed"
