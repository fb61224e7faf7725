"""Segmentation scores of explanation maps against object masks.

The protocol of the ImageNet-segmentation evaluations (Chefer et al. 2021 and the
works they compare with): upsample each map to the mask's pixels (bilinear),
min-max normalise it, and call a pixel foreground where the map exceeds its own
mean. Pixel accuracy and IoU accumulate pixel counts over the whole dataset
(mIoU = mean of the background and foreground IoU); mAP is the average precision
of the two-channel score ``[1 - map, map]`` against ``[background, foreground]``,
both flattened together, per image, then averaged; the pointing game asks whether
the map's maximum lies inside the mask.
"""

from __future__ import annotations

import numpy as np
import xarray as xr

from .inputs import mask_array, per_method, pixel_maps, with_sources

__all__ = ["segmentation", "segmentation_counts", "segmentation_scores", "average_precision"]

PARTS = ("background", "foreground")


def average_precision(scores: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Average precision of each row of ``scores`` against the boolean ``truth``.

    ``AP = Σ_n (R_n − R_{n−1}) P_n`` over the distinct score thresholds, highest
    first (tied scores enter together), as scikit-learn's
    ``average_precision_score``; a row without positives gives 0.

    Parameters
    ----------
    scores, truth
        ``(rows, values)`` arrays (or one row).

    Returns
    -------
    numpy.ndarray
        ``(rows,)`` average precisions.

    Examples
    --------
    >>> import numpy as np
    >>> from vitlens.metrics.segmentation import average_precision
    >>> float(average_precision(np.array([0.9, 0.8, 0.3, 0.1]), np.array([1, 0, 1, 0], bool))[0])
    0.8333333333333333
    """
    scores = np.atleast_2d(scores)
    truth = np.atleast_2d(truth).astype(bool)
    order = np.argsort(-scores, axis=1, kind="stable")
    s = np.take_along_axis(scores, order, 1)
    t = np.take_along_axis(truth, order, 1)
    tp = np.cumsum(t, axis=1, dtype=np.float64)
    seen = np.arange(1, s.shape[1] + 1, dtype=np.float64)
    group_end = np.ones(s.shape, dtype=bool)  # last position of each run of tied scores
    group_end[:, :-1] = s[:, 1:] != s[:, :-1]
    tp_at_end = np.where(group_end, tp, 0.0)
    previous = np.zeros_like(tp_at_end)
    previous[:, 1:] = np.maximum.accumulate(tp_at_end, axis=1)[:, :-1]
    gain = np.where(group_end, (tp - previous) * (tp / seen), 0.0).sum(1)
    positives = tp[:, -1]
    return np.where(positives > 0, gain / np.where(positives > 0, positives, 1.0), 0.0)


def _counts(values: np.ndarray, masks: np.ndarray) -> dict[str, np.ndarray]:
    """Per-image counts and scores from normalised pixel maps (B, H, W) and masks."""
    b = values.shape[0]
    m = values.reshape(b, -1)
    gt = masks.reshape(b, -1)
    fg = m > m.mean(1, keepdims=True)
    inter = np.stack([(~fg & ~gt).sum(1), (fg & gt).sum(1)], 1)
    union = np.stack([(~fg | ~gt).sum(1), (fg | gt).sum(1)], 1)
    two_channel = np.concatenate([1.0 - m, m], 1)
    one_hot = np.concatenate([~gt, gt], 1)
    # ties at the maximum are split evenly: the expected hit of a random tie-break
    top = m >= m.max(1, keepdims=True) - 1e-6
    return {
        "correct": (fg == gt).sum(1),
        "pixels": np.full(b, m.shape[1]),
        "intersection": inter,
        "union": union,
        "ap": average_precision(two_channel, one_hot),
        "pointing": (top & gt).sum(1) / top.sum(1),
    }


def counts_dataset(values: np.ndarray, masks: np.ndarray, dim: str = "sample") -> xr.Dataset:
    """:func:`segmentation_counts` on arrays; ``dim`` names the first axis."""
    c = _counts(values, masks)
    ds = xr.Dataset(
        {
            "correct": (dim, c["correct"].astype(np.int64)),
            "pixels": (dim, c["pixels"].astype(np.int64)),
            "intersection": ((dim, "part"), c["intersection"].astype(np.int64)),
            "union": ((dim, "part"), c["union"].astype(np.int64)),
            "ap": (dim, c["ap"]),
            "pointing": (dim, c["pointing"]),
        },
        coords={"part": list(PARTS)},
    )
    ds["correct"].attrs["description"] = "pixels whose thresholded map agrees with the mask"
    ds["intersection"].attrs["description"] = "pixels in both the predicted and the true part"
    ds["union"].attrs["description"] = "pixels in either the predicted or the true part"
    ds["ap"].attrs["description"] = "average precision of [1 - map, map] against [background, foreground]"
    ds["pointing"].attrs["description"] = "1 if the map's maximum lies in the mask (ties split evenly)"
    return ds


def segmentation_counts(maps: xr.DataArray | xr.Dataset, masks: xr.DataArray | np.ndarray) -> xr.Dataset:
    """Per-sample pixel counts, average precision and pointing hit (before reduction).

    Parameters
    ----------
    maps
        ``(sample, y, x)`` maps from :func:`vitlens.explain` (token grid or pixels),
        or a Dataset of them (one variable per method).
    masks
        ``(sample, y, x)`` boolean object masks, one per map sample.

    Returns
    -------
    xarray.Dataset
        ``correct``, ``pixels`` (sample); ``intersection``, ``union`` (sample,
        part); ``ap``, ``pointing`` (sample); with a ``method`` dim for a Dataset.
        :func:`segmentation_scores` turns them into scores; subsets of samples can
        be scored by selecting before that.

    Examples
    --------
    >>> import numpy as np, xarray as xr
    >>> from vitlens.metrics import segmentation_counts
    >>> masks = np.zeros((1, 4, 4), bool); masks[0, :2] = True
    >>> maps = xr.DataArray(masks.astype(float), dims=("sample", "y", "x"))
    >>> segmentation_counts(maps, masks).intersection.values.tolist()
    [[8, 8]]
    """
    def score(da: xr.DataArray) -> xr.Dataset:
        gt = mask_array(masks, da.sizes["sample"])
        values = pixel_maps(da, gt.shape[1:])
        ds = counts_dataset(values, gt)
        if "sample" in da.coords:
            ds = ds.assign_coords(sample=da["sample"].values)
        return with_sources(ds, da)

    return per_method(maps, score)


def segmentation_scores(counts: xr.Dataset, dim: str = "sample") -> xr.Dataset:
    """Reduce :func:`segmentation_counts` over ``dim`` into dataset-level scores.

    Pixel accuracy and IoU divide summed counts (dataset level, as the reference
    evaluation); ``miou_per_image`` — the mean of each image's own mIoU — is
    given beside it to show the difference; mAP and pointing are means over images.

    Examples
    --------
    >>> import numpy as np, xarray as xr
    >>> from vitlens.metrics import segmentation_counts, segmentation_scores
    >>> masks = np.zeros((1, 4, 4), bool); masks[0, :2] = True
    >>> maps = xr.DataArray(masks.astype(float), dims=("sample", "y", "x"))
    >>> float(segmentation_scores(segmentation_counts(maps, masks)).miou)
    1.0
    """
    inter = counts["intersection"].sum(dim)
    union = counts["union"].sum(dim)
    iou = inter / union.where(union > 0)
    image_iou = (counts["intersection"] / counts["union"].where(counts["union"] > 0)).mean("part")
    out = xr.Dataset(
        {
            "pixel_accuracy": counts["correct"].sum(dim) / counts["pixels"].sum(dim),
            "miou": iou.mean("part"),
            "iou_foreground": iou.sel(part="foreground", drop=True),
            "miou_per_image": image_iou.mean(dim),
            "mean_ap": counts["ap"].mean(dim),
            "pointing": counts["pointing"].mean(dim),
        }
    )
    out["pixel_accuracy"].attrs["description"] = "correct pixels / all pixels, summed over the dataset"
    out["miou"].attrs["description"] = "mean of background and foreground IoU from dataset-level pixel counts"
    out["iou_foreground"].attrs["description"] = "foreground IoU from dataset-level pixel counts"
    out["miou_per_image"].attrs["description"] = "mean over images of each image's own mIoU (not the reference protocol)"
    out["mean_ap"].attrs["description"] = "mean over images of the average precision of [1 - map, map]"
    out["pointing"].attrs["description"] = "fraction of images whose map maximum lies inside the mask"
    out.attrs["protocol"] = (
        "bilinear upsampling to the mask, min-max per map, foreground = map > its mean "
        "(Chefer et al. 2021 ImageNet-segmentation protocol)"
    )
    return out


def segmentation(maps: xr.DataArray | xr.Dataset, masks: xr.DataArray | np.ndarray) -> xr.Dataset:
    """Pixel accuracy, mIoU, mAP and pointing game of maps against object masks.

    Parameters
    ----------
    maps
        ``(sample, y, x)`` maps (token grid or pixels; upsampled bilinearly to the
        masks), or a Dataset with one variable per method (``vl.explain(cap, "all")``).
    masks
        ``(sample, y, x)`` boolean masks of the object each map should find, in the
        same order as the maps.

    Returns
    -------
    xarray.Dataset
        Scalar scores ``pixel_accuracy``, ``miou``, ``iou_foreground``,
        ``miou_per_image``, ``mean_ap`` (mAP), ``pointing`` (with a ``method`` dim for a
        Dataset of maps). See :func:`segmentation_scores` for the definitions.

    Raises
    ------
    vitlens.OptionError
        If maps and masks have different sample counts or wrong dimensions.

    Examples
    --------
    >>> import numpy as np, xarray as xr
    >>> masks = np.zeros((2, 8, 8), bool); masks[:, 2:6, 2:6] = True
    >>> perfect = xr.DataArray(masks.astype("float32"), dims=("sample", "y", "x"))
    >>> from vitlens.metrics import segmentation
    >>> scores = segmentation(perfect, masks)
    >>> float(scores.miou), float(scores.pointing)
    (1.0, 1.0)
    """
    counts = segmentation_counts(maps, masks)
    return segmentation_scores(counts, "sample")
