"""Capture sharded over dask workers: each worker builds the model once and writes whole batches of one store.

``vl.capture("vit-shapes", images, store="run.zarr", client=client)`` gives the
store a one-process ``vl.capture(model, images, store="run.zarr")`` gives (bit
for bit on CPU with as many torch threads: dask's workers use one each, and CPU
sums depend on the thread count), captured by the workers of a ``dask.distributed`` cluster:

- ``model`` is a name :func:`vitlens.load_model` accepts or a picklable
  function of no arguments; each worker builds it once (on its GPU when it has
  one) and keeps it for the run's batches. Every batch reports the digest of the
  weights it was captured with; a worker whose weights differ from the run's
  (an unseeded factory) writes nothing and the run stops.
- The batches are planned here: ``batch_size`` images each, batch ``i`` holding
  images ``i·batch_size`` onwards, as in one process. One worker captures the
  first missing batch and lays the store out: every array at its full length,
  chunked so that no chunk spans two batches, labels and attributes written
  once. Then each worker captures a contiguous range of batches and writes each
  into its own rows (zarr region writes of whole chunks: no two batches share a
  file). A worker that finishes its range takes over half of the longest one left.
- The commit record is the store's marker (``vitlens_committed.json``), written
  atomically by this process alone, which holds the store's lock: the committed
  batches (``done``, as ranges), and in ``images`` the committed prefix, which is
  what :func:`vitlens.open` reads of an unfinished store. A batch is committed
  once its worker has written every array of it.
- A worker killed mid-batch: dask runs the batch again on another worker; what
  the dead one wrote belongs to an uncommitted batch and is written over. This
  process killed: ``resume=True`` (same model, images and options) captures the
  missing batches only. Each run writes a new ``session`` into the marker, and a
  worker writes a batch only while the marker names its run's session, so a task
  left running by a dead client does not write into the run that resumed it.

Same safety as the one-process stream (``stream.py``): per-chunk checksums, the
run's fingerprint checked on resume, one client writing the store at a time,
atomic commits. The store must be where every worker can write it (a shared
file system on a real cluster).
"""

from __future__ import annotations

import hashlib
import os
import sys
import threading
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr
from torch import nn

from ..errors import ImageError, OptionError, ResumeError, ShardError
from . import lock as _lock
from . import stream
from .store import for_disk, quiet_zarr, read_marker, zarr_encoding

#: Batches each range keeps queued on its worker (one running, one ready to start).
DEPTH = 2


# -- who captures: the client, the model ------------------------------------------------------


def _active_client() -> Any:
    """The ``dask.distributed`` Client of this process, or None (never imports distributed itself)."""
    if "distributed" not in sys.modules:
        return None
    from distributed import default_client

    try:
        return default_client()
    except ValueError:  # no client
        return None


def sharding_client(client: Any, model: Any, store: Any) -> Any:
    """The Client a ``vl.capture`` call shards over, or None to capture in this process.

    ``client=False``: never. ``client=None`` (default): the active Client, when
    there is one, ``store=`` is given and ``model`` is a name or a factory (a live
    ``nn.Module`` is captured where it is). A Client passed explicitly must come
    with a name or a factory and a store; anything else is refused, saying what
    to pass.

    Examples
    --------
    >>> import timm
    >>> sharding_client(False, "vit-shapes", "run.zarr") is None
    True
    >>> sharding_client(None, timm.create_model("vit_tiny_patch16_224", img_size=32), "run.zarr") is None
    True
    """
    if client is False:
        return None
    if client is None:
        if isinstance(model, nn.Module) or store is None:
            return None
        return _active_client()
    if client is True:
        client = _active_client()
        if client is None:
            raise OptionError("client=True but no dask.distributed Client is active; create one first "
                              "(Client(LocalCluster(...)) or Client('tcp://scheduler:8786')), or pass it as client=.")
    if not hasattr(client, "submit") or not hasattr(client, "scheduler_info"):
        raise OptionError(f"client= takes a dask.distributed Client (or False); got {type(client).__name__}.")
    if isinstance(model, nn.Module):
        raise OptionError(
            f"client= captures on dask workers, which build the model themselves; got a live "
            f"{type(model).__name__}. Pass a name vl.load_model accepts (e.g. 'vit-shapes', or 'hf:<dir>'), "
            "or a picklable function of no arguments that builds it, such as "
            "functools.partial(vl.load_model, 'vit_base_patch16_224', checkpoint='weights.safetensors'); "
            "or capture this module in this process with client=False."
        )
    if not isinstance(model, str) and not callable(model):
        raise OptionError(f"client=: model must be a name vl.load_model accepts or a function of no arguments "
                          f"that builds the model; got {type(model).__name__}.")
    if store is None:
        raise OptionError("client= writes the capture into a store that every worker writes to: pass "
                          "store='run.zarr' (on a file system all workers share), or drop client=.")
    return client


