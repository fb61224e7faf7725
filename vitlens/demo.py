"""``vitlens demo``: what a new user runs first — offline, a few minutes on 2 CPU cores.

Loads the shipped models, explains a handful of generated samples (one- and
two-object; each labelled object explained for its own class) with all seven
methods, writes comparison figures (PNG, PDF) and an interactive HTML page, and
prints a short metrics table.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

DEMO_SEED = 2026  # never used for training (training seeds start at 0 and count up in blocks)


def demo_samples(n_images: int = 4, seed: int = DEMO_SEED):
    """Images and targets: every labelled object of each image becomes one row."""
    import vitlens as vl

    ds = vl.datasets.shapes(n_images, seed=seed, objects=(1, 2))
    images, targets, objects = [], [], []
    for i in range(n_images):
        for k, label in enumerate(ds.label.values[i]):
            if label >= 0:
                images.append(ds.image.values[i])
                targets.append(int(label))
                objects.append((i, k))
    return ds, np.stack(images), targets, objects


def main(argv: Sequence[str] = ()) -> int:
    p = argparse.ArgumentParser(prog="vitlens demo", description=__doc__.splitlines()[0])
    p.add_argument("--out", default="vitlens-demo", help="output folder (default: ./vitlens-demo)")
    p.add_argument("--images", type=int, default=4, help="generated images to explain (default 4)")
    p.add_argument("--eval", type=int, default=48, help="images for the metrics table (default 48; 0 skips it)")
    p.add_argument("--models", nargs="+", default=["vit-shapes", "swin-shapes"])
    args = p.parse_args(list(argv))

    from tqdm.auto import tqdm

    import vitlens as vl
    from vitlens import figures

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    ds, images, targets, objects = demo_samples(args.images)
    steps = tqdm(total=len(args.models) * 4, desc="demo", unit="step")
    written: list[Path] = []
    tables = []
    for name in args.models:
        steps.set_postfix_str(f"{name}: capture")
        model = vl.load_model(name)
        cap = vl.capture(model, images, target=targets)
        steps.update()
        steps.set_postfix_str(f"{name}: explain + figures")
        fig = figures.grid(cap, methods="all")
        written += [figures.save(fig, out / f"{name}-methods.png"), figures.save(fig, out / f"{name}-methods.pdf")]
        written.append(figures.save(fig, out / f"{name}-methods.html"))
        steps.update()
        written.append(figures.save(figures.layers(cap, "lnstat", sample=0), out / f"{name}-lnstat-by-layer.png"))
        written.append(vl.save(cap, out / f"{name}-capture.nc", overwrite=True))  # the demo owns its folder
        steps.update()
        if args.eval:
            steps.set_postfix_str(f"{name}: metrics on {args.eval} images")
            table = vl.evaluate(model, vl.datasets.shapes(args.eval, seed=DEMO_SEED + 1, objects=(1, 2)),
                                methods="all", target="label", progress=False)
            tables.append((name, table))
        steps.update()
    steps.close()

    for name, table in tables:
        frame = table.to_dataframe()
        cols = [c for c in ("pixel_accuracy", "miou", "mean_ap", "pointing", "positive_auc_label", "negative_auc_label",
                            "seconds_per_image") if c in frame.columns]
        print(f"\n{name}: localisation and faithfulness on {args.eval} generated images "
              "(higher is better, except positive AUC)")
        print(frame[cols].round(3).to_string())
    print(f"\nexplained {len(targets)} objects in {args.images} images with {len(vl.METHODS)} methods "
          f"in {time.perf_counter() - start:.0f} s; files in {out.resolve()}/:")
    for path in written:
        print(f"  {path.name}")
    return 0
