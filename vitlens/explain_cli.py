"""``vitlens explain IMAGE|DIR... --model NAME --method M|all --out DIR``: maps for your own images.

Writes, per image, the input and one overlay per method as PNG (at ``--size``
pixels, so they are readable), plus the capture. Output names are unique even
for same-named images from different folders; nothing already in ``--out`` is
replaced unless ``--overwrite`` is given.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .capture.images import IMAGE_SUFFIXES, folder_images  # noqa: F401 - IMAGE_SUFFIXES: its old home

MAX_SIZE = 8192  # --size: the longest side of a written PNG


def expand_inputs(items: Sequence[str]) -> list[Path]:
    """Image files, with each folder replaced by the images directly inside it, in the order
    ``vl.capture`` takes them (:func:`~vitlens.capture.images.folder_images`)."""
    out: list[Path] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            out += folder_images(path)
        else:
            out.append(path)  # vl.capture says clearly if it is missing or unreadable
    return out


def output_stems(paths: Sequence[Path]) -> list[str]:
    """A distinct file-name stem per input: the file's stem, with parent folders added where stems clash.

    Names are compared without case (one file on macOS and Windows disks), and a
    file given twice gets a numbered stem that no other input uses.

    Examples
    --------
    >>> output_stems([Path("a/img.png"), Path("b/img.png"), Path("c.png")])
    ['a_img', 'b_img', 'c']
    >>> output_stems([Path("x-2.png"), Path("x.png"), Path("x.png")])
    ['x-2', 'x', 'x-3']
    """
    resolved = [p.resolve() for p in paths]
    depth = [0] * len(paths)

    def stem(i: int) -> str:
        parents = resolved[i].parent.parts[len(resolved[i].parent.parts) - depth[i]:] if depth[i] else ()
        return "_".join([*(q.strip("/") or "root" for q in parents), resolved[i].stem])

    while True:
        names = [stem(i) for i in range(len(paths))]
        keys = [n.casefold() for n in names]
        clashing = [i for i, k in enumerate(keys) if keys.count(k) > 1
                    and depth[i] < len(resolved[i].parent.parts)
                    and len({resolved[j] for j, m in enumerate(keys) if m == k}) > 1]
        if not clashing:
            break
        for i in clashing:
            depth[i] += 1
    taken = {n.casefold() for n in names}
    first: dict[Path, str] = {}
    unique = []
    for path, name in zip(resolved, names):  # the same file given twice: number the repeats
        if path not in first:
            first[path] = name
            unique.append(name)
            continue
        k = 2
        while f"{name}-{k}".casefold() in taken:
            k += 1
        taken.add(f"{name}-{k}".casefold())
        unique.append(f"{name}-{k}")
    return unique


def _load(args: argparse.Namespace):
    import vitlens as vl

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", vl.RandomWeightsWarning)
        model = vl.load_model(args.model, checkpoint=args.checkpoint, pretrained=True if args.pretrained else None)
    for w in caught:
        if issubclass(w.category, vl.RandomWeightsWarning):
            print(f"vitlens explain: WARNING: --model {args.model} has RANDOM weights (no --checkpoint or "
                  "--pretrained given): the maps explain an untrained network. Pass --checkpoint FILE "
                  "(or --pretrained with network access).", file=sys.stderr)
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return model


def main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(
        prog="vitlens explain",
        description="Explain your own images: PNG overlays per image and method, plus the capture.",
    )
    p.add_argument("images", nargs="+", help="image files or folders of images")
    p.add_argument("--model", default="vit-shapes", help="shipped model or timm name (default: vit-shapes)")
    p.add_argument("--checkpoint", help="local weights file for a timm model name")
    p.add_argument("--pretrained", action="store_true", help="timm's pretrained weights (needs network or cache)")
    p.add_argument("--method", default="all", help="a method (vl.METHODS), or 'all' (default)")
    p.add_argument("--target", help="class index or name to explain (default: each image's prediction)")
    p.add_argument("--out", default="vitlens-explain", help="output folder (default: ./vitlens-explain)")
    p.add_argument("--format", choices=("nc", "zarr"), default="nc", help="capture file format (default: nc)")
    p.add_argument("--alpha", type=float, default=0.55, help="heat map opacity in the overlays, 0..1 (default 0.55)")
    p.add_argument("--size", type=int, default=448, help=f"longest side of the written PNGs in pixels, 16..{MAX_SIZE} (default 448)")
    p.add_argument("--overwrite", action="store_true", help="replace files already in --out")
    args = p.parse_args(list(argv))

    import vitlens as vl
    from vitlens.errors import OptionError
    from vitlens.figures import overlay

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise OptionError(f"--out {str(out)!r} is a file, not a folder; give a folder (it is created if missing).")
    if args.size < 16:
        raise OptionError(f"--size {args.size}: give at least 16 pixels.")
    if args.size > MAX_SIZE:  # refused before anything is allocated: 100000 px would take 30 GB per picture
        raise OptionError(f"--size {args.size}: give at most {MAX_SIZE} pixels (the longest side of each PNG); "
                          "larger pictures of a token-grid map show nothing more.")
    if not 0.0 <= args.alpha <= 1.0:  # also NaN
        raise OptionError(f"--alpha {args.alpha:g}: give an opacity between 0 and 1 (0: the picture alone, "
                          "1: the heat map alone).")
    try:
        methods = vl.registry.resolve_methods(args.method)  # the one reader of method names (did-you-mean hint)
    except OptionError as exc:
        raise OptionError(f"--method {args.method!r}: {exc}") from None
    if args.method == "all":  # as vl.explain(cap, "all"): not the methods whose passes are made only when named
        methods = [m for m in methods if not vl.methods.groups_of(m)]
    paths = expand_inputs(args.images)
    stems = output_stems(paths)
    planned = [out / f"{s}_{kind}.png" for s in stems for kind in ("input", *methods)]
    capture_path = out / f"capture.{args.format}"
    existing = [q for q in (*planned, capture_path) if q.exists()]
    if existing and not args.overwrite:
        shown = ", ".join(q.name for q in existing[:5]) + (f" and {len(existing) - 5} more" if len(existing) > 5 else "")
        raise OptionError(f"--out {str(out)!r} already holds {len(existing)} of the files this run writes ({shown}); "
                          "pass --overwrite to replace them, or choose another --out.")

    model = _load(args)
    target = args.target
    if target is not None and target.lstrip("-").isdigit():
        target = int(target)
    cap = vl.capture(model, [str(q) for q in paths], target=target, keep=("all", *vl.methods.extra_groups(methods)))
    maps = {m: vl.normalize(vl.to_pixels(vl.explain(cap, m))) for m in methods}
    out.mkdir(parents=True, exist_ok=True)
    from PIL import Image

    names = cap.attrs.get("class_names") or [str(k) for k in range(cap.logits.shape[1])]
    probs = np.exp(cap.logits.values - cap.logits.values.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    written: set[Path] = set()
    for i, path in enumerate(paths):
        t = int(cap.target.values[i])
        print(f"{path}: explaining class {t} ({names[t]}, p={probs[i, t]:.2f}) -> {stems[i]}_*.png")
        picture = (cap.image.values[i] * 255).round().astype(np.uint8)
        pictures = {"input": picture, **{m: overlay(cap.image.values[i], maps[m].values[i], alpha=args.alpha)
                                          for m in methods}}
        for kind, pixels in pictures.items():
            _write_png(_readable(Image.fromarray(pixels), args.size), out / f"{stems[i]}_{kind}.png")
            written.add(out / f"{stems[i]}_{kind}.png")
    saved = vl.save(cap, capture_path, overwrite=args.overwrite)
    print(f"wrote {len(written)} PNG files ({len(paths)} images x {len(methods) + 1}) and {saved.name} to {out}/")
    return 0


def _readable(image, size: int):
    """Scale the longest side to ``size`` pixels: whole-number factors keep token blocks crisp."""
    from PIL import Image

    longest = max(image.size)
    if longest >= size:
        return image
    factor = size / longest
    resample = Image.Resampling.NEAREST if factor == int(factor) else Image.Resampling.BICUBIC
    return image.resize((round(image.size[0] * factor), round(image.size[1] * factor)), resample)


def _write_png(image, path: Path) -> None:
    from .figures import _atomic_write

    _atomic_write(path, lambda handle: image.save(handle, format="PNG"))
