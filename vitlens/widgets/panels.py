"""What each widget panel shows, computed from a capture (never the model).

Every function returns maps on the first-stage token grid (see
:mod:`vitlens.widgets.layout`). Slow-changing quantities (per-layer cumulative
maps, which depend on heads, statistic, method and class) are computed once by
:class:`PanelMaps` and cached; a layer-slider move is then an index.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import numpy as np
import xarray as xr

from ..capture.layout import missing_variable
from ..errors import OptionError, VitlensError
from ..registry import method_info
from ..methods import METHOD_INFO, explain, minmax, statistic_maps
from ..methods.options import CHOICES, check
from .layout import CaptureLayout, HeadChoice, Query, heads_option, query_token, upsample, usable_layers

#: LayerNorm statistics the widgets offer (``vl.explain(..., "lnstat", stat=...)``): the options table's.
STATISTICS = CHOICES["stat"]


def method_names(cap: xr.DataTree | None = None) -> tuple[str, ...]:
    """The methods the widgets offer: :data:`vitlens.METHODS` (the method registry's order), or those
    offered for ``cap``: AttnLRP and LeGrad only where it was made with their passes (a method that
    reads gradients of a ``grads=False`` capture stays offered; its panel says to capture again)."""
    if cap is None:
        return tuple(METHOD_INFO)
    from ..methods import explainable_methods, extra_groups

    can = set(explainable_methods(cap))
    return tuple(m for m in METHOD_INFO if m in can or not extra_groups([m]))


def normalized(values: np.ndarray) -> np.ndarray:
    """Min-max normalise one map to [0, 1] (a constant map becomes zeros), float32.

    The rule of :func:`vitlens.normalize` (:func:`vitlens.methods.minmax`), so all panels share one colour scale.

    Examples
    --------
    >>> normalized(np.array([[1.0, 3.0]])).tolist()
    [[0.0, 1.0]]
    """
    return np.nan_to_num(minmax(np.asarray(values, dtype=np.float32), axis=None))  # no NaN to the front end


def query_attention(
    cap: xr.DataTree,
    layout: CaptureLayout,
    sample: int,
    layer: int,
    heads: Sequence[int],
    query: Query,
) -> np.ndarray:
    """Attention of one query token to every patch at ``layer``, mean over ``heads``.

    ViT: ``attention.sel(layer=l, head=heads).mean("head").isel(sample=s, query=q)``
    with prefix keys dropped. Swin: the query's window row (found with
    ``window_token``), scattered back onto the stage grid (zeros outside the
    window). Returns ``(gh, gw)`` on the first-stage grid; zeros if no head.

    Examples
    --------
    >>> import numpy as np, timm, vitlens as vl
    >>> from vitlens.widgets.layout import capture_layout
    >>> model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=3)
    >>> cap = vl.capture(model, np.zeros((1, 32, 32, 3)))
    >>> query_attention(cap, capture_layout(cap), 0, 11, [0, 1], None).shape
    (4, 4)
    """
    if not len(heads):
        return np.zeros(layout.grid, dtype=np.float32)
    return head_attention(cap, layout, sample, layer, query, heads).mean(0)


def head_attention(
    cap: xr.DataTree,
    layout: CaptureLayout,
    sample: int,
    layer: int,
    query: Query,
    heads: Sequence[int] | None = None,
) -> np.ndarray:
    """:func:`query_attention` of each head separately: ``(head, gh, gw)`` (default: every head)."""
    stage = layout.stage_of(layer)
    node = cap[stage.name]
    heads = list(range(stage.num_heads)) if heads is None else [int(h) for h in heads]
    att = node["attention"].isel(sample=sample).sel(layer=layer, head=heads)
    token = query_token(layout, stage, query)
    gh, gw = stage.grid
    if stage.window is None:
        keys = np.asarray(att.isel(query=token).transpose("head", "key").values, dtype=np.float32)
        values = keys[:, stage.num_prefix :].reshape(len(heads), gh, gw)
    else:
        wt = node["window_token"].sel(layer=layer).values  # (window, position)
        window, position = (int(i[0]) for i in np.nonzero(wt == token))
        keys = att.isel(window=window, query=position).transpose("head", "key").values
        flat = np.zeros((len(heads), gh * gw), dtype=np.float32)
        real = wt[window] >= 0  # attention to padded positions belongs to no patch
        flat[:, wt[window][real]] = keys[:, real]
        values = flat.reshape(len(heads), gh, gw)
    return upsample(values, stage.factor, layout.grid)


def _per_layer_array(maps: xr.DataArray, layers: Sequence[int]) -> np.ndarray:
    """(sample, layer, y, x) for every layer in ``layers``; zeros where a layer is missing."""
    values = np.asarray(maps.transpose("sample", "layer", "y", "x").values, dtype=np.float32)
    have = {int(l): i for i, l in enumerate(maps["layer"].values)}
    out = np.zeros((values.shape[0], len(layers), *values.shape[2:]), dtype=np.float32)
    for j, l in enumerate(layers):
        if l in have:
            out[:, j] = values[:, have[l]]
    return out


def fusion_maps(cap: xr.DataTree, layout: CaptureLayout, heads: HeadChoice, stat: str, grad: bool = False) -> np.ndarray:
    """``lnstat`` accumulated up to each layer: ``(sample, layer, gh, gw)`` over all layers.

    ``vl.explain(cap, "lnstat", heads=..., stat=stat, grad=grad, per_layer=True)``;
    ``grad=True`` is the gradient-weighted reading (class-specific). Layers after a
    stage with no selected head are zeros.
    """
    layers = usable_layers(layout, heads)
    if not layers:
        return np.zeros((cap["sample"].size, len(layout.layers), *layout.grid), dtype=np.float32)
    maps = explain(cap, "lnstat", heads=heads_option(layout, heads), stat=stat, grad=grad, per_layer=True,
                   layers=layers)
    return _per_layer_array(maps, layout.layers)


def statistic_array(cap: xr.DataTree, stat: str) -> np.ndarray:
    """The LayerNorm-input statistic of every layer: ``(sample, layer, gh, gw)``."""
    check("", stat=stat)  # the options table's statistics
    maps = statistic_maps(cap, stat=stat)
    return np.asarray(maps.transpose("sample", "layer", "y", "x").values, dtype=np.float32)


def method_options(layout: CaptureLayout, method: str) -> dict[str, Any]:
    """Options the widgets pass to :func:`vitlens.explain` besides heads and layers.

    The method's registered defaults for this capture's family and read-out
    (e.g. gradcam ``on="features"`` under an average read-out).
    """
    return METHOD_INFO[method].defaults_for(layout)


def layer_dependent(layout: CaptureLayout, method: str) -> bool:
    """Whether the method's map changes with the layer slider."""
    return METHOD_INFO[method].uses_layers(method_options(layout, method))


