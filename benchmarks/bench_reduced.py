"""What a capture costs for what is asked: bytes per image and time, full against reduced.

    python benchmarks/bench_reduced.py [--n 8] [--batch 8] [--models vit_base_patch16_224,swin_tiny_patch4_window7_224]

Random-init timm models (``pretrained=False``) at their own input size. Prints,
all measured in this run, per model:

- bytes per image of a streamed store: the full capture (float32, every group)
  against a reduced one (``maps="all", stats="all"``, ``keep="none"``: the seven
  maps, every registered head statistic, logits and targets). ``marginal`` is
  the growth per image between a store of ``n`` and of ``2n`` images (what a
  dataset pays; the zarr metadata is a fixed cost); the target is ≤ 64 KB for
  ViT-B/16 at 224 px (issue #27);
- seconds per image of in-memory captures that ask for less and less, against
  a plain forward pass and a plain forward+backward pass (#30.4: attention and
  rollout need no backward pass, the gradient methods no LRP pass).
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


def seconds(fn, repeat: int = 1) -> float:
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def store_bytes(model, images, tmp: Path, label: str, batch: int, **kw) -> tuple[float, float]:
    """(bytes per image of a store of ``images``, marginal bytes per image from n to 2n images)."""
    n = images.shape[0]
    sizes = []
    for k, part in ((1, images), (2, torch.cat([images, images.flip(0)]))):
        path = tmp / f"{label}-{k}.zarr"
        vl.capture(model, part, store=path, batch_size=batch, progress=False, **kw)
        sizes.append(du(path))
        shutil.rmtree(path)
    return sizes[0] / n, (sizes[1] - sizes[0]) / n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--models", default="vit_base_patch16_224,swin_tiny_patch4_window7_224")
    p.add_argument("--full-n", type=int, default=2, help="images in the full-capture store (58 MB each for ViT-B)")
    args = p.parse_args()
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads; "
          f"n={args.n}, batch {args.batch}; head statistics: {list(vl.registry.STAT_INFO)}")
    tmp = Path(tempfile.mkdtemp())
    try:
        for name in args.models.split(","):
            torch.manual_seed(0)
            model = timm.create_model(name, pretrained=False).eval()
            size = vl.models.adapter_for(model).input_size
            images = torch.randn(args.n, 3, *size)
            run(model, name, images, args, tmp)
    finally:
        shutil.rmtree(tmp)


def run(model, name: str, images: torch.Tensor, args, tmp: Path) -> None:
    n, batch = images.shape[0], args.batch
    print(f"\n{name}")
    full, full_marginal = store_bytes(model, images[: args.full_n], tmp, "full", batch)
    small, small_marginal = store_bytes(model, images, tmp, "reduced", batch, maps="all", stats="all")
    print(f"{'store bytes per image':58s} {'per image':>12s} {'marginal':>12s}")
    print(f"{'full capture (float32, every group)':58s} {full / 1e3:10.1f}KB {full_marginal / 1e3:10.1f}KB")
    print(f"{'reduced: 7 maps + every statistic + logits (keep=none)':58s} {small / 1e3:10.1f}KB "
          f"{small_marginal / 1e3:10.1f}KB")
    print(f"{'full / reduced (marginal)':58s} {full_marginal / max(small_marginal, 1):12.0f}×")

    def forward():
        with torch.no_grad():
            for i in range(0, n, batch):
                model(images[i : i + batch])

    def forward_backward():
        for i in range(0, n, batch):
            model.zero_grad(set_to_none=True)
            x = images[i : i + batch].clone().requires_grad_(True)
            model(x).max(1).values.sum().backward()

    def capture(**kw):
        return lambda: vl.capture(model, images, batch_size=batch, progress=False, **kw)

    forward()  # warm-up
    rows = [
        ("plain forward (no_grad)", forward),
        ("plain forward+backward", forward_backward),
        ("capture maps=[attention, rollout]", capture(maps=["attention", "rollout"])),
        ("capture keep=['attention'] (raw, no maps)", capture(keep=["attention"])),
        ("capture maps=[gradcam, generic_attention, lnstat, tokentm]",
         capture(maps=["gradcam", "generic_attention", "lnstat", "tokentm"])),
        ("capture maps='all', stats='all'", capture(maps="all", stats="all")),
        ("capture keep='all' (full, in memory)", capture()),
    ]
    times = {label: seconds(fn) for label, fn in rows}
    fwd, fb = times["plain forward (no_grad)"], times["plain forward+backward"]
    print(f"\n{'time':58s} {'s/img':>8s} {'× fwd':>7s} {'× fwd+bwd':>10s}")
    for label, t in times.items():
        print(f"{label:58s} {t / n:8.3f} {t / fwd:7.2f} {t / fb:10.2f}")


if __name__ == "__main__":
    main()
