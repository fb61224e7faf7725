"""Capture sharded over dask workers: the store one process writes, written by several; kills lose nothing."""

from __future__ import annotations

import functools
import json
import os
import sys
import textwrap
import time
from pathlib import Path

import dask.array as da
import numpy as np
import pytest
import xarray as xr
from conftest import kill_when, make_vit, random_images

import vitlens as vl
from vitlens.capture import shard, stream
from vitlens.capture.store import MARKER

TESTS = Path(__file__).resolve().parent
# the workers cannot import this file: what the tests send them (client.run's functions) goes by value
__import__("cloudpickle").register_pickle_by_value(sys.modules[__name__])
TINY = dict(img_size=32, patch_size=8, num_classes=5, embed_dim=48, depth=3, num_heads=3)  # conftest.make_vit's


def tiny_factory(tmp_path: Path, seed: int = 0):
    """A timm name with checkpoint= (what a real cluster is given): conftest.make_vit's weights, from a file."""
    from safetensors.torch import save_file

    path = tmp_path / f"tiny{seed}.safetensors"
    if not path.exists():
        save_file(make_vit(seed=seed).state_dict(), str(path))
    return functools.partial(vl.load_model, "vit_tiny_patch16_224", checkpoint=str(path), **TINY)


def one_thread(fn, *args, **kwargs):
    """``fn`` with one torch thread, as on a dask worker (its nanny sets OMP_NUM_THREADS=1): float sums on
    CPU depend on how many threads share them, so bit-for-bit equality is between equal thread counts."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fn(*args, **kwargs)
    finally:
        torch.set_num_threads(threads)


def assert_same_store(reference: Path, other: Path) -> None:
    """Every group, variable, dtype, value (bit for bit) and attribute of two stores is the same."""
    a, b = vl.open(reference), vl.open(other)
    assert {n.path for n in a.subtree} == {n.path for n in b.subtree}
    for node in a.subtree:
        x, y = node.to_dataset(inherit=False), b[node.path].to_dataset(inherit=False)
        assert x.attrs == y.attrs, node.path
        assert set(x.variables) == set(y.variables), node.path
        for name in x.variables:
            assert x[name].dims == y[name].dims and x[name].dtype == y[name].dtype, (node.path, name)
            assert x[name].values.tobytes() == y[name].values.tobytes(), f"{node.path}/{name} differs"
            assert x[name].attrs == y[name].attrs, (node.path, name)


def marker(path: Path) -> dict:
    return json.loads((path / MARKER).read_text())


def marker_now(path: Path) -> dict:
    """The marker of a store being written ({} before there is one)."""
    try:
        return marker(path)
    except (OSError, ValueError):
        return {}


# -- fast: planning and refusals ----------------------------------------------------------------------


class _NotAClient:  # what sharding_client checks of a Client: it can submit and knows its scheduler
    def submit(self, *a, **k):
        raise AssertionError("a refused capture must not submit anything")

    def scheduler_info(self):
        return {"workers": {}}


def test_batches_are_those_of_one_process_and_ranges_are_contiguous():
    plan = shard.ShardPlan(count=10, batch_size=4)
    assert [plan.rows(i) for i in range(plan.batches)] == [(0, 4), (4, 8), (8, 10)]
    assert [start for start, _ in stream.batches(np.zeros((10, 2, 2, 3)), 4)] == [0, 4, 8]  # the stream's starts
    assert plan.prefix(set()) == 0 and plan.prefix({1, 2}) == 0 and plan.prefix({0, 2}) == 4 and plan.prefix({0, 1, 2}) == 10
    missing = [0, 1, 2, 5, 6, 7, 8]
    ranges = shard.ShardPlan(count=40, batch_size=4).ranges(missing, workers=3)
    assert sorted(i for r in ranges for i in r) == missing and len(ranges) == 3
    assert all(r == sorted(r) for r in ranges) and [len(r) for r in ranges] in ([2, 3, 2], [3, 2, 2], [2, 2, 3])
    assert shard.ShardPlan(count=8, batch_size=4).ranges([1], workers=4) == [[1]]
    done = {0, 1, 2, 5, 9}
    assert shard._as_ranges(done) == [[0, 2], [5, 5], [9, 9]]
    assert shard._from_ranges(shard._as_ranges(done), 10, Path("x.zarr")) == done
    with pytest.raises(vl.ResumeError, match="outside"):
        shard._from_ranges([[8, 12]], 10, Path("x.zarr"))


def test_no_chunk_spans_two_batches():
    """Large images: the stream would put 5 per chunk; a batch of 32 then splits into chunks of 4."""
    per_image = stream.CHUNK_BYTES // 5 // 4  # float32 values: 5 images fill a chunk
    var = xr.Variable(("sample", "value"), da.zeros((32, per_image), dtype=np.float32, chunks=(32, per_image)))
    assert stream._chunks(var, 32)[0] == 5
    assert shard._sample_chunk(var, 32) == 4
    small = xr.Variable(("layer", "sample"), da.zeros((2, 7), dtype=np.float32))
    assert shard._sample_chunk(small, 6) == 6


def test_a_live_module_with_a_client_is_refused_saying_what_to_pass(tmp_path, vit):
    imgs = random_images(2, 32)
    with pytest.raises(vl.OptionError, match=r"live VisionTransformer.*vl\.load_model.*functools\.partial"):
        vl.capture(vit, imgs, store=tmp_path / "r.zarr", client=_NotAClient())
    assert not (tmp_path / "r.zarr").exists()
    with pytest.raises(vl.OptionError, match="store="):
        vl.capture("vit-shapes", imgs, client=_NotAClient())
    with pytest.raises(vl.OptionError, match="Client"):
        vl.capture("vit-shapes", imgs, store=tmp_path / "r.zarr", client="tcp://somewhere:8786")
    # without client=, a live module is captured in this process, as always
    assert shard.sharding_client(None, vit, tmp_path / "r.zarr") is None
    assert shard.sharding_client(False, "vit-shapes", tmp_path / "r.zarr") is None
    client = _NotAClient()
    assert shard.sharding_client(client, "vit-shapes", tmp_path / "r.zarr") is client
    import threading

    with pytest.raises(vl.OptionError, match="picklable"):  # what cannot reach the workers is named here
        shard._job(lambda: threading.Lock(), {"reference": threading.Lock()}, None)


def test_a_source_of_unknown_length_is_refused(tmp_path):
    def batches():
        yield random_images(2, 32)

    with pytest.raises(vl.OptionError, match="length is unknown.*client=False"):
        shard.capture_sharded(_NotAClient(), "vit-shapes", batches(), None, store=tmp_path / "g.zarr",
                              resume=False, progress=False, options={})
    with pytest.raises(vl.OptionError, match="'.zarr'"):
        shard.capture_sharded(_NotAClient(), "vit-shapes", random_images(2, 32), None, store=tmp_path / "g.nc",
                              resume=False, progress=False, options={})


# -- slow: a LocalCluster of two worker processes -------------------------------------------------------


@pytest.fixture(scope="module")
def client():
    from dask.distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, processes=True, threads_per_worker=1, dashboard_address=None) as cluster:
        with Client(cluster) as c:
            yield c


def _batches_run(stream_data) -> list[int]:
    return sorted(int(str(t["key"]).split("-")[2]) for t in stream_data if str(t["key"]).startswith("vitlens-batch-"))


@pytest.mark.slow
def test_two_worker_processes_write_the_store_one_process_writes(tmp_path, client):
    from dask.distributed import get_task_stream

    imgs = random_images(16, 32, seed=3)
    targets = [i % 5 for i in range(16)]
    one = tmp_path / "one.zarr"
    one_thread(vl.capture, make_vit(), imgs, targets, store=one, batch_size=4, progress=False)
    with get_task_stream(client) as ts:
        lazy = vl.capture(tiny_factory(tmp_path), imgs, targets, store=tmp_path / "two.zarr", batch_size=4,
                          progress=False, client=client)
    assert lazy["stage0"].attention.chunks is not None  # opened lazily, as a one-process store
    assert_same_store(one, tmp_path / "two.zarr")
    assert _batches_run(ts.data) == [0, 1, 2, 3]
    assert len({t["worker"] for t in ts.data if str(t["key"]).startswith("vitlens-batch-")}) == 2  # both worked
    done = marker(tmp_path / "two.zarr")
    assert done["complete"] and done["done"] == [[0, 3]] and done["images"] == 16
    assert vl.verify(tmp_path / "two.zarr").checksums == "crc32c per chunk"
    # a folder: each sample's source, named as in one process; a Client that is active is used without
    # client= (the model is a factory, store= is given)
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    for i, a in enumerate((imgs[:6] * 255).round().astype(np.uint8)):
        Image.fromarray(a).save(folder / f"{i:02d}.png")
    one_thread(vl.capture, make_vit(), str(folder), store=tmp_path / "one_folder.zarr", batch_size=4, progress=False)
    vl.capture(tiny_factory(tmp_path), str(folder), store=tmp_path / "implicit.zarr", batch_size=4, progress=False)
    assert marker(tmp_path / "implicit.zarr")["format"] == stream.SHARD_FORMAT
    assert_same_store(tmp_path / "one_folder.zarr", tmp_path / "implicit.zarr")
    assert vl.open(tmp_path / "implicit.zarr")["source"].values.tolist() == [f"{i:02d}.png" for i in range(6)]


@pytest.mark.slow
def test_two_worker_processes_write_the_reduced_store_one_process_writes(tmp_path, client):
    """maps=/stats=/keep='none' sharded: the answers per batch on the workers, the same store as one process."""
    imgs = random_images(12, 32, seed=4)
    reduced = dict(maps=["rollout", "transformer_attribution"], stats=["attention_entropy", "attention_distance"],
                   keep="none", batch_size=4, progress=False)
    one_thread(vl.capture, make_vit(), imgs, store=tmp_path / "one.zarr", **reduced)
    vl.capture(tiny_factory(tmp_path), imgs, store=tmp_path / "two.zarr", client=client, **reduced)
    assert_same_store(tmp_path / "one.zarr", tmp_path / "two.zarr")
    two = vl.open(tmp_path / "two.zarr")
    assert {"maps", "stats"} <= set(two.children) and not two["stage0"].data_vars  # answers, no raw attention
    np.testing.assert_array_equal(vl.explain(two, "rollout").values, vl.explain(vl.open(tmp_path / "one.zarr"), "rollout").values)
    assert marker(tmp_path / "two.zarr")["format"] == stream.SHARD_FORMAT


def _arm(step: int, log: str) -> int:
    """On a worker: exit (as SIGKILL would) at this process's ``step``-th write step from now."""
    os.environ[stream.FAULT_ENV], os.environ[stream.FAULT_LOG_ENV] = str(step), log
    stream._fault = stream._Faults()
    return os.getpid()


