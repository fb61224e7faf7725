"""Cost of head importance: every head ablated alone, batched, against plain forwards of the same images.

    OMP_NUM_THREADS=1 python benchmarks/bench_interventions.py [--n 4] [--batch 4]

``vl.head_importance`` runs one ablated forward per head (L×H of them, the batch
repeated with one head switched off in each copy) plus one recorded forward, no
backward pass. The target is about L×H plain forwards per image; the table
prints the measured time as a multiple of one plain forward (``torch.no_grad``,
same batch), so the ratio is measured in one run on one machine.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np
import timm
import torch

import vitlens as vl


def plain_forward(model, x: torch.Tensor, batch: int) -> float:
    t = time.perf_counter()
    with torch.no_grad():
        for i in range(0, x.shape[0], batch):
            model(x[i:i + batch])
    return time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=4)
    p.add_argument("--batch", type=int, default=4)
    args = p.parse_args()
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}, "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; {args.n} images, batch {args.batch}")
    print(f"{'model':28s} {'L×H':>5s} {'plain fwd s':>12s} {'importance s':>13s} {'× plain fwd':>12s} "
          f"{'÷ (L×H+1)':>10s}")
    for name in ("vit-shapes", "vit_base_patch16_224"):
        torch.manual_seed(0)
        if name == "vit-shapes":
            model = vl.load_model(name)
            images = vl.datasets.shapes(args.n, seed=0).image.values
        else:
            model = timm.create_model(name, pretrained=False).eval()
            images = np.random.default_rng(0).random((args.n, 224, 224, 3)).astype(np.float32)
        from vitlens.capture.images import prepare
        from vitlens.models import adapter_for

        x = prepare(images, adapter_for(model)).pixels
        heads = sum(p.attn.num_heads for p in adapter_for(model).parts)
        plain_forward(model, x[: args.batch], args.batch)  # warm-up
        rounds = []
        for _ in range(2):  # interleaved: plain, importance, plain
            a = plain_forward(model, x, args.batch)
            t = time.perf_counter()
            vl.head_importance(model, images, batch_size=args.batch, progress=False)
            b = time.perf_counter() - t
            c = plain_forward(model, x, args.batch)
            rounds.append((b, (a + c) / 2))
        imp, plain = min(rounds, key=lambda r: r[0] / r[1])
        ratio = imp / plain
        print(f"{name:28s} {heads:5d} {plain:12.2f} {imp:13.2f} {ratio:12.1f} {ratio / (heads + 1):10.2f}")


if __name__ == "__main__":
    main()
