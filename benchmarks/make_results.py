"""Regenerate benchmarks/RESULTS.md: explanation quality of every method on the shipped
shapes models, and the cost figures of capture and methods — all measured in one run.

    python benchmarks/make_results.py                               # ~25 min on 2 idle CPU cores
    python benchmarks/make_results.py --quick --out /tmp/RESULTS.md # a smoke run (~2 min)

Quality: ``vl.metrics.evaluate_items`` on held-out shapes images (the zoo's evaluation
seeds: ``EVAL_SEED`` for one-object pictures, ``EVAL_SEED + 1`` for two-object ones);
every labelled object is one item, scored with its own class as target and its own
mask. Cost: ``benchmarks/bench_cost.section`` (capture + seven maps against the floor of
exact αβ-LRP, the attention/rollout and gradient-method captures against the plain
passes, peak memory, every step of ``benchmarks/bench_methods.bench``) on ViT-B/16,
Swin-T and EVA02-S (random init, 224×224); capture + seven maps against plain at
batch 1, 8, 32 on ViT-B/16.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import xarray as xr

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import vitlens as vl  # noqa: E402
from vitlens.metrics import evaluate_items, summarize  # noqa: E402
from vitlens.metrics.bench import COLUMNS, format_table  # noqa: E402
from vitlens.zoo import available  # noqa: E402
from vitlens.zoo.train import EVAL_SEED  # noqa: E402
from bench_cost import COST_END, COST_START  # noqa: E402

SEED_METHODS = ("lnstat", "tokentm", "transformer_attribution")
HIGHER = {"pixel_accuracy", "miou", "mean_ap", "pointing", "negative_auc_predicted", "negative_auc_label", "insertion_auc"}
LOWER = {"positive_auc_predicted", "positive_auc_label", "deletion_auc"}
HEADER = {name: head for name, head, _ in COLUMNS}


# ------------------------------------------------------------------------- machine
def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{cpu}, {os.cpu_count()} cores (shared), torch {torch.__version__} with "
            f"{torch.get_num_threads()} thread(s), no GPU" if not torch.cuda.is_available()
            else f"{cpu}, GPU {torch.cuda.get_device_name()}")


# ------------------------------------------------------------------------- quality
def shapes_set(n_one: int, n_two: int) -> xr.Dataset:
    """Held-out one-object and two-object pictures in one dataset (two object slots)."""
    one = vl.datasets.shapes(n_one, seed=EVAL_SEED, objects=1)
    two = vl.datasets.shapes(n_two, seed=EVAL_SEED + 1, objects=2)
    one = one.reindex(object=[0, 1], fill_value={"label": -1, "mask": False})
    both = xr.concat([one, two], dim="sample", data_vars="all", coords="minimal", compat="override",
                     combine_attrs="drop_conflicts")
    return both.assign_coords(sample=np.arange(n_one + n_two))


def load(name: str) -> tuple[torch.nn.Module, bool]:
    """The shipped model, or (while its weights are missing) the same architecture at random init."""
    from vitlens.datasets.shapes import CLASS_NAMES
    from vitlens.zoo import build_from_config
    from vitlens.zoo.train import _MEAN, _SIZE, _STD, MODELS

    if name in available():
        return vl.load_model(name), True
    spec = MODELS[name]
    torch.manual_seed(0)
    config = {"name": name, "family": spec["family"], "timm_class": spec["timm_class"], "kwargs": spec["kwargs"],
              "class_names": list(CLASS_NAMES), "input_size": [3, _SIZE, _SIZE], "mean": _MEAN, "std": _STD}
    return build_from_config(config).eval(), False


def verdict(table: xr.Dataset) -> list[str]:
    """Plain statements of where each seed method fails to beat rollout."""
    lines = []
    base = table.sel({"method": "rollout"})
    for method in SEED_METHODS:
        if method not in table["method"].values:
            continue
        row = table.sel({"method": method})
        worse = [HEADER.get(k, k) for k in [*HIGHER, *LOWER] if k in table
                 and not (float(row[k]) > float(base[k]) if k in HIGHER else float(row[k]) < float(base[k]))]
        order = [HEADER[name] for name, _, _ in COLUMNS]
        worse.sort(key=order.index)
        if worse:
            lines.append(f"- **{method}** does not beat rollout on: {', '.join(worse)}.")
        else:
            lines.append(f"- **{method}** beats rollout on every quality metric.")
    return lines


def quality(name: str, n_one: int, n_two: int, batch_size: int) -> tuple[list[str], float]:
    model, trained = load(name)
    data = shapes_set(n_one, n_two)
    start = time.perf_counter()
    items = evaluate_items(model, data, "all", target="label", batch_size=batch_size, progress=True)
    seconds = time.perf_counter() - start
    every = summarize(items)
    one = summarize(items.isel(item=items.objects_in_image.values == 1))
    two = summarize(items.isel(item=items.objects_in_image.values == 2))
    out = [f"### {name}", ""]
    if not trained:
        out += [f"> **PENDING:** `{name}` weights are not in `vitlens/zoo/` yet; these numbers come from the "
                "same architecture at *random initialisation* and say nothing about the methods.", ""]
    out += [
        f"{n_one} one-object + {n_two} two-object held-out images → {every.attrs['items']} items; "
        f"clean top-1 accuracy against the item's class: {every.attrs['clean_accuracy']:.3f} overall, "
        f"{one.attrs['clean_accuracy']:.3f} on one-object items, {two.attrs['clean_accuracy']:.3f} on "
        "two-object items (there the model's top class is one of two labelled classes, so at most about "
        "half of the items can be \"correct\"). Evaluation took "
        f"{seconds:.0f} s.",
        "",
        "**All items**", "", format_table(every, markdown=True), "",
        "**One-object images**", "", format_table(one, markdown=True), "",
        "**Two-object images (each object scored with its own class and mask)**", "",
        format_table(two, markdown=True), "",
        "Where the seed methods do not beat rollout (all items):", "", *verdict(every), "",
        "Two-object items only:", "", *verdict(two), "",
        f"Capture time (shared by all methods): {float(every['capture_seconds_per_image'][0]) * 1000:.1f} ms "
        "per image; `ms/img` above is each method's own `vl.explain` time.",
        "",
    ]
    return out, seconds


# ------------------------------------------------- the LN-statistics paper's claim
#: (row label, method, options) of the localisation comparison; None options = defaults.
CLAIM_VARIANTS = (
    ("rollout", "rollout", {}),
    ("transformer_attribution", "transformer_attribution", {}),
    ("transformer_attribution, identity_path=keep", "transformer_attribution", {"identity_path": "keep"}),
    ("transformer_attribution, float32 products (before)", "transformer_attribution",
     {"identity_path": "keep", "_float32": True}),
    ("generic_attention", "generic_attention", {}),
    ("generic_attention, identity_path=keep", "generic_attention", {"identity_path": "keep"}),
    ("lnstat, grad=False (gradient-free)", "lnstat", {"grad": False}),
    ("lnstat, grad=True (gradient-weighted)", "lnstat", {"grad": True}),
    ("lnstat, grad=True, identity_path=keep", "lnstat", {"grad": True, "identity_path": "keep"}),
    ("tokentm", "tokentm", {}),
)
CLAIM_PAIRS = (("lnstat, grad=True (gradient-weighted)", "transformer_attribution"),
               ("lnstat, grad=False (gradient-free)", "transformer_attribution"),
               ("lnstat, grad=True (gradient-weighted)", "lnstat, grad=False (gradient-free)"),
               ("lnstat, grad=True (gradient-weighted)", "generic_attention"))
CLAIM_START, CLAIM_END = "<!-- lnstat-claim:start -->", "<!-- lnstat-claim:end -->"


def _claim_maps(cap: xr.DataTree, method: str, options: dict) -> xr.DataArray:
    from vitlens.methods import operators

    options = dict(options)
    if options.pop("_float32", False):  # the products as vitlens computed them before (float32)
        saved = operators.ACCUMULATE
        operators.ACCUMULATE = torch.float32
        try:
            return vl.explain(cap, method, **options)
        finally:
            operators.ACCUMULATE = saved
    return vl.explain(cap, method, **options)


def claim_items(name: str, n_one: int, n_two: int, batch_size: int,
                variants: tuple = CLAIM_VARIANTS) -> tuple[xr.Dataset, float, bool]:
    """Segmentation counts of every ``variants`` row (CLAIM_VARIANTS) on every item (its own class and mask)."""
    from vitlens.metrics.inputs import pixel_maps
    from vitlens.metrics.segmentation import counts_dataset

    model, trained = load(name)
    data = shapes_set(n_one, n_two)
    images, masks, labels = data["image"].values, data["mask"].values, data["label"].values
    item_sample, item_object = np.nonzero(masks.any((2, 3)))
    item_label = labels[item_sample, item_object]
    from vitlens.methods import groups_of

    keep = ("all", *sorted({g for _, method, opts in variants
                            for g in groups_of(method, {k: v for k, v in opts.items() if not k.startswith("_")})}))
    start = time.perf_counter()
    parts = []
    for a in range(0, item_sample.size, batch_size):
        sl = slice(a, a + batch_size)
        cap = vl.capture(model, images[item_sample[sl]], target=item_label[sl].tolist(), batch_size=batch_size,
                         progress=False, keep=keep)
        size = tuple(int(v) for v in cap.attrs["input_size"][-2:])
        per = [counts_dataset(pixel_maps(_claim_maps(cap, method, opts), size), masks[item_sample[sl], item_object[sl]],
                              "item") for _, method, opts in variants]
        parts.append(xr.concat(per, "variant"))
    items = xr.concat(parts, "item").assign_coords(
        variant=[label for label, _, _ in variants], item=np.arange(item_sample.size),
        objects_in_image=("item", np.bincount(item_sample, minlength=images.shape[0])[item_sample]))
    return items, time.perf_counter() - start, trained


def _scores(items: xr.Dataset) -> dict[str, np.ndarray]:
    inter, union = items["intersection"].sum("item"), items["union"].sum("item")
    return {"miou": (inter / union).mean("part").values, "mean_ap": items["ap"].mean("item").values,
            "pointing": items["pointing"].mean("item").values}


def _paired(items: xr.Dataset, a: str, b: str, rng: np.random.Generator, rounds: int = 2000) -> dict[str, tuple]:
    """Difference a − b of each score and its 95 % paired bootstrap interval over items."""
    sub = items.sel(variant=[a, b])
    inter, union = sub["intersection"].values, sub["union"].values  # (2, item, part)
    ap, point = sub["ap"].values, sub["pointing"].values
    n = ap.shape[1]

    def diff(idx: np.ndarray) -> np.ndarray:
        miou = (inter[:, idx].sum(1) / union[:, idx].sum(1)).mean(-1)
        return np.array([miou[0] - miou[1], ap[0, idx].mean() - ap[1, idx].mean(),
                         point[0, idx].mean() - point[1, idx].mean()])

    full = diff(np.arange(n))
    boot = np.stack([diff(rng.integers(0, n, n)) for _ in range(rounds)])
    lo, hi = np.percentile(boot, [2.5, 97.5], axis=0)
    return {k: (full[i], lo[i], hi[i]) for i, k in enumerate(("miou", "mean_ap", "pointing"))}


def _fmt_diff(d: tuple) -> str:
    v, lo, hi = d
    mark = " ✔" if lo > 0 else (" ✘" if hi < 0 else "")
    return f"{v:+.3f} [{lo:+.3f}, {hi:+.3f}]{mark}"


def claim_section(n_one: int, n_two: int, batch_size: int) -> tuple[list[str], dict]:
    """The RESULTS.md section on arXiv 2311.11378's claim, and the raw scores (for the docs)."""
    rng = np.random.default_rng(0)
    out = [CLAIM_START, "## Does the LN-statistics paper's claim reproduce? (lnstat vs Transformer Attribution)", "",
           "Generated by `python benchmarks/make_results.py --only-lnstat-claim` (splices this section into "
           "RESULTS.md; a full run writes it too). Same data and segmentation protocol as the tables above "
           "(maps of each item's own class, bilinear to 64×64, min-max, foreground = map > its mean; mIoU from "
           "dataset-level counts, mAP and pointing per item); no perturbation runs. Differences come with a 95 % "
           "paired bootstrap interval over items (2,000 resamples): ✔ = interval above 0, ✘ = below 0, "
           "neither = not resolved at this n.", ""]
    raw = {}
    for name in ("vit-shapes", "swin-shapes"):
        items, seconds, trained = claim_items(name, n_one, n_two, batch_size)
        out += [f"### {name}", ""]
        if not trained:
            out += ["> **PENDING:** random-init weights; these numbers say nothing about the methods.", ""]
        out += [f"{n_one} one-object + {n_two} two-object held-out images → n = {items.sizes['item']} items "
                f"({seconds:.0f} s on {torch.get_num_threads()} thread(s)).", ""]
        two = items.isel(item=items.objects_in_image.values == 2)
        s_all, s_two = _scores(items), _scores(two)
        raw[name] = {"all": {k: dict(zip(items.variant.values.tolist(), v.tolist())) for k, v in s_all.items()},
                     "items": int(items.sizes["item"])}
        out += ["| variant | mIoU | mAP | point | point (two-object items) |", "|---|---:|---:|---:|---:|"]
        for i, label in enumerate(items.variant.values):
            out.append(f"| {label} | {s_all['miou'][i]:.3f} | {s_all['mean_ap'][i]:.3f} | {s_all['pointing'][i]:.3f} "
                       f"| {s_two['pointing'][i]:.3f} |")
        out += ["", "| difference (all items) | mIoU | mAP | point |", "|---|---:|---:|---:|"]
        for a, b in CLAIM_PAIRS:
            d = _paired(items, a, b, rng)
            raw[name][f"{a} − {b}"] = {k: list(v) for k, v in d.items()}
            out.append(f"| {a} − {b} | {_fmt_diff(d['miou'])} | {_fmt_diff(d['mean_ap'])} | "
                       f"{_fmt_diff(d['pointing'])} |")
        out.append("")
    out += claim_verdict(raw) + ["", CLAIM_END]
    return out, raw


