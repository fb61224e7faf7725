"""Dataset-scale captures: stream batches into a zarr store, resumably.

``vl.capture(model, images, store="run.zarr")`` captures batch by batch and
appends each batch along ``sample`` to every group of the store. The root group
is written last for each batch, so its ``sample`` length is the number of images
fully committed; a run killed mid-batch loses nothing already committed, and
``resume=True`` trims any partial batch and continues after the last committed
image.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import xarray as xr

from ..errors import CaptureFormatError, ImageError, OptionError
from .store import _encode, _map_attrs

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif")
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
    """A folder path becomes its sorted image files; everything else is kept."""
    if isinstance(images, (str, os.PathLike)) and Path(images).is_dir():
        files = sorted(p for p in Path(images).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise ImageError(f"{str(images)!r} holds no image files ({', '.join(IMAGE_SUFFIXES)}).")
        return [str(p) for p in files]
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


def _quiet():
    ctx = warnings.catch_warnings()
    ctx.__enter__()
    warnings.filterwarnings("ignore", message=".*Zarr V3 specification.*")
    warnings.filterwarnings("ignore", message=".*[Cc]onsolidated metadata.*")
    warnings.filterwarnings("ignore", message=".*vitlens_committed.json.*")  # our commit marker
    return ctx


COMMIT_FILE = "vitlens_committed.json"


def committed(store: str | os.PathLike) -> int:
    """Images fully written to a streaming store (0 if it does not exist).

    Read from a small marker file that is replaced atomically after every batch
    has been written to every group, so a run killed mid-write never counts a
    partly written batch.
    """
    import json

    path = Path(store)
    if not path.exists():
        return 0
    marker = path / COMMIT_FILE
    if not marker.exists():
        if (path / "zarr.json").exists() or (path / ".zgroup").exists():
            return 0  # created, but no batch committed yet
        raise CaptureFormatError(f"{str(path)!r} is not a vitlens capture store.")
    return int(json.loads(marker.read_text())["images"])


def _commit(store: Path, images: int) -> None:
    import json

    tmp = store / (COMMIT_FILE + ".tmp")
    tmp.write_text(json.dumps({"images": images}))
    os.replace(tmp, store / COMMIT_FILE)


def _trim(store: Path, n: int) -> None:
    """Cut every ``sample``-indexed array back to the ``n`` committed images."""
    import zarr

    root = zarr.open_group(str(store), mode="a")
    groups = [root] + [g for _, g in root.groups()]
    for group in groups:
        for _, arr in group.arrays():
            dims = getattr(arr.metadata, "dimension_names", None) or arr.attrs.get("_ARRAY_DIMENSIONS")
            if dims and dims[0] == "sample" and arr.shape[0] > n:
                arr.resize((n, *arr.shape[1:]))
    zarr.consolidate_metadata(str(store))


def write_batch(tree: xr.DataTree, store: Path, first: bool, batch_size: int, total: int) -> None:
    """Append one captured batch to ``store``, then mark ``total`` images committed."""
    import zarr

    tree = _map_attrs(tree, _encode)
    ctx = _quiet()
    try:
        nodes = sorted(tree.subtree, key=lambda node: node.path == "/")  # root last
        for node in nodes:
            ds = node.to_dataset(inherit=False)
            group = None if node.path == "/" else node.path.strip("/")
            if first:
                encoding = {name: {"chunks": _chunks(v.variable, batch_size)} for name, v in ds.data_vars.items()
                            if "sample" in v.dims}
                ds.to_zarr(store, group=group, mode="w" if node.path == "/" and not store.exists() else "a",
                           encoding=encoding, consolidated=False)
            else:
                keep = [n for n, v in ds.variables.items() if "sample" in v.dims]
                ds[keep].to_zarr(store, group=group, mode="a", append_dim="sample", consolidated=False)
        zarr.consolidate_metadata(str(store))
        _commit(store, total)
    finally:
        ctx.__exit__(None, None, None)


def capture_to_store(
    capture_batch,
    images: Any,
    store: str | os.PathLike,
    *,
    target: Any,
    batch_size: int,
    resume: bool,
    progress: bool | None,
) -> xr.DataTree:
    """Drive ``capture_batch(images, target, offset)`` batch by batch into ``store``."""
    from .store import open as open_capture

    path = Path(store)
    if path.suffix.lower() != ".zarr":
        raise OptionError(f"store={str(path)!r}: streaming captures go to a '.zarr' directory.")
    done = committed(path) if resume else 0
    if path.exists() and not resume:
        raise OptionError(
            f"{str(path)!r} already exists; pass resume=True to continue it, or choose a new path."
        )
    if path.exists() and resume:
        if done == 0:  # killed before the first batch was committed: start afresh
            import shutil

            shutil.rmtree(path)
        else:
            _trim(path, done)
    n = _length(image_source(images))
    if n is not None and done >= n:
        return open_capture(path, chunks={})
    if progress is None:
        progress = True
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n, initial=done, desc=f"capture → {path.name}", unit="img")
    try:
        for start, part in batches(images, batch_size, skip=done):
            part_target = target
            count = _length(part) or (part.shape[0] if hasattr(part, "shape") else 1)
            if target is not None and not isinstance(target, (int, np.integer, str)):
                part_target = list(target)[start : start + count]
            tree = capture_batch(part, part_target, start)
            size = int(tree["sample"].size)
            write_batch(tree, path, first=(start == 0), batch_size=batch_size, total=start + size)
            if bar is not None:
                bar.update(size)
    finally:
        if bar is not None:
            bar.close()
    if not path.exists():
        raise ImageError("empty source: no image was captured.")
    return open_capture(path, chunks={})
