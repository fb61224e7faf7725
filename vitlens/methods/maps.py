"""Turning propagated rows into labeled maps; pixels and normalisation."""

from __future__ import annotations

import warnings
from typing import Any, Callable, Mapping

import numpy as np
import torch
import xarray as xr

from ..errors import OptionError
from ..capture.attrs import attr_value
from .operators import CaptureView, StageView, Step, merge_shares, propagate


def token_map(
    cv: CaptureView,
    values: torch.Tensor,
    method: str,
    options: Mapping[str, Any],
    layers: list[int] | None = None,
    stage: StageView | None = None,
) -> xr.DataArray:
    """(B, gh, gw) or (B, L, gh, gw) → DataArray (sample, [layer,] y, x) with attrs.

    The grid is the first stage's unless ``stage`` is given. float64 values (the
    propagation methods) give a float64 map, anything else float32.
    """
    grid_stage = stage or cv.stages[0]
    gh, gw = grid_stage.grid
    dims: tuple[str, ...] = ("sample", "y", "x")
    coords: dict[str, Any] = {"sample": cv.tree["sample"].values, "y": np.arange(gh), "x": np.arange(gw)}
    if values.ndim == 4:
        dims = ("sample", "layer", "y", "x")
        coords["layer"] = np.asarray(layers, dtype=np.int64)
    attrs = {
        "method": method,
        **{k: attr_value(v) for k, v in options.items()},
        "grid": list(grid_stage.grid),
        "stride": list(grid_stage.stride),
        "input_size": list(cv.tree.attrs["input_size"]),
        "model": cv.tree.attrs.get("model", ""),
    }
    # float64 stays float64: under an average read-out the class-specific part of a
    # propagated map can be below float32 resolution of its constant part
    dtype = np.float64 if values.dtype == torch.float64 else np.float32
    da = xr.DataArray(values.detach().cpu().numpy().astype(dtype), dims=dims, coords=coords, name=method, attrs=attrs)
    if "target" in cv.tree:
        da = da.assign_coords(target=("sample", cv.tree["target"].values))
    if "source" in cv.tree.coords:  # the image files the samples were read from
        da = da.assign_coords(source=("sample", np.atleast_1d(cv.tree["source"].values)))
    return da


def chain_map(
    cv: CaptureView,
    steps: Mapping[int, Step],
    layers: list[int],
    per_layer: bool,
    *,
    final: Callable[[torch.Tensor], torch.Tensor] | None = None,
    merge: str = "uniform",
    drop_identity: bool = False,
) -> tuple[torch.Tensor, list[int] | None]:
    """The read-out map of the product, or one cumulative map after each selected block."""
    kw = {"final": final, "shares": merge_shares(cv, merge), "drop_identity": drop_identity}
    if not per_layer:
        return propagate(cv, steps, layers[-1], **kw), None
    maps = [propagate(cv, {l: s for l, s in steps.items() if l <= top}, top, **kw) for top in layers]
    return torch.stack(maps, 1), layers


def finish(
    cv: CaptureView,
    steps: Mapping[int, Step],
    layers: list[int],
    method: str,
    options: dict[str, Any],
    *,
    per_layer: bool = False,
    merge: str = "uniform",
    by_stage: bool = False,
    final: Callable[[torch.Tensor], torch.Tensor] | None = None,
    identity_path: str = "keep",
) -> xr.DataArray | xr.Dataset:
    """Propagate ``steps`` and label the result (the common tail of every chain method).

    ``by_stage=True`` returns a Dataset with each stage's map on its own grid
    (``stage0`` … ; ViT has one stage) instead of the first-stage map.
    ``identity_path="drop"``: the map of the product's off-identity part, the
    part that crossed at least one attention term (computed directly, see
    :func:`~vitlens.methods.operators.propagate`).
    """
    options = {**options, "per_layer": per_layer, "merge": merge, "by_stage": by_stage}
    drop = identity_path == "drop"
    if by_stage:
        if per_layer:
            raise OptionError("by_stage=True gives one map per stage; it does not combine with per_layer=True.")
        collect: dict[str, torch.Tensor] = {}
        propagate(cv, steps, layers[-1], final=final, shares=merge_shares(cv, merge), collect=collect,
                  drop_identity=drop)
        out = xr.Dataset()
        for stage in cv.stages:
            if stage.name in collect:
                da = token_map(cv, collect[stage.name], method, options, stage=stage)
                out[stage.name] = da.rename({"y": f"y_{stage.name}", "x": f"x_{stage.name}"})
        out.attrs = {"method": method, **{k: attr_value(v) for k, v in options.items()}}
        return out
    values, per = chain_map(cv, steps, layers, per_layer, final=final, merge=merge, drop_identity=drop)
    return token_map(cv, values, method, options, per)