# ------------------------------------------------------- AttnLRP and LeGrad (issue 29)
NEW_METHODS = ("attnlrp", "legrad")
NEW_VARIANTS = (
    ("rollout", "rollout", {}),
    ("transformer_attribution", "transformer_attribution", {}),
    ("generic_attention", "generic_attention", {}),
    ("attnlrp (softmax=cp, default)", "attnlrp", {"softmax": "cp"}),
    ("attnlrp, softmax=attnlrp", "attnlrp", {"softmax": "attnlrp"}),
    ("legrad (score=mean, default)", "legrad", {"score": "mean"}),
    ("legrad, score=readout", "legrad", {"score": "readout"}),
)
NEW_PAIRS = (("attnlrp (softmax=cp, default)", "transformer_attribution"),
             ("legrad (score=mean, default)", "transformer_attribution"),
             ("attnlrp (softmax=cp, default)", "rollout"),
             ("legrad (score=mean, default)", "rollout"),
             ("attnlrp, softmax=attnlrp", "attnlrp (softmax=cp, default)"),
             ("legrad, score=readout", "legrad (score=mean, default)"))
NEW_START, NEW_END = "<!-- new-methods:start -->", "<!-- new-methods:end -->"


def new_rows(name: str, n_one: int, n_two: int, batch_size: int, mark: str = "") -> tuple[dict[str, list[str]], float, float]:
    """The quality-table rows of the new methods (all / one-object / two-object items), the seconds the
    evaluation took and its capture time per image (with the methods' extra passes). ``mark`` follows
    the method's name (rows made on fewer images than the table's)."""
    model, _ = load(name)
    start = time.perf_counter()
    items = evaluate_items(model, shapes_set(n_one, n_two), list(NEW_METHODS), target="label",
                           batch_size=batch_size, progress=True)
    seconds = time.perf_counter() - start
    tables = {"all": summarize(items),
              "one": summarize(items.isel(item=items.objects_in_image.values == 1)),
              "two": summarize(items.isel(item=items.objects_in_image.values == 2))}
    rows = {k: [line.replace(f"| {line.split('|')[1].strip()} |", f"| {line.split('|')[1].strip()}{mark} |", 1)
                for line in format_table(t, markdown=True).splitlines()
                if line.split("|")[1].strip() in NEW_METHODS] for k, t in tables.items()}
    return rows, seconds, float(tables["all"]["capture_seconds_per_image"][0])


