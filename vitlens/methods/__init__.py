"""Explanation methods: pure functions of a capture (no model rerun).

``vl.explain(cap, method, **options)`` dispatches to one module per method;
shared maths lives in :mod:`.operators` (operator chains, Swin windows and
merges), the chain methods' common options and pipeline in :mod:`.chain`. The
LRP rules used at capture time live with the model parts
(:mod:`vitlens.models.lrp_rules`); :mod:`.lrp` re-exports them. Each method registers
itself once (:mod:`.registry`); :data:`METHODS` and :data:`METHOD_INFO` list them.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import xarray as xr

from ..capture.reduced import holds_map, is_reduced, stored_map
from ..errors import CaptureFormatError, OptionError
# importing a method module registers it: this order is the order of vl.METHODS
from .attention import attention
from .rollout import rollout
from .gradcam import gradcam
from .transformer_attribution import transformer_attribution
from .generic_attention import generic_attention
from .lnstat import lnstat, statistic_maps
from .tokentm import tokentm
from .attnlrp import attnlrp
from .legrad import legrad
from .maps import minmax, normalize, to_pixels
from ..capture.layout import MissingVariableError, capture_options
from ..registry import CAPTURE_GROUPS, METHOD_INFO, MethodInfo, method_info, register_method, resolve_methods
from .selection import check_target, explainable

#: Names of the registered methods, in registration order (see :data:`METHOD_INFO`).
METHODS: tuple[str, ...] = tuple(METHOD_INFO)


def options_of(method: str) -> list[str]:
    """Keyword options a method takes."""
    return method_info(method).options()


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


def _explain_block(cap: xr.DataTree, method: Any, options: dict[str, Any]) -> xr.DataArray | xr.Dataset:
    return explain(cap.load(), method, **options)


def explain(cap: xr.DataTree, method: str | Sequence[str] = "all", **options: Any) -> xr.DataArray | xr.Dataset:
    """Compute an explanation map from a capture, without running the model again.

    Parameters
    ----------
    cap
        A capture from :func:`vitlens.capture` (or :func:`vitlens.open`).
    method
        One of :data:`vitlens.METHODS` for a DataArray; ``"all"`` or a list of
        names for a Dataset with one variable per method (options apply to the
        methods that take them). ``"all"`` leaves out the methods whose pass is
        made only when named in ``keep=`` (AttnLRP, LeGrad) unless the capture
        holds it (:func:`explainable_methods`). For a Dataset, methods whose
        inputs the capture does not hold (e.g. the gradient methods after
        ``grads=False``) are left out with a warning naming the fix, and listed
        in its ``attrs["left_out"]``.
    target
        Optional: the class to explain (index, name such as ``"star"``, or one
        per sample). Class-agnostic methods give their map for any class;
        class-specific ones need a capture made for that class (the error says
        how to make one). A sample selected with ``cap.sel(sample=k)`` works too.
    **options
        The method's options (``layers``, ``heads``, ``per_layer``,
        ``start_layer``, and its documented variants); recorded in ``attrs``.

    Returns
    -------
    xarray.DataArray or xarray.Dataset
        ``(sample, y, x)`` on the token grid (Swin: the first-stage grid), or
        ``(sample, layer, y, x)`` with ``per_layer=True``; a Dataset of them for
        ``"all"`` or a list.

    Notes
    -----
    A reduced capture (``vl.capture(..., maps=...)``) gives the map it stored when
    the options match those it was stored with; another variant is computed from
    the raw groups it kept, or refused with the capture call that makes it.

    Options not given take the method's registered defaults for the capture's
    family and read-out (``vl.methods.METHOD_INFO[method].defaults_for(cap)``),
    e.g. ``identity_path="drop"`` under an average read-out, or gradcam's
    ``on="features"`` under an average read-out other than Swin v1's; the
    map's ``attrs`` record what was used.

    Examples
    --------
    >>> import numpy as np, timm, vitlens as vl
    >>> model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=3)
    >>> cap = vl.capture(model, np.zeros((2, 32, 32, 3)))
    >>> maps = vl.explain(cap, "all")    # every method this capture holds the passes for
    >>> sorted(maps.data_vars) == sorted(vl.methods.explainable_methods(cap))
    True
    >>> list(vl.explain(cap, ["rollout", "tokentm"]).data_vars)
    ['rollout', 'tokentm']
    >>> "legrad" in maps                   # LeGrad's pass is made only when asked: keep=("all", "legrad")
    False
    """
    cap, target = explainable(cap), options.pop("target", None)  # cap.sel(sample=k); a class index or name
    single = isinstance(method, str) and method != "all"
    names = _every(cap, options) if method == "all" else resolve_methods(method)  # the one reader of names
    other_class = None if target is None else check_target(cap, names, target)
    stored = stored_map(cap, names[0], options) if single else None
    blocks = _sample_blocks(cap) if isinstance(cap, xr.DataTree) else None
    if stored is not None:  # a reduced capture's map, stored with these options
        out = stored
    elif blocks is not None:
        # lazy (dask-backed) capture: one task per sample chunk, each loading only
        # its chunk; runs on a dask.distributed Client's workers when one is active
        import dask

        parts = [dask.delayed(_explain_block)(cap.isel(sample=slice(a, b)), method, options) for a, b in blocks]
        results = dask.compute(*parts)
        out = xr.concat(results, "sample", combine_attrs="override")
        if all("lrp_unreliable" in r.attrs for r in results):  # every chunk's flagged samples, not the first's
            out.attrs["lrp_unreliable"] = [s for r in results for s in r.attrs["lrp_unreliable"]]
    elif single:
        out = _explain_one(cap, names[0], options)
    else:
        out = _explain_many(cap, names, options)
    if other_class is not None and "sample" in out.dims:  # class-agnostic: say which class it was asked for
        out = out.assign_coords(target=("sample", other_class))
    return out


def _explain_one(cap: xr.DataTree, method: str, options: dict[str, Any]) -> xr.DataArray:
    info = METHOD_INFO[method]
    allowed = info.options()
    unknown = set(options) - set(allowed)
    if unknown:
        raise OptionError(f"{method} takes no option(s) {sorted(unknown)}; its options are {allowed}.")
    return info.function(cap, **{**info.defaults_for(cap), **options})


def groups_of(method: str, options: Mapping[str, Any] | None = None) -> set[str]:
    """The extra capture groups (:data:`vitlens.capture.api.EXTRA_GROUPS`) ``method`` reads under ``options``.

    Most methods read only what every capture holds (an empty set); AttnLRP and LeGrad
    read a pass of their own, made only when named in ``keep=`` (their registered ``needs``).

    Examples
    --------
    >>> import vitlens as vl
    >>> vl.methods.groups_of("attnlrp"), vl.methods.groups_of("attnlrp", {"softmax": "attnlrp"})
    ({'attnlrp_cp'}, {'attnlrp'})
    >>> vl.methods.groups_of("rollout")
    set()
    """
    from ..capture.api import EXTRA_GROUPS

    info = method_info(method)
    given = {k: v for k, v in (options or {}).items() if k in info.options()}
    return set(info.groups({}, given)) & set(EXTRA_GROUPS)


def extra_groups(methods: Any = "all", options: Mapping[str, Any] | None = None) -> tuple[str, ...]:
    """The extra groups a capture needs so that every one of ``methods`` can be explained (for ``keep=``).

    Examples
    --------
    >>> import vitlens as vl
    >>> vl.methods.extra_groups(["rollout", "legrad"])
    ('legrad',)
    """
    out: set[str] = set()
    for name in resolve_methods(methods):
        out |= groups_of(name, options)
    return tuple(sorted(out))


def _kept(cap: xr.DataTree) -> set[str]:
    """The groups the capture stored (its recorded ``keep=``, resolved)."""
    keep = capture_options(cap).get("keep", [])
    return {keep} if isinstance(keep, str) else set(keep)


def explainable_methods(cap: xr.DataTree, options: Mapping[str, Any] | None = None) -> tuple[str, ...]:
    """The registered methods ``cap`` holds what they read for (``vl.explain(cap, "all")`` computes these).

    AttnLRP and LeGrad read a pass of their own: a capture made without it (the default)
    explains every other method. A reduced capture explains the methods whose maps it
    stores under ``options`` (``vl.capture(..., maps=...)``).

    Examples
    --------
    >>> import numpy as np, timm, vitlens as vl
    >>> model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=3)
    >>> cap = vl.capture(model, np.zeros((1, 32, 32, 3)), keep=("all", "legrad"))
    >>> "legrad" in vl.methods.explainable_methods(cap), "attnlrp" in vl.methods.explainable_methods(cap)
    (True, False)
    """
    kept = _kept(cap)
    out = []
    for name, info in METHOD_INFO.items():
        given = {k: v for k, v in (options or {}).items() if k in info.options()}
        if info.groups(cap, given) <= kept or holds_map(cap, name, given):  # what it reads, or its stored map
            out.append(name)
    return tuple(out)


def _every(cap: xr.DataTree, options: Mapping[str, Any]) -> list[str]:
    """What ``"all"`` asks for: every method but those reading a pass made only when named in ``keep=``
    (AttnLRP, LeGrad) that the capture lacks. A method whose standard group is missing (the gradients
    after ``grads=False``) is asked for, and left out by :func:`_explain_many` with the fix named."""
    if is_reduced(cap):  # the maps it stores, and those its kept groups compute
        out = list(explainable_methods(cap, options))
        if not out:
            raise CaptureFormatError("this reduced capture stores no maps and kept no raw groups to compute one; "
                                     "capture again with vl.capture(model, images, maps='all').")
        return out
    kept = _kept(cap)
    out = []
    for name, info in METHOD_INFO.items():
        given = {k: v for k, v in options.items() if k in info.options()}
        if info.groups(cap, given) - kept <= set(CAPTURE_GROUPS):
            out.append(name)
    return out


def _explain_many(cap: xr.DataTree, names: list[str], options: dict[str, Any]) -> xr.Dataset:
    """``names`` with the options each takes, on top of its defaults for ``cap``; a method whose
    inputs the capture lacks is left out (with a warning), unless every one is."""
    unused = set(options) - {o for n in names for o in METHOD_INFO[n].options()}
    if unused:
        raise OptionError(f"no method takes {sorted(unused)}.")
    out, left_out = {}, {}
    for name in names:
        info = METHOD_INFO[name]
        accepted = {**info.defaults_for(cap), **{k: v for k, v in options.items() if k in info.options()}}
        if not info.uses_layers(accepted):  # e.g. gradcam on the final feature map
            accepted = {k: v for k, v in accepted.items() if k not in ("layers", "heads")}
        elif not info.per_layer and "layers" in accepted and not isinstance(accepted["layers"], int):
            accepted.pop("layers")  # a single-block method under a list of blocks: its default block
        try:
            stored = stored_map(cap, name, accepted)  # a reduced capture's, or an error naming the capture call
            out[name] = info.function(cap, **accepted) if stored is None else stored
        except (MissingVariableError, CaptureFormatError) as exc:
            left_out[name] = exc
    if not out:
        raise next(iter(left_out.values()))
    if left_out:
        reasons = {str(exc) for exc in left_out.values()}
        warnings.warn(f"left out {', '.join(left_out)}: {' '.join(sorted(reasons))}", UserWarning, stacklevel=3)
    ds = xr.Dataset({n: da.drop_attrs() if hasattr(da, "drop_attrs") else da for n, da in out.items()})
    for n, da in out.items():
        ds[n].attrs = da.attrs
    ds.attrs = {"methods": list(out), **({"left_out": list(left_out)} if left_out else {})}
    return ds


__all__ = ["METHODS", "METHOD_INFO", "MethodInfo", "explain", "explainable_methods", "extra_groups", "groups_of",
           "method_info", "minmax", "normalize", "options_of",
           "register_method", "statistic_maps", "to_pixels", *METHODS]
