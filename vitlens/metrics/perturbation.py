"""Faithfulness by removing pixels: perturbation accuracy curves, deletion, insertion.

Every curve here comes from one operation: rank the pixels by the map (upsampled
bilinearly to the model input), set the chosen pixels to 0 in the *unnormalised*
picture in [0, 1] (all three channels), normalise with the model's mean/std, and
run the model.

- **Perturbation** (Chefer et al. 2021): at 0 %, 10 %, …, 90 % remove the
  top-ranked (``positive``) or bottom-ranked (``negative``) pixels; top-1
  accuracy against the ground-truth label at each step; AUC = trapezoid over
  x = 0, 0.1, …, 0.9, ×100. Positive: lower is better; negative: higher.
- **Deletion / insertion** (Petsiuk et al. 2018, on the same 10 % grid): the
  softmax probability of the explained class while the top-ranked pixels are
  removed (deletion, from the clean picture to an all-zero one; lower area is
  better) or inserted into an all-zero picture (insertion; higher is better);
  area = trapezoid over x = 0, 0.1, …, 1.

Ranking is a stable sort (ties keep pixel order), so the bottom-ranked pixels of
``negative`` are exactly the ones insertion adds last; with ``k(f) = ⌊N·f⌋``
pixels removed at fraction ``f``, insertion at ``f`` removes the bottom
``k(1 − f)``, i.e. it equals ``negative`` at ``1 − f``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import xarray as xr
from torch import nn

from ..errors import OptionError
from .inputs import (Pictures, label_array, model_device, per_method, pictures_for, pixel_maps, progress_bar,
                     with_sources)

__all__ = ["perturbation", "deletion", "insertion", "ranking", "removal_probabilities", "area"]

MODES = ("positive", "negative")


def area(curve: np.ndarray | xr.DataArray, x: np.ndarray) -> float:
    """Trapezoid area under ``curve`` sampled at ``x``.

    Examples
    --------
    >>> import numpy as np
    >>> from vitlens.metrics.perturbation import area
    >>> area(np.array([1.0, 0.5, 0.0]), np.array([0.0, 0.5, 1.0]))
    0.5
    """
    return float(np.trapezoid(np.asarray(curve, dtype=np.float64), np.asarray(x, dtype=np.float64)))


def ranking(values: np.ndarray) -> np.ndarray:
    """Pixel indices of each (H, W) map, most relevant first (stable: ties keep order).

    Examples
    --------
    >>> import numpy as np
    >>> from vitlens.metrics.perturbation import ranking
    >>> ranking(np.array([[[0.1, 0.9], [0.5, 0.9]]])).tolist()
    [[1, 3, 2, 0]]
    """
    flat = values.reshape(values.shape[0], -1)
    return np.argsort(-flat, axis=1, kind="stable")


def removal_probabilities(
    model: nn.Module,
    pictures: Pictures,
    order: np.ndarray,
    removals: Sequence[tuple[int, bool]],
    *,
    batch_size: int = 32,
    device: str | torch.device | None = None,
    bar: Any = None,
) -> np.ndarray:
    """Softmax probabilities ``(sample, step, class)`` after each removal.

    ``removals`` holds one ``(count, from_top)`` per step: ``count`` pixels of
    each picture, taken from the top (``True``) or the bottom of ``order``, are set
    to 0 in [0, 1] before normalisation. ``count = 0`` is the clean picture.
    """
    device = model_device(model, device)
    b_all = len(pictures)
    h, w = pictures.size
    npix = h * w
    mean = torch.tensor(pictures.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(pictures.std, device=device).view(1, 3, 1, 1)
    out: np.ndarray | None = None
    with torch.inference_mode():
        for start in range(0, b_all, batch_size):
            x = torch.from_numpy(np.ascontiguousarray(pictures.pictures[start : start + batch_size]))
            x = x.to(device).permute(0, 3, 1, 2).float()
            ranked = torch.from_numpy(np.ascontiguousarray(order[start : start + batch_size])).to(device)
            b = x.shape[0]
            for step, (count, from_top) in enumerate(removals):
                keep = torch.ones(b, npix, device=device)
                if count > 0:
                    idx = ranked[:, :count] if from_top else ranked[:, npix - count :]
                    keep.scatter_(1, idx, 0.0)
                logits = model((x * keep.view(b, 1, h, w) - mean) / std)
                probs = torch.softmax(logits.float(), dim=-1).cpu().numpy()
                if out is None:
                    out = np.empty((b_all, len(removals), probs.shape[-1]), dtype=np.float32)
                out[start : start + b, step] = probs
            if bar is not None:
                bar.update(b)
    assert out is not None
    return out


def _block_probabilities(model: nn.Module, pictures: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...],
                         order: np.ndarray, removals: Sequence[tuple[int, bool]], batch_size: int,
                         device: str | torch.device | None) -> np.ndarray:
    """:func:`removal_probabilities` of one sample chunk (a dask task for lazy captures)."""
    pics = Pictures(np.asarray(pictures, dtype=np.float32), mean, std)
    return removal_probabilities(model, pics, order, removals, batch_size=batch_size, device=device)


def probabilities(model: nn.Module, pictures: Pictures, order: np.ndarray, removals: Sequence[tuple[int, bool]], *,
                  batch_size: int, device: str | torch.device | None, bar: Any) -> np.ndarray:
    """:func:`removal_probabilities`, chunk by chunk for a lazy capture.

    The pictures of a dask-backed capture are loaded one sample chunk at a time;
    with a ``dask.distributed`` Client active, each chunk is a task on its workers
    (the model is sent to them), otherwise chunks run one after another here.
    """
    if not pictures.lazy:
        return removal_probabilities(model, pictures, order, removals, batch_size=batch_size, device=device, bar=bar)
    import dask

    assert pictures.blocks is not None
    tasks = [dask.delayed(_block_probabilities)(model, pictures.pictures[a:b], pictures.mean, pictures.std,
                                                order[a:b], removals, batch_size, device)
             for a, b in pictures.blocks]
    if _distributed_client():
        parts = list(dask.compute(*tasks))
        if bar is not None:
            bar.update(len(pictures))
    else:
        parts = []
        for (a, b), task in zip(pictures.blocks, tasks):
            parts.append(task.compute(scheduler="synchronous"))
            if bar is not None:
                bar.update(b - a)
    return np.concatenate(parts)


def _distributed_client() -> bool:
    try:
        from distributed import default_client

        default_client()
    except (ImportError, ValueError):
        return False
    return True


def _steps(steps: int) -> int:
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 2:
        raise OptionError(f"steps={steps!r}: use an int >= 2 (10 gives the 0 %, 10 %, ..., 90 % protocol).")
    return int(steps)


def _show(progress: bool | None, n: int, batch_size: int) -> bool:
    return bool(progress) if progress is not None else n > batch_size


def _ranked_probabilities(model: nn.Module, pics: Pictures, da: xr.DataArray, removals: Sequence[tuple[int, bool]],
                          desc: str, progress: bool | None, batch_size: int,
                          device: str | torch.device | None) -> np.ndarray:
    """:func:`probabilities` with the pixels ranked by the maps ``da`` (one per picture), under a progress bar."""
    n = len(pics)
    _check_count(da, n)
    order = ranking(pixel_maps(da, pics.size))
    bar = progress_bar(n, desc, _show(progress, n, batch_size))
    probs = probabilities(model, pics, order, removals, batch_size=batch_size, device=device, bar=bar)
    bar.close()
    return probs


def perturbation(
    model: nn.Module,
    images: Any,
    maps: xr.DataArray | xr.Dataset,
    labels: Any,
    mode: str = "positive",
    *,
    steps: int = 10,
    batch_size: int = 32,
    device: str | torch.device | None = None,
    progress: bool | None = None,
) -> xr.Dataset:
    """Accuracy while the most (or least) relevant pixels are removed, and its AUC.

    Parameters
    ----------
    model
        The classifier (any ``nn.Module`` mapping normalised pictures to logits);
        it runs where its parameters are.
    images
        The capture the maps came from (its ``image`` is the model-input picture in
        [0, 1]), or anything :func:`vitlens.capture` accepts (arrays at the input
        size are only normalised). For models vitlens does not adapt: arrays
        ``(sample, H, W, 3)`` in [0, 1], normalised with timm's data config.
        A lazy capture (``vl.open(store, chunks={})``) is scored one sample chunk
        at a time, as tasks on the workers of an active ``dask.distributed`` Client.
    maps
        ``(sample, y, x)`` maps (upsampled bilinearly to the picture), or a Dataset
        of them (one per method → a ``method`` dimension).
    labels
        Ground-truth class per sample; ``-1`` = unknown, scored against the model's
        clean prediction instead (recorded in ``attrs``).
    mode
        ``"positive"``: remove the most relevant pixels first (lower AUC is better);
        ``"negative"``: the least relevant first (higher is better).
    steps
        Grid of the curve: fractions ``0, 1/steps, …, (steps−1)/steps`` (10 → 0–90 %).
    batch_size, device, progress
        Pictures per forward pass; where to run (default: the model's device);
        show a progress bar (default: for more than one batch).

    Returns
    -------
    xarray.Dataset
        ``accuracy (removed)`` in [0, 1], ``auc`` (trapezoid over the fractions ×100)
        and ``correct (sample, removed)``.

    Examples
    --------
    >>> import numpy as np, timm, vitlens as vl
    >>> model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=3, depth=2)
    >>> cap = vl.capture(model, np.random.default_rng(0).random((2, 32, 32, 3)))
    >>> from vitlens.metrics import perturbation
    >>> out = perturbation(model, cap, vl.explain(cap, "rollout"), cap.target.values)
    >>> out.accuracy.sizes["removed"], float(out.accuracy[0])
    (10, 1.0)
    """
    if mode not in MODES:
        raise OptionError(f"mode={mode!r}; choose 'positive' (remove most relevant first) or 'negative'.")
    steps = _steps(steps)
    fractions = np.arange(steps) / steps
    pics = pictures_for(model, images)
    n = len(pics)
    truth = label_array(labels, n)
    npix = pics.size[0] * pics.size[1]
    removals = [(npix * i // steps, mode == "positive") for i in range(steps)]

    def score(da: xr.DataArray) -> xr.Dataset:
        probs = _ranked_probabilities(model, pics, da, removals, f"perturbation ({mode})", progress, batch_size, device)
        top1 = probs.argmax(-1)
        reference = np.where(truth >= 0, truth, top1[:, 0])
        correct = top1 == reference[:, None]
        return with_sources(accuracy_dataset(correct, fractions, mode, labelled=int((truth >= 0).sum())), da)

    return per_method(maps, score)


def accuracy_dataset(correct: np.ndarray, fractions: np.ndarray, mode: str, labelled: int, dim: str = "sample") -> xr.Dataset:
    """``accuracy``, ``auc`` and ``correct`` from a (sample, step) hit array."""
    acc = correct.mean(0)
    ds = xr.Dataset(
        {
            "accuracy": ("removed", acc),
            "auc": ((), 100.0 * area(acc, fractions)),
            "correct": ((dim, "removed"), correct),
        },
        coords={"removed": fractions},
        attrs={
            "mode": mode,
            "better": "lower" if mode == "positive" else "higher",
            "labelled": labelled,
            "protocol": "pixels set to 0 in the unnormalised picture; top-1 accuracy; AUC = trapezoid ×100",
        },
    )
    ds["removed"].attrs["description"] = "fraction of pixels set to 0"
    return ds


def _check_count(da: xr.DataArray, n: int) -> None:
    if da.sizes["sample"] != n:
        raise OptionError(
            f"got {da.sizes['sample']} maps for {n} pictures; pass the maps of exactly these images "
            "(vl.explain on their capture)."
        )


def _explained(da: xr.DataArray, target: Any, n: int, clean: np.ndarray) -> np.ndarray:
    """Class each map explains: ``target=``, else the map's ``target`` coord, else the prediction."""
    if target is not None:
        classes = label_array(target, n, "targets")
    elif "target" in da.coords:
        classes = label_array(da["target"], n, "targets")
    else:
        classes = np.full(n, -1)
    return np.where(classes >= 0, classes, clean)