def to_pixels(maps: xr.DataArray, size: int | tuple[int, int] | None = None) -> xr.DataArray:
    """Upsample token-grid maps to pixels, bilinearly.

    Parameters
    ----------
    maps
        ``(sample, [layer,] y, x)`` maps from :func:`vitlens.explain`.
    size
        ``(H, W)`` in pixels; default: the model's input size from ``maps.attrs``.

    Examples
    --------
    >>> import numpy as np, xarray as xr, vitlens as vl
    >>> m = xr.DataArray(np.eye(2)[None], dims=("sample", "y", "x"))
    >>> vl.to_pixels(m, 4).shape
    (1, 4, 4)
    """
    if size is None:
        if "input_size" not in maps.attrs:
            raise OptionError("to_pixels needs size=(H, W) for maps without an 'input_size' attribute.")
        size = tuple(maps.attrs["input_size"][-2:])
    if isinstance(size, (int, np.integer)):
        size = (int(size), int(size))
    h, w = int(size[0]), int(size[1])
    lead = [d for d in maps.dims if d not in ("y", "x")]
    arr = maps.transpose(*lead, "y", "x")
    dtype = np.float64 if arr.dtype == np.float64 else np.float32  # keep a float64 map's resolution
    t = torch.from_numpy(np.asarray(arr.values, dtype=dtype))
    flat = t.reshape(-1, 1, *t.shape[-2:])
    up = torch.nn.functional.interpolate(flat, size=(h, w), mode="bilinear", align_corners=False)
    up = up.reshape(*t.shape[:-2], h, w).numpy()
    coords = {d: arr[d] for d in lead if d in arr.coords}
    for name, c in arr.coords.items():
        if name not in ("y", "x") and set(c.dims) <= set(lead):
            coords[name] = c
    out = xr.DataArray(up, dims=(*lead, "y", "x"), coords={**coords, "y": np.arange(h), "x": np.arange(w)},
                       name=maps.name, attrs={**maps.attrs, "pixels": [h, w]})
    return out


def minmax(values: np.ndarray, axis: int | tuple[int, ...] = (-2, -1)) -> np.ndarray:
    """The one min-max rule: each map (over ``axis``) to [0, 1]; a constant map becomes zeros.

    NaN entries are left out of the minimum and maximum and stay NaN. The dtype
    is kept (float64 keeps a tiny class-specific part of a map; see
    docs/METHODS.md, "Average read-out"). :func:`normalize` applies it to labeled
    maps; the metrics and the widgets call it on arrays.

    Examples
    --------
    >>> minmax(np.array([[1.0, 3.0], [2.0, 2.0]])).tolist()
    [[0.0, 1.0], [0.5, 0.5]]
    >>> minmax(np.array([[1.0, 3.0], [2.0, 2.0]]), axis=-1).tolist()
    [[0.0, 1.0], [0.0, 0.0]]
    """
    values = np.asarray(values)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN map has no minimum: it becomes zeros
        lo = np.nanmin(values, axis=axis, keepdims=True)
        span = np.nanmax(values, axis=axis, keepdims=True) - lo
    ok = span > 0
    out = np.where(ok, (values - lo) / np.where(ok, span, 1), 0)
    return out.astype(values.dtype, copy=False) if np.issubdtype(values.dtype, np.floating) else out


def normalize(maps: xr.DataArray) -> xr.DataArray:
    """Min-max normalise each map (per sample, and per layer if present) to [0, 1].

    Constant maps become all zeros (the rule is :func:`minmax`).

    Examples
    --------
    >>> import numpy as np, xarray as xr, vitlens as vl
    >>> m = xr.DataArray(np.array([[[1.0, 3.0]]]), dims=("sample", "y", "x"))
    >>> vl.normalize(m).values.tolist()
    [[[0.0, 1.0]]]
    """
    out = xr.apply_ufunc(minmax, maps, input_core_dims=[["y", "x"]], output_core_dims=[["y", "x"]],
                         dask="parallelized", output_dtypes=[np.result_type(maps.dtype, np.float32)]).transpose(*maps.dims)
    out.attrs = {**maps.attrs, "normalized": "minmax"}
    out.name = maps.name
    return out
