"""``vitlens explain IMAGE... --model NAME --method M|all --out DIR``: maps for your own images."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import numpy as np


def main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(
        prog="vitlens explain",
        description="Explain your own images: PNG overlays per image and method, plus the capture.",
    )
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--model", default="vit-shapes", help="shipped model or timm name (default: vit-shapes)")
    p.add_argument("--checkpoint", help="local weights file for a timm model name")
    p.add_argument("--method", default="all", help="one of the seven methods, or 'all' (default)")
    p.add_argument("--target", help="class index or name to explain (default: each image's prediction)")
    p.add_argument("--out", default="vitlens-explain", help="output folder (default: ./vitlens-explain)")
    p.add_argument("--format", choices=("nc", "zarr"), default="nc", help="capture file format (default: nc)")
    p.add_argument("--alpha", type=float, default=0.55, help="heat map opacity in the overlays")
    args = p.parse_args(list(argv))

    import vitlens as vl
    from vitlens.figures import overlay

    model = vl.load_model(args.model, checkpoint=args.checkpoint)
    target = args.target
    if target is not None and target.lstrip("-").isdigit():
        target = int(target)
    cap = vl.capture(model, list(args.images), target=target)
    methods = list(vl.METHODS) if args.method == "all" else [args.method]
    maps = {m: vl.normalize(vl.to_pixels(vl.explain(cap, m))) for m in methods}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from PIL import Image

    names = cap["class_name"].values
    probs = np.exp(cap.logits.values - cap.logits.values.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    for i, path in enumerate(args.images):
        stem = Path(path).stem
        t = int(cap.target.values[i])
        print(f"{path}: explaining class {t} ({names[t]}, p={probs[i, t]:.2f})")
        Image.fromarray((cap.image.values[i] * 255).round().astype(np.uint8)).save(out / f"{stem}_input.png")
        for m in methods:
            Image.fromarray(overlay(cap.image.values[i], maps[m].values[i], alpha=args.alpha)).save(out / f"{stem}_{m}.png")
    saved = vl.save(cap, out / f"capture.{args.format}")
    print(f"wrote {len(args.images) * (len(methods) + 1)} PNG files and {saved} to {out}/")
    return 0
