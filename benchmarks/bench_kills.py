"""Kill a streaming capture ≥ 50 times; count the stores that lose anything (target: 0).

    python benchmarks/bench_kills.py [--kills 52] [--random 12] [--saves 16] [--seed 0]

A child process (spawned: a fork of a process whose torch OpenMP threads
have run can hang in the child) streams 10 images of a small ViT into a zarr store in batches of
3 and dies: ``--kills - --random`` times at write steps spread evenly over the
whole write path (``VITLENS_FAULT_POINT=N``: the writer ``os._exit``\\ s at its
N-th write — store creation, every group, the root, consolidation, both sides
of the commit-marker rename), and ``--random`` times by SIGKILL at a random
moment. After each kill the committed part must open and equal the same images
captured in memory, and ``resume=True`` must finish a store equal to the
in-memory capture. A store counts as lost if either fails.

Then ``--saves`` times a child runs ``vl.save(new, path, overwrite=True)`` over a
saved capture (``.zarr`` and ``.nc`` in turn) and is SIGKILLed at a random
moment of the save. The next ``vl.open(path)`` must give the old or the new
capture whole, and leave nothing of the killed save beside ``path`` (its
temporary copy, or a capture it moved aside).

Sharded captures (``vl.capture(factory, images, store=..., client=...)``, ``--shard-clients``,
``--shard-workers``): a spawned client with an in-process LocalCluster of 2 worker
threads is killed ``--shard-clients`` times, at write steps spread over its whole write
path (its commit markers, the store's layout, the workers' rows) and by SIGKILL at
random moments; and on a LocalCluster of 2 worker processes one worker is made to
exit at a random write step of its own ``--shard-workers`` times while the run goes on.
Every batch the marker lists as committed must hold exactly the one-process capture's
values (1 torch thread on both sides), a killed client's store must resume to the
one-process store, and a run that lost a worker must finish with it. A batch that
does not counts as lost.

``--reduced``: the same kills on a reduced capture (``maps=["rollout",
"transformer_attribution"]``, two head statistics, ``keep="none"``), one-process
and sharded (no save kills in this mode): the committed part must equal the same
reduced capture made in one process, and the resume must finish it.
``--only-shards --reduced`` runs the sharded reduced kills alone.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import signal
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import timm
import torch

import vitlens as vl
from vitlens.capture import stream

N, BATCH = 10, 3


def model():
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=5, embed_dim=48,
                             depth=3, num_heads=3).eval()


#: ``--reduced``: the same kills on a reduced capture (maps=, stats=, keep="none"). Read from the
#: environment, so that the spawned children capture the same way.
REDUCED_ENV = "VITLENS_BENCH_KILLS_REDUCED"


def options() -> dict:
    """The capture options of every one-process run: none, or the reduced capture's under ``--reduced``."""
    if os.environ.get(REDUCED_ENV) != "1":
        return {}
    return dict(maps=["rollout", "transformer_attribution"], stats=["attention_entropy", "attention_distance"],
                keep="none")


def images() -> np.ndarray:
    return np.random.default_rng(5).random((N, 32, 32, 3)).astype(np.float32)


def _child(store: str, fault: int | None, log: str | None, delay: float, ready=None) -> None:
    os.environ.pop(stream.FAULT_ENV, None)
    os.environ.pop(stream.FAULT_LOG_ENV, None)
    if fault is not None:
        os.environ[stream.FAULT_ENV] = str(fault)
    if log is not None:
        os.environ[stream.FAULT_LOG_ENV] = log
    imgs = images()

    def slow():
        for i in range(0, N, BATCH):
            time.sleep(delay)
            yield imgs[i : i + BATCH]

    net = model()
    if ready is not None:
        ready.set()  # imports done: a random kill lands in the capture, not in starting Python
    vl.capture(net, slow() if delay else imgs, store=store, batch_size=BATCH, progress=False, **options())
    os._exit(0)


def spawn(target, args: tuple, kill_after=None) -> int:
    """Exit code of ``target(*args, ready)`` in a spawned process, SIGKILLed ``kill_after`` s after it
    sets ``ready`` (its imports done) if it is still running then."""
    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Event()
    proc = ctx.Process(target=target, args=(*args, ready))
    proc.start()
    if kill_after is not None:
        ready.wait(300)
        proc.join(kill_after)
        if proc.is_alive():
            os.kill(proc.pid, signal.SIGKILL)
    proc.join(300)
    return proc.exitcode