def splice_rows(path: Path, name: str, rows: dict[str, list[str]]) -> None:
    """Put the new methods' rows into the three quality tables of model ``name`` (after tokentm; replaces
    earlier rows of theirs), keeping the rest of RESULTS.md as it is. Written atomically."""
    text = path.read_text(encoding="utf-8")
    head, rest = text.split(f"\n### {name}\n", 1)
    stop = rest.find("\n### ")
    stop = rest.find("\n## ") if stop < 0 else min(stop, rest.find("\n## ") if "\n## " in rest else stop)
    block, tail = rest[:stop], rest[stop:]
    lines = [l for l in block.split("\n")
             if l.split("|")[1:2] == [] or l.split("|")[1].split()[:1] not in [[m] for m in NEW_METHODS]]
    out, table = [], 0
    for line in lines:
        out.append(line)
        if line.startswith("| tokentm |"):
            out += rows[("all", "one", "two")[table]]
            table += 1
    if table != 3:
        raise SystemExit(f"{path}: expected three quality tables with a tokentm row under '### {name}', found {table}")
    tmp = path.with_suffix(".tmp")
    tmp.write_text(head + f"\n### {name}\n" + "\n".join(out) + tail, encoding="utf-8")
    tmp.replace(path)


def new_methods_section(n_one: int, n_two: int, batch_size: int, costs: dict[str, tuple], mark: str = "") -> list[str]:
    """The RESULTS.md section on AttnLRP and LeGrad against the seven, with paired bootstrap intervals."""
    rng = np.random.default_rng(0)
    out = [NEW_START, "## AttnLRP and LeGrad against the seven (issue 29)", "",
           "Generated by `python benchmarks/make_results.py --only-new-methods` (adds the `attnlrp` and `legrad` "
           "rows to the quality tables above, evaluated with the same protocol and data, and writes this "
           "section; a full run makes both). Segmentation protocol of the tables above on the same items (maps "
           "of each item's own class); differences with a 95 % paired bootstrap interval over items (2,000 "
           "resamples): ✔ = interval above 0, ✘ = below 0, neither = not resolved at this n.", ""]
    if mark:
        out += [f"{mark.strip()} The `attnlrp` and `legrad` rows of the tables above and this section were made on "
                f"the first {n_one} one-object and {n_two} two-object images of the same held-out seeds (a subset of "
                "the tables' images; the machine was shared by eight sessions), so their n differs from the other "
                "rows'; the comparisons below are paired on these items, the seven's scores recomputed on them.", ""]
    for name in ("vit-shapes", "swin-shapes"):
        items, seconds, trained = claim_items(name, n_one, n_two, batch_size, NEW_VARIANTS)
        out += [f"### {name}", ""]
        if not trained:
            out += ["> **PENDING:** random-init weights; these numbers say nothing about the methods.", ""]
        table_seconds, capture = costs.get(name, (float("nan"), float("nan")))
        out += [f"{n_one} one-object + {n_two} two-object held-out images → n = {items.sizes['item']} items "
                f"({seconds:.0f} s here; the table rows: {table_seconds:.0f} s, capture with the AttnLRP (CP) and "
                f"LeGrad passes {capture * 1000:.1f} ms per image).", ""]
        two = items.isel(item=items.objects_in_image.values == 2)
        s_all, s_two = _scores(items), _scores(two)
        out += ["| variant | mIoU | mAP | point | point (two-object items) |", "|---|---:|---:|---:|---:|"]
        for i, label in enumerate(items.variant.values):
            out.append(f"| {label} | {s_all['miou'][i]:.3f} | {s_all['mean_ap'][i]:.3f} | {s_all['pointing'][i]:.3f} "
                       f"| {s_two['pointing'][i]:.3f} |")
        out += ["", "| difference (all items) | mIoU | mAP | point |", "|---|---:|---:|---:|"]
        for a, b in NEW_PAIRS:
            d = _paired(items, a, b, rng)
            out.append(f"| {a} − {b} | {_fmt_diff(d['miou'])} | {_fmt_diff(d['mean_ap'])} | "
                       f"{_fmt_diff(d['pointing'])} |")
        out.append("")
    return out + [NEW_END]


