"""The one codec of vitlens' attributes: option values into attrs, attrs into netCDF/zarr and back.

- :func:`attr_value`: an option value as an attribute a saved capture or map keeps
  (``None`` → ``"none"``, booleans → ``"true"``/``"false"``, ranges and tuples → lists,
  numpy scalars → Python numbers). Maps record their options with it.
- :func:`encode` / :func:`decoded`: netCDF attributes cannot hold nested lists,
  booleans or None and turn lists into arrays, so every attribute that is not a plain
  string or number is stored as JSON text and its name listed under
  :data:`JSON_KEY`; :func:`decoded` undoes that (a no-op on attrs that hold no JSON).
  :func:`decode_tree` does it for every node and variable of a tree.
- :func:`json_text` / :func:`json_attr`: attributes that are JSON text in memory too
  (a capture's ``options``, an image-text model's ``text_input_ids``).

Examples
--------
>>> from vitlens.capture.attrs import attr_value, decoded, encode
>>> attr_value({"heads": (0, 2), "grad": False, "layers": range(2), "merge": None})
{'heads': [0, 2], 'grad': 'false', 'layers': [0, 1], 'merge': 'none'}
>>> decoded(encode({"grid": [4, 4], "stage": 0})) == {"grid": [4, 4], "stage": 0}
True
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import numpy as np
import xarray as xr

from ..errors import CaptureFormatError

#: The attribute listing which attributes are stored as JSON text.
JSON_KEY = "_vitlens_json_attrs"


def attr_value(value: Any) -> Any:
    """An option value as an attribute that survives netCDF/zarr (via ``vl.save``)."""
    if value is None:
        return "none"
    if isinstance(value, Mapping):
        return {str(k): attr_value(v) for k, v in value.items()}
    if isinstance(value, range):
        return list(value)
    if isinstance(value, (list, tuple)):
        return [attr_value(v) for v in value]
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if isinstance(value, bool):
        return str(value).lower()
    return value


def _plain(value: Any) -> bool:
    return isinstance(value, str) or (
        isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))
    )


def json_text(value: Any) -> str:
    """``value`` as JSON text (sorted keys, so equal values give equal text)."""
    return json.dumps(value.tolist() if isinstance(value, np.ndarray) else value, sort_keys=True)


def encode(attrs: Mapping[str, Any]) -> dict[str, Any]:
    """``attrs`` for netCDF/zarr: plain strings and numbers as they are, the rest as JSON text."""
    out, encoded = {}, []
    for k, v in attrs.items():
        if k == JSON_KEY:
            continue
        if _plain(v):
            out[k] = v
        else:
            out[k] = json.dumps(v.tolist() if isinstance(v, np.ndarray) else v)
            encoded.append(k)
    if encoded:
        out[JSON_KEY] = json.dumps(encoded)
    return out


def decoded(attrs: Mapping[str, Any], where: str = "") -> dict[str, Any]:
    """``attrs`` with the JSON text :func:`encode` wrote decoded; damage is a CaptureFormatError."""
    attrs = dict(attrs)
    raw = attrs.pop(JSON_KEY, "[]")
    try:
        names = json.loads(raw) if isinstance(raw, str) else list(raw)
        if not isinstance(names, list) or not all(isinstance(k, str) for k in names):
            raise ValueError(f"expected a JSON list of attribute names, got {raw!r}")
        for k in names:
            if k not in attrs:
                raise KeyError(f"attribute {k!r} is listed as JSON-encoded but missing")
            attrs[k] = json.loads(attrs[k])
    except (ValueError, KeyError, TypeError, RecursionError) as exc:  # RecursionError: deeply nested JSON
        raise CaptureFormatError(
            f"damaged attributes{' of ' + where if where else ''}: {type(exc).__name__}: {str(exc)[:200]}. "
            "The capture's metadata cannot be trusted; re-capture it or restore the file from a copy."
        ) from exc
    return {k: (v.item() if isinstance(v, np.generic) else v) for k, v in attrs.items()}


def json_attr(attrs: Mapping[str, Any], key: str, default: Any = None) -> Any:
    """The value of an attribute held as JSON text (``options``, ``text_input_ids``), decoded."""
    raw = decoded(attrs).get(key)
    if raw is None:
        return default
    return json.loads(raw) if isinstance(raw, str) else raw


def decode_tree(tree: xr.DataTree) -> xr.DataTree:
    """The tree with every node's and variable's JSON-stored attributes decoded (a no-op on a decoded one).

    Examples
    --------
    >>> import xarray as xr
    >>> tree = xr.DataTree(xr.Dataset(attrs={"grid": "[4, 4]", "_vitlens_json_attrs": '["grid"]'}))
    >>> decode_tree(tree).attrs["grid"]
    [4, 4]
    """
    if not any(JSON_KEY in node.attrs or any(JSON_KEY in v.attrs for v in node.variables.values())
               for node in tree.subtree):
        return tree
    nodes = {}
    for node in tree.subtree:
        ds = node.to_dataset(inherit=False)
        ds.attrs = decoded(ds.attrs, node.path)
        for name in ds.variables:
            ds[name].attrs = decoded(ds[name].attrs, f"{node.path.rstrip('/')}/{name}")
        nodes[node.path] = ds
    return xr.DataTree.from_dict(nodes, name=tree.name)


__all__ = ["JSON_KEY", "attr_value", "decode_tree", "decoded", "encode", "json_attr", "json_text"]
