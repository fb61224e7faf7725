"""Raw attention: ``E_h[A[l]]`` of one block, read out."""

from __future__ import annotations

import torch
import xarray as xr

from .maps import token_map
from .operators import HeadSelection, Step, head_fused, propagate, select_layers, view
from ..registry import register_method


@register_method(
    "attention",
    title="Attention",
    caption="raw attention of block {l} alone (mean of the selected heads), read out from {readout}",
    class_specific=False,
    per_layer=True,
    reference="docs/METHODS.md §1",
    needs={"*": ("attention",)},
)
def attention(
    cap: xr.DataTree,
    *,
    layers: int | list[int] | None = None,
    heads: HeadSelection = None,
    per_layer: bool = False,
) -> xr.DataArray:
    """Mean attention of the selected heads of one block, read out (docs/METHODS.md §1).

    ViT: the CLS row (mean of patch rows for avg-pooled models) of
    ``E_h[A[l]]`` over the patch columns. Swin: the average-pool row through
    block ``l``'s windowed operator, then down the patch mergings to the
    first-stage grid.

    Parameters
    ----------
    layers
        The block to show (default: the last). Several blocks: their maps are
        averaged, or returned one per block with ``per_layer=True``.
    heads
        Heads entering the mean (default: all); a dict maps layer → heads.
    per_layer
        One map per selected block, dim ``layer`` (not cumulative: attention
        is a single-block view).

    Examples
    --------
    >>> import numpy as np, timm, vitlens as vl
    >>> model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=3)
    >>> cap = vl.capture(model, np.zeros((1, 32, 32, 3)))
    >>> vl.explain(cap, "attention", layers=0, heads=[0, 1]).dims
    ('sample', 'y', 'x')
    """
    cv = view(cap)
    chosen = select_layers(cv, layers if layers is not None else cv.all_layers[-1])
    maps = []
    for layer in chosen:
        stage = cv.stage_of(layer)
        step = Step(layer, head_fused(stage, layer, heads, "attention"), alpha=0.0, beta=1.0)
        maps.append(propagate(cv, {layer: step}, layer))
    stacked = torch.stack(maps, 1)
    options = {"layers": chosen, "heads": heads, "per_layer": per_layer}
    if per_layer:
        return token_map(cv, stacked, "attention", options, chosen)
    return token_map(cv, stacked.mean(1), "attention", options)