def _word(d: list, higher: str = "better", lower: str = "worse") -> str:
    v, lo, hi = d
    return higher if lo > 0 else lower if hi < 0 else "not resolved: the interval spans 0"


def claim_verdict(raw: dict) -> list[str]:
    """Plain statements from the paired intervals (no hand-written numbers)."""
    ta = "transformer_attribution"
    names = (("miou", "mIoU"), ("mean_ap", "mAP"), ("pointing", "pointing"))
    readings = (("gradient-weighted", "lnstat, grad=True (gradient-weighted)"),
                ("gradient-free", "lnstat, grad=False (gradient-free)"))

    def split(model: str, reading: str) -> tuple[list[str], list[str], list[str]]:
        d = raw[model][f"{reading} − {ta}"]
        fmt = lambda k, lab: f"{lab} {d[k][0]:+.3f} [{d[k][1]:+.3f}, {d[k][2]:+.3f}]"  # noqa: E731
        return ([fmt(k, lab) for k, lab in names if d[k][1] > 0], [fmt(k, lab) for k, lab in names if d[k][2] < 0],
                [fmt(k, lab) for k, lab in names if d[k][1] <= 0 <= d[k][2]])

    def listing(better: list[str], worse: list[str], unresolved: list[str], good: str, bad: str) -> str:
        parts = []
        if better:
            parts.append(f"{good} on {', '.join(better)}")
        if worse:
            parts.append(f"{bad} on {', '.join(worse)}")
        if unresolved:
            parts.append(f"not resolved on {', '.join(unresolved)}")
        return "; ".join(parts)

    lines = ["**What holds and what does not** (generated from the intervals above; lnstat − Transformer "
             "Attribution, 95 % interval):", ""]
    lines.append("- **Claim 1, Swin: lnstat localises better than Transformer Attribution.**")
    for label, reading in readings:
        better, worse, unresolved = split("swin-shapes", reading)
        verdict = "holds" if better and not worse and not unresolved else "does not hold" if not better else "holds only in part"
        lines.append(f"  - {label}: {verdict} — " + listing(better, worse, unresolved, "better", "worse") + ".")
    lines.append("- **Claim 2, ViT: lnstat is competitive with Transformer Attribution** (read here as: no score "
                 "worse by more than 0.02).")
    for label, reading in readings:
        d = raw["vit-shapes"][f"{reading} − {ta}"]
        far = [lab for k, lab in names if d[k][0] < -0.02 and d[k][2] < 0]
        better, worse, unresolved = split("vit-shapes", reading)
        verdict = "holds" if not far else f"does not hold ({', '.join(far)} more than 0.02 below)"
        lines.append(f"  - {label}: {verdict} — " + listing(better, worse, unresolved, "better", "worse") + ".")
    for model in ("vit-shapes", "swin-shapes"):
        scores = raw[model]["all"]
        pairs = [("transformer_attribution", "transformer_attribution, identity_path=keep"),
                 ("generic_attention", "generic_attention, identity_path=keep"),
                 ("lnstat, grad=True (gradient-weighted)", "lnstat, grad=True, identity_path=keep")]
        gap = max(abs(scores[k][a] - scores[k][b]) for a, b in pairs for k in scores)
        f32 = max(abs(scores[k]["transformer_attribution, identity_path=keep"]
                      - scores[k]["transformer_attribution, float32 products (before)"]) for k in scores)
        lines.append(f"- {model}: `identity_path` drop vs keep changes no score by more than {gap:.4f}; "
                     f"Transformer Attribution's float32 products moved a score by up to {f32:.4f}.")
    lines.append("- Scope: the paper's figure (+23.6 % IoU over Chefer et al.) is on ImageNet with ImageNet-trained "
                 "Swin and ViT; these are two small models on synthetic shapes, so this tests the *rule* on "
                 "vitlens' models, it does not reproduce the paper's table.")
    return lines