def method_maps(cap: xr.DataTree, layout: CaptureLayout, method: str, heads: HeadChoice) -> tuple[np.ndarray, int]:
    """One method's map at every layer: ``(sample, layer, gh, gw)``, and its first layer.

    Cumulative up to the layer (``per_layer=True``) for the propagation methods;
    the single block for ``attention`` and attention Grad-CAM; the final feature
    map (the same at every layer) for feature Grad-CAM. Layers before a method's
    ``start_layer`` are zeros.
    """
    info = method_info(method)  # the one reader of method names (did-you-mean hint)
    n = int(cap["sample"].size)
    layers = usable_layers(layout, heads)
    out = np.zeros((n, len(layout.layers), *layout.grid), dtype=np.float32)
    if not layers:
        return out, layout.layers[0]
    extra = method_options(layout, method)
    if not info.uses_layers(extra):  # one map for every layer (gradcam on the final feature map)
        single = explain(cap, method, **extra).transpose("sample", "y", "x").values
        out[:] = np.asarray(single, dtype=np.float32)[:, None]
        return out, layout.layers[0]
    opt = heads_option(layout, heads)
    if not info.per_layer:  # a single-block method: one call per block
        for j, l in enumerate(layout.layers):
            if l in layers:
                out[:, j] = explain(cap, method, layers=l, heads=opt, **extra).transpose("sample", "y", "x").values
        return out, layout.layers[0]
    if "heads" in info.options():  # (a method whose map is not made of heads, AttnLRP, takes none)
        extra = {**extra, "heads": opt}
    maps = explain(cap, method, per_layer=True, layers=layers, **extra)
    return _per_layer_array(maps, layout.layers), int(maps["layer"].values[0])


