"""Attention rollout (Abnar & Zuidema 2020)."""

from __future__ import annotations

import xarray as xr

from .chain import Chain, chain_method
from .operators import Step


@chain_method(
    "rollout",
    title="Rollout",
    caption="attention rollout: 0.5·(I + attention) multiplied over {blocks}, read out from {readout}",
    class_specific=False,
    reference="Abnar & Zuidema 2020; docs/METHODS.md §2",
    needs={"*": ("attention",)},
)
def rollout(chain: Chain) -> xr.DataArray | xr.Dataset:
    """``R = Â_L···Â_s`` with ``Â_l = 0.5·(I + E_h[A[l]])``, read out (docs/METHODS.md §2).

    Parameters
    ----------
    layers
        Blocks entering the product (default: all); the others act as identity.
    heads
        Heads entering each ``E_h`` (default: all); a dict maps layer → heads.
    start_layer
        First block of the product (default 0; Chefer's evaluation scripts use 1).
    per_layer
        Add a ``layer`` dim: the cumulative map after each selected block.
    merge
        Swin patch merging: ``"uniform"`` (1/4 to each parent, default) or
        ``"lrp"`` (the shares the merging Linear's LRP rule gives; class-specific).
    by_stage
        Return a Dataset with each stage's map on its own grid instead.

    Examples
    --------
    >>> import numpy as np, timm, vitlens as vl
    >>> model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=3)
    >>> cap = vl.capture(model, np.zeros((1, 32, 32, 3)))
    >>> vl.explain(cap, "rollout", per_layer=True).sizes["layer"]
    12
    """
    steps = {l: Step(l, chain.fused(l, "attention"), alpha=0.5, beta=0.5) for l in chain.chosen}
    return chain.finish("rollout", steps)