def _build(spec: str | Callable[[], nn.Module], device: Any) -> nn.Module:
    """The model of ``spec`` on this worker: on ``device``, else on its GPU when it has one."""
    import torch

    if isinstance(spec, str):
        from ..models import load_model

        return load_model(spec, device=device)
    model = spec()
    if not isinstance(model, nn.Module):
        raise OptionError(f"the model factory {spec!r} returned a {type(model).__name__}, not a torch nn.Module.")
    if device is not None:
        model = model.to(device)
    elif torch.cuda.is_available():
        model = model.to("cuda")
    return model


# -- what a worker keeps between tasks --------------------------------------------------------


@dataclass(frozen=True)
class _Job:
    """What every task of a run carries: how to build the model, capture's options, a scalar target."""

    model: Any
    options: dict[str, Any]
    target: Any  #: the target when it is one for all images (None, a class, a callable); None for a list
    key: str  #: a digest of the above: the worker's cache key


@dataclass
class _Built:
    step: Callable[[Any, Any, int], xr.DataTree]
    fingerprint: dict[str, Any]
    lock: threading.Lock = field(default_factory=threading.Lock)  # one capture at a time per model (its hooks)


_BUILT: OrderedDict[str, _Built] = OrderedDict()  # per worker process, most recent last
_BUILDING = threading.Lock()
_KEEP_BUILT = 2


def _built(job: _Job) -> _Built:
    """The job's model and per-batch step on this worker, built at its first task."""
    from .api import _prepare, _stream_step

    with _BUILDING:
        if job.key in _BUILT:
            _BUILT.move_to_end(job.key)
            return _BUILT[job.key]
        model = _build(job.model, job.options.get("device"))
        model, adapter, plan, device = _prepare(model, job.target, **job.options)
        step, fingerprint = _stream_step(model, adapter, plan, device, None, job.target)
        _BUILT[job.key] = built = _Built(step, fingerprint)
        while len(_BUILT) > _KEEP_BUILT:
            _BUILT.popitem(last=False)
        return built


def _worker_address() -> str:
    try:
        from distributed import get_worker

        return get_worker().address
    except (ImportError, ValueError):
        return "local"


def _describe(job: _Job) -> dict[str, Any]:
    """Task: build the model on this worker; its part of the run's fingerprint (model, weights, options, text)."""
    return dict(_built(job).fingerprint)


# -- the store's layout and each batch's rows ----------------------------------------------------


def _sample_chunk(var: xr.Variable, batch_size: int) -> int:
    """Images per chunk: the one-process stream's choice, lowered to a divisor of the batch size
    so that no chunk spans two batches (two workers never write one file)."""
    along = stream._chunks(var, batch_size)[var.dims.index("sample")]
    while batch_size % along:
        along -= 1
    return along


