"""``vl.evaluate``: every method's segmentation and perturbation scores in one table.

One *evaluation item* is one labelled object of one image: its mask is the
segmentation ground truth and its class the label the perturbation accuracy is
measured against. A two-object image therefore gives two items (each scored with
its own object's class and mask).

Per batch of images the model is captured once for its predicted classes and,
for the items whose label differs from the prediction, once more for the labels;
each method's maps come from those captures. Perturbation curves for the
predicted-class maps are computed per image (two items of one image share them),
and for the label maps only where the label differs from the prediction and the
map does change with the class (class-agnostic maps such as rollout do not). The deletion and insertion curves reuse the forward
passes of the positive and negative perturbation runs (see
:mod:`vitlens.metrics.perturbation`), so the whole table costs one run of each.
"""

from __future__ import annotations

import inspect
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import xarray as xr
from torch import nn

from ..errors import ImageError, OptionError
from .inputs import Pictures, model_device, pixel_maps, progress_bar
from .perturbation import ranking, removal_probabilities
from .segmentation import PARTS, counts_dataset, segmentation_scores

__all__ = ["evaluate", "evaluate_items", "summarize", "TARGETS"]

#: Which class's maps the segmentation and deletion/insertion columns score.
TARGETS = ("label", "predicted")

_CURVES = [f"correct_{d}_{w}" for d in ("positive", "negative") for w in ("predicted", "label")]


def _method_names(methods: str | Sequence[str]) -> list[str]:
    from ..registry import METHOD_INFO, resolve_methods

    names = resolve_methods(methods)  # the one reader of method names (did-you-mean hint)
    if not names:
        raise OptionError(f"methods is empty; pass 'all' or names from {list(METHOD_INFO)}.")
    return names


