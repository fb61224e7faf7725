"""Reduced capture: keep the answers, not the tensors.

``vl.capture(model, images, maps=..., stats=..., keep=...)`` runs the registered
methods and head statistics (read from :mod:`vitlens.registry`, never imported
from ``vitlens.methods`` or ``vitlens.stats``) on each batch while its tensors
are in memory, and stores what they return:

- ``/maps/<method>``: ``(sample, map_y, map_x)`` on the first stage's token grid
  (``(sample, layer, map_y, map_x)`` with ``per_layer=True``), the method's
  options in its attrs. The grid's dimensions are renamed because the root's
  ``y``/``x`` are the picture's pixels; :func:`stored_map` gives the map back as
  ``vl.explain`` returns it, ``(sample, y, x)``.
- ``/stats/<name>``: ``(sample, layer, head)``.

Raw groups are dropped unless ``keep=`` names them, so a ViT-B/16 image costs
kilobytes instead of megabytes. ``vl.explain(capture, method, **options)``
returns a stored map when the options match those it was stored with (each
stored answer records them, resolved against the method's defaults, in its
``request`` attribute); otherwise it computes the map from raw groups that were
kept, or says what was stored and which capture call would recompute it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import numpy as np
import xarray as xr

from ..errors import CaptureFormatError, OptionError
from ..registry import METHOD_INFO, STAT_INFO, method_info, resolve_methods, resolve_stats

#: The tree's nodes of stored answers.
MAPS, STATS = "maps", "stats"

#: The dtype of stored maps and statistics: float32, half the bytes of the float64 some methods compute in.
#: A statistic changes by at most 6e-8 of its value. A map is stored as its float64 minimum over the
#: grid (a coordinate ``<method>_offset``) plus the float32 rest, so that it changes by at most 6e-8 of
#: its own range: a near-uniform map (rollout of an untrained model varies by 1e-4 of its value) keeps
#: every digit its min-max normalised form, which the metrics score, depends on. A method's float32
#: map is stored as it is, and read back in float32 (as ``vl.explain`` computes it).
ANSWER_DTYPE = np.float32

#: The suffix of the coordinate holding a stored map's minimum (see :data:`ANSWER_DTYPE`).
OFFSET = "_offset"

#: The token grid's dims as stored under ``/maps`` (the root's ``y``/``x`` are pixels).
STORED_GRID = {"y": "map_y", "x": "map_x"}

#: Each raw group's variables in a stage node (where the capture keeps them).
GROUP_VARS: dict[str, tuple[str, ...]] = {
    "attention": ("attention",),
    "attention_grad": ("attention_grad",),
    "attention_relevance": ("attention_relevance", "merge_share"),
    "ln": ("ln_mean", "ln_std"),
    "norms": ("token_norm", "attn_value_norm", "attn_value_cos", "attn_out_norm", "mlp_in_norm", "mlp_out_norm",
              "mlp_cos", "block_out_norm"),
    "features": ("features", "features_grad"),
    "head_output": ("head_output",),
    "ablation_effect": ("ablation_effect", "ablation_probability_drop"),
    "attnlrp": ("attnlrp_relevance",),
    "attnlrp_cp": ("attnlrp_cp_relevance",),
    "legrad": ("legrad_mean", "legrad_readout"),
}


def group_of(var: str) -> str | None:
    """The raw group a stage variable belongs to; None for what every capture stores (read-out weights)."""
    for group, names in GROUP_VARS.items():
        if var in names:
            return group
    return None


def _canonical(value: Any) -> Any:
    """A JSON-able form that is the same for equal options however they were spelled
    (``range(3)`` and ``[0, 1, 2]``, numpy and Python integers, dict keys)."""
    if isinstance(value, Mapping):
        return {str(k): _canonical(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, (range, list, tuple, np.ndarray)):
        return [_canonical(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def request(info: Any, attrs: Mapping[str, Any], options: Mapping[str, Any]) -> str:
    """The options of a map or statistic resolved for a capture, as one canonical JSON string."""
    resolved = info.resolve(attrs, options) if hasattr(info, "resolve") else dict(options)
    return json.dumps(_canonical(resolved), sort_keys=True)


def _named(kind: str, spec: Any, names: list[str]) -> dict[str, dict[str, Any]]:
    given = spec if isinstance(spec, Mapping) else {}
    out = {}
    for name in names:
        options = given.get(name) or {}
        if not isinstance(options, Mapping):
            raise OptionError(f"{kind}={{{name!r}: {options!r}}}: give the options as a dict, e.g. "
                              f"{{{name!r}: {{'per_layer': True}}}}, or list the name alone.")
        out[name] = dict(options)
    return out


def resolve_maps(spec: Any) -> dict[str, dict[str, Any]]:
    """``maps=``: ``"all"``, a name, a list of names or ``{name: options}`` → ``{name: options}``, checked.

    Examples
    --------
    >>> import vitlens as vl
    >>> resolve_maps({"rollout": {"start_layer": 1}, "gradcam": None})
    {'rollout': {'start_layer': 1}, 'gradcam': {}}
    >>> resolve_maps({"rollout": {"by_stage": True}})
    Traceback (most recent call last):
    ...
    vitlens.errors.OptionError: maps={'rollout': {'by_stage': True}}: a reduced capture stores one map per method ...
    """
    maps = _named("maps", spec, resolve_methods(spec))
    for name, options in maps.items():
        allowed = METHOD_INFO[name].options()
        unknown = set(options) - set(allowed)
        if "target" in options:
            raise OptionError(f"maps={{{name!r}: {{'target': ...}}}}: a reduced capture explains the class of "
                              "capture(target=...); pass target= to vl.capture instead.")
        if unknown:
            raise OptionError(f"maps={{{name!r}: ...}}: {name} takes no option(s) {sorted(unknown)}; "
                              f"its options are {allowed}.")
        if options.get("by_stage"):
            raise OptionError(f"maps={{{name!r}: {{'by_stage': True}}}}: a reduced capture stores one map per method "
                              "on the first stage's grid; drop by_stage (vl.explain(cap, ..., by_stage=True) on a "
                              "capture that keeps the raw groups gives the per-stage maps).")
    return maps


def resolve_stat_options(spec: Any) -> dict[str, dict[str, Any]]:
    """``stats=``: ``"all"``, a name, a list of names or ``{name: options}`` → ``{name: options}``."""
    return _named("stats", spec, resolve_stats(spec))


def needed_groups(maps: Mapping[str, Mapping[str, Any]], stats: Mapping[str, Mapping[str, Any]],
                  attrs: Mapping[str, Any]) -> frozenset[str]:
    """The raw groups the requested maps and statistics read (their registered ``needs``)."""
    groups: set[str] = set()
    for name, options in maps.items():
        groups |= METHOD_INFO[name].groups(attrs, options)
    for name, options in stats.items():
        groups |= STAT_INFO[name].groups(options)
    return frozenset(groups)


def answers(tree: xr.DataTree, maps: Mapping[str, Mapping[str, Any]],
            stats: Mapping[str, Mapping[str, Any]]) -> dict[str, xr.DataArray]:
    """The requested maps and statistics of one batch's capture, keyed ``maps/<name>`` / ``stats/<name>``,
    in their stored layout (the map grid renamed, the ``request`` attribute added, the dtypes of
    :data:`ANSWER_DTYPE`: each map as its minimum, ``maps/<name>_offset``, and the rest)."""
    out = {}
    for name, options in maps.items():
        info = METHOD_INFO[name]
        da = info.function(tree, **{**info.defaults_for(tree), **options})
        da = da.drop_vars([c for c in da.coords if c not in da.dims]).rename(STORED_GRID)
        attrs = {**da.attrs, "request": request(info, tree.attrs, options)}
        if da.dtype == np.float64:  # its minimum, and the float32 rest (ANSWER_DTYPE); read back as float64
            offset = da.min(list(STORED_GRID.values()))
            out[f"{MAPS}/{name}{OFFSET}"] = offset
            da = (da - offset).astype(ANSWER_DTYPE)
        out[f"{MAPS}/{name}"] = da.assign_attrs(attrs)
    for name, options in stats.items():
        info = STAT_INFO[name]
        da = info.function(tree, **options)
        da = da.drop_vars([c for c in da.coords if "sample" in da[c].dims and c != "sample"])
        if np.issubdtype(da.dtype, np.floating):
            da = da.astype(ANSWER_DTYPE)
        da.attrs["request"] = request(info, tree.attrs, options)
        out[f"{STATS}/{name}"] = da
    return out


def stored_groups(cap: xr.DataTree) -> frozenset[str]:
    """The raw groups a capture holds (in every stage that has any; ``/maps`` and ``/stats`` hold answers)."""
    present = set()
    for name, node in cap.children.items():
        if name in (MAPS, STATS):  # a stored map named "attention" is no raw attention
            continue
        for var in node.to_dataset(inherit=False).data_vars:
            group = group_of(str(var))
            if group is not None:
                present.add(group)
    return frozenset(present)


def stored_requests(cap: xr.DataTree, kind: str = MAPS) -> dict[str, dict[str, Any]]:
    """What a reduced capture stored under ``/maps`` (or ``/stats``): name → the options it was made with."""
    if kind not in cap.children:
        return {}
    node = cap[kind].to_dataset(inherit=False)
    return {str(name): json.loads(var.attrs.get("request", "{}")) for name, var in node.data_vars.items()}


def is_reduced(cap: xr.DataTree) -> bool:
    """Whether ``cap`` was made by a reduced capture (``maps=`` or ``stats=``), whatever it kept.

    Examples
    --------
    >>> import numpy as np, timm, vitlens as vl
    >>> model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=3, depth=2)
    >>> images = np.zeros((1, 32, 32, 3))
    >>> is_reduced(vl.capture(model, images, stats=["attention_entropy"])), is_reduced(vl.capture(model, images))
    (True, False)
    """
    if MAPS in cap.children or STATS in cap.children:
        return True
    options = cap.attrs.get("options", "{}")
    try:
        options = json.loads(options) if isinstance(options, str) else options
    except ValueError:
        return False
    return isinstance(options, Mapping) and ("maps" in options or "stats" in options)


def holds_map(cap: xr.DataTree, method: str, options: Mapping[str, Any] | None = None) -> bool:
    """Whether a reduced capture stores ``method``'s map made with ``options`` (resolved as the method does).

    Examples
    --------
    >>> import numpy as np, timm, vitlens as vl
    >>> model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=3, depth=2)
    >>> small = vl.capture(model, np.zeros((1, 32, 32, 3)), maps={"rollout": {"start_layer": 1}})
    >>> holds_map(small, "rollout", {"start_layer": 1}), holds_map(small, "rollout"), holds_map(small, "gradcam")
    (True, False, False)
    """
    if not isinstance(cap, xr.DataTree) or MAPS not in cap.children:
        return False
    node = cap[MAPS].to_dataset(inherit=False)
    info = method_info(method)
    given = {k: v for k, v in (options or {}).items() if k in info.options()}
    return method in node.data_vars and node[method].attrs.get("request") == request(info, cap.attrs, given)


def stored_map(cap: xr.DataTree, method: str, options: Mapping[str, Any]) -> xr.DataArray | None:
    """``method``'s map under ``options`` as a reduced capture stored it, in ``vl.explain``'s layout.

    None where the capture stores no maps, or stores another variant but kept the
    raw groups to compute this one. A CaptureFormatError, naming what was stored
    and the capture call that makes the map, where it can be neither read nor
    computed.

    Examples
    --------
    >>> import numpy as np, timm, vitlens as vl
    >>> model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=3, depth=2)
    >>> small = vl.capture(model, np.zeros((2, 32, 32, 3)), maps={"rollout": {"start_layer": 1}})
    >>> stored_map(small, "rollout", {"start_layer": 1}).dims
    ('sample', 'y', 'x')
    >>> stored_map(small, "rollout", {})
    Traceback (most recent call last):
    ...
    vitlens.errors.CaptureFormatError: this reduced capture stores the maps rollout with {"start_layer": 1}, ...
    """
    if not isinstance(cap, xr.DataTree) or not is_reduced(cap):
        return None
    info = method_info(method)
    unknown = set(options) - set(info.options())
    if unknown:
        raise OptionError(f"{method} takes no option(s) {sorted(unknown)}; its options are {info.options()}.")
    if holds_map(cap, method, options):
        return _as_explained(cap, method)
    wanted = request(info, cap.attrs, options)
    missing = info.groups(cap.attrs, options) - stored_groups(cap)
    if not missing:
        return None
    stored = stored_requests(cap)
    what = "; ".join(f"{name} with {_short(opts, info if name == method else METHOD_INFO.get(name))}"
                     for name, opts in stored.items())
    call = f"maps={{{method!r}: {dict(options)!r}}}" if options else f"maps=[{method!r}]"
    raise CaptureFormatError(
        f"this reduced capture stores {'the maps ' + what if what else 'no maps'}, and not {method} with "
        f"{_short(json.loads(wanted), info)}; it kept no raw {', '.join(sorted(missing))} to compute it. "
        f"Capture again with vl.capture(model, images, {call}) (add keep={sorted(missing)} to keep what any "
        f"{method} map is computed from)."
    )


def given_options(resolved: Mapping[str, Any], info: Any) -> dict[str, Any]:
    """Of a map's resolved options (as :func:`stored_requests` gives them), those that differ from the
    method's own defaults: what a user passes to ask for that map.

    Examples
    --------
    >>> from vitlens.registry import METHOD_INFO
    >>> given_options({"start_layer": 1, "per_layer": False}, METHOD_INFO["rollout"])
    {'start_layer': 1}
    """
    base = _canonical(info.resolve({}))  # the function's own defaults and the registry's for every capture
    return {k: v for k, v in resolved.items() if base.get(k, object()) != v}


def _short(resolved: Mapping[str, Any], info: Any) -> str:
    """The options that differ from the method's own defaults (what a user would have passed)."""
    if info is None:
        return json.dumps(resolved)
    diff = given_options(resolved, info)
    return json.dumps(diff, sort_keys=True) if diff else "its default options"


