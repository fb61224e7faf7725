"""``vitlens demo``: what a new user runs first — offline, no browser, under a minute.

Loads the shipped models, explains a handful of generated samples (one- and
two-object; each labelled object explained for its own class) with all seven
methods, writes comparison figures (PNG, PDF; drawn with matplotlib, so no
browser is needed), the captures, an ``index.html`` page showing it all, and
prints a short metrics table.
"""

from __future__ import annotations

import argparse
import html
import textwrap
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .metrics.bench import legend

DEMO_SEED = 2026  # never used for training (training seeds start at 0 and count up in blocks)
#: The metrics step: one-object images (one item each, so no second capture for another class)
#: and a 5-step perturbation grid, in one batch. 24 images of one and two objects on a 10-step grid
#: took most of the demo's 413 s; the full table is ``vitlens bench``'s.
EVAL_IMAGES = 12
EVAL_STEPS = 5

#: The score-table columns the demo prints (named and scaled as ``vitlens bench`` prints them).
DEMO_COLUMNS = ("pixel_accuracy", "miou", "mean_ap", "pointing", "positive_auc_label", "negative_auc_label",
                "seconds_per_image")


#: Why a baseline is expected to score low on these tables (printed under each table).
WEAK = {
    "class-agnostic": "the same map for every class (it never sees the class): on a two-object image it cannot "
                      "point at the object asked for",
    "gradcam": "one block's attention heads as channels, on that block's coarse grid: a single-layer baseline "
               "(docs/METHODS.md §3 compares its forms on both shipped models)",
}


def weak_baselines(methods: Sequence[str]) -> list[str]:
    """One line per method of ``methods`` that is expected to be weak here, saying why.

    Examples
    --------
    >>> weak_baselines(["rollout", "tokentm"])
    ['rollout: expected to be weak: the same map for every class (it never sees the class): on a two-object image it cannot point at the object asked for']
    """
    from .registry import METHOD_INFO

    out = []
    for m in methods:
        why = WEAK.get(m) or (WEAK["class-agnostic"] if m in METHOD_INFO and not METHOD_INFO[m].class_specific else None)
        if why:
            out.append(f"{m}: expected to be weak: {why}")
    return out


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


def metrics_frame(table):
    """The printed metrics table: ``vitlens bench``'s column names, units and rounding."""
    import pandas as pd

    from .metrics.bench import COLUMNS, scaled

    columns = {}
    for name, header, fmt in COLUMNS:
        if name in DEMO_COLUMNS and name in table:
            digits = int(fmt.split(".")[1][0]) if "." in fmt else 3
            columns[header] = scaled(table, name).values.round(digits)
    return pd.DataFrame(columns, index=pd.Index([str(m) for m in table["method"].values], name="method"))


def _index_html(out: Path, written: Sequence[Path], tables: Sequence[tuple[str, object]], n_eval: int) -> Path:
    from .figures import _atomic_write

    parts = ["<!doctype html><meta charset='utf-8'><title>vitlens demo</title>",
             "<style>body{font-family:sans-serif;max-width:1400px;margin:1em auto}img{max-width:100%}"
             "table{border-collapse:collapse}td,th{padding:2px 8px;border-bottom:1px solid #ddd}</style>",
             "<h1>vitlens demo</h1>"]
    for path in written:
        if path.suffix == ".png":
            parts.append(f"<h2>{html.escape(path.stem)}</h2><img src='{html.escape(path.name)}'>")
    for name, table in tables:
        parts.append(f"<h2>{html.escape(name)}: metrics on {n_eval} generated images</h2>")
        parts.append(metrics_frame(table).to_html())
        parts.extend(f"<p>{html.escape(line)}</p>" for line in weak_baselines(table["method"].values.tolist()))
        parts.append(f"<p>{html.escape(legend(EVAL_STEPS))}</p>")
    return _atomic_write(out / "index.html", lambda h: h.write("\n".join(parts).encode()))


def main(argv: Sequence[str] = ()) -> int:
    p = argparse.ArgumentParser(prog="vitlens demo", description=__doc__.splitlines()[0])
    p.add_argument("--out", default="vitlens-demo", help="output folder (default: ./vitlens-demo)")
    p.add_argument("--images", type=int, default=4, help="generated images to explain (default 4)")
    p.add_argument("--eval", type=int, default=EVAL_IMAGES,
                   help=f"images for the metrics table (default {EVAL_IMAGES}; 0 skips it)")
    p.add_argument("--models", nargs="+", default=["vit-shapes", "swin-shapes"])
    args = p.parse_args(list(argv))

    from tqdm.auto import tqdm

    import vitlens as vl
    from vitlens import figures
    from vitlens.errors import OptionError

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise OptionError(f"--out {str(out)!r} is a file; give a folder for the demo's output.")
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    ds, images, targets, objects = demo_samples(args.images)
    steps = tqdm(total=len(args.models) * (4 if args.eval else 3), desc="demo", unit="step")
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
        steps.update()
        written.append(figures.save(figures.layers(cap, "lnstat", sample=0), out / f"{name}-lnstat-by-layer.png"))
        written.append(vl.save(cap, out / f"{name}-capture.nc", overwrite=True))  # the demo owns its folder
        steps.update()
        if args.eval:
            steps.set_postfix_str(f"{name}: metrics on {args.eval} images")
            table = vl.evaluate(model, vl.datasets.shapes(args.eval, seed=DEMO_SEED + 1, objects=(1,)),
                                methods="all", target="label", progress=True, batch_size=max(1, args.eval),
                                steps=EVAL_STEPS)
            tables.append((name, table))
            steps.update()
    steps.close()
    written.append(_index_html(out, written, tables, args.eval))

    for name, table in tables:
        print(f"\n{name}: localisation and faithfulness on {args.eval} generated images")
        print(metrics_frame(table).to_string())
        for line in weak_baselines(table["method"].values.tolist()):
            print(f"  {line}")
    if tables:
        print(textwrap.fill(legend(EVAL_STEPS) + f" A quick look: {args.eval} held-out one-object images; "
                            "`vitlens bench` scores 500 by default.", 110))
    print(f"\nexplained {len(targets)} objects in {args.images} images with {len(vl.METHODS)} methods "
          f"in {time.perf_counter() - start:.0f} s; files in {out.resolve()}/ (open index.html):")
    for path in written:
        print(f"  {path.name}")
    return 0
