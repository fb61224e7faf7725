"""``vl.save`` / ``vl.open``: captures on disk as zarr or netCDF, exactly round-tripped.

netCDF attributes cannot hold nested lists, booleans or None, and turn lists into
arrays; so every attribute that is not a plain string or number is stored as
JSON and its name listed in ``_vitlens_json_attrs``. ``open`` decodes them, so
values, coordinates and attrs come back as they were saved; :func:`decode_attrs`
does the same for a tree opened with plain ``xr.open_datatree``.

Writes are atomic: :func:`save` writes a temporary sibling and swaps it in only
once it is complete, so a full disk, an I/O error or a kill never loses the
capture that was there before, and vitlens never deletes anything that is not a
vitlens capture; what a killed save left beside ``path`` is cleaned up by the
next save or open of ``path`` (:func:`clean_leftovers`). Reads are checked: a
missing array, group or chunk, a damaged chunk or damaged attributes raise
:class:`~vitlens.errors.CaptureFormatError` naming what is damaged — never NaN
standing in for data.

Integrity: every zarr chunk carries a CRC32C (zarr's ``crc32c`` codec, after
zstd), verified by zarr whenever the chunk is read; a ``.nc`` file starts with a
512-byte HDF5 user block holding the CRC32C of the rest of the file, verified
at every open. The root attribute ``_vitlens_layout`` lists every group and
variable written, so a missing one is named at open. :func:`verify` reads a
whole capture and checks all of it.
"""

from __future__ import annotations

import builtins
import contextlib
import json
import math
import os
import re
import shutil
import stat
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
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
#: Root attribute listing every group and its variables as written (checked at open).
LAYOUT_KEY = "_vitlens_layout"
#: Start of the 512-byte HDF5 user block of a ``.nc`` capture: ``<tag><crc32c hex> <length>\n``, zero-padded.
NC_CHECKSUM_TAG = b"vitlens-checksum/1 crc32c "
_USERBLOCK = 512
_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
#: The largest chunk vitlens reads (decoded): vitlens writes chunks of at most a few tens of MiB.
MAX_CHUNK_BYTES = 2 * 2**30


def _map_attrs(tree: xr.DataTree, fn) -> xr.DataTree:
    nodes = {}
    for node in tree.subtree:
        ds = node.to_dataset(inherit=False)
        ds.attrs = fn(ds.attrs)
        for name in ds.variables:
            ds[name].attrs = fn(ds[name].attrs)
        nodes[node.path] = ds
    return xr.DataTree.from_dict(nodes)


def for_disk(tree: xr.DataTree) -> xr.DataTree:
    """The tree as vitlens writes it: attributes encoded, the layout recorded, no source encodings.

    The root's ``_vitlens_layout`` lists every group and its variables, so an open
    can name a group or array that went missing (zarr's consolidated metadata
    would otherwise show it and read fill values).
    """
    encoded = _map_attrs(tree, _encode)
    for node in encoded.subtree:  # write with vitlens' own layout, not the source file's
        for var in node.variables.values():
            var.encoding = {}
    layout = {node.path: sorted(str(k) for k in node.to_dataset(inherit=False).variables) for node in tree.subtree}
    root = encoded.to_dataset(inherit=False)
    root.attrs = _encode({**_decode(root.attrs), LAYOUT_KEY: layout})
    encoded.dataset = root
    return encoded


def zarr_encoding(ds: xr.Dataset) -> dict[str, dict[str, Any]]:
    """Every variable's chunks compressed with zstd and then checksummed (CRC32C, verified on every read)."""
    from zarr.codecs import Crc32cCodec, ZstdCodec

    return {str(name): {"compressors": (ZstdCodec(), Crc32cCodec())} for name in ds.variables}


def _zarr_encodings(tree: xr.DataTree) -> dict[str, dict[str, dict[str, Any]]]:
    return {node.path: zarr_encoding(node.to_dataset(inherit=False)) for node in tree.subtree}


# -- .nc files: a CRC32C of the whole file in its HDF5 user block ------------------------


def _crc32c(data: Any, crc: int = 0) -> int:
    import google_crc32c

    view = memoryview(data).cast("B")
    for start in range(0, len(view), 8 * 2**20):
        crc = google_crc32c.extend(crc, bytes(view[start : start + 8 * 2**20]))
    return crc


