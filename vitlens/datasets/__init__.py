"""Datasets with ground-truth masks for scoring explanations.

Examples
--------
>>> import vitlens.datasets as vds
>>> ds = vds.shapes(8, seed=0)
>>> sorted(ds.data_vars)
['image', 'label', 'mask']
"""

from __future__ import annotations

from vitlens.datasets.imagenet_seg import imagenet_seg
from vitlens.datasets.shapes import CLASS_NAMES, shapes

__all__ = ["shapes", "imagenet_seg", "CLASS_NAMES"]