def run(store: Path, fault=None, log=None, delay=0.0, kill_after=None) -> int:
    return spawn(_child, (str(store), fault, log, delay), kill_after)


def equal(ref, tree, n=None) -> bool:
    ref = ref if n is None else ref.isel(sample=slice(0, n))
    if tree.attrs != ref.attrs:
        return False
    for path, node in ref.subtree_with_keys:
        a, b = node.to_dataset(inherit=False), tree[path].to_dataset(inherit=False).load()
        if set(a.variables) != set(b.variables):
            return False
        for name in a.variables:
            x, y = a[name].values, b[name].values
            ok = np.allclose(x, y, rtol=1e-4, atol=1e-6, equal_nan=True) if x.dtype.kind == "f" else np.array_equal(x, y)
            if not ok:
                return False
    return True


def check(store: Path, ref) -> tuple[bool, bool, int, str]:
    """(committed part intact, resumed OK, committed images, note)."""
    try:
        done = stream.committed(store) if store.exists() else 0
        if done:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                if not equal(ref, vl.open(store, chunks={}), done):
                    return False, False, done, "committed part differs"
    except Exception as exc:  # noqa: BLE001 - a benchmark counts every failure
        return False, False, -1, f"open: {type(exc).__name__}: {exc}"
    try:
        resumed = vl.capture(model(), images(), store=store, batch_size=BATCH, resume=True, progress=False,
                             **options())
        ok = equal(ref, resumed) and equal(ref, vl.open(store))
        return True, ok, done, "" if ok else "resumed store differs"
    except Exception as exc:  # noqa: BLE001
        return True, False, done, f"resume: {type(exc).__name__}: {exc}"


# -- sharded captures -----------------------------------------------------------------------


def _shard_child(store: str, fault: int | None, log: str | None, ready=None) -> None:
    """A client with 2 worker threads in its own process; ``fault``: exit at that write step of the process.
    Captures with :func:`options` (the environment says whether reduced)."""
    os.environ.pop(stream.FAULT_ENV, None)
    os.environ.pop(stream.FAULT_LOG_ENV, None)
    if fault is not None:
        os.environ[stream.FAULT_ENV] = str(fault)
    if log is not None:
        os.environ[stream.FAULT_LOG_ENV] = log
    torch.set_num_threads(1)
    stream._fault = stream._Faults()
    from dask.distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        if ready is not None:
            ready.set()
        vl.capture(model, images(), store=store, batch_size=BATCH, progress=False, client=client, **options())
    os._exit(0)


def run_shard_client(store: Path, fault=None, log=None, kill_after=None) -> int:
    return spawn(_shard_child, (str(store), fault, log), kill_after)


def committed_batches(store: Path) -> set[int]:
    import json

    from vitlens.capture.shard import ShardPlan, _from_ranges

    try:
        marker = json.loads((store / stream.MARKER).read_text())
    except (OSError, ValueError):
        return set()
    return _from_ranges(marker.get("done", []), ShardPlan(N, BATCH).batches, store)


def lost_batches(ref1, store: Path, batches: set[int]) -> list[int]:
    """Committed batches whose rows differ from the one-process capture (read raw: any batch, not a prefix)."""
    import xarray as xr

    from vitlens.capture.shard import ShardPlan

    if not batches:
        return []
    from vitlens.capture.store import quiet_zarr

    with quiet_zarr():
        raw = xr.open_datatree(store, engine="zarr", consolidated=False, chunks=None, mask_and_scale=False)
    lost = []
    for b in sorted(batches):
        start, stop = ShardPlan(N, BATCH).rows(b)
        for node in ref1.subtree:
            ds = node.to_dataset(inherit=False)
            names = [n for n, v in ds.data_vars.items() if "sample" in v.dims]
            if any(not same(ds[n].values[start:stop], raw[node.path][n].values[start:stop]) for n in names):
                lost.append(b)
                break
    return lost


def same(a: np.ndarray, b: np.ndarray) -> bool:
    """Bit for bit (NaN where NaN: a prefix token's pixel centre)."""
    return a.dtype == b.dtype and np.array_equal(a, b, equal_nan=a.dtype.kind == "f")


def shard_equal(ref1, store: Path) -> bool:
    tree = vl.open(store)
    return all(same(node.to_dataset(inherit=False)[n].values, tree[node.path][n].values)
               for node in ref1.subtree for n in node.to_dataset(inherit=False).variables)


