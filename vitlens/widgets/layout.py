"""What the widgets need on top of a capture's layout: query tokens, heads, windows, outlines.

The layout itself (stages, grids, strides, windows, prefix tokens) has one reader,
:func:`vitlens.capture.layout.capture_layout`. Widgets draw every map on the
*first-stage* token grid (ViT: the only grid; Swin: the finest); a token of a coarser
stage covers ``factor × factor`` first-stage tokens and its value is repeated over
that block (nearest-neighbour), the same convention as
:func:`vitlens.methods.statistic_maps`. A *query* is a patch ``(row, col)`` on the
first-stage grid, or ``None`` for the read-out token (CLS).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
import xarray as xr

from ..capture.layout import CaptureLayout, Query, StageLayout, capture_layout, missing_variable
from ..errors import OptionError

#: Selected heads per stage index (a stage with an empty set contributes nothing).
HeadChoice = Mapping[int, frozenset[int]]


def explorable_layout(cap: xr.DataTree) -> CaptureLayout:
    """The capture's layout (:func:`~vitlens.capture.layout.capture_layout`), for a capture that holds attention."""
    layout = capture_layout(cap)
    if "attention" not in cap[layout.first.name]:
        raise missing_variable(cap, "attention", layout.first.name)
    return layout


def check_view(layout: CaptureLayout, cap: xr.DataTree, layer: int | None, sample: int) -> int:
    """The layer to open a widget on (default: the last), after checking ``layer`` and ``sample``."""
    layers = layout.layers
    if layer is None:
        layer = layers[-1]
    layout.check_layers([layer])
    n = int(cap["sample"].size)
    if not 0 <= sample < n:
        raise OptionError(f"sample={sample}: this capture has samples 0..{n - 1}.")
    return int(layer)


def checked_query(layout: CaptureLayout, query: Query) -> Query:
    """``query`` as ``None`` (CLS) or an in-grid ``(row, col)`` of ints; what to do otherwise."""
    if query is None:
        if layout.default_query() is not None:
            raise OptionError("this model has no CLS token; select a patch (row, col) as the query.")
        return None
    row, col = (int(v) for v in query)
    gh, gw = layout.grid
    if not (0 <= row < gh and 0 <= col < gw):
        raise OptionError(f"patch ({row}, {col}) is outside the {gh}×{gw} token grid; rows 0..{gh - 1}, cols 0..{gw - 1}.")
    return (row, col)


def initial_query(layout: CaptureLayout, query: Query | str) -> Query:
    """A widget's ``query=`` option: ``"default"``, ``None`` (CLS) or a patch ``(row, col)``."""
    if isinstance(query, str):
        if query != "default":
            raise OptionError(f"query={query!r}; pass 'default', None (the CLS token) or a patch (row, col).")
        return layout.default_query()
    return checked_query(layout, query)


def patch_at(layout: CaptureLayout, x: float, y: float) -> tuple[int, int]:
    """The first-stage patch ``(row, col)`` under a click at pixel ``(x, y)`` of a panel (clamped to the grid).

    Examples
    --------
    >>> import numpy as np, timm, vitlens as vl
    >>> model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=3, depth=1)
    >>> patch_at(capture_layout(vl.capture(model, np.zeros((1, 32, 32, 3)), grads=False)), 27.5, 3.5)
    (0, 3)
    """
    sy, sx = layout.stride
    gh, gw = layout.grid
    col = int(round((x - (sx - 1) / 2) / sx))
    row = int(round((y - (sy - 1) / 2) / sy))
    return min(max(row, 0), gh - 1), min(max(col, 0), gw - 1)


def query_token(layout: CaptureLayout, stage: StageLayout, query: Query) -> int:
    """Token index (in ``stage``) of a query on the first-stage grid; ``None`` → CLS (token 0)."""
    if query is None:
        if stage.num_prefix == 0:
            raise OptionError("this model has no CLS token; select a patch (row, col) as the query.")
        return 0
    row, col = query
    gh, gw = layout.grid
    if not (0 <= row < gh and 0 <= col < gw):
        raise OptionError(f"patch ({row}, {col}) is outside the {gh}×{gw} token grid; rows 0..{gh - 1}, cols 0..{gw - 1}.")
    r, c = row // stage.factor, col // stage.factor
    return stage.num_prefix + r * stage.grid[1] + c


def heads_option(layout: CaptureLayout, choice: HeadChoice) -> None | list[int] | dict[int, list[int]]:
    """The ``heads=`` option of :func:`vitlens.explain` for a per-stage head choice.

    ``None`` when every head is selected; a list for a single-stage (ViT) capture;
    otherwise a dict mapping each layer to its stage's heads.
    """
    if all(len(choice[s.index]) == s.num_heads for s in layout.stages):
        return None
    if len(layout.stages) == 1:
        return sorted(choice[layout.first.index])
    return {l: sorted(choice[s.index]) for s in layout.stages for l in s.layers if choice[s.index]}


