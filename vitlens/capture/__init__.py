"""Capture: the only layer that touches a model (hooks), and captures on disk."""

from __future__ import annotations

from .api import EXTRA_GROUPS, KEEP_GROUPS, capture
from .interventions import ABLATIONS, head_importance, patch
from .store import Verification, open, save, verify  # noqa: A004 - public names

__all__ = ["ABLATIONS", "EXTRA_GROUPS", "KEEP_GROUPS", "Verification", "capture", "head_importance", "open", "patch",
           "save", "verify"]