@pytest.mark.slow
def test_a_worker_killed_mid_batch_loses_nothing_committed(tmp_path):
    """Once the store is laid out, one worker exits (as SIGKILL would) half-way through writing a batch:
    dask captures that batch again elsewhere, and the store is the one-process store all the same."""
    from dask.distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, processes=True, threads_per_worker=1, dashboard_address=None) as cluster:
        with Client(cluster) as client:  # its own: the other tests need two workers, and a restart can be slow
            _kill_a_worker(tmp_path, client)


def _kill_a_worker(tmp_path, client):
    import threading


    imgs = random_images(16, 32, seed=5)
    one = tmp_path / "one.zarr"
    one_thread(vl.capture, make_vit(), imgs, store=one, batch_size=2, progress=False)
    two, log = tmp_path / "two.zarr", tmp_path / "steps.txt"
    errors = []

    def run():
        try:
            vl.capture(tiny_factory(tmp_path), imgs, store=two, batch_size=2, progress=False, client=client)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    deadline = time.time() + 300
    while time.time() < deadline and not marker_now(two).get("layout"):
        time.sleep(0.01)
    first = sorted(client.scheduler_info()["workers"])[0]
    pid = client.run(_arm, 10, str(log), workers=[first])[first]  # half-way through the rows of a batch
    thread.join(600)
    assert not errors, errors
    steps = log.read_text().splitlines()
    assert len(steps) == 10 and steps[-1].split("\t")[1].startswith(("set ", "rows"))  # it died writing rows
    assert any(line.split("\t")[1].startswith("set ") for line in steps)  # some of that batch was on disk
    assert pid not in client.run(os.getpid).values()  # that worker process is gone
    assert_same_store(one, two)
    assert marker(two)["done"] == [[0, 7]]