def _write_layout(tree: xr.DataTree, path: Path, count: int, batch_size: int) -> None:
    """Every group and array of the store at its full length (``count`` images), no batch's data yet:
    the labels (coordinates without ``sample``), attributes and encodings of ``tree`` (one batch)."""
    import dask.array as da
    import zarr

    target = stream._store(path)
    with quiet_zarr():
        for node in sorted(tree.subtree, key=lambda node: node.path == "/"):  # root last
            ds = node.to_dataset(inherit=False)
            encoding = zarr_encoding(ds)  # every chunk checksummed (CRC32C), as in one process
            variables = {}
            for name, var in ds.variables.items():
                if name == "sample":
                    var = xr.Variable("sample", np.arange(count, dtype=var.dtype), var.attrs)
                elif "sample" in var.dims:
                    along = _sample_chunk(var, batch_size)
                    chunks = tuple(along if d == "sample" else s for d, s in zip(var.dims, var.shape))
                    shape = tuple(count if d == "sample" else s for d, s in zip(var.dims, var.shape))
                    encoding[str(name)]["chunks"] = chunks
                    # (strings, such as each image's source, lay out as strings: xarray encodes by the values)
                    empty = "" if var.dtype == object else 0
                    var = xr.Variable(var.dims, da.full(shape, empty, dtype=var.dtype, chunks=chunks), var.attrs)
                variables[name] = var
            full = xr.Dataset({n: v for n, v in variables.items() if n not in ds.coords},
                              coords={n: v for n, v in variables.items() if n in ds.coords}, attrs=ds.attrs)
            group = None if node.path == "/" else node.path.strip("/")
            stream._fault(f"layout {node.path}")
            # compute=False: metadata and the labels only; every batch's rows are written by its worker
            full.to_zarr(target, group=group, mode="a", encoding=encoding, consolidated=False, compute=False,
                         write_empty_chunks=True)
        stream._fault("consolidate")
        zarr.consolidate_metadata(target)


def _write_rows(tree: xr.DataTree, path: Path, start: int) -> None:
    """One batch's rows of every array (whole chunks: see :func:`_sample_chunk`)."""
    target = stream._store(path)
    size = int(tree["sample"].size)
    with quiet_zarr():
        for node in tree.subtree:
            ds = node.to_dataset(inherit=False)
            rows = [n for n, v in ds.variables.items() if "sample" in v.dims and n != "sample"]
            if not rows:
                continue
            group = None if node.path == "/" else node.path.strip("/")
            stream._fault(f"rows {node.path}")
            part = ds[rows].drop_vars([n for n in ds[rows].coords if "sample" not in ds[n].dims or n == "sample"])
            part.to_zarr(target, group=group, region={"sample": slice(start, start + size)}, consolidated=False,
                         write_empty_chunks=True)


def _capture_batch(job: _Job, index: int, start: int, images: Any, target: Any, sources: list[str] | None,
                   session: str, path: str, layout: tuple[int, int] | None, weights: str | None) -> dict[str, Any]:
    """Task: capture batch ``index`` (images from ``start``; ``sources``: their files' names, or None)
    and write its rows (and, for the first batch of a run, the store's layout: ``(count, batch_size)``);
    report what was written."""
    from .api import _label_samples

    built = _built(job)
    digest = built.fingerprint["weights"]
    where = _worker_address()
    if weights is not None and digest != weights:
        raise ShardError(
            f"worker {where} built the model with other weights (digest {digest}) than the run's ({weights}): "
            "the factory is not deterministic (random initialisation?). Build the model from a checkpoint or "
            "seed it inside the factory (torch.manual_seed), then resume=True; nothing of this batch was written."
        )
    with built.lock:
        tree = built.step(images, target, 0, sources=sources)  # the batch's sources, from its first image on
    tree = _label_samples(tree, np.arange(start, start + int(tree["sample"].size)), None)
    store = Path(path)
    marker = read_marker(store) or {}
    if marker.get("session") != session:  # a run that resumed this store has taken over
        return {"batch": index, "written": False, "worker": where, "weights": digest}
    tree = for_disk(tree)
    if layout is not None:  # no batch is committed yet: what an earlier try of this task wrote goes first
        stream._clear_uncommitted(store)
        _write_layout(tree, store, *layout)
    _write_rows(tree, store, start)
    size = int(tree["sample"].size)
    del tree
    from .memory import release_memory

    release_memory()
    return {"batch": index, "written": True, "images": size, "worker": where, "weights": digest}


