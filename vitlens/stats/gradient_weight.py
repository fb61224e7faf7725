"""Gradient weight: each head's share in Chefer et al.'s generic attention, ``mean (∂y/∂A ⊙ A)⁺``."""

from __future__ import annotations

import numpy as np
import xarray as xr

from ..registry import register_stat
from .rows import attention_rows, every_layer, head_table


@register_stat(
    "gradient_weight",
    title="Gradient weight",
    unit="logit",
    caption="mean over query and key tokens of (∂y/∂A ⊙ A)⁺ for the captured target: how much the head's attention "
            "raises the explained logit, the per-head term of Chefer et al.'s generic attention",
    needs_gradients=True,
    reference="Chefer et al. 2021 (docs/METHODS.md, Head statistics)",
)
def gradient_weight(cap: xr.DataTree) -> xr.DataArray:
    """Per image, block and head: ``mean_{i, j} (∂y/∂A[i, j] · A[i, j])⁺`` for the captured target.

    Over every query and key token (prefix tokens too); Swin: over the pairs of
    real tokens that share a window (padded positions left out). ``y`` is the
    target logit the capture explained, so the values are in logits.

    Returns
    -------
    xarray.DataArray
        ``(sample, layer, head)``, ≥ 0.

    Examples
    --------
    >>> import numpy as np, timm, vitlens as vl
    >>> model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=3, depth=2)
    >>> cap = vl.capture(model, np.random.default_rng(0).random((1, 32, 32, 3)))
    >>> bool((vl.head_stats(cap, "gradient_weight") >= 0).all())
    True
    """
    per_layer = {}
    for stage, layer in every_layer(cap):
        att = attention_rows(stage, layer, queries="all")
        grad = attention_rows(stage, layer, "attention_grad", queries="all")
        product = np.clip(att.values * grad.values, 0.0, None) * att.real_key
        pairs = np.broadcast_to(att.real_key, product.shape[-2:]).sum()
        per_layer[layer] = product.sum((-2, -1)) / pairs
    return head_table(cap, per_layer, "gradient_weight")
