"""Generic attention explainability (Chefer, Gur & Wolf, ICCV 2021), self-attention rule."""

from __future__ import annotations

import xarray as xr

from .chain import Chain, chain_method
from .operators import Step, resolve_identity_path
from .options import IdentityPath


@chain_method(
    "generic_attention",
    title="Generic Attention",
    caption="Chefer et al. 2021 (generic): gradient × attention, accumulated over {blocks}, for class {cls}",
    class_specific=True,
    defaults={"avg": {"identity_path": "drop"}},
    reference="Chefer, Gur & Wolf, ICCV 2021; docs/METHODS.md §5",
    needs={"*": ("attention", "attention_grad")},
)
def generic_attention(chain: Chain, *, identity_path: IdentityPath | None = None) -> xr.DataArray | xr.Dataset:
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
    steps = {l: Step(l, chain.fused(l, "attention_grad", "attention", clamp=True)) for l in chain.chosen}
    identity_path = resolve_identity_path(chain.cv, "generic_attention", identity_path)
    return chain.finish("generic_attention", steps, {"identity_path": identity_path}, identity_path=identity_path)