def _arm(step: int, log: str) -> int:
    os.environ[stream.FAULT_ENV], os.environ[stream.FAULT_LOG_ENV] = str(step), log
    stream._fault = stream._Faults()
    return os.getpid()


def kill_shards(d: Path, clients: int, workers: int, rng) -> dict[str, int]:
    """Kill sharded captures: the client (with its worker threads) and single worker processes."""
    import threading

    from dask.distributed import Client, LocalCluster

    torch.set_num_threads(1)  # the reference: one torch thread, as every worker
    ref1 = vl.capture(model(), images(), batch_size=BATCH, **options())
    out = {"client kills": 0, "worker kills": 0, "committed batches checked": 0, "lost": 0, "resumed OK": 0,
           "runs that finished before the kill": 0}
    log = d / "shard-steps.txt"
    assert run_shard_client(d / "shard-trace.zarr", log=str(log)) == 0
    steps = len(log.read_text().splitlines())
    out["client write steps"] = steps
    fixed = clients - clients // 4
    plan = [("step", int(s)) for s in sorted(set(np.linspace(1, steps, fixed).round().astype(int).tolist()))]
    plan += [("random", None)] * (clients - len(plan))
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        for i, (kind, step) in enumerate(plan):
            store = d / f"shard{i}.zarr"
            code = (run_shard_client(store, fault=step) if kind == "step"
                    else run_shard_client(store, kill_after=rng.random() * 6.0))
            if code == 0:
                out["runs that finished before the kill"] += 1
                continue
            out["client kills"] += 1
            done = committed_batches(store)
            out["committed batches checked"] += len(done)
            lost = lost_batches(ref1, store, done)
            try:
                vl.capture(model, images(), store=store, batch_size=BATCH, progress=False, client=client,
                           resume=True, **options())
                ok = shard_equal(ref1, store)
            except Exception as exc:  # noqa: BLE001 - a benchmark counts every failure
                print(f"  shard client kill {i} ({kind} {step}): resume: {type(exc).__name__}: {exc}", file=sys.stderr)
                ok = False
            out["resumed OK"] += ok
            out["lost"] += len(lost) + (not ok and not lost)
            if lost:
                print(f"  shard client kill {i} ({kind} {step}): committed batches {lost} differ", file=sys.stderr)
    for i in range(workers):  # a fresh cluster each time: a nanny restarting a worker can be slow on a loaded machine
        store, wlog = d / f"shardw{i}.zarr", d / f"shardw{i}.txt"
        with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
                Client(cluster) as client:
            target = sorted(client.scheduler_info()["workers"])[int(rng.integers(2))]
            # a step of the worker's own writes (about half the run's; a reduced store has fewer than 90)
            pid = client.run(_arm, int(rng.integers(1, min(90, max(2, steps // 2)))), str(wlog),
                             workers=[target])[target]
            try:
                vl.capture(model, images(), store=store, batch_size=BATCH, progress=False, client=client,
                           **options())
                ok = shard_equal(ref1, store)
            except Exception as exc:  # noqa: BLE001
                print(f"  shard worker kill {i}: {type(exc).__name__}: {exc}", file=sys.stderr)
                ok = False
            killed = pid not in client.run(os.getpid).values()  # the worker that exited is gone
        out["worker kills"] += killed
        out["runs that finished before the kill"] += not killed
        out["committed batches checked"] += len(committed_batches(store))
        out["lost"] += not ok
    return out


def _save_child(cap, path: str, ready) -> None:
    ready.set()
    vl.save(cap, path, overwrite=True)
    os._exit(0)


def kill_saves(d: Path, old, new, count: int, rng) -> tuple[int, int, int, int, int]:
    """(kills, kills that left copies beside the capture, next open whole, something left after it, lost)."""
    durations = {}
    for suffix in (".zarr", ".nc"):  # how long one save takes, to spread the kills over it
        start = time.perf_counter()
        vl.save(new, d / f"timing{suffix}")
        durations[suffix] = time.perf_counter() - start
    kills = removed = whole = left = lost = 0
    for i in range(count):
        suffix = (".zarr", ".nc")[i % 2]
        path = d / f"save{i}{suffix}"
        vl.save(old, path)
        if spawn(_save_child, (new, str(path)), kill_after=rng.random() * durations[suffix] * 1.2) == 0:
            continue
        kills += 1
        removed += any(q.name.startswith(f".{path.name}.vitlens-") for q in d.iterdir())
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                back = vl.open(path)
            ok = equal(old, back) or equal(new, back)
        except Exception as exc:  # noqa: BLE001 - a benchmark counts every failure
            print(f"  save kill {i}: open: {type(exc).__name__}: {exc}", file=sys.stderr)
            ok = False
        whole += ok
        lost += not ok
        rest = [q.name for q in d.iterdir() if q.name.startswith(f".{path.name}.vitlens-")]
        if rest:
            left += 1
            print(f"  save kill {i}: left {rest}", file=sys.stderr)
    return kills, removed, whole, left, lost


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--kills", type=int, default=52)
    p.add_argument("--random", type=int, default=12)
    p.add_argument("--saves", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shard-clients", type=int, default=16, help="kills of a sharded capture's client")
    p.add_argument("--shard-workers", type=int, default=8, help="kills of one worker of a sharded capture")
    p.add_argument("--only-shards", action="store_true", help="only the sharded captures' kills")
    p.add_argument("--reduced", action="store_true",
                   help="the one-process kills on a reduced capture (maps=, stats=, keep='none'); no save kills")
    args = p.parse_args()
    if args.reduced:
        os.environ[REDUCED_ENV] = "1"
        args.saves = 0
    if args.only_shards:
        args.kills = args.random = args.saves = 0
    ref = vl.capture(model(), images(), **options())
    rng = np.random.default_rng(args.seed)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        log = d / "steps.txt"
        assert run(d / "trace.zarr", log=str(log)) == 0
        steps = [line.split("\t", 1)[1] for line in log.read_text().splitlines()]
        phases, phase = [], "store creation"
        for label in steps:  # the part of the write path each step belongs to
            if label.startswith("commit marker") and phase == "store creation":
                pass  # the empty marker written when the store is created
            elif label.endswith("begins"):
                phase = "root group" if label == "group / begins" else "child groups"
            elif label == "consolidate":
                phase = "consolidation"
            elif label.startswith("commit marker"):
                phase = "commit marker"
            phases.append(phase)
        fixed = args.kills - args.random
        points = sorted(set(np.linspace(1, len(steps), fixed).round().astype(int).tolist()))
        plan = [("step", int(s)) for s in points] + [("random", None)] * args.random
        kills = resumed_ok = lost = not_killed = 0
        by_phase: dict[str, int] = {}
        for i, (kind, step) in enumerate(plan):
            store = d / f"run{i}.zarr"
            if kind == "step":
                code = run(store, fault=step)
                label = phases[step - 1]
            else:
                code = run(store, delay=0.2, kill_after=0.2 + rng.random() * 1.4)
                label = "random SIGKILL"
            if code == 0:
                not_killed += 1
                continue
            kills += 1
            intact, ok, done, note = check(store, ref)
            resumed_ok += ok
            lost += not (intact and ok)
            by_phase[label] = by_phase.get(label, 0) + 1
            if note:
                print(f"  kill {i} ({kind} {step}): {note}", file=sys.stderr)
        saves = kill_saves(d, ref.isel(sample=slice(0, 5)), ref, args.saves, rng) if args.saves else None
        t1 = time.perf_counter()
        shards = kill_shards(d, args.shard_clients, args.shard_workers, rng) \
            if args.shard_clients or args.shard_workers else None
        shard_seconds = time.perf_counter() - t1
    print(f"write path: {len(steps)} steps for {N} images in batches of {BATCH}; {time.perf_counter() - t0:.0f} s\n")
    print("| kills | resumed OK | stores lost | runs that finished before the kill |")
    print("|---:|---:|---:|---:|")
    print(f"| {kills} | {resumed_ok} | {lost} | {not_killed} |")
    print("\nkills by where they landed: " + ", ".join(f"{k}: {v}" for k, v in sorted(by_phase.items())))
    if saves is not None:
        print("\n| vl.save kills | kills that left a copy beside the capture | next open gave the old or new "
              "capture whole | something left after that open | lost |")
        print("|---:|---:|---:|---:|---:|")
        print("| " + " | ".join(map(str, saves)) + " |")
    if shards is not None:
        kind = "reduced " if options() else ""
        print(f"\nsharded {kind}captures ({N} images in batches of {BATCH}, 2 workers; {shard_seconds:.0f} s; "
              f"{shards.pop('client write steps')} write steps in a client's run):\n")
        print("| " + " | ".join(shards) + " |")
        print("|" + "---:|" * len(shards))
        print("| " + " | ".join(str(v) for v in shards.values()) + " |")


if __name__ == "__main__":
    main()
