"""What the head atlas shows, computed from a capture or a store: the figures and the widget both read it.

:func:`summary` is the dataset view of one statistic (mean, spread and count per
block and head); :func:`extremes` the images where a head's statistic is highest
and lowest; :func:`examples` those images with the head's attention for one
query over each, read from the store's attention or, for a reduced store that
kept none, from a capture of just those images (that needs the model).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import xarray as xr

from ..capture.layout import Query, capture_layout
from ..errors import CaptureFormatError, OptionError
from .rows import attention_rows, holds_groups, stage_nodes

#: A query token: a patch ``(row, col)`` on the first-stage grid, or ``None`` for the first prefix token (CLS).



def summary(values: xr.DataArray) -> xr.Dataset:
    """The dataset view of a head statistic ``(sample, layer, head)``: ``mean``, ``std``, ``min``, ``max``, ``count``.

    Each is ``(layer, head)`` over the samples where the statistic exists (NaN
    where a block has no such head).

    Examples
    --------
    >>> import numpy as np, xarray as xr
    >>> v = xr.DataArray(np.arange(8.0).reshape(2, 2, 2), dims=("sample", "layer", "head"))
    >>> summary(v)["mean"].values.tolist()
    [[2.0, 3.0], [4.0, 5.0]]
    """
    values = values.load() if values.chunks is None else values.compute()
    with np.errstate(invalid="ignore"):
        out = xr.Dataset({"mean": values.mean("sample"), "std": values.std("sample"), "min": values.min("sample"),
                          "max": values.max("sample"), "count": values.count("sample")})
    out.attrs = dict(values.attrs)
    return out


@dataclass(frozen=True)
class Extremes:
    """The samples where one head's statistic is highest and lowest (positions along ``sample``)."""

    layer: int
    head: int
    highest: list[int]
    lowest: list[int]
    values: np.ndarray  # the statistic of every sample (NaN where it does not exist)

    def value(self, position: int) -> float:
        return float(self.values[position])


def extremes(values: xr.DataArray, layer: int, head: int, k: int = 4) -> Extremes:
    """The ``k`` samples with the highest and the ``k`` with the lowest statistic of ``(layer, head)``.

    Positions along ``sample`` (``values.isel(sample=...)``), best first; ties keep
    the samples' order; samples where the statistic does not exist are skipped.

    Examples
    --------
    >>> import numpy as np, xarray as xr
    >>> v = xr.DataArray(np.array([3.0, 1.0, 4.0, 1.5]).reshape(4, 1, 1), dims=("sample", "layer", "head"),
    ...                  coords={"layer": [0], "head": [0]})
    >>> e = extremes(v, 0, 0, k=2)
    >>> e.highest, e.lowest
    ([2, 0], [1, 3])
    """
    if k < 1:
        raise OptionError(f"k={k}: show at least one image (k ≥ 1).")
    column = values.sel(layer=layer, head=head)
    column = np.asarray(column.values if column.chunks is None else column.compute().values, dtype=np.float64)
    defined = np.flatnonzero(np.isfinite(column))
    if not defined.size:
        raise OptionError(f"block {layer} has no head {head} (or its statistic exists for no image); "
                          "choose a head the block has.")
    order = defined[np.argsort(column[defined], kind="stable")]
    top = defined[np.argsort(-column[defined], kind="stable")]
    return Extremes(int(layer), int(head), [int(s) for s in top[:k]], [int(s) for s in order[:k]], column)


def holds_attention(cap: xr.DataTree) -> bool:
    """Whether the capture (or store) kept the raw attention of every stage."""
    return holds_groups(cap, ["attention"])


