"""Dataset-scale captures: throughput of streaming to zarr and of lazy analysis.

    python benchmarks/bench_stream.py [--n 32] [--batch 8] [--model vit_base_patch16_224]

Prints (all measured in this run):
- capture throughput to a zarr store vs plain batched forward+backward (ratio);
- bytes per image on disk for the default capture and for ``keep=`` /
  ``dtype="float16"`` variants;
- analysis throughput (``vl.explain(lazy, "all")``) in-process and on a
  ``dask.distributed.LocalCluster`` with 1 and 2 worker processes.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import timm
import torch

import vitlens as vl


def du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--n", type=int, default=32)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--model", default="vit_base_patch16_224")
    args = p.parse_args()
    torch.manual_seed(0)
    model = timm.create_model(args.model, pretrained=False).eval()
    size = model.patch_embed.img_size
    images = torch.randn(args.n, 3, *size)
    tmp = Path(tempfile.mkdtemp())
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads; "
          f"{args.model}, n={args.n}, batch {args.batch}")

    t = time.perf_counter()
    for i in range(0, args.n, args.batch):
        model.zero_grad(set_to_none=True)
        logits = model(images[i : i + args.batch])
        logits.max(1).values.sum().backward()
    plain = time.perf_counter() - t

    rows = []
    for label, kw in [
        ("default (float32, everything)", {}),
        ("float16, everything", {"dtype": "float16"}),
        ("float16, attention+grad+relevance", {"dtype": "float16", "keep": ["attention", "attention_grad", "attention_relevance"]}),
        ("float16, attention+ln (gradient-free)", {"dtype": "float16", "keep": ["attention", "ln", "norms"], "grads": False}),
    ]:
        store = tmp / f"{len(rows)}.zarr"
        t = time.perf_counter()
        vl.capture(model, images, store=store, batch_size=args.batch, progress=False, **kw)
        seconds = time.perf_counter() - t
        rows.append((label, seconds, du(store) / args.n, store))

    print(f"\nplain batched forward+backward: {args.n / plain:.2f} img/s")
    print(f"{'capture to zarr':42s} {'img/s':>7s} {'× plain time':>13s} {'MB/img':>8s}")
    for label, seconds, bpi, _ in rows:
        print(f"{label:42s} {args.n / seconds:7.2f} {seconds / plain:13.2f} {bpi / 2**20:8.2f}")

    lazy_path = rows[0][3]
    lazy = vl.open(lazy_path, chunks={})
    t = time.perf_counter()
    vl.explain(lazy, "all")
    inproc = time.perf_counter() - t
    header = 'vl.explain(lazy, "all")'
    print(f"\n{header:42s} {'img/s':>7s}")
    print(f"{'in-process (threads)':42s} {args.n / inproc:7.2f}")
    from dask.distributed import Client, LocalCluster

    for workers in (1, 2):
        with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None) as cl:
            with Client(cl):
                vl.explain(vl.open(lazy_path, chunks={}), "attention")  # warm the workers' imports
                t = time.perf_counter()
                vl.explain(vl.open(lazy_path, chunks={}), "all")
                dt = time.perf_counter() - t
        print(f"{f'LocalCluster, {workers} worker process(es)':42s} {args.n / dt:7.2f}")
    shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
