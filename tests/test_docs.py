"""The user documentation speaks to users: no notes about the project's own issue tracker."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_user_docs_carry_no_internal_issue_notes():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    assert len(pages) >= 3
    notes = [f"{p.name}: {m.group(0)}" for p in pages
             for m in re.finditer(r"\((?:see )?issues? #?\d+[^)]*\)|(?:before|since|after) issue #?\d+", p.read_text())]
    assert not notes, notes