def _nc_header(data: Any) -> bytes:
    line = NC_CHECKSUM_TAG + f"{_crc32c(data):08x} {memoryview(data).nbytes}\n".encode()
    return line.ljust(_USERBLOCK, b"\0")


def _check_nc(path: Path) -> bool:
    """Verify a ``.nc`` capture's checksum; False for a file written before vitlens kept one."""
    import google_crc32c

    _regular(path, path)
    with builtins_open(path, "rb") as f:
        head = f.read(_USERBLOCK)
        if head.startswith(_HDF5_SIGNATURE):
            return False
        line, _, padding = head.partition(b"\n")
        match = re.fullmatch(re.escape(NC_CHECKSUM_TAG) + rb"([0-9a-f]{8}) (\d{1,20})", line)
        if len(head) < _USERBLOCK or match is None or padding.strip(b"\0"):
            raise CaptureFormatError(
                f"{str(path)!r} is not a vitlens capture or its header is damaged (it starts with neither HDF5 "
                "data nor vitlens' checksum block). Re-capture it or restore it from a copy."
            )
        crc, length = 0, 0
        for block in iter(lambda: f.read(8 * 2**20), b""):
            crc = google_crc32c.extend(crc, block)
            length += len(block)
    if (crc, length) != (int(match.group(1), 16), int(match.group(2))):
        raise CaptureFormatError(
            f"{str(path)!r} is damaged: its checksum does not match its contents ({length} bytes, CRC32C "
            f"{crc:08x}; written: {int(match.group(2))} bytes, {match.group(1).decode()}). vitlens never reads "
            "damaged data as values; re-capture it or restore it from a copy."
        )
    return True


# -- what a killed save left behind ------------------------------------------------------


def _regular(entry: Path, store: Path) -> None:
    """Refuse anything but a regular file or folder (a FIFO would block a read forever)."""
    try:
        mode = os.stat(entry).st_mode
    except OSError as exc:
        raise CaptureFormatError(f"{str(entry)!r} in {str(store)!r} cannot be read ({exc}).") from exc
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        where = str(entry) if entry == store else f"{entry.relative_to(store).as_posix()!r} in {str(store)!r}"
        raise CaptureFormatError(
            f"{where} is not a regular file (a FIFO, socket, device, or a link to one); vitlens never writes "
            "such files and does not read them (a read could block forever). Remove it, or restore the "
            "capture from a copy."
        )


