"""The package's rooms import only downwards, and its public names stay as documented.

Layers, lowest first: errors and the version; models (with zoo and datasets); capture;
methods and head statistics; metrics and figures; widgets; the command line and the
coverage harnesses on top. A module may import its own layer or any lower one, never
a higher one, so the graph has no circles between rooms.
"""

from __future__ import annotations

import ast
import pathlib

import vitlens

ROOT = pathlib.Path(vitlens.__file__).parent

#: room -> layer (a module belongs to its longest matching room)
LAYERS = {
    "vitlens.errors": 0,
    "vitlens._version": 0,
    "vitlens.registry": 0,
    "vitlens.models": 1,
    "vitlens.zoo": 1,
    "vitlens.datasets": 1,
    "vitlens.capture": 2,
    "vitlens.methods": 3,
    "vitlens.stats": 3,
    "vitlens.metrics": 4,
    "vitlens.figures": 4,
    "vitlens.widgets": 5,
    "vitlens": 6,  # the package root re-exports everything
    "vitlens.cli": 7,
    "vitlens.demo": 7,
    "vitlens.explain_cli": 7,
    "vitlens.coverage": 7,
}


def _module(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: pathlib.Path) -> set[str]:
    name = _module(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
                out |= {target} if node.module else {f"{target}.{a.name}" for a in node.names}
            elif node.module and node.module.split(".")[0] == "vitlens":
                out.add(node.module)
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "vitlens"}
    return out


def _layer(module: str) -> int:
    room = max((r for r in LAYERS if module == r or module.startswith(r + ".")), key=len)
    return LAYERS[room]


def upward_imports() -> list[str]:
    """Every import from a lower room to a higher one, as ``"a -> b"``."""
    found = []
    for path in sorted(ROOT.rglob("*.py")):
        here = _module(path)
        for target in sorted(_imports(path)):
            if _layer(target) > _layer(here):
                found.append(f"{here} -> {target}")
    return found


def test_no_module_imports_from_a_higher_layer():
    assert upward_imports() == []


def test_the_layer_check_sees_an_upward_import(tmp_path, monkeypatch):
    bad = ROOT / "models" / "_upward_probe.py"
    bad.write_text("from ..widgets import Explorer\n")
    try:
        assert "vitlens.models._upward_probe -> vitlens.widgets" in upward_imports()
    finally:
        bad.unlink()


#: the public API (``vitlens/__init__.py``): notebooks, docs and users rely on these names
PUBLIC = {
    "Compare", "Explorer", "HeadGrid", "ModelView", "TokenCurves", "KEEP_GROUPS", "METHODS",
    "CaptureError", "CaptureFormatError", "DeviceError", "ExportError", "ImageError", "ModelLoadError",
    "OptionError", "PrecisionWarning", "RandomWeightsWarning", "SimilarityHead", "ResumeError", "StorageError",
    "StoreLockedError", "TargetError", "UnsupportedModelError", "VitlensError", "capture", "datasets",
    "evaluate", "explain", "figures", "methods", "normalize", "to_pixels", "with_head", "widgets",
    "load_model", "metrics", "models", "open", "plot", "save", "registry", "HEAD_STATS", "head_stats", "stats", "HeadAtlas",
}


def test_public_names_are_all_still_exported():
    assert PUBLIC <= set(vitlens.__all__)
    missing = [n for n in vitlens.__all__ if not hasattr(vitlens, n)]
    assert missing == []
