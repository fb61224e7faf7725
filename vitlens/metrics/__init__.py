"""Scoring explanation maps: segmentation against masks, faithfulness by removing pixels.

The protocols are those of docs/METHODS.md ("Metrics"): segmentation as in the
ImageNet-segmentation evaluations (pixel accuracy, mIoU, mAP) plus the pointing
game; perturbation accuracy curves and their AUC (positive / negative); deletion
and insertion areas. :func:`evaluate` runs them all for every method and returns
one tidy table.

Examples
--------
>>> import numpy as np, xarray as xr
>>> from vitlens.metrics import segmentation
>>> masks = np.zeros((1, 8, 8), bool); masks[0, :4] = True
>>> maps = xr.DataArray(masks.astype("float32"), dims=("sample", "y", "x"))
>>> float(segmentation(maps, masks).pointing)
1.0
"""

from __future__ import annotations

from .evaluate import evaluate, evaluate_items, summarize
from .perturbation import deletion, insertion, perturbation
from .segmentation import average_precision, segmentation, segmentation_counts, segmentation_scores

__all__ = [
    "segmentation",
    "segmentation_counts",
    "segmentation_scores",
    "average_precision",
    "perturbation",
    "deletion",
    "insertion",
    "evaluate",
    "evaluate_items",
    "summarize",
]