@contextlib.contextmanager
def _held(path: Path, blocking: bool = True) -> Iterator[bool]:
    """An exclusive ``flock`` on a file or folder while a save works on it: yields whether it was taken.

    A save holds it on its temporary copy (and on a capture it moves aside), so
    :func:`clean_leftovers` can tell a live save's files from a dead one's: the
    kernel drops the lock when its process dies.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - no flock: nothing can be proven dead
        yield False
        return
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    except OSError:
        yield False
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except OSError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


_ZARR_NAME = r"zarr\.json|\.zarray|\.zattrs|\.zgroup|\.zmetadata|c|[0-9]+(?:\.[0-9]+)*"
#: Names zarr gives the files of a store, and its partial writes (``<stem>.<32 hex>.partial``).
_ZARR_FILE = re.compile(rf"(?:{_ZARR_NAME})|(?:zarr|{_ZARR_NAME})\.[0-9a-f]{{32}}\.partial")


def _foreign_files(path: Path) -> list[str]:
    """Files in a zarr capture folder that neither zarr nor vitlens writes (sorted, relative)."""
    from .lock import LOCK

    own = {MARKER, LOCK}
    out = []
    for folder, names in _files(path).items():
        for name in names:
            if folder == "" and (name in own or name.startswith(MARKER + ".tmp")):
                continue
            if not _ZARR_FILE.fullmatch(name):
                out.append(f"{folder}/{name}" if folder else name)
    return sorted(out)


def _vitlens_copy(entry: Path, kind: str) -> bool:
    """Whether ``entry`` (named like a save's temporary or set-aside copy) holds only what a save writes."""
    if entry.is_symlink():
        return False
    if kind == "old":
        return is_capture(entry) and (entry.is_file() or not _foreign_files(entry))
    if entry.is_file():  # a .nc copy: empty (killed before writing), or it starts as vitlens writes it
        with builtins_open(entry, "rb") as f:
            head = f.read(len(NC_CHECKSUM_TAG))
        return NC_CHECKSUM_TAG.startswith(head) or head.startswith(_HDF5_SIGNATURE)
    if not entry.is_dir():
        return False
    try:
        return not _foreign_files(entry)
    except CaptureFormatError:  # a FIFO or link inside: not what a save writes
        return False


def leftovers(path: str | os.PathLike) -> list[Path]:
    """What interrupted :func:`save` calls of ``path`` left beside it: temporary and set-aside copies.

    Only entries named as a save names them (``.<name>.vitlens-tmp-<8 hex>[suffix]``,
    ``.<name>.vitlens-old-<8 hex>``), holding only what a save writes, and not
    locked by a live save.
    """
    path = Path(path)
    if not path.parent.is_dir():
        return []
    pattern = re.compile(re.escape(f".{path.name}") + r"\.vitlens-(tmp|old)-[0-9a-f]{8}" + r"(?:" + re.escape(path.suffix) + r")?")
    found = []
    for entry in sorted(path.parent.iterdir()):
        match = pattern.fullmatch(entry.name)
        if match is None or not _vitlens_copy(entry, match.group(1)):
            continue
        with _held(entry, blocking=False) as free:
            if free:
                found.append(entry)
    return found


def clean_leftovers(path: str | os.PathLike) -> list[Path]:
    """Remove what killed saves of ``path`` left (see :func:`leftovers`), and only that.

    A capture set aside by a save killed between its two renames (where the
    kernel cannot exchange folders atomically) is put back at ``path`` if
    nothing is there, with a warning; otherwise it is the replaced capture and
    is removed. Returns the removed entries.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> folder = pathlib.Path(tempfile.mkdtemp())
    >>> (folder / ".c.nc.vitlens-tmp-0123abcd.nc").write_bytes(b"")  # a save killed before it wrote
    0
    >>> [p.name for p in clean_leftovers(folder / "c.nc")], sorted(folder.iterdir())
    (['.c.nc.vitlens-tmp-0123abcd.nc'], [])
    """
    path = Path(path)
    try:  # best effort: a folder vitlens may not list or change never stops a save or an open
        found = leftovers(path)
        olds = [p for p in found if _OLD_TAG in p.name]
        if olds and not (path.exists() or path.is_symlink()):
            newest = max(olds, key=lambda p: p.stat().st_mtime)
            os.rename(newest, path)
            _fsync_dir(path.parent)
            found.remove(newest)
            warnings.warn(
                f"{str(path)!r} was missing: a vl.save was killed while replacing it; the capture it was "
                f"replacing ({newest.name}) is back in place.", UserWarning, stacklevel=3,
            )
        for entry in found:
            _remove(entry)
    except OSError:
        return []
    return found


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
        with _held(target):  # a killed swap leaves it for clean_leftovers to put back
            os.rename(target, old)
            try:
                os.rename(tmp, target)
            except BaseException:
                os.rename(old, target)
                raise
        _remove(old)
    _fsync_dir(target.parent)


def _nbytes(tree: xr.DataTree) -> int:
    return sum(int(v.nbytes) for node in tree.subtree for v in node.to_dataset(inherit=False).variables.values())


def _check_space(tree: xr.DataTree, directory: Path, target: Path) -> None:
    """netCDF is stored uncompressed: refuse up front what cannot fit (HDF5 crashes on ENOSPC)."""
    need = int(_nbytes(tree) * 1.02) + 2**20 + _USERBLOCK
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
    >>> model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=3, depth=2)
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
    clean_leftovers(path)
    if path.exists() or path.is_symlink():
        if not overwrite:
            raise OptionError(
                f"{str(path)!r} already exists; pass overwrite=True to replace it (the old capture is kept "
                "until the new one is completely written), or choose another path."
            )
        foreign = _foreign_files(path) if path.is_dir() and not path.is_symlink() else []
        if path.is_symlink() or not is_capture(path):
            raise CaptureFormatError(
                f"{str(path)!r} exists and is not a vitlens capture; vitlens never replaces or deletes "
                "what it did not write. Choose another path."
            )
        if path.is_dir():
            from .lock import check_unlocked

            if foreign:
                raise CaptureFormatError(
                    f"{str(path)!r} is a vitlens capture but also holds {foreign[0]!r}, which vitlens did not "
                    "write; replacing the capture would delete it. Move it out, or save to another path."
                )
            check_unlocked(path)
    encoded = for_disk(cap)
    tmp = path.with_name(f".{path.name}{_TMP_TAG}{uuid.uuid4().hex[:8]}{path.suffix}")
    if engine == "zarr":
        tmp.mkdir()
    else:
        _check_space(encoded, path.parent, path)
        tmp.touch(exist_ok=False)
    with _held(tmp):  # while held, clean_leftovers knows this copy is a live save's
        try:
            if engine == "zarr":
                with quiet_zarr():
                    encoded.to_zarr(tmp, mode="w-", consolidated=True, write_empty_chunks=True,
                                    encoding=_zarr_encodings(encoded))
            else:
                # HDF5 crashes the interpreter when the disk fills while it writes a file: build the
                # file in memory, then write its bytes with plain Python I/O (a clean OSError).
                data = encoded.to_netcdf(engine="h5netcdf")
                with builtins_open(tmp, "wb") as f:
                    f.write(_nc_header(data))  # an HDF5 user block: the file's checksum
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


