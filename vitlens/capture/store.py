"""``vl.save`` / ``vl.open``: captures on disk as zarr or netCDF, exactly round-tripped.

netCDF attributes cannot hold nested lists, booleans or None, and turn lists into
arrays; so every attribute that is not a plain string or number is stored as
JSON and its name listed in ``_vitlens_json_attrs``. ``open`` decodes them, so
values, coordinates and attrs come back as they were saved; :func:`decode_attrs`
does the same for a tree opened with plain ``xr.open_datatree``.

Writes are atomic: :func:`save` writes a temporary sibling and swaps it in only
once it is complete, so a full disk, an I/O error or a kill never loses the
capture that was there before, and vitlens never deletes anything that is not a
vitlens capture. Reads are checked: a missing chunk, a damaged chunk or damaged
attributes raise :class:`~vitlens.errors.CaptureFormatError` naming what is
damaged — never NaN standing in for data.
"""

from __future__ import annotations

import builtins
import contextlib
import json
import os
import shutil
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from ..errors import CaptureFormatError, OptionError, StorageError
from .attrs import decode_tree as decode_attrs, decoded as _decode, encode as _encode  # the one attrs codec

#: Commit marker of a streaming store (``vl.capture(..., store=...)``); see ``stream.py``.
MARKER = "vitlens_committed.json"
_TMP_TAG = ".vitlens-tmp-"
builtins_open = builtins.open  # ``open`` below is vitlens' public reader
_OLD_TAG = ".vitlens-old-"


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


@contextlib.contextmanager
def quiet_zarr() -> Iterator[None]:
    """Silence zarr-python's notes on what its v3 spec does not cover yet.

    String coordinates and consolidated metadata round-trip exactly with
    zarr-python; the commit marker and lock are vitlens' own files in the store.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Zarr V3 specification.*")
        warnings.filterwarnings("ignore", message=".*[Cc]onsolidated metadata.*")
        warnings.filterwarnings("ignore", message=".*not recognized as a component of a Zarr hierarchy.*")
        yield


# -- what is (not) a vitlens capture ---------------------------------------------------


def _zarr_root_attrs(path: Path) -> dict[str, Any] | None:
    for name, key in (("zarr.json", "attributes"), (".zattrs", None)):
        meta = path / name
        if meta.is_file():
            try:
                doc = json.loads(meta.read_text())
            except (OSError, ValueError):
                return None
            return doc.get(key, {}) if key else doc
    return None


def is_capture(path: str | os.PathLike) -> bool:
    """Whether ``path`` holds a vitlens capture (saved or streamed) — what vitlens may replace."""
    path = Path(path)
    if path.is_dir():
        if (path / MARKER).is_file():
            return True
        attrs = _zarr_root_attrs(path)
        return bool(attrs) and "vitlens_version" in attrs
    if path.is_file():
        try:
            import h5py

            with h5py.File(path, "r") as f:
                return "vitlens_version" in f.attrs
        except Exception:  # not HDF5 / unreadable: not ours
            return False
    return False


def read_marker(path: str | os.PathLike) -> dict[str, Any] | None:
    """The commit marker of a streaming store (``None`` where there is none).

    Raises :class:`CaptureFormatError` when the marker is damaged.
    """
    marker = Path(path) / MARKER
    if not marker.is_file():
        return None
    try:
        doc = json.loads(marker.read_text())
        images = doc["images"]
        if not isinstance(images, int) or isinstance(images, bool) or images < 0:
            raise ValueError(f"'images' must be a count, got {images!r}")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CaptureFormatError(
            f"{str(marker)!r}, the commit marker of a streaming capture, is damaged ({exc}); vitlens cannot "
            "tell which batches were committed, so it neither opens nor resumes the store. Re-run the "
            "capture into a new store (the marker is written atomically by vitlens, so something else "
            "changed it)."
        ) from exc
    return doc


# -- atomic replacement ------------------------------------------------------------------


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    try:
        import ctypes
        import ctypes.util

        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    rc = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange)
    return rc == 0


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _remove_settled(path: Path, timeout: float = 10.0) -> None:
    """Remove a failed temporary copy, also what zarr's writes still in flight add after the error."""
    import time

    deadline = time.monotonic() + timeout
    quiet_since = None
    while time.monotonic() < deadline:
        if path.exists() or path.is_symlink():
            _remove(path)
            quiet_since = None
        elif quiet_since is None:
            quiet_since = time.monotonic()
        elif time.monotonic() - quiet_since > 0.3:
            return
        time.sleep(0.05)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def swap_in(tmp: Path, target: Path) -> None:
    """Put the finished ``tmp`` at ``target``; an old ``target`` is removed only once replaced.

    Files are replaced with ``os.replace``; directories are exchanged atomically
    where the kernel can (``renameat2``), else moved aside first — a crash in
    between leaves the old capture at ``.<name>.vitlens-old-*`` beside it.
    """
    if tmp.is_file() and not target.is_dir():
        os.replace(tmp, target)
    elif not target.exists():
        os.rename(tmp, target)
    elif _exchange(tmp, target):
        _remove(tmp)  # now the old capture
    else:
        old = target.with_name(f".{target.name}{_OLD_TAG}{uuid.uuid4().hex[:8]}")
        os.rename(target, old)
        os.rename(tmp, target)
        _remove(old)
    _fsync_dir(target.parent)


