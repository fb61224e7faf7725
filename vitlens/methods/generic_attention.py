"""Generic attention explainability (Chefer, Gur & Wolf, ICCV 2021), self-attention rule."""

from __future__ import annotations

import xarray as xr

from .maps import finish
from .operators import (HeadSelection, Step, head_fused, resolve_identity_path,
                        select_layers, view)
from ..registry import register_method
from .options import IdentityPath, Merge


@register_method(
    "generic_attention",
    title="Generic Attention",
    caption="Chefer et al. 2021 (generic): gradient × attention, accumulated over {blocks}, for class {cls}",
    class_specific=True,
    per_layer=True,
    defaults={"avg": {"identity_path": "drop"}},
    reference="Chefer, Gur & Wolf, ICCV 2021; docs/METHODS.md §5",
    needs={"*": ("attention", "attention_grad"), ("merge", "lrp"): ("attention_relevance",)},
)
def generic_attention(
    cap: xr.DataTree,
    *,
    layers: list[int] | None = None,
    heads: HeadSelection = None,
    start_layer: int = 0,
    per_layer: bool = False,
    merge: Merge = "uniform",
    by_stage: bool = False,
    identity_path: IdentityPath | None = None,
) -> xr.DataArray | xr.Dataset:
    """``R ← I``; per block ``R ← R + Ā·R`` with ``Ā = E_h[(∂y_c/∂A ⊙ A)⁺]`` (docs/METHODS.md §5).

    Class-specific through the gradient of the explained logit; no LRP.
    Options as for :func:`vitlens.methods.rollout` (including ``merge``,
    ``by_stage``).

    Examples
    --------
    >>> import numpy as np, timm, vitlens as vl
    >>> model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=3)
    >>> cap = vl.capture(model, np.zeros((1, 32, 32, 3)), target=2)
    >>> vl.explain(cap, "generic_attention").attrs["method"]
    'generic_attention'
    """
    cv = view(cap)
    chosen = select_layers(cv, layers, start_layer)
    steps = {
        l: Step(l, head_fused(cv.stage_of(l), l, heads, "attention_grad", "attention", clamp=True))
        for l in chosen
    }
    identity_path = resolve_identity_path(cv, "generic_attention", identity_path)
    options = {"layers": chosen, "heads": heads, "start_layer": start_layer, "identity_path": identity_path}
    return finish(cv, steps, chosen, "generic_attention", options, per_layer=per_layer, merge=merge,
                  by_stage=by_stage, identity_path=identity_path)
