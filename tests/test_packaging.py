"""pyproject.toml is the source of truth; environment.yml mirrors it."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _pyproject_requirements() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        reqs += extra
    return {r.replace(" ", "") for r in reqs}


def _environment_requirements() -> set[str]:
    lines = (ROOT / "environment.yml").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if re.match(r"\s*- pip:\s*$", line))
    out = set()
    for line in lines[start + 1 :]:
        m = re.match(r"\s+- (\S.*)$", line)
        if m and not m.group(1).startswith("-e"):
            out.add(m.group(1).replace(" ", ""))
    return out


def test_environment_yml_mirrors_pyproject():
    assert _environment_requirements() == _pyproject_requirements()


def test_python_requirement_matches():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["requires-python"] == ">=3.10"
    assert "python>=3.10" in (ROOT / "environment.yml").read_text()


def test_license_is_an_spdx_string_so_setuptools_does_not_warn():
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert data["project"]["license"] == "MIT"  # a TOML table warns (deprecated) on every build
    assert any(r.startswith("setuptools>=77") for r in data["build-system"]["requires"])


def test_static_figures_need_matplotlib_not_a_browser():
    core = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    names = {re.split(r"[<>=!\[ ]", r)[0] for r in core}
    assert "matplotlib" in names and "kaleido" not in names