@dataclass(frozen=True)
class _Array:
    """One stored zarr array as its own metadata describes it (the committed part of a stream)."""

    group: str
    name: str
    shape: tuple[int, ...]
    chunks: tuple[int, ...]
    dims: tuple[str, ...]
    key_encoding: dict[str, Any]
    v3: bool
    checksummed: bool
    itemsize: int

    @property
    def where(self) -> str:
        return f"/{self.group}/{self.name}".replace("//", "/")

    @property
    def chunk_count(self) -> int:
        return math.prod(math.ceil(s / c) for s, c in zip(self.shape, self.chunks)) if all(self.shape) else 0


def _files(path: Path) -> dict[str, list[str]]:
    """Every file of a zarr store by folder (``''`` for the root); refuses what is not a file or folder."""
    out: dict[str, list[str]] = {}
    stack = [path]
    while stack:
        folder = stack.pop()
        rel = folder.relative_to(path).as_posix()
        names = out.setdefault("" if rel == "." else rel, [])
        with os.scandir(folder) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(Path(entry.path))
                elif entry.is_file(follow_symlinks=False):
                    names.append(entry.name)
                else:  # a link, FIFO, socket or device
                    _regular(Path(entry.path), path)
                    if Path(entry.path).is_dir():
                        raise CaptureFormatError(
                            f"{Path(entry.path).relative_to(path).as_posix()!r} in {str(path)!r} is a link to a "
                            "folder; vitlens writes no links. Copy the capture without links (e.g. cp -rL)."
                        )
                    names.append(entry.name)
    return out


def _itemsize(dtype: Any) -> int:
    try:
        return max(1, int(np.dtype(dtype).itemsize))
    except (TypeError, ValueError):
        return 8  # strings and other named types: a per-element reference


