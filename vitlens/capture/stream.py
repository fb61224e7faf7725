"""Dataset-scale captures: stream batches into a zarr store, crash-safely and resumably.

``vl.capture(model, images, store="run.zarr")`` captures batch by batch and
appends each batch along ``sample`` to every group of the store. The store's
truth is its commit marker, ``vitlens_committed.json``: written atomically
(temporary file + rename) after a batch is in every group, it holds the number
of committed images and the run's fingerprint. So whatever the moment of a kill:

- the committed images are intact (zarr writes every file atomically, and the
  marker only ever counts complete batches); ``vl.open`` reads exactly them;
- ``resume=True`` cuts every array back to the committed count — reading the
  arrays' own metadata, never the consolidated copy that may be stale — and
  continues after the last committed image;
- a resume only ever removes uncommitted rows of its own run: stores without a
  vitlens marker (a ``vl.save`` capture, someone's files) are refused, and so is
  a run whose fingerprint (weights, options, targets, images) differs.

One writer at a time: the store is locked while written (see ``lock.py``).
``VITLENS_FAULT_POINT=N`` (internal, for the fault-injection tests) makes the
writer ``os._exit`` at its N-th write step.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import xarray as xr

from ..errors import CaptureFormatError, ImageError, OptionError, ResumeError, StorageError
from . import lock as _lock
from .memory import release_memory
from .store import MARKER, for_disk, is_capture, quiet_zarr, read_marker, zarr_encoding

from .images import IMAGE_SUFFIXES, folder_images  # noqa: F401 - IMAGE_SUFFIXES: its old home

CHUNK_BYTES = 32 * 2**20  # target size of one stored chunk


def _length(images: Any) -> int | None:
    if isinstance(images, (xr.Dataset, xr.DataArray)):
        arr = images["image"] if isinstance(images, xr.Dataset) else images
        return int(arr.sizes["sample"]) if "sample" in arr.dims else 1
    if isinstance(images, (np.ndarray, torch.Tensor)):
        return int(images.shape[0]) if images.ndim == 4 else 1
    if isinstance(images, (list, tuple)):
        return len(images)
    return None


def image_source(images: Any) -> Any:
    """A folder path becomes its image files (:func:`~vitlens.capture.images.folder_images`); everything
    else is kept."""
    if isinstance(images, (str, os.PathLike)) and Path(images).is_dir():
        return [str(p) for p in folder_images(images)]
    return images


def batches(images: Any, batch_size: int, skip: int = 0) -> Iterator[tuple[int, Any]]:
    """``(start, batch)`` pairs over ``images`` from image ``skip`` on.

    Sliceable sources (arrays, Datasets, lists, folders) are sliced; other
    iterables (a torch ``DataLoader``, a generator) are iterated, each item a
    batch — a tensor, or a tuple/list/dict whose first entry (or ``"image"``) is.
    """
    images = image_source(images)
    n = _length(images)
    if n is not None:
        if isinstance(images, xr.Dataset):
            images = images["image"]
        if isinstance(images, xr.DataArray) and "sample" not in images.dims:
            images = images.expand_dims("sample")
        if isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 3:
            images = images[None]
        for start in range(skip, n, batch_size):
            part = images[start : start + batch_size]
            if isinstance(part, xr.DataArray):
                part = part.load()
            yield start, part
        return
    if not isinstance(images, Iterable):
        raise ImageError(f"cannot stream images from a {type(images).__name__}.")
    start = 0
    for item in images:
        if isinstance(item, dict):
            item = item.get("image", item.get("pixel_values"))
        elif isinstance(item, (tuple, list)) and item and not isinstance(item[0], (str, os.PathLike)):
            item = item[0]
        count = _length(item) if not hasattr(item, "shape") else (item.shape[0] if item.ndim == 4 else 1)
        count = count or 1
        if start + count > skip:
            if start < skip:  # a resumed run whose last committed image fell inside this batch
                item = item[skip - start :]
                yield skip, item
            else:
                yield start, item
        start += count


def _chunks(var: xr.Variable, batch: int) -> tuple[int, ...]:
    per_sample = var.dtype.itemsize * int(np.prod([s for d, s in zip(var.dims, var.shape) if d != "sample"]))
    along = max(1, min(batch, CHUNK_BYTES // max(per_sample, 1)))
    return tuple(along if d == "sample" else s for d, s in zip(var.dims, var.shape))


COMMIT_FILE = MARKER
FORMAT = "vitlens-stream/1"
#: A store written by dask workers, batch by batch (``vl.capture(..., client=...)``; see ``shard.py``).
SHARD_FORMAT = "vitlens-shard/1"
#: How a store of each format is continued (named when a resume meets the other format).
RESUME_WITH = {
    FORMAT: "it was captured in one process: resume it there, vl.capture(model, images, store=..., "
            "resume=True, client=False)",
    SHARD_FORMAT: "it was captured over dask workers: resume it with vl.capture(name_or_factory, images, "
                  "store=..., resume=True, client=client) (any number of workers; LocalCluster(n_workers=1) "
                  "on one machine)",
}

# -- fault injection (tests only) ------------------------------------------------------

FAULT_ENV = "VITLENS_FAULT_POINT"
FAULT_LOG_ENV = "VITLENS_FAULT_LOG"
FAULT_EXIT = 86


class _Faults:
    """Counts write steps; ``os._exit`` at step ``$VITLENS_FAULT_POINT`` (a deterministic SIGKILL)."""

    def __init__(self) -> None:
        at = os.environ.get(FAULT_ENV)
        self.at = int(at) if at else None
        self.log = os.environ.get(FAULT_LOG_ENV)
        self.step = 0

    def __call__(self, label: str) -> None:
        if self.at is None and self.log is None:
            return
        self.step += 1
        if self.log:
            with open(self.log, "a") as f:
                f.write(f"{self.step}\t{label}\n")
        if self.step == self.at:
            os._exit(FAULT_EXIT)


_fault = _Faults()


def _store(path: Path):
    """A zarr LocalStore whose every key write is a fault-injection step."""
    from zarr.storage import LocalStore

    class _Store(LocalStore):
        async def set(self, key: str, value) -> None:  # type: ignore[override]
            # through the module, not a global: dask's tokenizer pickles this class by value when it names
            # a lazy write (shard.py's layout), and the copy would count its steps apart from this module's
            sys.modules[__name__]._fault(f"set {key}")
            await super().set(key, value)

    return _Store(path)


# -- commit marker ---------------------------------------------------------------------


def committed(store: str | os.PathLike) -> int:
    """Images fully written to a streaming store (0 if it does not exist).

    Read from the commit marker, which is replaced atomically after every batch
    has been written to every group, so a run killed mid-write never counts a
    partly written batch.
    """
    path = Path(store)
    if not path.exists():
        return 0
    marker = read_marker(path)
    if marker is None:
        if (path / "zarr.json").exists() or (path / ".zgroup").exists() or _only_vitlens_leftovers(path):
            return 0
        raise CaptureFormatError(f"{str(path)!r} is not a vitlens capture store.")
    return int(marker["images"])


def _write_marker(store: Path, doc: dict[str, Any]) -> None:
    tmp = store / (MARKER + ".tmp")
    with open(tmp, "w") as f:
        f.write(json.dumps(doc, sort_keys=True))
        f.flush()
        os.fsync(f.fileno())
    _fault("commit marker written, not yet renamed")
    os.replace(tmp, store / MARKER)
    _fault("commit marker renamed")


def _leftover(name: str) -> bool:
    return name == _lock.LOCK or name.startswith(MARKER + ".tmp")


def _only_vitlens_leftovers(path: Path) -> bool:
    """A directory this code created and was killed in before writing its first marker."""
    return path.is_dir() and all(_leftover(p.name) for p in path.iterdir())


def _remove_partials(store: Path) -> None:
    """zarr's own temporary files (``*.partial``) left by a kill mid-write."""
    for root, _, files in os.walk(store):
        for f in files:
            if f.endswith(".partial"):
                Path(root, f).unlink(missing_ok=True)