_CLIENT = textwrap.dedent(
    """
    import sys, time
    sys.path.insert(0, {tests!r})
    from conftest import random_images
    import vitlens as vl
    from vitlens.capture import shard
    from test_shard import tiny_factory
    from pathlib import Path
    from dask.distributed import Client, LocalCluster

    commit = shard._Run.commit
    def slow_commit(self, *a, **k):  # time for the test to kill this process mid-run
        commit(self, *a, **k)
        time.sleep(0.4)
    shard._Run.commit = slow_commit

    if __name__ == "__main__":
        with LocalCluster(n_workers=1, processes=False, threads_per_worker=1, dashboard_address=None) as c, \\
                Client(c) as client:
            vl.capture(tiny_factory(Path({tmp!r})), random_images(16, 32, seed=6), store={store!r}, batch_size=2,
                       progress=False, client=client)
    """
)


@pytest.mark.slow
def test_a_killed_client_resumes_and_redoes_only_the_missing_batches(tmp_path, client):
    from dask.distributed import get_task_stream

    store = tmp_path / "killed.zarr"
    script = tmp_path / "run.py"
    script.write_text(_CLIENT.format(tests=str(TESTS), tmp=str(tmp_path), store=str(store)))
    tiny_factory(tmp_path)  # the checkpoint, written before the client starts
    kill_when(script, lambda: sum(b - a + 1 for a, b in marker_now(store).get("done", [])) >= 3,
              timeout=300, poll=0.02, never="the sharded run never committed 3 batches")
    done = shard._from_ranges(marker(store)["done"], 8, store)
    assert 3 <= len(done) < 8 and not marker(store)["complete"]
    imgs = random_images(16, 32, seed=6)
    one = tmp_path / "one.zarr"
    reference = one_thread(vl.capture, make_vit(), imgs, store=one, batch_size=2, progress=False)
    with pytest.warns(UserWarning, match="resume=True"):  # the committed prefix, and how to continue
        partial = vl.open(store)
    prefix = shard.ShardPlan(16, 2).prefix(done)
    assert partial.sizes["sample"] == prefix
    xr.testing.assert_identical(partial["stage0"].attention, reference["stage0"].attention[:prefix].load())

    with pytest.raises(vl.ResumeError, match="weights"):  # another model: refused, nothing written
        vl.capture(tiny_factory(tmp_path, seed=1), imgs, store=store, batch_size=2, resume=True, client=client,
                   progress=False)
    with pytest.raises(vl.ResumeError, match="batch_size=2"):
        vl.capture(tiny_factory(tmp_path), imgs, store=store, batch_size=4, resume=True, client=client,
                   progress=False)
    with pytest.raises(vl.ResumeError, match="dask workers.*client=client"):
        vl.capture(make_vit(), imgs, store=store, batch_size=2, resume=True, progress=False)
    with get_task_stream(client) as ts:
        vl.capture(tiny_factory(tmp_path), imgs, store=store, batch_size=2, resume=True, client=client,
                   progress=False)
    assert _batches_run(ts.data) == sorted(set(range(8)) - done)  # only what was missing
    assert_same_store(one, store)


@pytest.mark.slow
def test_workers_that_build_different_weights_stop_the_run(tmp_path, client):
    """An unseeded factory gives each worker its own random weights: nothing of theirs is written."""

    def unseeded():
        import timm

        return timm.create_model("vit_tiny_patch16_224", **TINY).eval()

    store = tmp_path / "mixed.zarr"
    with pytest.raises(vl.ShardError, match="seed it inside the factory"):
        vl.capture(unseeded, random_images(16, 32, seed=2), store=store, batch_size=2, progress=False,
                   client=client)
    done = marker(store)["done"]
    weights = marker(store)["run"]["weights"]
    assert sum(b - a + 1 for a, b in done) < 8 and weights  # stopped, what is committed is the describing worker's