class PanelMaps:
    """A small least-recently-used cache of per-layer map stacks.

    Keys say what a stack depends on (panel, heads, statistic, method, class);
    values are ``(sample, layer, gh, gw)`` arrays.

    Examples
    --------
    >>> cache = PanelMaps(size=2)
    >>> cache.get(("a",), lambda: np.zeros(1)).shape
    (1,)
    """

    def __init__(self, size: int = 48) -> None:
        self.size = size
        self._items: OrderedDict[Hashable, Any] = OrderedDict()

    def get(self, key: Hashable, compute: Callable[[], Any]) -> Any:
        if key in self._items:
            self._items.move_to_end(key)
            return self._items[key]
        value = compute()
        self._items[key] = value
        if len(self._items) > self.size:
            self._items.popitem(last=False)
        return value

    def clear(self) -> None:
        self._items.clear()

    def __len__(self) -> int:
        return len(self._items)


def safe(compute: Callable[[], np.ndarray], shape: tuple[int, ...]) -> tuple[np.ndarray, str]:
    """Run ``compute``; on a vitlens error return zeros and the message (shown as the caption)."""
    try:
        return compute(), ""
    except VitlensError as exc:
        return np.zeros(shape, dtype=np.float32), str(exc)


#: Per-token quantities :func:`token_curves` reads across depth: (variable, LayerNorm, label).
CURVES = (
    ("token_norm", None, "token norm ‖x‖"),
    ("ln_std", "norm1", "LayerNorm std (norm1)"),
    ("ln_mean", "norm1", "LayerNorm mean (norm1)"),
)


def token_curves(cap: xr.DataTree, layout: CaptureLayout, sample: int, query: Query) -> dict[str, dict[str, np.ndarray]]:
    """One token's norm and LayerNorm statistics at every block, and the mean over patch tokens.

    Returns ``{label: {"layer": (L,), "token": (L,), "patches": (L,)}}`` over all
    layers of the capture (Swin: the stage token covering the query at each
    stage). Raises :class:`~vitlens.errors.CaptureFormatError` when the capture
    holds no norms or LayerNorm statistics.

    Examples
    --------
    >>> import numpy as np, timm, vitlens as vl
    >>> from vitlens.widgets.layout import capture_layout
    >>> model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=3, depth=2)
    >>> cap = vl.capture(model, np.zeros((1, 32, 32, 3)))
    >>> token_curves(cap, capture_layout(cap), 0, None)["token norm ‖x‖"]["token"].shape
    (2,)
    """
    out: dict[str, dict[str, list]] = {label: {"layer": [], "token": [], "patches": []} for _, _, label in CURVES}
    for stage in layout.stages:
        node = cap[stage.name]
        token = query_token(layout, stage, query)
        patch = np.flatnonzero(np.asarray(node["kind"].values) == "patch")
        for var, norm, label in CURVES:
            if var not in node:
                raise missing_variable(cap, var, stage.name)
            values = node[var].isel(sample=sample)
            if norm is not None:
                values = values.sel(norm=norm)
            values = np.asarray(values.transpose("layer", "token").values, dtype=np.float64)
            out[label]["layer"] += [int(l) for l in node["layer"].values]
            out[label]["token"] += values[:, token].tolist()
            out[label]["patches"] += values[:, patch].mean(1).tolist()
    return {label: {k: np.asarray(v) for k, v in d.items()} for label, d in out.items()}


def pooled(values: np.ndarray, factor: int) -> np.ndarray:
    """Mean over ``factor × factor`` blocks of the last two axes (cropping a remainder).

    Examples
    --------
    >>> pooled(np.arange(16.0).reshape(4, 4), 2).tolist()
    [[2.5, 4.5], [10.5, 12.5]]
    """
    if factor == 1:
        return values
    h, w = values.shape[-2:]
    h, w = h // factor * factor, w // factor * factor
    v = values[..., :h, :w]
    return v.reshape(*v.shape[:-2], h // factor, factor, w // factor, factor).mean(axis=(-3, -1))