def _array_meta(path: Path, folder: str, files: list[str]) -> _Array | None:
    group, _, name = folder.rpartition("/")
    where = f"/{folder}"
    try:
        if "zarr.json" in files:
            meta = json.loads((path / folder / "zarr.json").read_text())
            if meta.get("node_type") != "array":
                return None
            shape, chunks = meta["shape"], meta["chunk_grid"]["configuration"]["chunk_shape"]
            dims = meta.get("dimension_names") or [None] * len(shape)
            codecs = [c.get("name") if isinstance(c, dict) else c for c in meta.get("codecs", [])]
            key_encoding, v3 = meta.get("chunk_key_encoding", {}), True
            dtype = meta.get("data_type")
            dtype = dtype if isinstance(dtype, str) else "object"
        elif ".zarray" in files:
            meta = json.loads((path / folder / ".zarray").read_text())
            shape, chunks = meta["shape"], meta["chunks"]
            attrs = json.loads((path / folder / ".zattrs").read_text()) if ".zattrs" in files else {}
            dims = attrs.get("_ARRAY_DIMENSIONS") or [None] * len(shape)
            codecs = [(meta.get("compressor") or {}).get("id")] + [f.get("id") for f in meta.get("filters") or []]
            key_encoding = {"configuration": {"separator": meta.get("dimension_separator", ".")}}
            v3, dtype = False, meta.get("dtype", "object")
            dtype = dtype if isinstance(dtype, str) else "object"
        else:
            return None
        if not (isinstance(shape, list) and isinstance(chunks, list) and len(shape) == len(chunks) == len(dims)
                and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in shape)
                and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in chunks)):
            raise ValueError(f"shape {shape!r}, chunks {chunks!r} and dimensions {dims!r} do not fit together")
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
        raise CaptureFormatError(
            f"variable {where} of {str(path)!r} has damaged metadata ({type(exc).__name__}: {str(exc)[:200]}); "
            "re-capture it or restore it from a copy."
        ) from exc
    itemsize = _itemsize(dtype)
    return _Array(group, name, tuple(shape), tuple(chunks), tuple(str(d) for d in dims), key_encoding, v3,
                  "crc32c" in codecs, itemsize)


def _scan_zarr(path: Path, committed: int | None) -> list[_Array]:
    """Check a zarr capture before xarray reads a byte of it.

    Refuses FIFOs and other non-regular files, damaged or impossible metadata
    (chunks larger than vitlens writes, dimensions whose lengths disagree), and
    arrays missing chunk files — counted before they are listed, so a claimed
    10^9 images costs nothing. Arrays of a streaming store are clipped to its
    ``committed`` images.
    """
    files = _files(path)
    arrays = [a for folder, names in files.items() if folder for a in [_array_meta(path, folder, names)] if a]
    chunk_files: dict[str, set[str]] = {a.where: set() for a in arrays}
    for folder, names in files.items():
        parts = folder.split("/") if folder else []
        for depth in range(len(parts), 0, -1):
            owner = "/" + "/".join(parts[:depth])
            if owner in chunk_files:
                rel = "/".join(parts[depth:])
                chunk_files[owner].update(f"{rel}/{n}" if rel else n for n in names if not n.endswith(".partial"))
                break
    out, lengths = [], {}
    for a in arrays:
        if committed is not None and a.dims and a.dims[0] == "sample":
            if a.shape[0] < committed:
                raise CaptureFormatError(
                    f"variable {a.where} of {str(path)!r} holds {a.shape[0]} images but {committed} are marked "
                    "committed: the store is damaged. Re-capture it into a new store."
                )
            a = _Array(a.group, a.name, (committed, *a.shape[1:]), a.chunks, a.dims, a.key_encoding, a.v3,
                       a.checksummed, a.itemsize)
        claimed = ", ".join(f"{d}: {s}" for d, s in zip(a.dims, a.shape))
        if math.prod(a.chunks) * a.itemsize > MAX_CHUNK_BYTES:
            raise CaptureFormatError(
                f"variable {a.where} of {str(path)!r} claims chunks of {math.prod(a.chunks) * a.itemsize / 2**30:.1f} "
                f"GiB (shape {claimed}); vitlens writes chunks of at most tens of MiB, so its metadata is damaged "
                "and vitlens does not read it. Re-capture it or restore it from a copy."
            )
        for d, s in zip(a.dims, a.shape):
            if d == "None":
                continue
            other = lengths.setdefault((a.group, d), (s, a.where))
            if other[0] != s:
                raise CaptureFormatError(
                    f"{str(path)!r} is damaged: dimension {d!r} is {s} long in {a.where} but {other[0]} in "
                    f"{other[1]} (shape {claimed}). Re-capture it or restore it from a copy."
                )
        present = chunk_files[a.where] - {"zarr.json", ".zarray", ".zattrs"}
        needed = a.chunk_count
        missing: list[str] = []
        if needed > len(present):
            missing = [f"{needed - len(present)} chunk files"]
        elif needed:
            import itertools

            counts = [math.ceil(s / c) for s, c in zip(a.shape, a.chunks)]
            missing = [k for k in (_chunk_key(i, a.key_encoding, a.v3) for i in itertools.product(*map(range, counts)))
                       if k not in present][:1]
        if missing:
            n_missing = needed - len(present) if needed > len(present) else None
            raise CaptureFormatError(
                f"variable {a.where} of {str(path)!r} is missing "
                f"{n_missing if n_missing is not None else 'some'} of its {needed} stored chunks "
                f"(shape {claimed}{'' if n_missing is not None else f'; e.g. {missing[0]!r}'}): the capture is "
                "damaged. vitlens never fills missing data with NaN; re-capture it or restore it from a copy."
            )
        out.append(a)
    return out


