"""The transformers rows of docs/COVERAGE.md: every class an adapter lists is explained."""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")

from vitlens.coverage import transformers_classes as hf_catalog  # noqa: E402


@pytest.mark.parametrize("name", hf_catalog.classes())
def test_every_listed_transformers_class_is_explained(name):
    result = hf_catalog.check(name)
    assert result.status == "explained", result.reason
    assert result.leak <= hf_catalog.TOLERANCE


def test_the_section_counts_what_it_checked(monkeypatch):
    monkeypatch.setattr(hf_catalog, "classes", lambda: ["ViTForImageClassification", "NoSuchModel"])
    text = hf_catalog.section()
    assert "**1 of 2 classes explained.**" in text
    assert "| `NoSuchModel` | - | failed |" in text
