"""Memory of a long streaming capture: RSS over ≥ 500 images, with and without returning freed memory.

    python benchmarks/bench_memory.py [--n 640] [--batch 32]

Each setting runs in a fresh process that streams ``--n`` images of a small ViT
(64×64 input, 65 tokens, 4 blocks) into a zarr store and records its resident
set size after every committed batch. ``VITLENS_MALLOC_TRIM=0`` turns off the
``gc.collect()`` + ``malloc_trim(0)`` vitlens runs after each batch (without
them, batch trees wait in reference cycles and glibc keeps the freed buffers,
so RSS climbs with the length of the run although nothing leaks).
Prints RSS (MiB) at points of the run, the growth from the first batch to the
end, and the peak.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def child(n: int, batch: int) -> None:
    import numpy as np
    import timm
    import torch

    import vitlens as vl

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=64, patch_size=8, depth=4, embed_dim=96,
                              num_heads=3, num_classes=10).eval()
    rng = np.random.default_rng(0)
    samples = []

    def source():
        for start in range(0, n, batch):
            samples.append((start, rss_mib()))  # after the previous batch was committed
            yield rng.random((min(batch, n - start), 64, 64, 3), dtype=np.float32)

    with tempfile.TemporaryDirectory() as d:
        vl.capture(model, source(), store=Path(d) / "run.zarr", batch_size=batch, progress=False)
        samples.append((n, rss_mib()))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"samples": samples, "peak": peak}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--n", type=int, default=640)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args.n, args.batch)
        return
    runs = {}
    for label, trim in (("gc + malloc_trim after each batch (default)", "1"), ("neither (VITLENS_MALLOC_TRIM=0)", "0")):
        env = {**os.environ, "VITLENS_MALLOC_TRIM": trim, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        out = subprocess.run([sys.executable, __file__, "--child", "--n", str(args.n), "--batch", str(args.batch)],
                             env=env, capture_output=True, text=True, check=True)
        runs[label] = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"streaming {args.n} images, batch {args.batch}, small ViT (64x64, 4 blocks); RSS in MiB\n")
    labels = list(runs)
    points = runs[labels[0]]["samples"]
    step = max(1, len(points) // 8)
    picks = sorted(set(list(range(1, len(points), step)) + [len(points) - 1]))
    print(f"| images committed | {' | '.join(labels)} |")
    print("|---:|" + "---:|" * len(labels))
    for i in picks:
        print(f"| {points[i][0]} | " + " | ".join(f"{runs[l]['samples'][i][1]:.0f}" for l in labels) + " |")
    print("| growth, batch 1 → end | " + " | ".join(
        f"{runs[l]['samples'][-1][1] - runs[l]['samples'][1][1]:+.0f}" for l in labels) + " |")
    print("| peak RSS | " + " | ".join(f"{runs[l]['peak']:.0f}" for l in labels) + " |")


if __name__ == "__main__":
    main()