def _check_layout(groups: dict[str, xr.Dataset], layout: Any, path: Path) -> None:
    """Every group and variable the capture was written with is there (named if not)."""
    if layout is None:
        return  # written before vitlens recorded its layout
    if not isinstance(layout, dict) or not all(isinstance(v, list) for v in layout.values()):
        raise CaptureFormatError(f"{str(path)!r}: its recorded layout ({LAYOUT_KEY}) is damaged.")
    for group, names in layout.items():
        if group not in groups:
            raise CaptureFormatError(
                f"group {group} of {str(path)!r} is missing (the capture was written with it): the capture is "
                "damaged. vitlens never fills missing data with NaN; re-capture it or restore it from a copy."
            )
        for name in names:
            if name not in groups[group].variables:
                raise CaptureFormatError(
                    f"variable {group.rstrip('/')}/{name} of {str(path)!r} is missing (the capture was written "
                    "with it): the capture is damaged. vitlens never fills missing data with NaN; re-capture it "
                    "or restore it from a copy."
                )


def _is_count(v: Any, least: int = 0) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_)) and int(v) >= least


def _is_numbers(v: Any, n: int, least: int | None = None) -> bool:
    return (isinstance(v, list) and len(v) == n and all(
        isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool) and math.isfinite(x)
        and (least is None or x >= least) for x in v))


def _json_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except (ValueError, RecursionError):
        return False


#: The attributes capture writes that vitlens reads back, and what each must be (checked at open).
_ATTR_RULES: dict[str, dict[str, tuple[str, Any]]] = {
    "root": {
        "class_names": ("a list of class names (strings)", lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v)),
        "input_size": ("[channels, height, width], positive", lambda v: _is_numbers(v, 3, 1)),
        "mean": ("three numbers", lambda v: _is_numbers(v, 3)),
        "std": ("three positive numbers", lambda v: _is_numbers(v, 3) and all(x > 0 for x in v)),
        "num_prefix_tokens": ("a count", _is_count),
        "num_stages": ("a positive count", lambda v: _is_count(v, 1)),
        "num_layers": ("a positive count", lambda v: _is_count(v, 1)),
        "model": ("a string", lambda v: isinstance(v, str)),
        "family": ("a string", lambda v: isinstance(v, str)),
        "readout": ("a string", lambda v: isinstance(v, str)),
        "vitlens_version": ("a string", lambda v: isinstance(v, str)),
        "options": ("the JSON text of the capture options", lambda v: isinstance(v, str) and _json_object(v)),
    },
    "stage": {
        "stage": ("a count", _is_count),
        "grid": ("[rows, columns], positive", lambda v: _is_numbers(v, 2, 1) and all(_is_count(x) for x in v)),
        "stride": ("[rows, columns], positive", lambda v: _is_numbers(v, 2, 1)),
        "num_heads": ("a positive count", lambda v: _is_count(v, 1)),
        "num_prefix_tokens": ("a count", _is_count),
        "embed_dim": ("a positive count", lambda v: _is_count(v, 1)),
        "window_size": ("[rows, columns], positive", lambda v: _is_numbers(v, 2, 1) and all(_is_count(x) for x in v)),
    },
}