def _clear_uncommitted(store: Path) -> None:
    """Remove the zarr nodes of a run killed before its first commit (the marker proves it ours)."""
    _remove_partials(store)
    (store / "zarr.json").unlink(missing_ok=True)
    for child in store.iterdir():
        if child.is_dir() and any("zarr.json" in files for _, _, files in os.walk(child)):
            shutil.rmtree(child)


def _trim(store: Path, n: int) -> None:
    """Cut every ``sample``-indexed array back to the ``n`` committed images.

    Reads each array's own metadata (``use_consolidated=False``): the
    consolidated copy in the root may predate the kill.
    """
    import zarr

    _remove_partials(store)
    with quiet_zarr():
        root = zarr.open_group(_store(store), mode="r+", use_consolidated=False)
        groups = [root] + [g for _, g in root.groups()]
        for group in groups:
            for name, arr in group.arrays():
                dims = getattr(arr.metadata, "dimension_names", None) or arr.attrs.get("_ARRAY_DIMENSIONS")
                if not dims or dims[0] != "sample":
                    continue
                if arr.shape[0] < n:
                    raise CaptureFormatError(
                        f"{str(store)!r}: {group.path or '/'}/{name} holds {arr.shape[0]} images but {n} are "
                        "marked committed; the store was damaged outside vitlens. Capture into a new store."
                    )
                if arr.shape[0] > n:
                    arr.resize((n, *arr.shape[1:]))
        zarr.consolidate_metadata(_store(store))


