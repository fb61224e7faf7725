"""The runnable examples in public docstrings run and print what they say."""

from __future__ import annotations

import doctest
import importlib

import pytest

def _all_modules() -> list[str]:
    """Every module of the package, so a new module's examples are run too."""
    import pkgutil

    import vitlens

    names = ["vitlens"]
    for info in pkgutil.walk_packages(vitlens.__path__, prefix="vitlens."):
        names.append(info.name)
    return sorted(names)


MODULES = _all_modules()


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0, f"{result.failed} docstring example(s) failed in {name}"