def _check_attrs(groups: dict[str, xr.Dataset], path: Path) -> None:
    """The capture's own attributes have the types and sizes capture wrote (a damaged one is named).

    Runs on decoded attributes; an attribute vitlens does not know, or one a
    capture does not have, is left alone.
    """

    def damaged(where: str, key: str, value: Any, what: str) -> CaptureFormatError:
        return CaptureFormatError(
            f"attribute {key!r} of {where} in {str(path)!r} is damaged: it should be {what}, got "
            f"{str(value)[:80]!r}. The capture's metadata cannot be trusted; re-capture it or restore it "
            "from a copy."
        )

    for group, ds in groups.items():
        attrs = _decode(ds.attrs, group)
        kind = "root" if group == "/" else "stage" if "stage" in attrs else None
        if kind is None:
            continue
        for key, (what, ok) in _ATTR_RULES[kind].items():
            if key in attrs and not ok(attrs[key]):
                raise damaged(group, key, attrs[key], what)
        sizes = ds.sizes
        if kind == "root" and "class_names" in attrs and "class" in sizes and len(attrs["class_names"]) != sizes["class"]:
            raise damaged(group, "class_names", attrs["class_names"], f"one name per class ({sizes['class']})")
        if kind == "stage":
            if "num_heads" in attrs and "head" in sizes and attrs["num_heads"] != sizes["head"]:
                raise damaged(group, "num_heads", attrs["num_heads"], f"the number of heads stored ({sizes['head']})")
            tokens = sizes.get("token")
            if tokens and "grid" in attrs and math.prod(attrs["grid"]) > tokens:
                raise damaged(group, "grid", attrs["grid"], f"a token grid of at most the {tokens} tokens stored")
            if tokens and attrs.get("num_prefix_tokens", 0) >= tokens:
                raise damaged(group, "num_prefix_tokens", attrs["num_prefix_tokens"],
                              f"fewer than the {tokens} tokens stored")


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
    >>> model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=3, depth=2)
    >>> path = vl.save(vl.capture(model, np.zeros((2, 32, 32, 3))), os.path.join(tempfile.mkdtemp(), "c.zarr"))
    >>> vl.open(path, chunks={})["stage0"].attention.sizes["sample"]
    2
    """
    path = Path(path)
    engine = _engine(path)
    if path.parent.is_dir():
        clean_leftovers(path)
    if not path.exists():
        raise CaptureFormatError(f"{str(path)!r} does not exist.")
    _regular(path, path)
    marker = read_marker(path) if engine == "zarr" and path.is_dir() else None
    if marker is not None and marker["images"] == 0:
        raise CaptureFormatError(
            f"{str(path)!r} is a streaming capture with no committed batch yet (it was interrupted, or is "
            "being written); continue it with vl.capture(model, images, store=..., resume=True)."
        )
    if engine == "zarr" and path.is_dir():
        _scan_zarr(path, None if marker is None else marker["images"])
    elif engine == "netcdf":
        if not path.is_file():
            raise CaptureFormatError(f"{str(path)!r} is a folder, not a '.nc' capture file.")
        _check_nc(path)
    try:
        with quiet_zarr():
            if engine == "zarr" and marker is not None:
                view = _committed_view(path, marker["images"])
                groups = xr.open_groups(view, engine="zarr", chunks=None, consolidated=False)
            elif engine == "zarr":  # each array's own metadata: a consolidated copy may list what is gone
                groups = xr.open_groups(path, engine="zarr", chunks=None, consolidated=False)
            else:
                groups = xr.open_groups(path, engine="h5netcdf", chunks=None)
    except CaptureFormatError:
        raise
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
    root_attrs = _decode(root.attrs, "/")
    _check_layout(groups, root_attrs.get(LAYOUT_KEY), path)
    _check_attrs(groups, path)
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
    nodes = {}
    for group, ds in groups.items():
        ds = _guard(ds, group, path)
        ds.attrs = _decode(ds.attrs, group)
        ds.attrs.pop(LAYOUT_KEY, None)
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
    from .precision import settle_unreliable

    settle_unreliable(tree)  # a reduced store's maps: the run's unreliable samples, not its first batch's
    return tree


# -- verifying a whole capture ---------------------------------------------------------------


@dataclass(frozen=True)
class Verification:
    """What :func:`verify` checked: every stored value of a capture, read and found intact."""

    path: str
    format: str  #: "zarr" or "netcdf"
    checksums: str  #: "crc32c per chunk", "crc32c of the file", or "none (...)" for captures written before
    images: int
    variables: int
    chunks: int  #: stored chunks read (zarr), or 1 (the .nc file)
    bytes: int  #: decoded bytes read

    def __str__(self) -> str:
        return (f"{self.path}: intact — {self.images} images, {self.variables} variables, {self.chunks} "
                f"{'chunks' if self.format == 'zarr' else 'file'}, {self.bytes / 2**20:.1f} MiB read; "
                f"checksums: {self.checksums}")


def _read_every_block(data: Any) -> int:
    """Read every chunk of a (dask-backed) variable once; returns the non-finite count of float data."""
    import dask.array as da

    def count(block: np.ndarray) -> np.ndarray:
        bad = int(block.size - np.isfinite(block).sum()) if block.dtype.kind in "fc" else 0
        return np.full((1,) * block.ndim, bad, dtype=np.int64)

    if not isinstance(data, da.Array):
        return int(count(np.asarray(data)).sum())
    ones = tuple((1,) * len(c) for c in data.chunks)
    return int(data.map_blocks(count, dtype=np.int64, chunks=ones).sum().compute())


def verify(path: str | os.PathLike) -> Verification:
    """Read a whole saved or streamed capture and check every part of it.

    Checks what :func:`open` checks (layout, chunk files, metadata, attributes,
    commit marker), then reads every stored chunk — of a streaming store, its
    committed images — so that each chunk's CRC32C is verified (for ``.nc``, the
    file's), and that no data variable holds NaN or infinity (a capture never
    stores them). Captures written before vitlens kept checksums are read and checked
    all the same; the report says they carry none.

    Parameters
    ----------
    path
        A ``.zarr`` store or ``.nc`` file written by vitlens.

    Returns
    -------
    Verification
        What was read: images, variables, chunks, bytes, and the kind of checksum.

    Raises
    ------
    CaptureFormatError
        Naming every damaged variable (or the damaged file).

    Examples
    --------
    >>> import numpy as np, timm, tempfile, os, vitlens as vl
    >>> model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=3, depth=2)
    >>> path = vl.save(vl.capture(model, np.zeros((2, 32, 32, 3))), os.path.join(tempfile.mkdtemp(), "c.zarr"))
    >>> report = vl.verify(path)
    >>> report.images, report.checksums
    (2, 'crc32c per chunk')
    """
    path = Path(path)
    engine = _engine(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "unfinished streaming capture": its committed part is checked
        tree = open(path, chunks={})
    if engine == "netcdf":  # open checked the file's checksum
        with builtins_open(path, "rb") as f:
            checked = f.read(len(NC_CHECKSUM_TAG)) == NC_CHECKSUM_TAG
        checksums = "crc32c of the file" if checked else "none (written before vitlens kept checksums)"
        chunks = 1
    else:
        marker = read_marker(path)
        arrays = _scan_zarr(path, None if marker is None else marker["images"])
        with_crc = sum(a.checksummed for a in arrays)
        checksums = ("crc32c per chunk" if with_crc == len(arrays) else
                     "none (written before vitlens kept checksums)" if with_crc == 0 else
                     f"crc32c per chunk on {with_crc} of {len(arrays)} arrays")
        chunks = sum(a.chunk_count for a in arrays)
    damaged, variables, nbytes = [], 0, 0
    for node in tree.subtree:
        ds = node.to_dataset(inherit=False)
        for name, var in ds.variables.items():
            where = f"{node.path.rstrip('/')}/{name}"
            variables += 1
            nbytes += int(var.nbytes)
            try:
                bad = _read_every_block(var.data)
            except CaptureFormatError as exc:
                damaged.append(str(exc))
                continue
            if bad and name in ds.data_vars:  # coordinates may hold NaN (a prefix token has no pixel centre)
                damaged.append(f"variable {where} of {str(path)!r} holds {bad} NaN or infinite values, which a "
                               "capture never stores: it is damaged")
    if damaged:
        raise CaptureFormatError(
            f"{str(path)!r} is damaged in {len(damaged)} variable{'s' if len(damaged) > 1 else ''}: "
            + "; ".join(damaged) + ". Re-capture it or restore it from a copy."
        )
    return Verification(str(path), engine, checksums, int(tree["sample"].size) if "sample" in tree.dims else 0,
                        variables, chunks, nbytes)