def splice_claim(path: Path, lines: list[str]) -> None:
    """Replace (or insert before the cost section) the claim section of RESULTS.md; the rest is kept."""
    splice(path, lines, CLAIM_START, CLAIM_END, before="\n## Cost")


def splice(path: Path, lines: list[str], start: str, end: str, before: str | None = None,
           replaces: str | None = None) -> None:
    """Replace the section between the markers ``start`` and ``end`` of RESULTS.md by ``lines``.

    Without the markers, a section headed ``replaces`` (a file from before the
    markers) is replaced up to the next ``## `` heading; failing that the section
    goes in before the heading ``before`` (or at the end). The rest of the file
    is kept as it is. Written atomically.
    """
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    block = "\n".join(lines)
    old = -1 if replaces is None else text.find(replaces)
    if start in text and end in text:
        head, rest = text.split(start, 1)
        text = head + block + rest.split(end, 1)[1]
    elif old >= 0:
        stop = text.find("\n## ", old + len(replaces))
        text = text[: old + 1] + block + "\n" + ("" if stop < 0 else "\n" + text[stop + 1 :])
    else:
        cut = -1 if before is None else text.find(before)
        text = (text + "\n" + block + "\n") if cut < 0 else text[: cut + 1] + block + "\n\n" + text[cut + 1 :]
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