def _probability_curve(
    model: nn.Module,
    images: Any,
    maps: xr.DataArray | xr.Dataset,
    target: Any,
    steps: int,
    batch_size: int,
    device: str | torch.device | None,
    progress: bool | None,
    kind: str,
) -> xr.Dataset:
    steps = _steps(steps)
    fractions = np.arange(steps + 1) / steps
    pics = pictures_for(model, images)
    n = len(pics)
    npix = pics.size[0] * pics.size[1]
    if kind == "deletion":
        removals = [(npix * i // steps, True) for i in range(steps + 1)]
    else:
        removals = [(npix * (steps - i) // steps, False) for i in range(steps + 1)]

    def score(da: xr.DataArray) -> xr.Dataset:
        probs = _ranked_probabilities(model, pics, da, removals, kind, progress, batch_size, device)
        clean = probs[:, -1 if kind == "insertion" else 0].argmax(-1)
        classes = _explained(da, target, n, clean)
        curves = np.take_along_axis(probs, classes[:, None, None], 2)[..., 0]
        return with_sources(probability_dataset(curves, fractions, kind), da)

    return per_method(maps, score)


def probability_dataset(curves: np.ndarray, fractions: np.ndarray, kind: str, dim: str = "sample") -> xr.Dataset:
    """``probability``, ``auc`` and per-sample curves for deletion / insertion."""
    coord = "deleted" if kind == "deletion" else "inserted"
    mean = curves.mean(0)
    ds = xr.Dataset(
        {
            "probability": (coord, mean),
            "auc": ((), area(mean, fractions)),
            "sample_probability": ((dim, coord), curves),
        },
        coords={coord: fractions},
        attrs={
            "kind": kind,
            "better": "lower" if kind == "deletion" else "higher",
            "protocol": "softmax probability of the explained class; pixels set to 0 in the unnormalised "
            "picture; area = trapezoid over the fractions",
        },
    )
    ds[coord].attrs["description"] = f"fraction of pixels {coord} (most relevant first)"
    return ds


def deletion(
    model: nn.Module,
    images: Any,
    maps: xr.DataArray | xr.Dataset,
    target: Any = None,
    *,
    steps: int = 10,
    batch_size: int = 32,
    device: str | torch.device | None = None,
    progress: bool | None = None,
) -> xr.Dataset:
    """Probability of the explained class while the most relevant pixels are removed.

    Parameters
    ----------
    model, images, maps, batch_size, device, progress
        As in :func:`perturbation`.
    target
        Class whose probability is followed, per sample; default: the map's
        ``target`` coordinate (the class it explains), else the clean prediction.
    steps
        Fractions ``0, 1/steps, …, 1`` of the pixels removed (the last picture is all zero).

    Returns
    -------
    xarray.Dataset
        ``probability (deleted)``, ``auc`` (area over [0, 1]; lower is better),
        ``sample_probability (sample, deleted)``.

    Examples
    --------
    >>> import numpy as np, timm, vitlens as vl
    >>> model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=3, depth=2)
    >>> cap = vl.capture(model, np.random.default_rng(0).random((2, 32, 32, 3)))
    >>> from vitlens.metrics import deletion
    >>> deletion(model, cap, vl.explain(cap, "rollout")).probability.sizes["deleted"]
    11
    """
    return _probability_curve(model, images, maps, target, steps, batch_size, device, progress, "deletion")


def insertion(
    model: nn.Module,
    images: Any,
    maps: xr.DataArray | xr.Dataset,
    target: Any = None,
    *,
    steps: int = 10,
    batch_size: int = 32,
    device: str | torch.device | None = None,
    progress: bool | None = None,
) -> xr.Dataset:
    """Probability of the explained class while the most relevant pixels are inserted.

    Starts from an all-zero picture and adds pixels, most relevant first, until
    the clean picture is restored (same grid and options as :func:`deletion`).

    Returns
    -------
    xarray.Dataset
        ``probability (inserted)``, ``auc`` (area over [0, 1]; higher is better),
        ``sample_probability (sample, inserted)``.

    Examples
    --------
    >>> import numpy as np, timm, vitlens as vl
    >>> model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=3, depth=2)
    >>> cap = vl.capture(model, np.random.default_rng(0).random((2, 32, 32, 3)))
    >>> from vitlens.metrics import insertion
    >>> out = insertion(model, cap, vl.explain(cap, "rollout"))
    >>> 0.0 <= float(out.auc) <= 1.0
    True
    """
    return _probability_curve(model, images, maps, target, steps, batch_size, device, progress, "insertion")
