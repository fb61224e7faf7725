"""Mean attention distance: how far, in input pixels, each head looks (Dosovitskiy et al. 2021, Fig. 7)."""

from __future__ import annotations

import numpy as np
import xarray as xr

from ..registry import register_stat
from .rows import attention_rows, every_layer, head_table, row_mean


@register_stat(
    "attention_distance",
    title="Mean attention distance",
    unit="px",
    caption="attention-weighted mean distance, in input pixels, from each patch query to the patch keys it "
            "attends to (attention renormalised over patch keys), averaged over patch queries",
    reference="Dosovitskiy et al. 2021, Fig. 7; Raghu et al. 2021 (docs/METHODS.md, Head statistics)",
)
def attention_distance(cap: xr.DataTree) -> xr.DataArray:
    """Per image, block and head: how far the patches attend, in input pixels (docs/METHODS.md, Head statistics).

    For each patch query ``i``: ``Σ_j A[i, j]·d(i, j) / Σ_j A[i, j]`` over the
    patch keys ``j`` (prefix tokens left out, the row renormalised over the
    patches), ``d`` the distance between the two patches' centres in input
    pixels; then the mean over the patch queries. Swin: within each query's
    window, padded positions left out, centres at each stage's stride.

    Returns
    -------
    xarray.DataArray
        ``(sample, layer, head)`` in pixels.

    Examples
    --------
    >>> import numpy as np, timm, vitlens as vl
    >>> model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=3, depth=2)
    >>> cap = vl.capture(model, np.zeros((1, 32, 32, 3)), grads=False)
    >>> d = vl.head_stats(cap, "attention_distance")
    >>> d.dims, bool((d > 0).all() and (d < 32 * 2 ** 0.5).all())
    (('sample', 'layer', 'head'), True)
    """
    per_layer = {}
    for stage, layer in every_layer(cap):
        rows = attention_rows(stage, layer)
        mass = rows.row_sum(rows.patch_key)  # (sample, head, row): a row with no weight on patches has no distance
        distance = rows.row_sum(rows.key_distance()) / np.where(mass > 0, mass, 1.0)  # 0 off the patch keys
        per_layer[layer] = row_mean(distance, mass > 0)
    return head_table(cap, per_layer, "attention_distance")