# ---------------------------------------------------------------------------- cost
_THROUGHPUT_CHILD = r"""
import json, statistics, sys, time, timm, torch, vitlens as vl
torch.manual_seed(0)
b = int(sys.argv[1])
model = timm.create_model("vit_base_patch16_224", pretrained=False).eval()
x = torch.randn(b, 3, 224, 224)
target = (torch.arange(b) % 1000).tolist()

def plain():
    model.zero_grad(set_to_none=True)
    model(x).gather(1, torch.tensor(target)[:, None]).sum().backward()

def capture():
    cap = vl.capture(model, x, target=target, batch_size=b, progress=False)
    for method in vl.methods.explainable_methods(cap):  # the seven a default capture explains
        vl.explain(cap, method)

def timed(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t

rounds = int(sys.argv[2])
plain(), capture()  # warm-up
t_plain, t_cap = [], []
for _ in range(rounds):
    t_plain.append(timed(plain))
    t_cap.append(timed(capture))
print(json.dumps([t_plain, t_cap]))
"""


def throughput(batches: tuple[int, ...]) -> list[str]:
    """Capture + all seven maps against plain forward+backward at several batch sizes (ViT-B/16).

    Each batch size runs in a fresh process (no allocator state carried from the
    one before): interleaved rounds (plain, then capture and the maps) after one
    warm-up round; each row is the median of its rounds' own ratios, so the
    per-image cost is flat in batch size when the last column is.
    """
    rows = ["| batch | rounds | plain fwd+bwd (img/s) | capture + seven maps (img/s) | ratio (median of rounds) |",
            "|---:|---:|---:|---:|---:|"]
    for b in batches:
        rounds = 5 if b == 1 else 3
        out = subprocess.run([sys.executable, "-c", _THROUGHPUT_CHILD, str(b), str(rounds)], capture_output=True,
                             text=True, check=True)
        t_plain, t_cap = json.loads(out.stdout.strip().splitlines()[-1])
        ratio = statistics.median(c / p for c, p in zip(t_cap, t_plain))
        rows.append(f"| {b} | {rounds} | {b / statistics.median(t_plain):.2f} | {b / statistics.median(t_cap):.2f} | "
                    f"{ratio:.2f} |")
    return rows


