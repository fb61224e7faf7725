"""Explanation methods: pure functions of a capture (no model rerun).

``vl.explain(cap, method, **options)`` dispatches to one module per method;
shared maths lives in :mod:`.operators` (operator chains, Swin windows and
merges). The LRP rules used at capture time live with the model parts
(:mod:`vitlens.models.lrp_rules`); :mod:`.lrp` re-exports them.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

import numpy as np
import xarray as xr

from ..errors import OptionError
from . import lnstat as _lnstat_module
from .attention import attention
from .generic_attention import generic_attention
from .gradcam import gradcam
from .lnstat import lnstat
from .maps import normalize, to_pixels
from .rollout import rollout
from .tokentm import tokentm
from .transformer_attribution import transformer_attribution

METHODS: tuple[str, ...] = (
    "attention",
    "rollout",
    "gradcam",
    "transformer_attribution",
    "generic_attention",
    "lnstat",
    "tokentm",
)

_FUNCTIONS: dict[str, Callable[..., xr.DataArray]] = {
    "attention": attention,
    "rollout": rollout,
    "gradcam": gradcam,
    "transformer_attribution": transformer_attribution,
    "generic_attention": generic_attention,
    "lnstat": lnstat,
    "tokentm": tokentm,
}


def options_of(method: str) -> list[str]:
    """Keyword options a method takes."""
    return [p for p in inspect.signature(_FUNCTIONS[method]).parameters if p != "cap"]


def _sample_blocks(cap: xr.DataTree) -> list[tuple[int, int]] | None:
    """Chunk boundaries along ``sample`` if the capture is dask-backed, else None."""
    chunks = None
    for node in cap.subtree:
        for var in node.to_dataset(inherit=False).data_vars.values():
            if var.chunks is not None and "sample" in var.dims:
                sizes = var.variable.chunksizes["sample"]  # the data only: coords may chunk differently
                if chunks is None or len(sizes) > len(chunks):
                    chunks = sizes
    if chunks is None:
        return None
    edges = np.cumsum((0, *chunks))
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])]


def _explain_block(cap: xr.DataTree, method: str, options: dict[str, Any]) -> xr.DataArray | xr.Dataset:
    return explain(cap.load(), method, **options)


def explain(cap: xr.DataTree, method: str = "all", **options: Any) -> xr.DataArray | xr.Dataset:
    """Compute an explanation map from a capture, without running the model again.

    Parameters
    ----------
    cap
        A capture from :func:`vitlens.capture` (or :func:`vitlens.open`).
    method
        One of :data:`vitlens.METHODS`, or ``"all"`` for a Dataset with one
        variable per method (options apply to the methods that take them).
    **options
        The method's options (``layers``, ``heads``, ``per_layer``,
        ``start_layer``, and its documented variants); recorded in ``attrs``.

    Returns
    -------
    xarray.DataArray
        ``(sample, y, x)`` on the token grid (Swin: the first-stage grid), or
        ``(sample, layer, y, x)`` with ``per_layer=True``.

    Examples
    --------
    >>> import numpy as np, timm, vitlens as vl
    >>> model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=3)
    >>> cap = vl.capture(model, np.zeros((2, 32, 32, 3)))
    >>> maps = vl.explain(cap, "all")
    >>> sorted(maps.data_vars) == sorted(vl.METHODS)
    True
    """
    blocks = _sample_blocks(cap) if isinstance(cap, xr.DataTree) else None
    if blocks is not None:
        # lazy (dask-backed) capture: one task per sample chunk, each loading only
        # its chunk; runs on a dask.distributed Client's workers when one is active
        import dask

        parts = [dask.delayed(_explain_block)(cap.isel(sample=slice(a, b)), method, options) for a, b in blocks]
        results = dask.compute(*parts)
        out = xr.concat(results, "sample", combine_attrs="override")
        return out
    if method == "all":
        out = {}
        for name in METHODS:
            accepted = {k: v for k, v in options.items() if k in options_of(name)}
            if name == "gradcam" and "layers" in accepted and not isinstance(accepted["layers"], int):
                accepted.pop("layers")
            out[name] = _FUNCTIONS[name](cap, **accepted)
        unused = set(options) - {o for n in METHODS for o in options_of(n)}
        if unused:
            raise OptionError(f"no method takes {sorted(unused)}.")
        ds = xr.Dataset({n: da.drop_attrs() if hasattr(da, "drop_attrs") else da for n, da in out.items()})
        for n, da in out.items():
            ds[n].attrs = da.attrs
        ds.attrs = {"methods": list(METHODS)}
        return ds
    if method not in _FUNCTIONS:
        import difflib

        close = difflib.get_close_matches(str(method), METHODS, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise OptionError(f"unknown method {method!r}; choose from {list(METHODS)} or 'all'.{hint}")
    allowed = options_of(method)
    unknown = set(options) - set(allowed)
    if unknown:
        raise OptionError(f"{method} takes no option(s) {sorted(unknown)}; its options are {allowed}.")
    return _FUNCTIONS[method](cap, **options)


statistic_maps = _lnstat_module.statistic_maps

__all__ = ["METHODS", "explain", "normalize", "options_of", "statistic_maps", "to_pixels", *METHODS]
