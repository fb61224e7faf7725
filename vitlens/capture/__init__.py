"""Capture: the only layer that touches a model (hooks), and captures on disk."""

from __future__ import annotations

from .api import KEEP_GROUPS, capture
from .store import open, save  # noqa: A004 - public names

__all__ = ["KEEP_GROUPS", "capture", "open", "save"]
