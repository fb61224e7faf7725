"""``vitlens bench``: score every explanation method on a dataset with masks.

Examples
--------
    vitlens bench --model vit-shapes --n 500
    vitlens bench --model swin-shapes --n 500 --objects 2 --out results/
    vitlens bench --model vit_base_patch16_224 --checkpoint vit_b16.safetensors \\
        --dataset imagenet-seg --path gtsegs_ijcv.mat --n 1000 --target predicted
    vitlens bench --model vit-shapes --n 500 --store val.zarr   # the maps of a store of the same images

Prints the table (one row per method) and saves it as CSV and netCDF in ``--out``.
"""

from __future__ import annotations

import argparse
import platform
import re
import time
from collections.abc import Sequence
from pathlib import Path

import xarray as xr

from ..errors import OptionError

__all__ = ["main", "format_table", "COLUMNS", "legend", "scaled"]

#: Columns as printed (name, header, format): the one naming of score tables
#: (``vitlens bench``, ``vitlens demo``, benchmarks/RESULTS.md).
COLUMNS = (
    ("pixel_accuracy", "pix.acc", "{:.3f}"),
    ("miou", "mIoU", "{:.3f}"),
    ("mean_ap", "mAP", "{:.3f}"),
    ("pointing", "point", "{:.3f}"),
    ("positive_auc_predicted", "pos.pred↓", "{:.1f}"),
    ("negative_auc_predicted", "neg.pred↑", "{:.1f}"),
    ("positive_auc_label", "pos.label↓", "{:.1f}"),
    ("negative_auc_label", "neg.label↑", "{:.1f}"),
    ("deletion_auc", "del↓", "{:.3f}"),
    ("insertion_auc", "ins↑", "{:.3f}"),
    ("seconds_per_image", "ms/img", "{:.1f}"),
)
#: Printed value = table value × factor (the explain time is printed in milliseconds).
FACTORS = {"seconds_per_image": 1000.0}
def legend(steps: int = 10) -> str:
    """What the columns mean, printed under a table of a ``steps``-step perturbation grid.

    Examples
    --------
    >>> "0-80 % of pixels removed" in legend(5)
    True
    """
    top = 100 * (int(steps) - 1) // int(steps)
    return (
        "pix.acc, mIoU, mAP, point: localisation against the object masks, fractions in [0, 1] (higher is better). "
        f"pos/neg: area under the top-1 accuracy (in %) over 0-{top} % of pixels removed (in steps of "
        f"{100 // int(steps)} %), most (pos) or least (neg) relevant first, for maps of the predicted (.pred) or "
        f"label (.label) class, so 0-{top} (pos: lower is better; neg: higher). del/ins: deletion/insertion area. "
        "ms/img: vl.explain time per image for the method (capture excluded)."
    )


def scaled(table: xr.Dataset, name: str) -> xr.DataArray:
    """Column ``name`` of a score table in its printed unit (see :data:`FACTORS`)."""
    return table[name] * FACTORS.get(name, 1.0)


def format_table(table: xr.Dataset, markdown: bool = False) -> str:
    """The score table as aligned text (or a Markdown table), one row per method."""
    headers = ["method"] + [h for _, h, _ in COLUMNS]
    rows = []
    for i, method in enumerate(table["method"].values):
        row = table.isel(method=i)  # not .sel(method=...): `method` is a keyword of .sel itself
        rows.append([str(method)] + [fmt.format(float(scaled(row, name))) for name, _, fmt in COLUMNS])
    if markdown:
        lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(["---"] + ["---:"] * len(COLUMNS)) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(lines)
    widths = [max(len(r[i]) for r in rows + [headers]) for i in range(len(headers))]
    fmt_row = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    return "\n".join([fmt_row(headers)] + [fmt_row(r) for r in rows])


