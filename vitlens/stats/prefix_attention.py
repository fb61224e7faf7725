"""Prefix attention: the share of the patches' attention that goes to CLS, distillation and register tokens."""

from __future__ import annotations

import numpy as np
import xarray as xr

from ..registry import register_stat
from .rows import attention_rows, every_layer, head_table, row_mean


@register_stat(
    "prefix_attention",
    title="Attention to prefix tokens",
    unit="share",
    caption="share of each patch query's attention that goes to prefix tokens (CLS, distillation, registers), "
            "averaged over patch queries: the attention sink; 0 for a model without prefix tokens",
    reference="Darcet et al. 2024 (docs/METHODS.md, Head statistics)",
)
def prefix_attention(cap: xr.DataTree) -> xr.DataArray:
    """Per image, block and head: the mean share of a patch query's attention on prefix tokens.

    ``Σ_{j prefix} A[i, j] / Σ_{j token} A[i, j]`` for each patch query ``i``
    (the denominator is 1 except where padded window positions took a share),
    then the mean over the patch queries. 0 for Swin and any model without
    prefix tokens.

    Returns
    -------
    xarray.DataArray
        ``(sample, layer, head)``, a share in [0, 1].

    Examples
    --------
    >>> import numpy as np, timm, vitlens as vl
    >>> model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=3, depth=2,
    ...                           reg_tokens=2)
    >>> cap = vl.capture(model, np.zeros((1, 32, 32, 3)), grads=False)
    >>> s = vl.head_stats(cap, "prefix_attention")
    >>> bool(((s > 0) & (s < 1)).all())
    True
    """
    per_layer = {}
    for stage, layer in every_layer(cap):
        rows = attention_rows(stage, layer)
        mass = rows.row_sum(rows.real_key)
        prefix = rows.row_sum(rows.prefix_key)
        per_layer[layer] = row_mean(prefix / np.where(mass > 0, mass, 1.0), mass > 0)
    return head_table(cap, per_layer, "prefix_attention")
