"""The runnable examples in public docstrings run and print what they say."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = [
    "vitlens",
    "vitlens.capture.api",
    "vitlens.capture.store",
    "vitlens.capture.windows",
    "vitlens.methods",
    "vitlens.methods.attention",
    "vitlens.methods.rollout",
    "vitlens.methods.gradcam",
    "vitlens.methods.generic_attention",
    "vitlens.methods.transformer_attribution",
    "vitlens.methods.lnstat",
    "vitlens.methods.tokentm",
    "vitlens.methods.lrp",
    "vitlens.methods.maps",
    "vitlens.models.loading",
    "vitlens.figures",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0, f"{result.failed} docstring example(s) failed in {name}"