def _parser() -> argparse.ArgumentParser:
    from ..zoo.train import EVAL_SEED

    p = argparse.ArgumentParser(
        prog="vitlens bench",
        description="Segmentation and perturbation scores of every explanation method (one row per method).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", default="vit-shapes", help="shipped model (vit-shapes, swin-shapes) or a timm name")
    p.add_argument("--checkpoint", default=None, help="local weights for a timm name (.safetensors/.pth)")
    p.add_argument("--num-classes", type=int, default=None, help="classifier size for a timm name")
    p.add_argument("--dataset", choices=("shapes", "imagenet-seg"), default="shapes")
    p.add_argument("--path", default=None, help="gtsegs_ijcv.mat for --dataset imagenet-seg")
    p.add_argument("--n", type=int, default=500, help="number of images")
    p.add_argument("--objects", default="1,2", help="shapes: labelled objects per image, e.g. 1 or 1,2")
    p.add_argument("--seed", type=int, default=EVAL_SEED, help="shapes: seed (the zoo's held-out evaluation seed)")
    p.add_argument("--methods", default="all", help="'all' or comma-separated method names")
    p.add_argument("--target", choices=("label", "predicted"), default="label",
                   help="class whose maps the segmentation and deletion/insertion columns score")
    p.add_argument("--steps", type=int, default=10, help="perturbation grid (10: 0, 10, ..., 90 %%)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default=None, help="cpu, cuda, ... (None: cuda if available)")
    p.add_argument("--store", default=None,
                   help="a capture of the same images by the same model (e.g. vl.capture(model, dataset, "
                        "store=PATH, maps='all')): score its maps instead of computing them (--methods all: the "
                        "methods it stores)")
    p.add_argument("--out", default=".", help="folder for the CSV and netCDF files")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p


def _load(args: argparse.Namespace):  # noqa: ANN202
    import torch

    from ..capture.validate import check_device
    from ..errors import DeviceError
    from ..models import load_model
    from ..zoo import available

    kwargs = {}
    if args.model not in available():
        kwargs = {"checkpoint": args.checkpoint}
        if args.num_classes is not None:
            kwargs["num_classes"] = args.num_classes
    elif args.checkpoint:
        raise OptionError(f"{args.model} is shipped with vitlens; drop --checkpoint (or name a timm model).")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:  # before the model is built: torch's own error for a missing GPU says nothing about --device
        check_device(device)
    except DeviceError as exc:
        exc.cli_message = (f"--device {device} is not available here ({exc}). Use --device cpu, or leave --device "
                           "out (cuda when torch sees a GPU, else cpu).")
        raise
    model = load_model(args.model, **kwargs)
    return model.to(device).eval(), device


def _dataset(args: argparse.Namespace, model):  # noqa: ANN001, ANN202
    from ..models import adapter_for

    size = adapter_for(model).input_size
    if args.dataset == "imagenet-seg":
        if not args.path:
            raise OptionError("--dataset imagenet-seg needs --path gtsegs_ijcv.mat.")
        from ..datasets.imagenet_seg import imagenet_seg

        if size[0] != size[1]:
            raise OptionError(f"the model takes {size[0]}×{size[1]} inputs; imagenet-seg gives square pictures.")
        return imagenet_seg(args.path, n=args.n, size=int(size[0]), progress=not args.no_progress)
    from ..datasets.shapes import CLASS_NAMES, shapes

    classes = int(getattr(model, "num_classes", len(CLASS_NAMES)))
    if classes < len(CLASS_NAMES):
        raise OptionError(
            f"the model has {classes} classes but shapes has {len(CLASS_NAMES)}; use a shapes-trained model "
            "(vit-shapes, swin-shapes) or --dataset imagenet-seg."
        )
    try:
        objects = tuple(int(v) for v in str(args.objects).split(","))
    except ValueError:
        raise OptionError(f"--objects {args.objects!r}: use e.g. 1 or 1,2.") from None
    if size[0] != size[1]:
        raise OptionError(f"the model takes {size[0]}×{size[1]} inputs; shapes makes square pictures.")
    return shapes(args.n, seed=args.seed, size=int(size[0]), objects=objects)


def main(argv: Sequence[str]) -> int:
    """Run the benchmark; returns the exit status."""
    import torch

    from .evaluate import evaluate

    args = _parser().parse_args(list(argv))
    if args.n < 1:
        raise OptionError(f"--n {args.n}: use at least one image.")
    methods = "all" if args.methods == "all" else [m.strip() for m in args.methods.split(",") if m.strip()]
    model, device = _load(args)
    dataset = _dataset(args, model)
    start = time.perf_counter()
    table = evaluate(model, dataset, methods=methods, target=args.target, maps=args.store, steps=args.steps,
                     batch_size=args.batch_size, device=device, progress=not args.no_progress)
    seconds = time.perf_counter() - start
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"bench-{args.model}-{args.dataset}")
    table.attrs.update({"dataset": args.dataset, "n": args.n, "seconds": round(seconds, 1),
                        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, {device}"})
    if args.dataset == "shapes":
        table.attrs.update({"seed": args.seed, "objects": args.objects})
    print(f"{args.model} on {args.dataset}: {args.n} images, {table.attrs['items']} items, "
          f"target={args.target}, clean accuracy {table.attrs['clean_accuracy']:.3f} "
          f"({table.attrs['accuracy_reference']}); {seconds:.0f} s on {table.attrs['machine']}")
    if args.store:
        table.attrs["store"] = args.store
        print(f"maps read from {args.store} ({table.attrs['maps_computed']} maps of classes it does not explain "
              "computed with the model)")
    print(format_table(table))
    print(legend(args.steps) + f" Capture: {1000 * float(table['capture_seconds_per_image'][0]):.1f} ms/img.")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table.to_dataframe().to_csv(out / f"{name}.csv")
    table.to_netcdf(out / f"{name}.nc")
    print(f"saved {out / (name + '.csv')} and {out / (name + '.nc')}")
    return 0