def _as_explained(cap: xr.DataTree, method: str) -> xr.DataArray:
    da = cap[MAPS][method]
    if f"{method}{OFFSET}" in da.coords:  # the map's minimum, apart from its float32 rest (ANSWER_DTYPE)
        da = (da + da[f"{method}{OFFSET}"]).assign_attrs(da.attrs)
    da = da.drop_vars([c for c in da.coords if c not in da.dims and c != "sample"])
    da = da.rename({v: k for k, v in STORED_GRID.items()})
    da = da.assign_coords(y=np.arange(da.sizes["y"]), x=np.arange(da.sizes["x"]))
    if "target" in cap.to_dataset(inherit=False):
        da = da.assign_coords(target=("sample", cap["target"].values))
    da.attrs = {k: v for k, v in da.attrs.items() if k != "request"}
    root = cap.to_dataset(inherit=False)
    if "lrp_unreliable" in da.attrs and "lrp_condition" in root:
        # each batch flagged its own samples, numbered within the batch: flag them again over the whole capture
        from .precision import unreliable

        condition = np.asarray(root["lrp_condition"].values)
        bad = unreliable(condition, str(da.attrs.get("lrp_dtype", "float32")))
        da = da.assign_coords(lrp_condition=("sample", condition))
        da.attrs["lrp_unreliable"] = [v.item() if hasattr(v, "item") else v for v in root["sample"].values[bad]]
    da.name = method
    return da


__all__ = ["ANSWER_DTYPE", "GROUP_VARS", "MAPS", "OFFSET", "STATS", "STORED_GRID", "answers", "group_of", "holds_map", "is_reduced",
           "given_options", "needed_groups", "request", "resolve_maps", "resolve_stat_options", "stored_groups", "stored_map", "stored_requests"]