def cost(batch: int, repeat: int, batches: tuple[int, ...], memory_batch: int, spliced: bool = False) -> list[str]:
    """The cost section: ``bench_cost.section`` (targets, peak memory, every step of the three models),
    then the per-image cost against batch size (``batches``; none: left out)."""
    from bench_cost import COST_END as end, section

    out = section(batch, repeat, int(torch.get_num_threads()), memory_batch, spliced=spliced)[:-1]
    if batches:
        out += ["", "Per-image cost against batch size, ViT-B/16 at 224 (capture + seven maps against plain "
                "forward+backward; interleaved rounds after a warm-up):", ""]
        out += throughput(batches)
    return out + ["", end]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n-one", type=int, default=250, help="one-object images per model")
    p.add_argument("--n-two", type=int, default=250, help="two-object images per model")
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--quick", action="store_true", help="small n and light cost figures (a smoke run)")
    p.add_argument("--skip-cost", action="store_true")
    p.add_argument("--out", default=str(HERE / "RESULTS.md"))
    p.add_argument("--only-lnstat-claim", action="store_true",
                   help="compute only the section on the LN-statistics paper's claim and splice it into --out")
    p.add_argument("--claim-json", default=None, help="also write the claim section's raw scores as JSON here")
    p.add_argument("--only-new-methods", action="store_true",
                   help="evaluate only attnlrp and legrad: add their rows to the quality tables of --out and "
                        "splice in their section (~1/3 of a quality run)")
    p.add_argument("--only-cost", action="store_true",
                   help="measure only the cost section (~15 min) and splice it into --out")
    args = p.parse_args()
    if args.quick:
        args.n_one, args.n_two = 10, 10
    if args.only_lnstat_claim:
        t = time.perf_counter()
        lines, raw = claim_section(args.n_one, args.n_two, args.batch_size)
        lines.insert(3, "> Spliced into an existing RESULTS.md: the full tables above may predate the current "
                        "method defaults (their `lnstat` row is whatever the default was when they were generated; "
                        "this section names every option it uses).\n")
        splice_claim(Path(args.out), lines)
        if args.claim_json:
            Path(args.claim_json).write_text(json.dumps(raw, indent=1), encoding="utf-8")
        print(f"spliced the lnstat-claim section into {args.out} in {(time.perf_counter() - t) / 60:.1f} min")
        return
    if args.only_new_methods:
        t = time.perf_counter()
        costs = {}
        mark = "" if (args.n_one, args.n_two) == (250, 250) else " ‡"  # rows on fewer images than the tables'
        for name in ("vit-shapes", "swin-shapes"):
            rows, seconds, capture = new_rows(name, args.n_one, args.n_two, args.batch_size, mark)
            splice_rows(Path(args.out), name, rows)
            costs[name] = (seconds, capture)
        splice(Path(args.out), new_methods_section(args.n_one, args.n_two, args.batch_size, costs, mark), NEW_START,
               NEW_END, before="\n## Does the LN-statistics")
        print(f"spliced the new methods into {args.out} in {(time.perf_counter() - t) / 60:.1f} min")
        return
    cost_args = dict(batch=8, repeat=3, batches=(1, 8, 32), memory_batch=8) if not args.quick else \
        dict(batch=1, repeat=1, batches=(1, 2), memory_batch=1)
    if args.only_cost:
        t = time.perf_counter()
        splice(Path(args.out), cost(**cost_args, spliced=True), COST_START, COST_END, replaces="\n## Cost")
        print(f"spliced the cost section into {args.out} in {(time.perf_counter() - t) / 60:.1f} min")
        return
    start = time.perf_counter()
    body: list[str] = ["## Explanation quality on the shapes models", ""]
    spent = {}
    for name in ("vit-shapes", "swin-shapes"):
        lines, spent[name] = quality(name, args.n_one, args.n_two, args.batch_size)
        body += lines
    costs = {name: (float("nan"), float("nan")) for name in spent}
    body += new_methods_section(args.n_one, args.n_two, args.batch_size, costs) + [""]
    body += claim_section(args.n_one, args.n_two, args.batch_size)[0] + [""]
    if not args.skip_cost:
        body += cost(**cost_args)
    total = time.perf_counter() - start
    pending = [n for n in spent if n not in available()]
    head = [
        "# vitlens benchmark results",
        "",
        *([f"> **PENDING:** no trained weights for {', '.join(pending)} yet; the quality tables below use "
           "random initialisation and will be regenerated.", ""] if pending else []),
        *(["> Quick smoke run (`--quick`): small n and light cost figures, not the published configuration.", ""]
          if args.quick else []),
        "Generated by `python benchmarks/make_results.py` "
        f"on {_dt.date.today().isoformat()}; do not edit by hand.",
        "",
        f"- Machine: {machine()}.",
        f"- Whole run: {total / 60:.1f} min (quality: "
        + ", ".join(f"{k} {v:.0f} s" for k, v in spent.items()) + ").",
        f"- Data: `vl.datasets.shapes`, held-out seeds {EVAL_SEED} ({args.n_one} one-object images) and "
        f"{EVAL_SEED + 1} ({args.n_two} two-object images) at 64×64; n = {args.n_one + args.n_two} images per model.",
        "- Protocol (docs/METHODS.md, Metrics): maps upsampled bilinearly to 64×64 and min-max normalised. "
        "Segmentation: foreground = map > its mean; pixel accuracy and mIoU from dataset-level counts; mAP per "
        "item; pointing = the map's maximum inside the mask (ties split). Perturbation: 0–90 % of pixels set to 0 "
        "in the unnormalised picture, most relevant first (pos, lower is better) or least relevant first (neg, "
        "higher is better); top-1 accuracy against the item's class; AUC = trapezoid ×100. `pred`/`label`: maps "
        "explaining the predicted / the item's class. Deletion/insertion: softmax probability of the item's "
        "class, area over 0–100 % (del lower, ins higher is better). Segmentation and deletion/insertion use the "
        "maps of the item's class (`target=\"label\"`). Default options of every method.",
        "",
    ]
    body += kept_sections(Path(args.out), body)
    Path(args.out).write_text("\n".join(head + body) + "\n", encoding="utf-8")
    print(f"wrote {args.out} in {total / 60:.1f} min")


def kept_sections(path: Path, body: list[str]) -> list[str]:
    """The marked sections of the old file (``<!-- name:start -->`` … ``<!-- name:end -->``) that other
    benchmarks splice in (e.g. bench_shard.py --results) and this run does not write: kept at the end."""
    import re

    old = path.read_text(encoding="utf-8") if path.exists() else ""
    text = "\n".join(body)
    out: list[str] = []
    for match in re.finditer(r"<!-- ([\w-]+):start -->.*?<!-- \1:end -->", old, re.S):
        if f"<!-- {match.group(1)}:start -->" not in text:
            out += ["", match.group(0)]
    return out


if __name__ == "__main__":
    main()
