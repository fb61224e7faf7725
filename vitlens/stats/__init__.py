"""Head statistics: one number per image, block and head, as pure functions of a capture.

Each statistic is one module that registers itself with
:func:`vitlens.registry.register_stat` (name, title, unit, caption, whether it
needs gradients, reference); :data:`HEAD_STATS` lists them in registration
order. :func:`head_stats` returns one as ``(sample, layer, head)``: read from a
reduced store that holds it (``vl.capture(..., stats=...)`` writes
``/stats/<name>``), otherwise computed from the capture's attention — the same
function a reduced capture runs on each batch, so both give the same numbers.
Definitions: docs/METHODS.md, "Head statistics".
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import xarray as xr

from ..errors import CaptureFormatError, OptionError
from ..registry import STAT_INFO, StatInfo, register_stat, resolve_stats, stat_info

# importing a statistic's module registers it: this order is the order of vl.HEAD_STATS
from .attention_distance import attention_distance
from .attention_entropy import attention_entropy
from .prefix_attention import prefix_attention
from .gradient_weight import gradient_weight
from .ablation_effect import ablation_effect  # read from what capture recorded (one forward per head)
from .rows import holds_groups, stage_nodes

#: Names of the registered head statistics, in registration order (see :data:`STAT_INFO`).
HEAD_STATS: tuple[str, ...] = tuple(STAT_INFO)

#: Where a reduced store keeps its statistics (``/stats/<name>``).
STATS_GROUP = "stats"


def stored_stats(cap: xr.DataTree) -> list[str]:
    """The head statistics a (reduced) capture holds under ``/stats``, in its order."""
    if STATS_GROUP not in cap.children:
        return []
    node = cap[STATS_GROUP]
    return [str(v) for v in node.to_dataset(inherit=False).data_vars] + [str(c) for c in node.children]


def _stored(cap: xr.DataTree, name: str) -> xr.DataArray:
    node = cap[STATS_GROUP]
    da = node[name] if name in node.to_dataset(inherit=False).data_vars else next(iter(node[name].data_vars.values()))
    return da


def _sample_blocks(cap: xr.DataTree) -> list[tuple[int, int]] | None:
    from ..methods import _sample_blocks as blocks

    return blocks(cap)


def _compute(cap: xr.DataTree, name: str, options: dict[str, Any]) -> np.ndarray:
    return np.asarray(stat_info(name).function(cap.load(), **options).values)


def head_stats(cap: xr.DataTree | str | os.PathLike, name: str, **options: Any) -> xr.DataArray:
    """One head statistic of every image, block and head: ``(sample, layer, head)``.

    Parameters
    ----------
    cap
        A capture (:func:`vitlens.capture`), a store opened with :func:`vitlens.open`,
        or the path of a store. A reduced store (``vl.capture(..., stats=[...])``)
        gives the values it holds; otherwise they are computed from the attention
        (and, for :attr:`~vitlens.registry.StatInfo.needs_gradients`, its gradients).
    name
        One of :data:`HEAD_STATS` (``vl.HEAD_STATS``).
    **options
        The statistic's options (none of the shipped ones takes any).

    Returns
    -------
    xarray.DataArray
        ``(sample, layer, head)`` with a ``stage`` coordinate on ``layer``; lazy
        (dask) on a lazily opened store: ``.mean("sample")`` is the dataset view,
        ``.compute()`` runs it. NaN marks a head the block does not have (Swin
        stages with fewer heads) and a head whose statistic does not exist (e.g.
        no attention on any patch). ``attrs``: ``stat``, ``unit``.

    Examples
    --------
    >>> import numpy as np, timm, vitlens as vl
    >>> model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=3, depth=2)
    >>> cap = vl.capture(model, np.random.default_rng(0).random((4, 32, 32, 3)))
    >>> vl.HEAD_STATS
    ('attention_distance', 'attention_entropy', 'prefix_attention', 'gradient_weight', 'ablation_effect')
    >>> d = vl.head_stats(cap, "attention_distance")
    >>> d.dims, d.shape, d.attrs["unit"]
    (('sample', 'layer', 'head'), (4, 2, 3), 'px')
    >>> d.mean("sample").shape  # the dataset view: layers x heads
    (2, 3)
    """
    if isinstance(cap, (str, os.PathLike)):
        from ..capture import open as open_capture

        cap = open_capture(cap)
    if not isinstance(cap, xr.DataTree) or "vitlens_version" not in cap.attrs:
        raise CaptureFormatError(
            f"head_stats takes a capture from vl.capture or vl.open (an xarray.DataTree); got {type(cap).__name__}."
        )
    from ..methods.selection import explainable

    cap = explainable(cap)  # cap.sel(sample=k): one image, still (sample, layer, head)
    (name,) = resolve_stats([name])
    info = stat_info(name)
    if name in stored_stats(cap):
        if options:
            raise OptionError(f"this store holds {name!r} as it was captured (without options); compute it with "
                              f"options from a capture that keeps the attention (keep='all').")
        return _labeled(_stored(cap, name), info)
    _check_computable(cap, name, info)
    blocks = _sample_blocks(cap)
    if blocks is None:
        return _labeled(info.function(cap, **options), info)
    # lazy store: one dask task per sample chunk, loading only that chunk
    import dask
    import dask.array as da

    first = cap.isel(sample=slice(*blocks[0]))
    template = info.function(first.load(), **options)  # the labels (and a check that it runs)
    parts = [da.from_delayed(dask.delayed(_compute)(cap.isel(sample=slice(a, b)), name, options),
                             shape=(b - a, *template.shape[1:]), dtype=template.dtype) for a, b in blocks]
    coords = {k: v for k, v in template.coords.items() if "sample" not in v.dims}
    return _labeled(xr.DataArray(da.concatenate(parts, axis=0), dims=template.dims, attrs=template.attrs,
                                 coords={**coords, "sample": cap["sample"].values}), info)


def _labeled(values: xr.DataArray, info: StatInfo) -> xr.DataArray:
    """The statistic named and labeled with its registration (whichever module computed it)."""
    return values.rename(info.name).assign_attrs(stat=info.name, unit=info.unit)


def _check_computable(cap: xr.DataTree, name: str, info: StatInfo) -> None:
    """A clear error when the capture cannot give ``name``: what it holds and the call that would."""
    missing = sorted(g for g in info.groups() if not holds_groups(cap, [g]))
    if not missing:
        return
    held = stored_stats(cap)
    have = f"it stores the statistics {held}" if held else "it stores no statistics"
    grads = " with grads=True" if "attention_grad" in missing else ""
    raise CaptureFormatError(
        f"this capture holds neither {name!r} nor the {', '.join(missing)} it is computed from ({have}); capture "
        f"again with vl.capture(model, images, stats=[{name!r}]){grads}, or keep {missing} (keep='all' for the "
        f"attention groups)."
    )


__all__ = ["HEAD_STATS", "STAT_INFO", "StatInfo", "ablation_effect", "attention_distance", "attention_entropy", "gradient_weight",
           "head_stats", "holds_groups", "prefix_attention", "register_stat", "stage_nodes", "stored_stats"]
