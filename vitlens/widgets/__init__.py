"""Live widgets for Jupyter: :class:`Explorer`, :class:`HeadGrid`, :class:`ModelView`,
:class:`TokenCurves`, :class:`Compare` and :class:`HeadAtlas` (a dataset's heads).

Widgets only read a capture (and call :func:`vitlens.explain`); they never touch
hooks. The one exception is explaining another class (:class:`Explorer`,
:class:`Compare`), which recaptures one sample with :func:`vitlens.capture`
when given the model. Their state lives in traits, so :func:`link` (plain
``traitlets.link``) makes two widgets of one capture follow each other.
"""

from __future__ import annotations

from ..errors import ExportError
from .base import link
from .compare import Compare
from .explorer import Explorer
from .export import export_target
from .head_atlas import HeadAtlas
from .head_grid import HeadGrid
from .model_view import ModelView
from .token_curves import TokenCurves

__all__ = ["Compare", "Explorer", "ExportError", "HeadAtlas", "HeadGrid", "ModelView", "TokenCurves", "export_target", "link"]