def _dataset_arrays(dataset: xr.Dataset, n: int | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """images (N, H, W, 3) float32 in [0, 1], masks (N, O, H, W) bool, labels (N, O) int64."""
    if not isinstance(dataset, xr.Dataset):
        raise OptionError(
            f"dataset must be an xarray.Dataset with 'image' and 'mask' (e.g. vl.datasets.shapes(500)); "
            f"got {type(dataset).__name__}."
        )
    missing = [v for v in ("image", "mask") if v not in dataset]
    if missing:
        raise OptionError(
            f"dataset lacks {missing}; evaluate needs 'image (sample, y, x, channel)' and "
            "'mask (sample, [object,] y, x)', plus 'label' for perturbation accuracy."
        )
    total = dataset.sizes.get("sample", 0)
    if total == 0:
        raise OptionError("dataset holds no images; pass a dataset with at least one image and mask.")
    if n is not None:
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise OptionError(f"n={n!r}: use a positive number of images, or None for all.")
        if n > total:
            raise OptionError(f"n={n} but the dataset holds {total} images; use n <= {total} or n=None.")
        dataset = dataset.isel(sample=slice(0, int(n)))
    images = dataset["image"].transpose("sample", "y", "x", "channel").values
    if np.issubdtype(images.dtype, np.integer):
        images = images.astype(np.float32) / 255.0
    images = np.asarray(images, dtype=np.float32)
    if images.min() < -1e-4 or images.max() > 1 + 1e-4:
        raise ImageError("dataset images must lie in [0, 1] (or be uint8); vitlens datasets do.")
    mask = dataset["mask"]
    if "object" not in mask.dims:
        mask = mask.expand_dims(object=[0], axis=1)
    masks = mask.transpose("sample", "object", "y", "x").values.astype(bool)
    if "label" in dataset:
        label = dataset["label"]
        if "object" not in label.dims:
            label = label.expand_dims(object=[0], axis=1)
        labels = label.transpose("sample", "object").values.astype(np.int64)
    else:
        labels = np.full(masks.shape[:2], -1, dtype=np.int64)
    if labels.shape != masks.shape[:2]:
        raise OptionError(f"label has shape {labels.shape} but mask has {masks.shape[:2]} (sample, object).")
    return np.clip(images, 0.0, 1.0), masks, labels


def _fit(images: np.ndarray, masks: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Resize pictures (bilinear, antialiased) and masks (nearest) together to the model input."""
    if images.shape[1:3] == tuple(size):
        return images, masks
    f = torch.nn.functional
    x = torch.from_numpy(images).permute(0, 3, 1, 2)
    x = f.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False).clamp(0, 1)
    n, o = masks.shape[:2]
    m = torch.from_numpy(masks.reshape(n * o, 1, *masks.shape[2:]).astype(np.float32))
    m = f.interpolate(m, size=size, mode="nearest").reshape(n, o, *size) > 0.5
    return np.ascontiguousarray(x.permute(0, 2, 3, 1).numpy()), m.numpy()


def _hits(probs: np.ndarray, clean: np.ndarray, reference: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Top-1 hits (items, S) of the positive and the negative run, clean picture first.

    ``probs`` (items, 2(S−1), classes) holds the positive steps 1..S−1, then the negative ones.
    """
    half = probs.shape[1] // 2
    top1 = probs.argmax(-1)
    first = clean.argmax(-1)[:, None]
    positive = np.concatenate([first, top1[:, :half]], 1)
    negative = np.concatenate([first, top1[:, half:]], 1)
    return positive == reference[:, None], negative == reference[:, None]


def _deletion_insertion(probs: np.ndarray, clean: np.ndarray, zero: np.ndarray, explained: np.ndarray
                        ) -> tuple[np.ndarray, np.ndarray]:
    """Deletion and insertion curves (items, S+1) of the explained class from the same runs.

    Deletion at j/S is the positive run at j/S; insertion at j/S keeps the top pixels,
    i.e. it is the negative run at (S − j)/S; the ends are the clean and the all-zero picture.
    """
    half = probs.shape[1] // 2
    pick = np.arange(len(explained))
    p = probs[pick, :, explained]  # (items, runs)
    c_clean, c_zero = clean[pick, explained][:, None], zero[pick, explained][:, None]
    deletion = np.concatenate([c_clean, p[:, :half], c_zero], 1)
    insertion = np.concatenate([c_zero, p[:, half:][:, ::-1], c_clean], 1)
    return deletion, insertion


def _check_options(names: list[str], options: Mapping[str, Mapping[str, Any]] | None, target: str, steps: Any,
                   batch_size: Any) -> dict[str, dict[str, Any]]:
    """The per-method options, after checking every argument of :func:`evaluate_items`."""
    opts = {k: dict(v) for k, v in (options or {}).items()}
    if set(opts) - set(names):
        raise OptionError(f"options for {sorted(set(opts) - set(names))}, which are not evaluated; evaluated: {names}.")
    if target not in TARGETS:
        raise OptionError(f"target={target!r}; choose 'label' (each object's class) or 'predicted'.")
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 2:
        raise OptionError(f"steps={steps!r}: use an int >= 2 (10 gives the 0 %, 10 %, ..., 90 % protocol).")
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise OptionError(f"batch_size must be a positive int; got {batch_size!r}.")
    return opts


class _Items:
    """The evaluation items: one per labelled object (a non-empty mask) of each image."""

    def __init__(self, masks: np.ndarray, labels: np.ndarray):
        self.sample, self.object = np.nonzero(masks.any((2, 3)))
        if self.sample.size == 0:
            raise ImageError("no image of the dataset has a non-empty mask; evaluate scores maps against masks.")
        self.label = labels[self.sample, self.object]
        self.masks = masks
        self.predicted = np.zeros(self.sample.size, np.int64)
        self.reference = np.zeros(self.sample.size, np.int64)

    def __len__(self) -> int:
        return int(self.sample.size)

    def in_batch(self, start: int, size: int) -> tuple[np.ndarray, np.ndarray]:
        """The items of images ``start … start + size − 1``, and their images' positions in the batch."""
        its = np.nonzero((self.sample >= start) & (self.sample < start + size))[0]
        return its, self.sample[its] - start


class _Scores:
    """Per-method, per-item results, filled batch by batch (segmentation counts, perturbation hits,
    deletion and insertion curves, timings)."""

    def __init__(self, n_methods: int, n_items: int, steps: int):
        self.seg: dict[str, np.ndarray] = {
            "correct": np.zeros((n_methods, n_items), np.int64),
            "intersection": np.zeros((n_methods, n_items, 2), np.int64),
            "union": np.zeros((n_methods, n_items, 2), np.int64),
            "ap": np.zeros((n_methods, n_items)),
            "pointing": np.zeros((n_methods, n_items)),
        }
        self.hits = {k: np.zeros((n_methods, n_items, steps), bool) for k in _CURVES}
        self.deletion = np.zeros((n_methods, n_items, steps + 1), np.float32)
        self.insertion = np.zeros((n_methods, n_items, steps + 1), np.float32)
        self.explain_seconds = np.zeros(n_methods)
        self.capture_seconds = 0.0
        self.maps_computed = 0  # (method, image, class) maps computed with the model: all of them without a store

    def put(self, m: int, its: np.ndarray, counts: xr.Dataset, probs: Mapping[str, np.ndarray], clean: np.ndarray,
            zero: np.ndarray, reference: np.ndarray, explained: np.ndarray, curve_probs: np.ndarray) -> None:
        """Method ``m``'s results for items ``its``: ``probs`` maps "predicted"/"label" to their runs."""
        for key, arr in self.seg.items():
            arr[m, its] = counts[key].values
        for which, p in probs.items():
            positive, negative = _hits(p, clean, reference)
            self.hits[f"correct_positive_{which}"][m, its] = positive
            self.hits[f"correct_negative_{which}"][m, its] = negative
        self.deletion[m, its], self.insertion[m, its] = _deletion_insertion(curve_probs, clean, zero, explained)

    def dataset(self, names: list[str], items: _Items, n_images: int, npix: int, steps: int,
                attrs: dict[str, Any], sources: list[str] | None = None) -> xr.Dataset:
        """The per-item Dataset :func:`evaluate_items` returns (``sources``: the dataset's, per image)."""
        fractions = np.arange(steps) / steps
        full = np.arange(steps + 1) / steps
        objects_in_image = np.bincount(items.sample, minlength=n_images)[items.sample]
        out = xr.Dataset(
            {
                "correct": (("method", "item"), self.seg["correct"]),
                "pixels": ("item", np.full(len(items), npix, np.int64)),
                "intersection": (("method", "item", "part"), self.seg["intersection"]),
                "union": (("method", "item", "part"), self.seg["union"]),
                "ap": (("method", "item"), self.seg["ap"]),
                "pointing": (("method", "item"), self.seg["pointing"]),
                **{k: (("method", "item", "removed"), v) for k, v in self.hits.items()},
                "deletion": (("method", "item", "deleted"), self.deletion),
                "insertion": (("method", "item", "inserted"), self.insertion),
                "explain_seconds": ("method", self.explain_seconds),
                "capture_seconds": ((), self.capture_seconds),
            },
            coords={
                "method": names,
                "item": np.arange(len(items)),
                "sample": ("item", items.sample),
                "object": ("item", items.object),
                "label": ("item", items.label),
                "reference": ("item", items.reference),
                "predicted": ("item", items.predicted),
                "objects_in_image": ("item", objects_in_image),
                "part": list(PARTS),
                "removed": fractions,
                "deleted": full,
                "inserted": full,
            },
            attrs=attrs,
        )
        if sources is not None:  # the image file of each item
            out = out.assign_coords(source=("item", np.asarray(sources, dtype=object)[items.sample]))
        out["reference"].attrs["description"] = ("class accuracy is measured against: the label, or the prediction "
                                                 "where unknown")
        out["explain_seconds"].attrs["description"] = "time spent in vl.explain for the predicted-class maps of all images"
        out["capture_seconds"].attrs["description"] = "time spent in vl.capture (predicted class) for all images"
        return out


def evaluate_items(
    model: nn.Module | str,
    dataset: xr.Dataset,
    methods: str | Sequence[str] = "all",
    n: int | None = None,
    target: str = "label",
    *,
    maps: xr.DataTree | str | os.PathLike | None = None,
    options: Mapping[str, Mapping[str, Any]] | None = None,
    steps: int = 10,
    batch_size: int = 32,
    device: str | torch.device | None = None,
    progress: bool | None = None,
) -> xr.Dataset:
    """Per-item raw results behind :func:`evaluate` (select items, then :func:`summarize`).

    Same parameters as :func:`evaluate`. Returns a Dataset over ``method`` and
    ``item`` (coords ``sample``, ``object``, ``label``, ``predicted``,
    ``objects_in_image``; ``source``, the image file, when the dataset has
    one) holding the segmentation counts, the hit arrays of the
    four perturbation runs over ``removed``, the deletion / insertion probability
    curves, and the timings; ``attrs["maps"]`` says where the maps came from and
    ``attrs["maps_computed"]`` counts the (method, image, class) maps computed
    with the model (none that a store given as ``maps=`` holds).

    Examples
    --------
    >>> import timm, vitlens as vl
    >>> model = timm.create_model("vit_tiny_patch16_224", img_size=64, patch_size=16, num_classes=8, depth=2)
    >>> from vitlens.metrics import evaluate_items, summarize
    >>> items = evaluate_items(model, vl.datasets.shapes(2, objects=2), "rollout")
    >>> items.sizes["item"], summarize(items).sizes["method"]
    (4, 1)
    """
    from ..models import adapter_for, load_model

    if isinstance(model, str):
        model = load_model(model)
    adapter = adapter_for(model)
    stored = _open_maps(maps)
    names = _method_names(_stored_methods(stored) if stored is not None and methods == "all" else methods)
    opts = _check_options(names, options, target, steps, batch_size)
    steps, batch_size = int(steps), int(batch_size)
    device = model_device(model, device)

    images, masks, labels = _dataset_arrays(dataset, n)
    from ..capture.images import sample_sources

    sources = sample_sources(dataset["image"].isel(sample=slice(0, len(images))))
    if stored is not None:
        stored = _StoredMaps(stored, model, dataset, len(images), sources, names, opts)
    size = tuple(int(s) for s in adapter.input_size)
    resized = images.shape[1:3] != size
    images, masks = _fit(images, masks, size)
    items = _Items(masks, labels)
    n_img, npix = images.shape[0], size[0] * size[1]
    # removal schedule shared by every map: positive steps 1..S-1, then negative steps 1..S-1
    runs = [(npix * i // steps, True) for i in range(1, steps)] + [(npix * i // steps, False) for i in range(1, steps)]
    scores = _Scores(len(names), len(items), steps)
    norm: tuple[tuple[float, ...], tuple[float, ...], str] = ((), (), "")

    bar = progress_bar(n_img, "evaluate", bool(progress) if progress is not None else n_img > batch_size)
    order_all = np.tile(np.arange(npix), (min(batch_size, n_img), 1))
    for s0 in range(0, n_img, batch_size):
        chunk = images[s0 : s0 + batch_size]
        norm = _evaluate_batch(model, chunk, s0, items, names, opts, scores, runs, order_all[: len(chunk)], target,
                               size, batch_size, device, stored)
        bar.update(len(chunk))
    bar.close()
    mean, std, model_name = norm
    return scores.dataset(names, items, n_img, npix, steps, attrs={
        "model": model_name,
        "images": n_img,
        "target": target,
        "steps": steps,
        "input_size": list(size),
        "resized": int(resized),
        "mean": list(mean),
        "std": list(std),
        "options": repr(opts),
        "maps": "computed" if stored is None else stored.describe(),
        "maps_computed": scores.maps_computed,
    }, sources=sources)


def _groups(model: nn.Module, names: list[str], opts: dict[str, dict[str, Any]]) -> list[str]:
    """The capture groups the methods read (their registered ``needs``): the captures run only their passes."""
    from ..models import adapter_for
    from ..registry import METHOD_INFO

    attrs = adapter_for(model).describe()
    groups: set[str] = set()
    for name in names:
        info = METHOD_INFO[name]
        groups |= info.groups(attrs, {k: v for k, v in opts.get(name, {}).items() if k in info.options()})
    return sorted(groups)


class _ComputedMaps:
    """One batch's maps computed with the model: a capture per set of classes asked for (the
    predicted classes of the whole batch, the labels of the images whose label differs), each once."""

    def __init__(self, model: nn.Module, chunk: np.ndarray, names: list[str], opts: dict[str, dict[str, Any]],
                 scores: _Scores, batch_size: int, device: Any, predict: bool = True):
        self.model, self.chunk, self.opts, self.scores = model, chunk, opts, scores
        self.batch_size, self.device = batch_size, device
        self.keep = _groups(model, names, opts)  # the extra passes (AttnLRP, LeGrad) included, nothing unread
        self.captures: dict[tuple[tuple[int, ...], tuple[int, ...] | None], xr.DataTree] = {}
        if predict:  # the predicted classes of the batch, from its capture for them
            root = self.capture(np.arange(len(chunk)), None)
            self.predicted = root["target"].values.astype(np.int64)
            self.mean, self.std = tuple(root.attrs["mean"]), tuple(root.attrs["std"])
            self.model_name = str(root.attrs.get("model", ""))

    def capture(self, rows: np.ndarray, classes: np.ndarray | None) -> xr.DataTree:
        """The capture of images ``rows`` of the batch for ``classes`` (None: their predicted classes)."""
        from ..capture import capture

        key = (tuple(rows.tolist()), None if classes is None else tuple(classes.tolist()))
        if key not in self.captures:
            t = time.perf_counter()
            self.captures[key] = capture(self.model, self.chunk[rows], target=None if classes is None else
                                         classes.tolist(), keep=self.keep, batch_size=self.batch_size,
                                         device=self.device, progress=False)
            if classes is None:  # the predicted-class capture is the one evaluate times (as before stores)
                self.scores.capture_seconds += time.perf_counter() - t
        return self.captures[key]

    def maps(self, name: str, rows: np.ndarray, classes: np.ndarray | None) -> xr.DataArray:
        """``name``'s maps (sample, y, x) of images ``rows`` for ``classes`` (None: the predicted ones)."""
        from ..methods import explain

        self.scores.maps_computed += len(rows)
        return explain(self.capture(rows, classes), name, **self.opts.get(name, {}))


@dataclass(frozen=True)
class _MapSource:
    """``maps=`` opened: the capture, where it is (for messages), and its store's path (None in memory)."""

    tree: xr.DataTree
    where: str
    path: str | None = None


def _open_maps(maps: Any) -> _MapSource | None:
    """``maps=``: a capture, or the path of a store (opened lazily)."""
    if maps is None:
        return None
    if isinstance(maps, (str, os.PathLike)):
        from ..capture import open as open_store

        path = os.fspath(maps)
        return _MapSource(open_store(maps, chunks={}), f"the store {path}", path)
    if not isinstance(maps, xr.DataTree):
        raise OptionError(f"maps= takes a capture of the dataset's images (vl.capture(model, dataset, maps='all')) or "
                          f"the path of its store; got {type(maps).__name__}.")
    return _MapSource(maps, "the capture given as maps=")


def _stored_methods(opened: _MapSource) -> str | list[str]:
    """``methods="all"`` with ``maps=``: the methods a reduced capture stores (every method for a full one)."""
    from ..capture.reduced import is_reduced, stored_requests
    from ..registry import METHOD_INFO

    tree, where = opened.tree, opened.where
    if not is_reduced(tree):
        return "all"
    held = stored_requests(tree)
    if not held:
        raise OptionError(f"{where} stores no maps (a reduced capture made with stats= alone); capture the dataset "
                          "with maps='all' (or the methods to score), or leave maps= out to compute them.")
    return [m for m in METHOD_INFO if m in held]


class _StoredMaps:
    """The maps of a capture of the dataset (``maps=``), checked to be of its images and of the model.

    Each method's map is read where the capture explains the class asked for (any class for a
    class-agnostic method); a class-specific map of another class (e.g. the label's, where the
    capture explains the prediction) is computed with the model, for those images only.
    """

    def __init__(self, opened: _MapSource, model: nn.Module, dataset: xr.Dataset, n_images: int,
                 sources: list[str] | None, names: list[str], opts: dict[str, dict[str, Any]]):
        from ..errors import CaptureFormatError
        from ..methods import explain

        tree, self.where = opened.tree, opened.where
        root = tree.to_dataset(inherit=False)
        if "logits" not in root or "target" not in root or "mean" not in tree.attrs:
            raise OptionError(f"{self.where} is not a vitlens capture (no logits, target or mean); pass "
                              "vl.capture(model, dataset, maps=...)'s result or the path of its store.")
        held, total = int(tree.sizes.get("sample", root.sizes.get("sample", 0))), int(dataset.sizes["sample"])
        if held not in (total, n_images):
            raise ImageError(
                f"{self.where} holds {held} images but the dataset {total}"
                f"{f' (of which evaluate scores the first {n_images})' if n_images != total else ''}: maps= must be "
                "a capture of the dataset's images in the same order, e.g. vl.capture(model, dataset, maps='all').")
        self._check_sources(root, sources, n_images)
        if opened.path is not None:
            self._check_run(opened.path, model, dataset)
        self.tree, self.n, self.model = tree, n_images, model
        self.target = np.asarray(root["target"].values[:n_images], dtype=np.int64)
        logits = np.asarray(root["logits"].values[:n_images], dtype=np.float64)
        self.predicted = logits.argmax(-1)
        self.probabilities = np.exp(logits - logits.max(-1, keepdims=True))
        self.probabilities /= self.probabilities.sum(-1, keepdims=True)
        self.names, self.opts = names, opts
        self.explained: dict[str, xr.DataArray] = {}
        for name in names:  # every map is readable (stored with these options, or computable), before any work
            try:
                self.explained[name] = explain(tree, name, **opts.get(name, {})).transpose("sample", "y", "x")
            except CaptureFormatError as exc:
                from ..capture.reduced import given_options, stored_requests
                from ..registry import METHOD_INFO

                held_opts = stored_requests(tree).get(name)
                hint = (f" To score the map it stores, pass options="
                        f"{{{name!r}: {given_options(held_opts, METHOD_INFO[name])!r}}} to evaluate."
                        if held_opts is not None else "")
                raise CaptureFormatError(f"maps=: {exc}{hint}") from None

    def _check_sources(self, root: xr.Dataset, sources: list[str] | None, n_images: int) -> None:
        if sources is None or "source" not in root.coords:
            return
        held = [str(v) for v in np.atleast_1d(root["source"].values)[:n_images]]
        for i, (a, b) in enumerate(zip(held, sources)):
            if a != b:
                raise ImageError(f"image {i} of {self.where} is {a!r} but the dataset's image {i} is {b!r}: maps= must "
                                 "be a capture of the dataset's images in the same order.")

    def _check_run(self, path: str, model: nn.Module, dataset: xr.Dataset) -> None:
        """A store's commit marker: a finished run, of this model's weights and (where comparable) this dataset."""
        from ..capture.fingerprint import source_fingerprint, weights_digest
        from ..capture.store import read_marker

        marker = read_marker(path)
        if marker is None:
            return
        run = marker.get("run", {})
        if not marker.get("complete", True):
            raise ImageError(f"{self.where} is an unfinished capture ({marker.get('images')} images committed); "
                             "finish it with vl.capture(..., resume=True) before scoring its maps.")
        if run.get("weights") not in (None, weights_digest(model)):
            raise OptionError(f"{self.where} was captured with other weights than this model's; score it with the "
                              "model that made it, or capture the dataset again with this one.")
        made, given = run.get("source") or {}, source_fingerprint(dataset)
        comparable = (made.get("kind"), made.get("count")) == (given.get("kind"), given.get("count"))
        if comparable and made.get("digest") != given.get("digest"):
            raise ImageError(f"{self.where} was captured from other images than this dataset's "
                             f"({given.get('count')} images, but another content or order); maps= must be a capture "
                             "of the dataset's images in the same order.")

    def describe(self) -> str:
        return f"read from {self.where}"

    def batch(self, s0: int, chunk: np.ndarray, scores: _Scores, batch_size: int, device: Any) -> _BatchOfStore:
        return _BatchOfStore(self, s0, chunk, scores, batch_size, device)

    def check_probabilities(self, s0: int, clean: np.ndarray) -> None:
        """The model's class probabilities of the batch's pictures against those the capture stored."""
        stored = self.probabilities[s0 : s0 + len(clean)]
        gap = np.abs(stored - clean).max(-1)
        if (gap > _SAME_PROBABILITY).any():
            i = int(np.argmax(gap))
            raise ImageError(
                f"image {s0 + i}: the model's class probabilities differ by up to {gap[i]:.3g} from those stored in "
                f"{self.where}: it is a capture of other images or of another model. maps= must be a capture of the "
                "dataset's images in the same order by this model, e.g. vl.capture(model, dataset, maps='all').")


#: The most a class probability may differ between the model now and a capture of the same images
#: (float noise of other batches or another device is below 1e-5; other images or weights far above).
_SAME_PROBABILITY = 1e-3


class _BatchOfStore:
    """One batch's maps from a :class:`_StoredMaps`, with the few it lacks computed."""

    def __init__(self, stored: _StoredMaps, s0: int, chunk: np.ndarray, scores: _Scores, batch_size: int,
                 device: Any):
        self.stored, self.s0, self.chunk, self.scores = stored, s0, chunk, scores
        self.batch_size, self.device = batch_size, device
        rows = slice(s0, s0 + len(chunk))
        self.predicted, self.target = stored.predicted[rows], stored.target[rows]
        self.mean, self.std = tuple(stored.tree.attrs["mean"]), tuple(stored.tree.attrs["std"])
        self.model_name = str(stored.tree.attrs.get("model", ""))
        self.computed: _ComputedMaps | None = None

    def maps(self, name: str, rows: np.ndarray, classes: np.ndarray | None) -> xr.DataArray:
        """``name``'s maps (sample, y, x) of images ``rows`` for ``classes`` (None: the predicted ones)."""
        from ..registry import METHOD_INFO

        classes = self.predicted[rows] if classes is None else classes
        da = self.stored.explained[name].isel(sample=self.s0 + rows)
        values = np.array(da.values)
        missing = (self.target[rows] != classes) if METHOD_INFO[name].class_specific else np.zeros(len(rows), bool)
        if missing.any():  # stored for another class: computed for these images alone
            if self.computed is None:
                self.computed = _ComputedMaps(self.stored.model, self.chunk, self.stored.names, self.stored.opts,
                                              self.scores, self.batch_size, self.device, predict=False)
            other = self.computed.maps(name, rows[missing], classes[missing])
            values[missing] = other.transpose("sample", "y", "x").values
        return xr.DataArray(values, dims=("sample", "y", "x"))


def _evaluate_batch(model: nn.Module, chunk: np.ndarray, s0: int, items: _Items, names: list[str],
                    opts: dict[str, dict[str, Any]], scores: _Scores, runs: list[tuple[int, bool]], order: np.ndarray,
                    target: str, size: tuple[int, ...], batch_size: int, device: Any,
                    stored: _StoredMaps | None = None) -> tuple[tuple[float, ...], tuple[float, ...], str]:
    """Score every method on one batch of images (and their items); returns the capture's
    normalisation and model name.

    The maps come from ``stored`` (a capture of the dataset) where it holds them; otherwise the
    batch is captured once for its predicted classes and, for items whose label differs, once more
    for the labels. Class-agnostic maps reuse the predicted-class runs.
    """
    npix = size[0] * size[1]
    its, local = items.in_batch(s0, len(chunk))
    source: _ComputedMaps | _BatchOfStore
    if stored is None:
        source = _ComputedMaps(model, chunk, names, opts, scores, batch_size, device)
    else:
        source = stored.batch(s0, chunk, scores, batch_size, device)
    mean, std = source.mean, source.std
    pics = Pictures(chunk, mean, std)
    pred = source.predicted
    lab = np.where(items.label[its] >= 0, items.label[its], pred[local])
    diff = lab != pred[local]
    items.predicted[its], items.reference[its] = pred[local], lab
    if diff.any():
        pics_label = Pictures(chunk[local[diff]], mean, std)
    base = removal_probabilities(model, pics, order, [(0, True), (npix, True)], batch_size=batch_size, device=device)
    if stored is not None:
        stored.check_probabilities(s0, base[:, 0])
    clean, zero = base[local, 0], base[local, 1]
    item_masks = items.masks[items.sample[its], items.object[its]]
    everyone = np.arange(len(chunk))

    for m, name in enumerate(names):
        t = time.perf_counter()
        maps_pred = source.maps(name, everyone, None)
        scores.explain_seconds[m] += time.perf_counter() - t
        values = pixel_maps(maps_pred, size)
        probs = removal_probabilities(model, pics, ranking(values), runs, batch_size=batch_size, device=device)
        probs_pred = probs[local]
        values_label, probs_label = values[local], probs_pred.copy()
        if diff.any():
            v = pixel_maps(source.maps(name, local[diff], lab[diff]), size)
            # class-agnostic maps (attention, rollout, ...) differ from the predicted-class
            # ones only by float noise of the other batch: reuse those runs
            if not np.allclose(v, values_label[diff], rtol=0.0, atol=1e-5):
                values_label[diff] = v
                probs_label[diff] = removal_probabilities(model, pics_label, ranking(v), runs,
                                                          batch_size=batch_size, device=device)
        counts = counts_dataset(values_label if target == "label" else values[local], item_masks, "item")
        curve_probs, explained = (probs_label, lab) if target == "label" else (probs_pred, pred[local])
        scores.put(m, its, counts, {"predicted": probs_pred, "label": probs_label}, clean, zero, lab, explained,
                   curve_probs)
    return mean, std, source.model_name


def summarize(items: xr.Dataset, dim: str = "item") -> xr.Dataset:
    """Turn :func:`evaluate_items` results (or a selection of items) into the score table.

    Examples
    --------
    >>> import timm, vitlens as vl
    >>> model = timm.create_model("vit_tiny_patch16_224", img_size=64, patch_size=16, num_classes=8, depth=2)
    >>> from vitlens.metrics import evaluate_items, summarize
    >>> items = evaluate_items(model, vl.datasets.shapes(4, objects=2), ["rollout", "gradcam"])
    >>> first_objects = summarize(items.isel(item=items.object.values == 0))
    >>> first_objects.attrs["items"], first_objects.method.values.tolist()
    (4, ['rollout', 'gradcam'])
    """
    if items.sizes.get(dim, 0) == 0:
        raise OptionError("no items to summarise; select at least one item.")
    seg = segmentation_scores(items, dim)
    table = xr.Dataset(
        {k: seg[k] for k in ("pixel_accuracy", "miou", "iou_foreground", "mean_ap", "pointing")},
    )
    for direction in ("positive", "negative"):
        for which in ("predicted", "label"):
            accuracy = items[f"correct_{direction}_{which}"].mean(dim)
            table[f"{direction}_auc_{which}"] = 100.0 * accuracy.integrate("removed")  # trapezoid
            table[f"{direction}_auc_{which}"].attrs["better"] = "lower" if direction == "positive" else "higher"
    for kind, coord in (("deletion", "deleted"), ("insertion", "inserted")):
        table[f"{kind}_auc"] = items[kind].mean(dim).integrate(coord)
    images = int(items.attrs.get("images", 1)) or 1
    table["seconds_per_image"] = items["explain_seconds"] / images
    table["capture_seconds_per_image"] = xr.full_like(table["seconds_per_image"], float(items["capture_seconds"]) / images)
    clean = float((items["correct_positive_label"].isel(removed=0, method=0)).mean(dim))
    labelled = int((items["label"] >= 0).sum())
    table.attrs = {
        **{k: v for k, v in items.attrs.items() if k in ("model", "target", "steps", "input_size", "resized", "maps",
                                                     "maps_computed")},
        "items": int(items.sizes[dim]),
        "images_in_items": int(np.unique(items["sample"].values).size),
        "labelled_items": labelled,
        "clean_accuracy": clean,
        "accuracy_reference": "ground-truth label" if labelled == items.sizes[dim] else
        "ground-truth label where known, else the model's clean prediction",
        "protocol": (
            "segmentation: bilinear upsampling, min-max, foreground = map > its mean; pixel accuracy and mIoU from "
            "dataset-level counts, mAP per item; perturbation: 0-90 % of pixels set to 0 in the unnormalised "
            "picture, top-1 accuracy against the label, AUC = trapezoid x100 (positive: lower is better, "
            "negative: higher); deletion/insertion: softmax probability of the explained class, area over 0-100 %"
        ),
    }
    descriptions = {
        "positive_auc_predicted": "positive perturbation AUC, maps of the predicted class (lower is better)",
        "negative_auc_predicted": "negative perturbation AUC, maps of the predicted class (higher is better)",
        "positive_auc_label": "positive perturbation AUC, maps of the ground-truth class (lower is better)",
        "negative_auc_label": "negative perturbation AUC, maps of the ground-truth class (higher is better)",
        "deletion_auc": "area under the explained class's probability while deleting (lower is better)",
        "insertion_auc": "area under the explained class's probability while inserting (higher is better)",
        "seconds_per_image": "vl.explain time per image for this method (capture excluded)",
        "capture_seconds_per_image": "vl.capture time per image (shared by all methods)",
    }
    for k, text in descriptions.items():
        table[k].attrs["description"] = text
    return table


def evaluate(*args: Any, **kwargs: Any) -> xr.Dataset:
    """Score explanation methods on a dataset with masks: one row per method.

    Parameters
    ----------
    model
        A model vitlens explains, or a name for :func:`vitlens.load_model`
        (e.g. ``"vit-shapes"``).
    dataset
        ``image (sample, y, x, channel)`` in [0, 1], ``mask (sample, object, y, x)``
        and ``label (sample, object)`` (-1 = none), as
        :func:`vitlens.datasets.shapes` and :func:`vitlens.datasets.imagenet_seg`
        return. Every non-empty mask is one evaluation item. Pictures of another
        size than the model input are resized together with their masks.
    methods
        ``"all"`` or method names from :data:`vitlens.METHODS` (with ``maps=``,
        ``"all"`` is every method the capture stores).
    n
        Use the first ``n`` images (default: all).
    target
        Which class's maps the segmentation and deletion/insertion columns score:
        ``"label"`` (the item's object class; the prediction where the label is
        unknown) or ``"predicted"`` (the model's top class, as Chefer et al. on
        ImageNet-segmentation). Perturbation AUCs are given for both.
    maps
        A capture of the dataset's images, in their order, by this model: a
        reduced one (``vl.capture(model, dataset, maps="all")``, in memory, or
        the path of its store, or ``vl.open(path)``) or a full one. Its maps are
        scored instead of being computed; the pictures for the perturbation
        runs come from ``dataset`` (a reduced capture keeps none) and the model
        runs them. Only a class-specific map of a class the capture does not
        explain (the label's, where it explains the prediction) is computed,
        for those images alone (``attrs["maps_computed"]`` of
        :func:`evaluate_items` counts them). The capture must hold the
        dataset's images (same count; same ``source`` files and, for a store,
        same fingerprint and weights where recorded; the same class
        probabilities as the model gives now) and each map with the
        ``options`` asked for; otherwise a :class:`vitlens.VitlensError` says
        what differs.
    options
        Per-method options, e.g. ``{"rollout": {"start_layer": 1}}``.
    steps, batch_size, device, progress
        Perturbation grid (10 → 0–90 %); images per batch; where to run (default:
        the model's device); progress bar (default: for more than one batch).

    Returns
    -------
    xarray.Dataset
        Over ``method``: ``pixel_accuracy``, ``miou``, ``iou_foreground``,
        ``mean_ap`` (mAP), ``pointing``, ``positive_auc_predicted``,
        ``negative_auc_predicted``, ``positive_auc_label``, ``negative_auc_label``,
        ``deletion_auc``, ``insertion_auc``, ``seconds_per_image``,
        ``capture_seconds_per_image``; ``attrs`` hold the item counts, the clean
        accuracy and the protocol. ``.to_dataframe()`` gives the table. Pick a
        row with ``table.sel({"method": "rollout"})`` — ``.sel(method=...)`` would
        be taken as xarray's own ``method`` keyword.

    Examples
    --------
    >>> import timm, vitlens as vl
    >>> model = timm.create_model("vit_tiny_patch16_224", img_size=64, patch_size=16, num_classes=8, depth=2)
    >>> from vitlens.metrics import evaluate
    >>> table = evaluate(model, vl.datasets.shapes(4), methods=["rollout", "tokentm"])
    >>> table.to_dataframe().shape[0]
    2

    Scoring the maps of a reduced store (kilobytes per image) instead of computing them:

    >>> import tempfile, pathlib
    >>> ds = vl.datasets.shapes(4)
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "val.zarr"
    >>> _ = vl.capture(model, ds, store=path, maps=["rollout", "tokentm"], stats="all", progress=False)
    >>> from_store = evaluate(model, ds, maps=path)
    >>> from_store.method.values.tolist(), bool((from_store.miou == evaluate(model, ds, ["rollout", "tokentm"]).miou).all())
    (['rollout', 'tokentm'], True)
    """
    return summarize(evaluate_items(*args, **kwargs))


# evaluate is evaluate_items summarised: it takes evaluate_items' parameters (documented above), and
# help() and inspect.signature show that one signature
evaluate.__signature__ = inspect.signature(evaluate_items)  # type: ignore[attr-defined]