# -- memory ------------------------------------------------------------------------------



# -- writing ----------------------------------------------------------------------------


def _without_source(tree: xr.DataTree) -> xr.DataTree:
    root = tree.to_dataset(inherit=False).drop_vars("source")
    tree.dataset = root
    return tree


def write_batch(tree: xr.DataTree, store: Path, first: bool, batch_size: int, marker: dict[str, Any]) -> None:
    """Append one captured batch to ``store``, then commit it in the marker."""
    try:
        _write_batch(tree, store, first, batch_size, marker)
    except OSError as exc:  # a full disk, a lost mount: the committed batches are intact
        done = (read_marker(store) or {}).get("images", 0)
        raise StorageError(
            f"could not write images {marker['images'] - int(tree['sample'].size)}–{marker['images'] - 1} to "
            f"{str(store)!r} ({exc}). The {done} images committed before are intact; free disk space, then "
            "continue with vl.capture(model, images, store=..., resume=True)."
        ) from exc


def _write_batch(tree: xr.DataTree, store: Path, first: bool, batch_size: int, marker: dict[str, Any]) -> None:
    import zarr

    tree = for_disk(tree)  # attributes encoded, the layout recorded (checked at open)
    target = _store(store)
    with quiet_zarr():
        nodes = sorted(tree.subtree, key=lambda node: node.path == "/")  # root last
        for node in nodes:
            ds = node.to_dataset(inherit=False)
            group = None if node.path == "/" else node.path.strip("/")
            _fault(f"group {node.path} begins")
            if first:
                encoding = zarr_encoding(ds)  # every chunk checksummed (CRC32C), verified on every read
                for name, v in ds.data_vars.items():
                    if "sample" in v.dims:
                        encoding[str(name)]["chunks"] = _chunks(v.variable, batch_size)
                ds.to_zarr(target, group=group, mode="a", encoding=encoding, consolidated=False,
                           write_empty_chunks=True)
            else:
                keep = [n for n, v in ds.variables.items() if "sample" in v.dims]
                if not keep:  # e.g. a stage node of a reduced capture: labels only, written with the first batch
                    continue
                ds[keep].to_zarr(target, group=group, mode="a", append_dim="sample", consolidated=False,
                                 write_empty_chunks=True)
        _fault("consolidate")
        zarr.consolidate_metadata(target)
    _write_marker(store, marker)


