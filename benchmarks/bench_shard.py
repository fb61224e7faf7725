"""Capture sharded over dask workers: images/s in one process and on a LocalCluster of 1 and 2 workers.

    python benchmarks/bench_shard.py [--n 128] [--batch 16] [--model vit-shapes] [--results]

Prints one table, every row measured in this run on the same images, model and
batch size: plain batched forward+backward (the floor), a one-process
``vl.capture(..., store=...)``, and ``vl.capture(..., store=..., client=...)`` on
``LocalCluster(n_workers=k, threads_per_worker=1, processes=True)`` for k = 1, 2.
A sharded time runs from the call to its return (the workers build the model,
one lays the store out, all capture and write; the cluster is started before and
its start is printed apart). dask's workers run torch with one thread each (its
nanny sets ``OMP_NUM_THREADS=1``), so the one-process rows are given with the
machine's threads and with one (the workers' stores are checked bit for bit
against the one-thread store: CPU sums depend on the thread count). The load average before and after is printed:
on a shared machine the ratios within a run are what carries over.
``--results`` also splices the table into benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import vitlens as vl

START, END = "<!-- shard:start -->", "<!-- shard:end -->"


def plain(model: torch.nn.Module, pixels: torch.Tensor, batch: int) -> float:
    """Seconds for batched forward + backward of each image's top logit (what a capture cannot go below)."""
    t = time.perf_counter()
    for i in range(0, len(pixels), batch):
        model.zero_grad(set_to_none=True)
        x = pixels[i : i + batch].clone().requires_grad_(True)
        model(x).max(1).values.sum().backward()
    return time.perf_counter() - t


def with_threads(threads: int, fn):
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return fn()
    finally:
        torch.set_num_threads(old)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=128)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--model", default="vit-shapes", help="a name vl.load_model accepts (shipped or timm)")
    p.add_argument("--results", action="store_true", help="splice the table into benchmarks/RESULTS.md")
    args = p.parse_args()
    load_before = os.getloadavg()
    from vitlens.capture.images import prepare
    from vitlens.models import adapter_for

    model = vl.load_model(args.model, device="cpu")
    size = tuple(adapter_for(model).input_size)
    images = np.random.default_rng(0).random((args.n, *size, 3)).astype(np.float32)
    pixels = prepare(images, adapter_for(model)).pixels
    threads = torch.get_num_threads()
    tmp = Path(tempfile.mkdtemp())
    rows: list[tuple[str, float]] = []

    plain(model, pixels[: args.batch], args.batch)  # warm-up
    vl.capture(model, images[: args.batch], batch_size=args.batch, progress=False)
    rows.append((f"plain forward+backward, {threads} torch threads", plain(model, pixels, args.batch)))
    rows.append(("plain forward+backward, 1 torch thread", with_threads(1, lambda: plain(model, pixels, args.batch))))

    def one_process(name: str) -> float:
        t = time.perf_counter()
        vl.capture(model, images, store=tmp / name, batch_size=args.batch, progress=False)
        return time.perf_counter() - t

    rows.append((f"capture to zarr, one process, {threads} torch threads", one_process("one.zarr")))
    rows.append(("capture to zarr, one process, 1 torch thread", with_threads(1, lambda: one_process("one1.zarr"))))

    from dask.distributed import Client, LocalCluster

    starts = {}
    for workers in (1, 2):
        t = time.perf_counter()
        with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None) as cl, \
                Client(cl) as client:
            starts[workers] = time.perf_counter() - t
            t = time.perf_counter()
            vl.capture(args.model, images, store=tmp / f"w{workers}.zarr", batch_size=args.batch, progress=False,
                       client=client)
            rows.append((f"capture to zarr, LocalCluster, {workers} worker process{'es' if workers > 1 else ''}",
                         time.perf_counter() - t))
        one, sharded = vl.open(tmp / "one1.zarr"), vl.open(tmp / f"w{workers}.zarr")  # both: 1 torch thread
        if not all(np.array_equal(one[node.path][v].values, sharded[node.path][v].values)
                   for node in one.subtree for v in node.to_dataset(inherit=False).data_vars):
            raise SystemExit(f"the store of {workers} workers differs from the one-process store (1 thread)")
    load_after = os.getloadavg()
    shutil.rmtree(tmp)

    floor = rows[1][1]  # plain, one torch thread: per process, what each worker runs with
    lines = [
        f"machine: {platform.machine()}, {os.cpu_count()} cores (shared), torch {torch.__version__}; load average "
        f"{load_before[0]:.1f} before, {load_after[0]:.1f} after",
        f"{args.model} at {size[0]}×{size[1]}, n={args.n}, batch {args.batch}; cluster start "
        + ", ".join(f"{k} worker{'s' if k > 1 else ''} {s:.1f} s" for k, s in starts.items()) + " (not in the times)",
        "",
        "| run | img/s | × plain time (1 thread) |",
        "|---|---:|---:|",
        *[f"| {label} | {args.n / seconds:.2f} | {seconds / floor:.2f} |" for label, seconds in rows],
    ]
    print("\n".join(lines))
    print("the stores of 1 and 2 workers equal the one-process store of 1 torch thread, bit for bit")
    if args.results:
        import sys

        sys.path.insert(0, str(Path(__file__).parent))
        from make_results import splice

        section = [START, "## Capture sharded over dask workers", "",
                   "`python benchmarks/bench_shard.py` (spliced in by `--results`): images/s of "
                   "`vl.capture(..., store=...)` in one process and with `client=` on a LocalCluster; dask's "
                   "workers run torch with one thread each. Measured on a machine shared with other work: the "
                   "ratios within the run are what carries over; where the cores are busy, a second worker "
                   "process has no core to run on.", "", "```", *lines[:2], "```", "", *lines[3:],
                   "", END]
        splice(Path(__file__).parent / "RESULTS.md", section, START, END)
        print("spliced into benchmarks/RESULTS.md")


if __name__ == "__main__":
    main()
