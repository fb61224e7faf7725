"""``vl.save`` / ``vl.open``: captures on disk as zarr or netCDF, exactly round-tripped.

netCDF attributes cannot hold nested lists, booleans or None, and turn lists into
arrays; so every attribute that is not a plain string or number is stored as
JSON and its name listed in ``_vitlens_json_attrs``. ``open`` decodes them, so
values, coordinates and attrs come back as they were saved.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from ..errors import CaptureFormatError, OptionError

_JSON_KEY = "_vitlens_json_attrs"


def _plain(value: Any) -> bool:
    return isinstance(value, str) or (
        isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))
    )


def _encode(attrs: dict[str, Any]) -> dict[str, Any]:
    out, encoded = {}, []
    for k, v in attrs.items():
        if _plain(v):
            out[k] = v
        else:
            out[k] = json.dumps(v.tolist() if isinstance(v, np.ndarray) else v)
            encoded.append(k)
    if encoded:
        out[_JSON_KEY] = json.dumps(encoded)
    return out


def _decode(attrs: dict[str, Any]) -> dict[str, Any]:
    attrs = dict(attrs)
    encoded = json.loads(attrs.pop(_JSON_KEY, "[]"))
    for k in encoded:
        attrs[k] = json.loads(attrs[k])
    return {k: (v.item() if isinstance(v, np.generic) else v) for k, v in attrs.items()}


def _map_attrs(tree: xr.DataTree, fn) -> xr.DataTree:
    nodes = {}
    for node in tree.subtree:
        ds = node.to_dataset(inherit=False)
        ds.attrs = fn(ds.attrs)
        for name in ds.variables:
            ds[name].attrs = fn(ds[name].attrs)
        nodes[node.path] = ds
    return xr.DataTree.from_dict(nodes)


def _engine(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix == ".zarr":
        return "zarr"
    if suffix in (".nc", ".nc4", ".netcdf"):
        return "netcdf"
    raise OptionError(f"{str(path)!r}: choose a '.zarr' or '.nc' path to save/open a capture.")


def save(cap: xr.DataTree, path: str | os.PathLike) -> Path:
    """Write a capture (or any vitlens DataTree) to ``.zarr`` or ``.nc``.

    Examples
    --------
    >>> import numpy as np, timm, tempfile, os, vitlens as vl
    >>> model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=3)
    >>> cap = vl.capture(model, np.zeros((1, 32, 32, 3)))
    >>> path = vl.save(cap, os.path.join(tempfile.mkdtemp(), "cap.nc"))
    >>> bool(vl.open(path)["stage0"].attention.identical(cap["stage0"].attention))
    True
    """
    if not isinstance(cap, xr.DataTree):
        raise CaptureFormatError(f"save() takes the DataTree returned by vl.capture; got {type(cap).__name__}.")
    path = Path(path)
    engine = _engine(path)
    encoded = _map_attrs(cap, _encode)
    if engine == "zarr":
        with warnings.catch_warnings():
            # zarr-python flags string coordinates and consolidated metadata as
            # not yet in the v3 spec; both round-trip exactly with zarr-python.
            warnings.filterwarnings("ignore", message=".*Zarr V3 specification.*")
            warnings.filterwarnings("ignore", message=".*[Cc]onsolidated metadata.*")
            warnings.filterwarnings("ignore", message=".*vitlens_committed.json.*")  # our commit marker
            encoded.to_zarr(path, mode="w", consolidated=True)
    else:
        encoded.to_netcdf(path, engine="h5netcdf", mode="w")
    return path


def open(path: str | os.PathLike, *, chunks: dict | None = None) -> xr.DataTree:  # noqa: A001 - public name
    """Read a capture saved with :func:`save`.

    Parameters
    ----------
    path
        A ``.zarr`` directory or ``.nc`` file written by :func:`save`.
    chunks
        Passed to xarray to open lazily with dask (``{}`` for the stored chunks);
        ``None`` loads everything into memory.
    """
    path = Path(path)
    engine = _engine(path)
    if not path.exists():
        raise CaptureFormatError(f"{str(path)!r} does not exist.")
    try:
        if engine == "zarr":
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*[Cc]onsolidated metadata.*")
                warnings.filterwarnings("ignore", message=".*vitlens_committed.json.*")  # our commit marker
                tree = xr.open_datatree(path, engine="zarr", chunks=chunks, consolidated=None)
        else:
            tree = xr.open_datatree(path, engine="h5netcdf", chunks=chunks)
    except Exception as exc:
        raise CaptureFormatError(f"{str(path)!r} could not be read as a vitlens capture: {exc}") from exc
    if "vitlens_version" not in tree.attrs:
        raise CaptureFormatError(
            f"{str(path)!r} is not a vitlens capture (no 'vitlens_version' attribute at its root); "
            "write captures with vl.save(cap, path)."
        )
    tree = _map_attrs(tree, _decode)
    if chunks is None:
        tree = tree.load()
    return tree