def _open_store(path: Path, fingerprint: dict[str, Any], resume: bool,
                fresh: dict[str, Any] | None = None) -> tuple[Any, dict[str, Any]]:
    """Lock ``path`` and return ``(lock, marker)``: a fresh store (marker ``fresh``, by default a
    one-process stream's), or a checked one of the same format to resume."""
    fresh = fresh if fresh is not None else {"format": FORMAT, "images": 0, "complete": False, "run": fingerprint}
    if not path.exists():
        if not path.parent.is_dir():
            raise StorageError(f"store={str(path)!r}: the directory {str(path.parent)!r} does not exist; create it first.")
        try:
            path.mkdir()
        except FileExistsError:  # another process created it just now
            raise OptionError(f"{str(path)!r} already exists; pass resume=True to continue it.") from None
        handle = _lock.acquire(path)
        _write_marker(path, fresh)
        return handle, fresh
    if not resume:
        raise OptionError(f"{str(path)!r} already exists; pass resume=True to continue it, or choose a new path.")
    if not path.is_dir():
        raise ResumeError(f"{str(path)!r} is a file, not a streaming capture store; vitlens will not modify it.")
    marker = read_marker(path)
    if marker is None:
        if not _only_vitlens_leftovers(path):
            if is_capture(path):
                raise ResumeError(
                    f"{str(path)!r} was written by vl.save, not by a streaming vl.capture(..., store=...) run; "
                    "resume=True only continues such a run, and vitlens will not modify this capture. "
                    "Capture into a new store path."
                )
            raise ResumeError(
                f"{str(path)!r} is not a vitlens streaming store (it has no commit marker "
                f"{MARKER!r}); vitlens never deletes or changes what it did not write. Choose a new store path."
            )
        handle = _lock.acquire(path)
        _write_marker(path, fresh)
        return handle, fresh
    if marker.get("format") != fresh["format"] or "run" not in marker:
        how = RESUME_WITH.get(marker.get("format")) if "run" in marker else None
        raise ResumeError(f"{str(path)!r} was written by another vitlens store format ({marker.get('format')!r}); "
                          + (f"{how}." if how else "capture into a new store path."))
    from .fingerprint import differences

    diff = differences(marker["run"], fingerprint)
    if diff:
        raise ResumeError(
            f"resume=True would mix two different runs in {str(path)!r}: " + "; ".join(diff) + ". Resume with "
            "the same model, images (same order) and options, or capture into a new store path."
        )
    source = fingerprint.get("source", {})
    if source.get("shuffle") and marker["images"] and not marker.get("complete"):
        raise ResumeError(
            f"cannot resume {str(path)!r} from a shuffling DataLoader: the images after the committed "
            f"{marker['images']} would not be the ones the first run had left. Use shuffle=False."
        )
    handle = _lock.acquire(path)
    marker = read_marker(path) or marker  # another writer may have committed before we got the lock
    return handle, marker


def capture_to_store(
    capture_batch,
    images: Any,
    store: str | os.PathLike,
    *,
    target: Any,
    batch_size: int,
    resume: bool,
    progress: bool | None,
    fingerprint: dict[str, Any] | None = None,
) -> xr.DataTree:
    """Drive ``capture_batch(images, target, offset)`` batch by batch into ``store``."""
    from .store import open as open_capture

    global _fault
    _fault = _Faults()
    path = Path(store)
    if path.suffix.lower() != ".zarr":
        raise OptionError(f"store={str(path)!r}: streaming captures go to a '.zarr' directory.")
    if path.exists() and not resume:
        raise OptionError(
            f"{str(path)!r} already exists; pass resume=True to continue it, or choose a new path."
        )
    fingerprint = fingerprint if fingerprint is not None else {}
    created = not path.exists()
    handle, marker = _open_store(path, fingerprint, resume)
    try:
        done = int(marker["images"])
        if marker.get("complete"):
            return open_capture(path, chunks={})
        if done == 0:
            _clear_uncommitted(path)
        else:
            _trim(path, done)
        n = _length(image_source(images))
        bar = None
        if progress is None or progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=n, initial=done, desc=f"capture → {path.name}", unit="img")
        try:
            for start, part in batches(images, batch_size, skip=done):
                part_target = target
                count = _length(part) or (part.shape[0] if hasattr(part, "shape") else 1)
                if target is not None and not isinstance(target, (int, np.integer, str)) and not callable(target):
                    part_target = list(target)[start : start + count]
                tree = capture_batch(part, part_target, start)
                if start > 0 and "source" in tree.coords and not (path / "source").is_dir():
                    tree = _without_source(tree)  # resuming a store written before vitlens recorded sources
                size = int(tree["sample"].size)
                marker = {**marker, "images": start + size}
                write_batch(tree, path, first=(start == 0), batch_size=batch_size, marker=marker)
                del tree, part
                release_memory()
                if bar is not None:
                    bar.update(size)
        finally:
            if bar is not None:
                bar.close()
        if int(marker["images"]) == 0:
            if created:  # only the marker and lock this call wrote
                for name in (MARKER, _lock.LOCK):
                    (path / name).unlink(missing_ok=True)
                path.rmdir()
            raise ImageError("empty source: no image was captured.")
        _write_marker(path, {**marker, "complete": True})
    finally:
        _lock.release(handle)
    return open_capture(path, chunks={})
