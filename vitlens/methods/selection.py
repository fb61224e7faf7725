"""What ``vl.explain`` accepts besides a fresh capture: plain xarray selections and ``target=``.

``cap.sel(sample=0)`` / ``cap.isel(sample=0)`` drop the ``sample`` dimension;
:func:`explainable` puts it back (length 1), so a selected sample stays
explainable. ``vl.explain(cap, method, target=...)`` takes a class index, a
class name or one per sample; :func:`check_target` says whether the capture holds what
the map needs (class-agnostic methods, or the class the capture was made for)
and otherwise says exactly how to re-capture.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import xarray as xr

from ..errors import TargetError

#: The capture's variables that describe the model, not an image (no ``sample`` dimension).
SAMPLE_FREE = frozenset({"window_token"})


def explainable(cap: Any) -> Any:
    """``cap`` with a ``sample`` dimension: a scalar selection (``cap.sel(sample=0)``) becomes length 1.

    Examples
    --------
    >>> import numpy as np, xarray as xr
    >>> one = xr.DataTree(xr.Dataset({"image": (("sample", "y"), np.zeros((2, 3)))},
    ...                              coords={"sample": [0, 1]})).sel(sample=1)
    >>> explainable(one)["image"].dims, explainable(one)["sample"].values.tolist()
    (('sample', 'y'), [1])
    """
    if not isinstance(cap, xr.DataTree) or "sample" in cap.dims or "sample" not in cap.coords:
        return cap
    sample = cap["sample"]
    if sample.ndim != 0:
        return cap
    value = [sample.values.item()]
    nodes = {}
    for key, node in cap.subtree_with_keys:
        ds = node.to_dataset(inherit=False)
        if "sample" in ds.coords:
            ds = ds.drop_vars("sample")
        ds = ds.assign({name: var.expand_dims(sample=value) for name, var in ds.data_vars.items()
                        if name not in SAMPLE_FREE})
        if key == ".":
            ds = ds.assign_coords(sample=value)
            if "source" in ds.coords and ds["source"].ndim == 0:  # the selected image's file
                ds = ds.assign_coords(source=("sample", [ds["source"].values.item()]))
        nodes["/" if key == "." else "/" + key] = ds
    return xr.DataTree.from_dict(nodes)


def resolve_target(target: Any, cap: xr.DataTree) -> np.ndarray:
    """Class indices, one per sample, from an index, a class name or a list of either."""
    names = list(cap.attrs.get("class_names", []))
    n = int(cap["sample"].size)
    values = [target] * n if isinstance(target, (str, int, np.integer)) else list(np.ravel(np.asarray(target, object)))
    if len(values) != n:
        raise TargetError(f"target= has {len(values)} entries for {n} samples; give one class (index or name) "
                          "or one per sample.")
    out = []
    for v in values:
        if isinstance(v, str):
            if v not in names:
                raise TargetError(f"unknown class name {v!r}; this capture's classes are {names[:10]}"
                                  f"{'...' if len(names) > 10 else ''}.")
            out.append(names.index(v))
        elif isinstance(v, (int, np.integer)) and not isinstance(v, bool) and (not names or 0 <= int(v) < len(names)):
            out.append(int(v))
        else:
            raise TargetError(f"target {v!r}: give a class index (0..{len(names) - 1}) or a class name.")
    return np.asarray(out, np.int64)


def check_target(cap: xr.DataTree, methods: list[str], target: Any) -> np.ndarray | None:
    """Whether ``methods`` can be explained for ``target`` from this capture.

    Returns ``None`` when ``target`` is the class the capture was made for, or the
    class indices (one per sample) when it is another class and every method in
    ``methods`` is class-agnostic (the map is the same for every class; the caller
    labels it with the class asked for). Otherwise a TargetError that says how to
    capture for that class.
    """
    wanted = resolve_target(target, cap)
    captured = np.asarray(cap["target"].values, np.int64).ravel()
    if np.array_equal(wanted, captured):
        return None
    from ..registry import METHOD_INFO

    specific = [m for m in methods if METHOD_INFO[m].class_specific]
    if specific:
        names = list(cap.attrs.get("class_names", []))
        label = (repr(names[wanted[0]]) if names else str(wanted[0])) if len(set(wanted)) == 1 else \
            repr([names[w] if names else int(w) for w in wanted])
        raise TargetError(
            f"{', '.join(specific)} {'is' if len(specific) == 1 else 'are'} class-specific, and this capture holds "
            f"the gradients and relevances of class(es) {sorted(set(captured.tolist()))}, not {label}. Capture "
            f"again for that class: cap = vl.capture(model, cap['image'], target={label}) (with the same keep=/"
            "dtype= options), then vl.explain(cap, ...).")
    return wanted


__all__ = ["SAMPLE_FREE", "check_target", "explainable", "resolve_target"]