def _nbytes(tree: xr.DataTree) -> int:
    return sum(int(v.nbytes) for node in tree.subtree for v in node.to_dataset(inherit=False).variables.values())


def _check_space(tree: xr.DataTree, directory: Path, target: Path) -> None:
    """netCDF is stored uncompressed: refuse up front what cannot fit (HDF5 crashes on ENOSPC)."""
    need = int(_nbytes(tree) * 1.02) + 2**20
    free = shutil.disk_usage(directory).free
    if free < need:
        raise StorageError(
            f"not enough disk space to save {str(target)!r}: it needs about {need / 2**20:.1f} MiB and "
            f"{free / 2**20:.1f} MiB are free. Free some space, save elsewhere, or save as '.zarr' "
            "(compressed). Nothing was written or replaced."
        )


def save(cap: xr.DataTree, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write a capture (or any vitlens DataTree) to ``.zarr`` or ``.nc``, atomically.

    The capture is written to a temporary sibling of ``path`` and moved into place
    only when complete: if writing fails (full disk, I/O error, interrupt) nothing
    at ``path`` changes and the temporary copy is removed.

    Parameters
    ----------
    cap
        The DataTree returned by :func:`vitlens.capture` (or :func:`open`), in
        memory or lazy — saving a lazily opened capture onto its own source is safe.
    path
        A ``.zarr`` directory or ``.nc`` file.
    overwrite
        ``False`` (default): refuse an existing ``path``. ``True``: replace an
        existing *vitlens capture* at ``path``; the old one stays intact until the
        new one is complete. Anything that is not a vitlens capture is never
        replaced or deleted.

    Returns
    -------
    pathlib.Path
        ``path``.

    Examples
    --------
    >>> import numpy as np, timm, tempfile, os, vitlens as vl
    >>> model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=3)
    >>> cap = vl.capture(model, np.zeros((1, 32, 32, 3)))
    >>> path = vl.save(cap, os.path.join(tempfile.mkdtemp(), "cap.nc"))
    >>> bool(vl.open(path)["stage0"].attention.identical(cap["stage0"].attention))
    True
    >>> path = vl.save(cap, path, overwrite=True)  # replacing needs overwrite=True
    """
    if not isinstance(cap, xr.DataTree):
        raise CaptureFormatError(f"save() takes the DataTree returned by vl.capture; got {type(cap).__name__}.")
    path = Path(path)
    engine = _engine(path)
    if not path.parent.is_dir():
        raise StorageError(f"cannot save {str(path)!r}: the directory {str(path.parent)!r} does not exist; create it first.")
    if path.exists() or path.is_symlink():
        if not overwrite:
            raise OptionError(
                f"{str(path)!r} already exists; pass overwrite=True to replace it (the old capture is kept "
                "until the new one is completely written), or choose another path."
            )
        if path.is_symlink() or not is_capture(path):
            raise CaptureFormatError(
                f"{str(path)!r} exists and is not a vitlens capture; vitlens never replaces or deletes "
                "what it did not write. Choose another path."
            )
        if path.is_dir():
            from .lock import check_unlocked

            check_unlocked(path)
    encoded = _map_attrs(cap, _encode)
    for node in encoded.subtree:  # write with vitlens' own layout, not the source file's
        for var in node.variables.values():
            var.encoding = {}
    tmp = path.with_name(f".{path.name}{_TMP_TAG}{uuid.uuid4().hex[:8]}{path.suffix}")
    try:
        if engine == "zarr":
            with quiet_zarr():
                encoded.to_zarr(tmp, mode="w-", consolidated=True, write_empty_chunks=True)
        else:
            _check_space(encoded, path.parent, path)
            # HDF5 crashes the interpreter when the disk fills while it writes a file: build the
            # file in memory, then write its bytes with plain Python I/O (a clean OSError).
            data = encoded.to_netcdf(engine="h5netcdf")
            with builtins_open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
    except BaseException as exc:
        _remove_settled(tmp)
        if isinstance(exc, OSError):
            raise StorageError(
                f"could not write {str(path)!r} ({exc}); nothing was replaced"
                f"{' — the capture already there is intact' if path.exists() else ''}. Free disk space or "
                "save elsewhere."
            ) from exc
        raise
    swap_in(tmp, path)
    return path


# -- checked reading ----------------------------------------------------------------------


class _GuardedArray(xr.backends.BackendArray):
    """A stored variable whose read errors name the variable (never a bare codec error)."""

    def __init__(self, variable: xr.Variable, where: str):
        self.variable, self.where = variable, where
        self.shape, self.dtype = variable.shape, variable.dtype

    def __getitem__(self, key):
        from xarray.core import indexing

        return indexing.explicit_indexing_adapter(key, self.shape, indexing.IndexingSupport.BASIC, self._read)

    def _read(self, key: tuple) -> np.ndarray:
        try:
            return np.asarray(self.variable[key].values)
        except CaptureFormatError:
            raise
        except Exception as exc:
            raise CaptureFormatError(
                f"{self.where} cannot be read: its stored data is damaged ({type(exc).__name__}: {exc}). "
                "Re-capture it or restore the capture from a copy."
            ) from exc


def _guard(ds: xr.Dataset, group: str, path: Path) -> xr.Dataset:
    from xarray.core import indexing

    out = ds.copy()
    for name, var in ds.variables.items():
        if name in ds.indexes:
            continue  # index coordinates are read (and checked) at open
        where = f"variable {group.rstrip('/')}/{name} of {str(path)!r}"
        data = indexing.LazilyIndexedArray(_GuardedArray(var, where))
        out[name] = xr.Variable(var.dims, data, var.attrs, var.encoding)
    return out


def _chunk_key(index: tuple[int, ...], encoding: dict[str, Any], v3: bool) -> str:
    sep = encoding.get("configuration", {}).get("separator", "/" if v3 else ".")
    if v3 and encoding.get("name", "default") == "default":
        return "c" + "".join(sep + str(i) for i in index) if index else "c"
    return sep.join(str(i) for i in index) if index else "0"


def _check_chunks(path: Path, groups: dict[str, xr.Dataset]) -> None:
    """Every chunk a variable needs is on disk (zarr would silently read fill values)."""
    import itertools
    import math

    for group, ds in groups.items():
        for name, var in ds.variables.items():
            array = path / group.strip("/") / str(name)
            meta_v3, meta_v2 = array / "zarr.json", array / ".zarray"
            try:
                if meta_v3.is_file():
                    meta = json.loads(meta_v3.read_text())
                    if meta.get("node_type") != "array":
                        continue
                    chunk = meta["chunk_grid"]["configuration"]["chunk_shape"]
                    encoding, v3 = meta.get("chunk_key_encoding", {}), True
                elif meta_v2.is_file():
                    meta = json.loads(meta_v2.read_text())
                    chunk = meta["chunks"]
                    encoding = {"configuration": {"separator": meta.get("dimension_separator", ".")}}
                    v3 = False
                else:
                    continue
            except (OSError, ValueError, KeyError) as exc:
                raise CaptureFormatError(
                    f"variable {group.rstrip('/')}/{name} of {str(path)!r} has damaged metadata ({exc})."
                ) from exc
            shape = var.shape
            if len(chunk) != len(shape) or any(s == 0 for s in shape):
                continue
            counts = [math.ceil(s / c) for s, c in zip(shape, chunk)]
            present = {
                os.path.relpath(os.path.join(root, f), array).replace(os.sep, "/")
                for root, _, files in os.walk(array) for f in files
            }
            missing = [k for k in (_chunk_key(i, encoding, v3) for i in itertools.product(*map(range, counts)))
                       if k not in present]
            if missing:
                raise CaptureFormatError(
                    f"variable {group.rstrip('/')}/{name} of {str(path)!r} is missing {len(missing)} of "
                    f"{math.prod(counts)} stored chunks (e.g. {missing[0]!r}): the capture is damaged. "
                    "vitlens never fills missing data with NaN; re-capture it or restore it from a copy."
                )


def _committed(groups: dict[str, xr.Dataset], n: int, path: Path) -> dict[str, xr.Dataset]:
    out = {}
    for group, ds in groups.items():
        if "sample" in ds.dims:
            if ds.sizes["sample"] < n:
                raise CaptureFormatError(
                    f"group {group!r} of {str(path)!r} holds {ds.sizes['sample']} images but {n} are marked "
                    "committed: the store is damaged. Re-capture it into a new store."
                )
            ds = ds.isel(sample=slice(0, n))
        out[group] = ds
    return out


def _committed_view(path: Path, n: int):
    """A read-only zarr store showing the first ``n`` images of every ``sample`` array.

    Mid-batch, arrays of one group can differ in length and the consolidated
    metadata may be gone or stale; the view clips each array's own metadata to
    the committed count, so a store interrupted at any moment opens with exactly
    its committed images.
    """
    from zarr.storage import LocalStore

    return _CommittedView(LocalStore(path, read_only=True), n)


try:
    from zarr.storage import WrapperStore as _WrapperStore
except ImportError:  # pragma: no cover - zarr < 3
    _WrapperStore = object  # type: ignore[assignment,misc]


class _CommittedView(_WrapperStore):  # type: ignore[misc,valid-type]
    def __init__(self, store, n: int):
        super().__init__(store)
        self.n = n

    def _with_store(self, store):
        return type(self)(store, self.n)

    def __reduce__(self):
        return (type(self), (self._store, self.n))

    async def get(self, key, prototype, byte_range=None):
        buf = await self._store.get(key, prototype, byte_range)
        if buf is None or byte_range is not None or not (key == "zarr.json" or key.endswith("/zarr.json")):
            return buf
        doc = json.loads(buf.to_bytes())
        if doc.get("node_type") == "array":
            names = doc.get("dimension_names") or [None]
            if names[0] == "sample" and doc["shape"][0] > self.n:
                doc["shape"][0] = self.n
            else:
                return buf
        elif "consolidated_metadata" in doc:
            doc.pop("consolidated_metadata")  # may predate the kill; read each node's own
        else:
            return buf
        return prototype.buffer.from_bytes(json.dumps(doc).encode())


def _chunked(ds: xr.Dataset, chunks: dict | str) -> xr.Dataset:
    if isinstance(chunks, dict) and not chunks:  # the stored chunks
        out = ds.copy()
        for name, var in ds.variables.items():
            if name not in ds.indexes:
                preferred = var.encoding.get("preferred_chunks") or {}
                out[name] = var.chunk({d: preferred.get(d, s) for d, s in zip(var.dims, var.shape)})
        return out
    if isinstance(chunks, dict):
        return ds.chunk({d: c for d, c in chunks.items() if d in ds.dims})
    return ds.chunk(chunks)


def open(path: str | os.PathLike, *, chunks: dict | str | None = None) -> xr.DataTree:  # noqa: A001 - public name
    """Read a capture saved with :func:`save` or streamed with ``vl.capture(..., store=...)``.

    Parameters
    ----------
    path
        A ``.zarr`` directory or ``.nc`` file written by vitlens.
    chunks
        Passed to xarray to open lazily with dask (``{}`` for the stored chunks);
        ``None`` loads everything into memory.

    Returns
    -------
    xarray.DataTree
        The capture. A streaming store that was interrupted opens with its
        committed images (and a warning that says how to resume it).

    Raises
    ------
    CaptureFormatError
        ``path`` is not a vitlens capture, or it is damaged (missing or corrupt
        chunks, damaged attributes or commit marker); the message names what.

    Examples
    --------
    >>> import numpy as np, timm, tempfile, os, vitlens as vl
    >>> model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=3)
    >>> path = vl.save(vl.capture(model, np.zeros((2, 32, 32, 3))), os.path.join(tempfile.mkdtemp(), "c.zarr"))
    >>> vl.open(path, chunks={})["stage0"].attention.sizes["sample"]
    2
    """
    path = Path(path)
    engine = _engine(path)
    if not path.exists():
        raise CaptureFormatError(f"{str(path)!r} does not exist.")
    marker = read_marker(path) if engine == "zarr" and path.is_dir() else None
    if marker is not None and marker["images"] == 0:
        raise CaptureFormatError(
            f"{str(path)!r} is a streaming capture with no committed batch yet (it was interrupted, or is "
            "being written); continue it with vl.capture(model, images, store=..., resume=True)."
        )
    try:
        with quiet_zarr():
            if engine == "zarr" and marker is not None:
                view = _committed_view(path, marker["images"])
                groups = xr.open_groups(view, engine="zarr", chunks=None, consolidated=False)
            elif engine == "zarr":
                groups = xr.open_groups(path, engine="zarr", chunks=None, consolidated=None)
            else:
                groups = xr.open_groups(path, engine="h5netcdf", chunks=None)
    except Exception as exc:
        from .lock import LOCK

        if (marker is not None and marker["images"] == 0) or (marker is None and (path / LOCK).is_file()):
            raise CaptureFormatError(
                f"{str(path)!r} is a streaming capture that was interrupted before its first batch was "
                "committed; continue it with vl.capture(model, images, store=..., resume=True)."
            ) from exc
        raise CaptureFormatError(f"{str(path)!r} could not be read as a vitlens capture: {exc}") from exc
    root = groups.get("/")
    if root is None or "vitlens_version" not in root.attrs:
        raise CaptureFormatError(
            f"{str(path)!r} is not a vitlens capture (no 'vitlens_version' attribute at its root); "
            "write captures with vl.save(cap, path)."
        )
    if marker is not None:
        n = marker["images"]
        groups = _committed(groups, n, path)
        if not marker.get("complete", True):
            warnings.warn(
                f"{str(path)!r} holds the first {n} images of an unfinished streaming capture; continue it "
                "with vl.capture(model, images, store=..., resume=True) and the same model and options.",
                UserWarning,
                stacklevel=2,
            )
    if engine == "zarr":
        _check_chunks(path, groups)
    nodes = {}
    for group, ds in groups.items():
        ds = _guard(ds, group, path)
        ds.attrs = _decode(ds.attrs, group)
        for name in ds.variables:
            ds[name].attrs = _decode(ds[name].attrs, f"{group.rstrip('/')}/{name}")
        if chunks is not None:
            ds = _chunked(ds, chunks)
        nodes[group] = ds
    try:
        tree = xr.DataTree.from_dict(nodes)
    except ValueError as exc:
        raise CaptureFormatError(f"{str(path)!r}: its groups do not fit together ({exc}); the store is damaged.") from exc
    if chunks is None:
        tree = tree.load()
    return tree
