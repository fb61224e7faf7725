"""The causal head statistic: how much each image's target logit drops when the head alone is ablated.

Unlike the attention statistics it cannot be computed from recorded tensors: it
needs the model, one forward per head. Capture records it as the
``ablation_effect`` group (``vl.capture(model, images, keep=[..., "ablation_effect"])``,
or :func:`vitlens.head_importance`, which can stream into a store); this
statistic reads that group.
"""

from __future__ import annotations

import xarray as xr

from ..capture.interventions import importance_of
from ..registry import register_stat


@register_stat(
    "ablation_effect",
    title="Ablation effect",
    unit="logit",
    caption="drop of the target logit when this head alone is switched off (its output set to zero, or to its "
            "mean over a reference set): positive where the head supports the prediction",
    reference="causal head ablation, as in Michel et al. 2019 (docs/METHODS.md, Interventions)",
    needs={"*": ("ablation_effect",)},  # recorded by capture (one forward per head), not from attention
)
def ablation_effect(cap: xr.DataTree) -> xr.DataArray:
    """Per image, block and head: the target logit's drop when the head alone is ablated.

    Read from a capture that recorded it (``keep=[..., "ablation_effect"]`` or
    :func:`vitlens.head_importance` with ``store=``); a capture without it raises a
    :class:`~vitlens.errors.CaptureFormatError` naming the call that records it.

    Examples
    --------
    >>> import numpy as np, timm, vitlens as vl
    >>> model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=3, depth=2)
    >>> cap = vl.capture(model, np.random.default_rng(0).random((2, 32, 32, 3)), keep=["ablation_effect"])
    >>> ablation_effect(cap).dims
    ('sample', 'layer', 'head')
    """
    return importance_of(cap)["ablation_effect"].rename("ablation_effect")