# -- planning ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShardPlan:
    """The batches of a sharded capture: ``count`` images, ``batch_size`` a batch, as in one process.

    Examples
    --------
    >>> plan = ShardPlan(count=10, batch_size=4)
    >>> plan.batches, plan.rows(2)
    (3, (8, 10))
    >>> plan.prefix({0, 2})  # images committed from the first on (what vl.open shows)
    4
    >>> plan.ranges([0, 1, 2], workers=2)
    [[0, 1], [2]]
    """

    count: int
    batch_size: int

    @property
    def batches(self) -> int:
        return -(-self.count // self.batch_size)

    def rows(self, index: int) -> tuple[int, int]:
        """The images ``[start, stop)`` of batch ``index``."""
        start = index * self.batch_size
        return start, min(start + self.batch_size, self.count)

    def prefix(self, done: Iterable[int]) -> int:
        """Images committed without a gap from the first one on."""
        done = set(done)
        first_missing = next((i for i in range(self.batches) if i not in done), self.batches)
        return self.rows(first_missing - 1)[1] if first_missing else 0

    def ranges(self, missing: Iterable[int], workers: int) -> list[list[int]]:
        """``missing`` batches cut into at most ``workers`` contiguous runs of about equal length."""
        missing = sorted(missing)
        parts = max(1, min(workers, len(missing)))
        bounds = np.linspace(0, len(missing), parts + 1).round().astype(int)
        return [missing[a:b] for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


def _as_ranges(batches: Iterable[int]) -> list[list[int]]:
    """Sorted batch indices as ``[first, last]`` runs (the marker's compact form)."""
    out: list[list[int]] = []
    for i in sorted(batches):
        if out and out[-1][1] == i - 1:
            out[-1][1] = i
        else:
            out.append([i, i])
    return out


def _from_ranges(ranges: Any, batches: int, path: Path) -> set[int]:
    try:
        done = {i for first, last in ranges for i in range(int(first), int(last) + 1)}
    except (TypeError, ValueError) as exc:
        raise ResumeError(f"{str(path)!r}: its commit record is damaged ({exc}); capture into a new store.") from None
    if done and (min(done) < 0 or max(done) >= batches):
        raise ResumeError(f"{str(path)!r}: its commit record names batches outside 0–{batches - 1}; the store is "
                          "damaged. Capture into a new store.")
    return done


def _batch_targets(target: Any, start: int, stop: int) -> Any:
    """The batch's part of a per-image target list (a scalar or callable target stays whole)."""
    if target is None or isinstance(target, (int, np.integer, str)) or callable(target):
        return target
    return list(target)[start:stop]


def _batch_images(source: Any, start: int, stop: int) -> Any:
    part = source[start:stop]
    if isinstance(part, xr.DataArray):
        part = part.load()
    return part


def _job(model: Any, options: dict[str, Any], target: Any) -> _Job:
    from distributed.protocol.pickle import dumps  # how dask will send them

    scalar = target if _batch_targets(target, 0, 0) is target else None
    try:
        blob = dumps((model, options, scalar))
    except Exception as exc:  # noqa: BLE001 - whatever pickling raises, say what to change
        raise OptionError(
            f"client=: the model ({model!r}) and the capture options must be picklable to reach the workers; "
            f"pickling failed ({type(exc).__name__}: {exc}). Pass a model name or a module-level function."
        ) from exc
    return _Job(model, options, scalar, hashlib.blake2b(blob, digest_size=16).hexdigest())


# -- the client's loop --------------------------------------------------------------------------


class _Run:
    """This process's side of a sharded capture: the marker it alone writes, and the tasks in flight."""

    def __init__(self, client: Any, path: Path, plan: ShardPlan, marker: dict[str, Any], job: _Job,
                 images: Any, source: Any, target: Any, bar: Any):
        self.client, self.path, self.plan, self.marker, self.job = client, path, plan, marker, job
        self.source, self.target, self.bar = source, target, bar
        from .images import image_sources

        self.sources = image_sources(images)  # each image's file, named as one process names it
        self.done = _from_ranges(marker.get("done", []), plan.batches, path)
        self.weights = marker["run"]["weights"]

    def submit(self, index: int, worker: str | None = None, layout: bool = False) -> Any:
        start, stop = self.plan.rows(index)
        return self.client.submit(
            _capture_batch, self.job, index, start, _batch_images(self.source, start, stop),
            _batch_targets(self.target, start, stop), None if self.sources is None else self.sources[start:stop],
            self.marker["session"], str(self.path),
            (self.plan.count, self.plan.batch_size) if layout else None, self.weights,
            key=f"vitlens-batch-{index}-{self.marker['session'][:8]}", pure=False,
            **({} if worker is None else {"workers": [worker], "allow_other_workers": True}),
        )

    def commit(self, result: dict[str, Any], layout: bool = False) -> None:
        if not result["written"]:
            raise ShardError(f"{str(self.path)!r} was taken over by another run while this one was writing it; "
                             "let that run finish (or resume again).")
        self.done.add(result["batch"])
        self.marker = {**self.marker, "done": _as_ranges(self.done), "images": self.plan.prefix(self.done),
                       **({"layout": True} if layout else {})}
        stream._write_marker(self.path, self.marker)
        if self.bar is not None:
            self.bar.update(result["images"])

    def missing(self) -> list[int]:
        return [i for i in range(self.plan.batches) if i not in self.done]

    def run(self) -> None:
        from distributed import as_completed

        missing = self.missing()
        if not self.marker.get("layout"):
            first = missing.pop(0)
            self.commit(_result(self.submit(first, layout=True), self.path), layout=True)
        workers = list(self.client.scheduler_info().get("workers", {})) or [None]
        ranges = [deque(r) for r in self.plan.ranges(missing, len(workers))]
        owner = {k: workers[k % len(workers)] for k in range(len(ranges))}
        futures: dict[Any, int] = {}  # future -> its range
        pending = as_completed()

        def feed(k: int) -> None:
            while ranges[k] and sum(1 for r in futures.values() if r == k) < DEPTH:
                future = self.submit(ranges[k].popleft(), owner[k])
                futures[future] = k
                pending.add(future)

        for k in range(len(ranges)):
            feed(k)
        try:
            for future in pending:
                k = futures.pop(future)
                result = _result(future, self.path)
                self.commit(result)
                owner[k] = result["worker"]  # the range goes on where its last batch ran
                if not ranges[k] and not any(r == k for r in futures.values()):
                    longest = max(range(len(ranges)), key=lambda j: len(ranges[j]))
                    half = len(ranges[longest]) // 2
                    if half:  # take over the second half of the longest range left
                        ranges[k] = deque(list(ranges[longest])[-half:])
                        for _ in range(half):
                            ranges[longest].pop()
                feed(k)
        finally:
            for future in futures:
                future.cancel()


def _result(future: Any, path: Path) -> dict[str, Any]:
    """A task's report, or its error: a batch that keeps killing workers becomes a :class:`ShardError`."""
    try:
        from distributed.scheduler import KilledWorker
    except ImportError:  # pragma: no cover
        KilledWorker = ()  # type: ignore[assignment]  # noqa: N806
    try:
        return future.result()
    except KilledWorker as exc:
        raise ShardError(
            f"a batch of {str(path)!r} ended the worker that ran it several times over ({exc}); the batches "
            "committed before are intact. Look at the workers' logs (out of memory? a crashing image?), then "
            "continue with vl.capture(..., store=..., resume=True, client=client)."
        ) from exc


def capture_sharded(client: Any, model: str | Callable[[], nn.Module], images: Any, target: Any, *,
                    store: str | os.PathLike, resume: bool, progress: bool | None,
                    options: dict[str, Any]) -> xr.DataTree:
    """``vl.capture(model, images, target, store=store, client=client, **options)`` on the client's workers.

    Returns the store opened lazily, as a one-process streaming capture does.
    Called by :func:`vitlens.capture` (``client=``); see the module's description.

    Examples
    --------
    >>> import tempfile, os, numpy as np, vitlens as vl
    >>> from dask.distributed import Client, LocalCluster
    >>> images = vl.datasets.shapes(n=4, seed=0).image
    >>> path = os.path.join(tempfile.mkdtemp(), "run.zarr")
    >>> with LocalCluster(n_workers=1, processes=False, dashboard_address=None) as cluster, Client(cluster) as c:
    ...     lazy = vl.capture("vit-shapes", images, store=path, client=c, batch_size=2, progress=False)
    >>> lazy.sizes["sample"], vl.verify(path).images
    (4, 4)
    """
    from .api import DEFAULT_BATCH_SIZE
    from .fingerprint import source_fingerprint, target_fingerprint
    from .store import open as open_capture

    path = Path(store)
    if path.suffix.lower() != ".zarr":
        raise OptionError(f"store={str(path)!r}: streaming captures go to a '.zarr' directory.")
    if path.exists() and not resume:
        raise OptionError(f"{str(path)!r} already exists; pass resume=True to continue it, or choose a new path.")
    source = stream.image_source(images)
    count = stream._length(source)
    if count is None:
        raise OptionError(
            f"client=: the workers capture batches by their position, so the images must be an array, a Dataset, "
            f"a list of paths or a folder; got a {type(images).__name__}, whose length is unknown. Capture it in "
            "one process (client=False), or pass its items as a list."
        )
    if count == 0:
        raise ImageError("empty source: no image was captured.")
    if isinstance(source, xr.Dataset):
        source = source["image"]
    if isinstance(source, xr.DataArray) and "sample" not in source.dims:
        source = source.expand_dims("sample")
    if isinstance(source, np.ndarray) and source.ndim == 3:
        source = source[None]
    batch_size = options.get("batch_size")
    batch_size = DEFAULT_BATCH_SIZE if batch_size is None else batch_size
    if not isinstance(batch_size, (int, np.integer)) or isinstance(batch_size, bool) or batch_size < 1:
        raise OptionError(f"batch_size must be a positive int; got {batch_size!r}.")
    plan = ShardPlan(count=count, batch_size=int(batch_size))
    if target is not None and _batch_targets(target, 0, 0) is not target and len(list(target)) != count:
        from ..errors import TargetError

        raise TargetError(f"got {len(list(target))} targets for {count} images; pass one per image, one, or None.")

    job = _job(model, dict(options), target)
    if not client.scheduler_info().get("workers"):
        client.wait_for_workers(1, timeout=120)
    fingerprint = {**client.submit(_describe, job, pure=False).result(),
                   "target": target_fingerprint(target), "source": source_fingerprint(images)}
    shape = {"images": plan.count, "batch_size": plan.batch_size}
    fresh = {"format": stream.SHARD_FORMAT, "images": 0, "complete": False, "run": fingerprint,
             "shard": shape, "done": [], "layout": False}
    handle, marker = stream._open_store(path, fingerprint, resume, fresh)
    try:
        if marker.get("shard") != shape:
            raise ResumeError(
                f"{str(path)!r} was captured in batches of {marker.get('shard', {}).get('batch_size')} images; "
                f"its batches are the unit of its commit record. Resume it with "
                f"batch_size={marker.get('shard', {}).get('batch_size')}."
            )
        if marker.get("complete"):
            return open_capture(path, chunks={})
        marker = {**marker, "session": uuid.uuid4().hex}  # tasks of an earlier run no longer write
        stream._write_marker(path, marker)
        if marker.get("layout"):
            stream._remove_partials(path)
        else:
            stream._clear_uncommitted(path)
        bar = None
        run = None
        try:
            if progress is None or progress:
                from tqdm.auto import tqdm

                bar = tqdm(total=plan.count, desc=f"capture → {path.name} (dask)", unit="img")
            run = _Run(client, path, plan, marker, job, images, source, target, bar)
            if bar is not None:
                bar.update(sum(b - a for a, b in map(plan.rows, run.done)))
            run.run()
        finally:
            if bar is not None:
                bar.close()
        stream._remove_partials(path)  # what a killed worker left of its uncommitted writes
        stream._write_marker(path, {**run.marker, "images": plan.count, "complete": True})
    finally:
        _lock.release(handle)
    return open_capture(path, chunks={})