def query_maps(cap: xr.DataTree, layer: int, head: int, query: Query) -> np.ndarray:
    """``(sample, gh, gw)``: head ``head``'s attention of ``query`` at ``layer`` over the patch keys.

    On the first-stage grid: a coarser Swin stage's token covers a block of
    first-stage tokens (its value repeated there; cropped where an odd merge
    hangs over the edge); outside the query's window the map is 0. ``query``
    ``None`` is the first prefix token (CLS).

    Examples
    --------
    >>> import numpy as np, timm, vitlens as vl
    >>> model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=3, depth=2)
    >>> cap = vl.capture(model, np.zeros((2, 32, 32, 3)), grads=False)
    >>> m = query_maps(cap, 1, 0, None)
    >>> m.shape, bool(np.allclose(m.sum((1, 2)) + cap["stage0"].attention[:, 1, 0, 0, 0], 1, atol=1e-5))
    ((2, 4, 4), True)
    """
    stages = stage_nodes(cap)
    name = capture_layout(cap).stage_of(layer).name  # the one message for a layer not in the capture
    stage = next(s for s in stages if s.name == name)
    first = stages[0]
    heads = stage.num_heads
    if not 0 <= head < heads:
        raise OptionError(f"block {layer} has heads 0..{heads - 1}; got head {head}.")
    fy, fx = (a // b for a, b in zip(stage.stride, first.stride, strict=True))
    if query is None:
        if stage.num_prefix == 0:
            raise OptionError("this model has no CLS token; choose a patch (row, col) as the query.")
        token = 0
    else:
        row, col = (int(v) for v in query)
        if not (0 <= row < first.grid[0] and 0 <= col < first.grid[1]):
            raise OptionError(f"query ({row}, {col}) is outside the {first.grid[0]}×{first.grid[1]} token grid.")
        token = stage.num_prefix + (row // fy) * stage.grid[1] + col // fx
    rows = attention_rows(stage, layer, queries="all")
    r = int(np.flatnonzero(rows.token == token)[0])
    keys = rows.key_token[r if rows.key_token.shape[0] > 1 else 0]
    patch = keys >= stage.num_prefix
    flat = np.zeros((rows.values.shape[0], stage.grid[0] * stage.grid[1]))
    flat[:, keys[patch] - stage.num_prefix] = rows.values[:, head, r][:, patch]
    maps = flat.reshape(-1, *stage.grid).repeat(fy, 1).repeat(fx, 2)
    return maps[:, : first.grid[0], : first.grid[1]]


def _source_images(cap: xr.DataTree, positions: Sequence[int], images: Any) -> Any:
    if "image" in cap.to_dataset(inherit=False):
        return np.asarray(cap["image"].isel(sample=list(positions)).values, dtype=np.float32)
    if images is None:
        raise CaptureFormatError("this store kept neither the attention nor the images: pass the images it was "
                                 "captured from, e.g. HeadAtlas(store, model, images=ds.image).")
    if isinstance(images, xr.DataArray | xr.Dataset):
        data = images["image"] if isinstance(images, xr.Dataset) else images
        return np.asarray(data.isel(sample=list(positions)).values)
    return [images[int(p)] for p in positions]


def examples(cap: xr.DataTree, positions: Sequence[int], layer: int, head: int, query: Query, *,
             model: Any = None, images: Any = None) -> tuple[np.ndarray, np.ndarray, xr.DataTree]:
    """The images at ``positions`` and head ``head``'s attention of ``query`` at ``layer`` over each.

    Returns ``(pictures (k, H, W, 3), maps (k, gh, gw), source)``, ``source`` the
    capture the maps were read from: ``cap`` itself when it kept the attention,
    otherwise a capture of just those images (``model`` needed; the images come
    from the store's ``image`` or from ``images``, the source it was captured from).
    """
    positions = [int(p) for p in positions]
    if holds_attention(cap):
        source = cap.isel(sample=positions).load()
    else:
        if model is None:
            raise CaptureFormatError("this store holds no attention, so showing a head's attention recaptures "
                                     "those images: pass the model, e.g. HeadAtlas(store, model).")
        from ..capture import capture

        source = capture(model, _source_images(cap, positions, images), keep=["attention"], grads=False,
                         progress=False)
    pictures = np.asarray(source["image"].values, dtype=np.float32)
    return pictures, query_maps(source, layer, head, query), source


def default_query(cap: xr.DataTree) -> Query:
    """CLS for a model read out from its CLS token, otherwise the centre patch (as the widgets choose).

    Examples
    --------
    >>> import numpy as np, timm, vitlens as vl
    >>> model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=3, depth=1)
    >>> default_query(vl.capture(model, np.zeros((1, 32, 32, 3)), grads=False)) is None
    True
    """
    return capture_layout(cap).default_query()
