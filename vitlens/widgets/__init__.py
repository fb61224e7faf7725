"""Live widgets for Jupyter: :class:`Explorer`, :class:`HeadGrid`, :class:`Compare`.

Widgets only read a capture (and call :func:`vitlens.explain`); they never touch
hooks. The one exception is explaining another class in :class:`Explorer`,
which recaptures one sample with :func:`vitlens.capture` when given the model.
"""

from __future__ import annotations

from .compare import Compare
from .explorer import Explorer
from .figure import ExportError
from .head_grid import HeadGrid

__all__ = ["Compare", "Explorer", "ExportError", "HeadGrid"]
