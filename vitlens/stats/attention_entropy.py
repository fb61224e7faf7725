"""Attention entropy: how spread out each head's attention rows are (Raghu et al. 2021)."""

from __future__ import annotations

import numpy as np
import xarray as xr

from ..registry import register_stat
from .rows import attention_rows, every_layer, head_table, row_mean


@register_stat(
    "attention_entropy",
    title="Attention entropy",
    unit="nats",
    caption="entropy of each patch query's attention row over the tokens it can attend to, averaged over patch "
            "queries: 0 for a head that looks at one token, log N for one that looks at all N evenly",
    reference="Raghu et al. 2021 (docs/METHODS.md, Head statistics)",
)
def attention_entropy(cap: xr.DataTree) -> xr.DataArray:
    """Per image, block and head: the entropy in nats of the patch queries' attention rows.

    For each patch query: ``−Σ_j p_j·log p_j`` over every key token ``j``
    (prefix tokens included: the row as the softmax gives it), ``0·log 0 = 0``;
    then the mean over the patch queries. Swin: the row over the query's window,
    padded positions left out and the row renormalised over the real tokens.

    Returns
    -------
    xarray.DataArray
        ``(sample, layer, head)`` in nats.

    Examples
    --------
    >>> import numpy as np, timm, vitlens as vl
    >>> model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=3, depth=2)
    >>> cap = vl.capture(model, np.zeros((1, 32, 32, 3)), grads=False)
    >>> e = vl.head_stats(cap, "attention_entropy")
    >>> bool((e >= 0).all() and (e <= np.log(17)).all())  # 16 patches + CLS
    True
    """
    per_layer = {}
    for stage, layer in every_layer(cap):
        rows = attention_rows(stage, layer)
        p = rows.values if rows.real_key.all() else rows.values * rows.real_key  # padding is no token
        mass = p.sum(-1)
        # −Σ p/m·log(p/m) = log m − Σ p·log p / m, with 0·log 0 = 0
        with np.errstate(divide="ignore", invalid="ignore"):
            plogp = np.where(p > 0, p * np.log(p), 0.0).sum(-1)
            entropy = np.log(np.where(mass > 0, mass, 1.0)) - plogp / np.where(mass > 0, mass, 1.0)
        per_layer[layer] = row_mean(entropy, mass > 0)
    return head_table(cap, per_layer, "attention_entropy")