def usable_layers(layout: CaptureLayout, choice: HeadChoice) -> list[int]:
    """Layers that can be aggregated: every block before the first stage with no head selected."""
    out: list[int] = []
    for stage in layout.stages:
        if not choice[stage.index]:
            break
        out.extend(stage.layers)
    return out


def upsample(values: np.ndarray, factor: int, grid: tuple[int, int] | None = None) -> np.ndarray:
    """Repeat a stage-grid map ``(..., h, w)`` onto the first-stage ``grid``.

    A stage merged from an odd-sided grid hangs over the image edge by part of a
    token: the repeated map is cropped to ``grid``.

    Examples
    --------
    >>> upsample(np.array([[1, 2], [3, 4]]), 2, (3, 3)).tolist()
    [[1, 1, 2], [1, 1, 2], [3, 3, 4]]
    """
    if factor > 1:
        values = np.repeat(np.repeat(values, factor, -2), factor, -1)
    return values if grid is None else values[..., : grid[0], : grid[1]]


def window_ids(layout: CaptureLayout, layer: int, window_token: np.ndarray) -> np.ndarray:
    """Window index of every first-stage token at ``layer`` (Swin), as a grid."""
    stage = layout.stage_of(layer)
    ids = np.empty(stage.grid[0] * stage.grid[1], dtype=np.int64)
    for w, tokens in enumerate(window_token):
        ids[tokens[tokens >= 0]] = w  # padded positions (-1) hold no token
    return upsample(ids.reshape(stage.grid), stage.factor, layout.grid)


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """``[start, stop)`` of every run of True in a 1-d boolean array."""
    edges = np.diff(np.concatenate([[0], mask.astype(np.int8), [0]]))
    return list(zip(np.flatnonzero(edges == 1).tolist(), np.flatnonzero(edges == -1).tolist(), strict=True))


def window_edges(ids: np.ndarray, stride: tuple[int, int]) -> tuple[list[float | None], list[float | None]]:
    """Line segments (pixel coordinates, ``None``-separated) between tokens of different windows.

    Adjacent cut cells are merged into one segment, so a grid of windows costs a
    few dozen points, not one per token.

    Examples
    --------
    >>> window_edges(np.array([[0, 1], [0, 1]]), (4, 4))
    ([3.5, 3.5, None], [-0.5, 7.5, None])
    """
    sy, sx = stride
    xs: list[float | None] = []
    ys: list[float | None] = []
    gh, gw = ids.shape
    for r in range(1, gh):
        for start, stop in _runs(ids[r] != ids[r - 1]):
            xs += [start * sx - 0.5, stop * sx - 0.5, None]
            ys += [r * sy - 0.5, r * sy - 0.5, None]
    for c in range(1, gw):
        for start, stop in _runs(ids[:, c] != ids[:, c - 1]):
            xs += [c * sx - 0.5, c * sx - 0.5, None]
            ys += [start * sy - 0.5, stop * sy - 0.5, None]
    return xs, ys


def patch_outline(layout: CaptureLayout, layer: int, query: Query) -> tuple[list[float], list[float]]:
    """Closed square (pixel coordinates) around the query's token at ``layer``'s stage."""
    if query is None:
        return [], []
    stage = layout.stage_of(layer)
    f = stage.factor
    sy, sx = layout.stride
    gh, gw = layout.grid
    r0, c0 = (query[0] // f) * f, (query[1] // f) * f
    y0, y1 = r0 * sy - 0.5, min(r0 + f, gh) * sy - 0.5  # an edge token of an odd merge is cut by the image
    x0, x1 = c0 * sx - 0.5, min(c0 + f, gw) * sx - 0.5
    return [x0, x1, x1, x0, x0], [y0, y0, y1, y1, y0]


def parse_heads(layout: CaptureLayout, heads: None | Iterable[int] | Mapping[int, Iterable[int]]) -> dict[int, frozenset[int]]:
    """A user's ``heads=`` (None, heads for every stage, or stage → heads) as a per-stage choice."""
    choice = layout.all_heads()
    if heads is None:
        return choice
    if isinstance(heads, Mapping):
        items = {int(k): v for k, v in heads.items()}
    else:
        picked = list(heads)
        items = {s.index: picked for s in layout.stages}
    for index, picked in items.items():
        if index not in choice:
            raise OptionError(f"heads: stage {index} is not in this capture (stages 0..{len(layout.stages) - 1}).")
        n = layout.stages[index].num_heads
        hs = frozenset(int(h) for h in picked)
        bad = sorted(h for h in hs if not 0 <= h < n)
        if bad:
            raise OptionError(f"heads {bad} are out of range in stage {index}, which has heads 0..{n - 1}.")
        choice[index] = hs
    return choice
