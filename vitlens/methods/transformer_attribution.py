"""Transformer Attribution (Chefer, Gur & Wolf, CVPR 2021): LRP relevance × gradient."""

from __future__ import annotations

import xarray as xr

from .chain import Chain, chain_method
from .operators import Step, resolve_identity_path
from .options import IdentityPath


@chain_method(
    "transformer_attribution",
    start_layer=1,
    title="Transformer Attr.",
    caption="Chefer et al. 2021: gradient × LRP relevance of the attention, accumulated over {blocks}, for class {cls}",
    class_specific=True,
    defaults={"avg": {"identity_path": "drop"}},
    reference="Chefer, Gur & Wolf, CVPR 2021; docs/METHODS.md §4",
    needs={"*": ("attention_grad", "attention_relevance")},
)
def transformer_attribution(chain: Chain, *, identity_path: IdentityPath | None = None) -> xr.DataArray | xr.Dataset:
    """``C = (I + Ē_L)···(I + Ē_s)``, ``Ē_l = E_h[(∂y_c/∂A ⊙ R_A)⁺]`` (docs/METHODS.md §4).

    ``R_A`` is the LRP relevance at each block's attention probabilities,
    computed at capture time (``attention_relevance``) with the paper's rules
    (:mod:`vitlens.methods.lrp`). No row normalisation. ``start_layer``
    defaults to 1 as in the authors' evaluation scripts (their demo notebooks
    use 0, which includes the first block). Other options (``layers``,
    ``heads``, ``per_layer``, ``merge``, ``by_stage``) as for
    :func:`vitlens.methods.rollout`.

    Examples
    --------
    >>> import numpy as np, timm, vitlens as vl
    >>> model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=3)
    >>> cap = vl.capture(model, np.zeros((1, 32, 32, 3)))
    >>> vl.explain(cap, "transformer_attribution").attrs["start_layer"]
    1
    """
    steps = {l: Step(l, chain.fused(l, "attention_grad", "attention_relevance", clamp=True)) for l in chain.chosen}
    identity_path = resolve_identity_path(chain.cv, "transformer_attribution", identity_path)
    out = chain.finish("transformer_attribution", steps, {"identity_path": identity_path},
                       identity_path=identity_path)
    return with_lrp_condition(chain.cap, out)


def with_lrp_condition(cap: xr.DataTree, out: xr.DataArray | xr.Dataset) -> xr.DataArray | xr.Dataset:
    """The map with the capture's LRP conditioning: coordinate ``lrp_condition`` (sample), attrs
    ``lrp_dtype`` and ``lrp_unreliable`` (the samples whose float32 map depends on rounding), and a
    :class:`~vitlens.PrecisionWarning` naming them (docs/METHODS.md, "Sensitivity to rounding")."""
    from ..capture.layout import capture_options
    from ..capture.precision import unreliable_samples, warn_unreliable

    if "lrp_condition" not in cap.dataset or "sample" not in out.dims:
        return out
    samples = unreliable_samples(cap)
    out = out.assign_coords(lrp_condition=("sample", cap["lrp_condition"].values))
    out.attrs.update(lrp_dtype=str(capture_options(cap).get("lrp_dtype", "float32")), lrp_unreliable=samples)
    warn_unreliable(samples, stacklevel=3)
    return out
