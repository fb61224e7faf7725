"""TokenTM: token transformation effects (Wu, Duan, Kang, Tang, Yan, CVPR 2024).

Confirmed by the paper: a token's transformation effect is measured by the change
of its length (L2 norm) and by a direction correlation, NECC (normalised
exponential cosine correlation), before vs after a transformation; these weights
are combined with attention; the contribution map starts as a diagonal of input
token lengths and is updated layer by layer; the final map is the CLS row.
The exact rule below (which tokens count as "before/after", the NECC form, how
weights enter the operator) is vitlens' documented choice (docs/METHODS.md §7); each
part is a switchable option recorded in the result's attrs.
"""

from __future__ import annotations

import math

import torch
import xarray as xr

from .chain import Chain, chain_method
from .operators import StageView, Step
from .options import IdentityPath, Init, Necc, check

def necc(cos: torch.Tensor, kind: Necc) -> torch.Tensor:
    """Normalised exponential cosine correlation of (B, N) cosines.

    ``"range"``: ``(exp(c) − e⁻¹)/(e − e⁻¹)`` ∈ [0, 1]; ``"softmax"``:
    ``N·softmax_j(c_j)``; ``"none"``: 1 (drops the direction term).

    Examples
    --------
    >>> necc(torch.tensor([[1.0, -1.0]]), "range")
    tensor([[1., 0.]])
    """
    if kind == "range":
        return (cos.exp() - math.exp(-1)) / (math.e - math.exp(-1))
    if kind == "softmax":
        return cos.shape[-1] * cos.softmax(-1)
    return torch.ones_like(cos)


def transformation_weights(stage: StageView, layer: int, part: str, necc_kind: str, length: bool) -> torch.Tensor:
    """``w_j = λ_j·NECC_j`` (B, N) for the MSA (value path) or FFN of ``layer``."""
    i = stage.layer_index(layer)
    if part == "msa":
        out, inp, cos = "attn_value_norm", "token_norm", "attn_value_cos"
    else:
        out, inp, cos = "mlp_out_norm", "mlp_in_norm", "mlp_cos"
    w = necc(stage.tensor(cos)[:, i], necc_kind)
    if length:
        w = w * stage.tensor(out)[:, i] / stage.tensor(inp)[:, i].clamp_min(1e-12)
    return w


@chain_method(
    "tokentm",
    title="TokenTM",
    caption="TokenTM: attention × token-length and direction changes, accumulated over {blocks}, for class {cls}",
    class_specific=True,
    reference="Wu, Duan, Kang, Tang & Yan, CVPR 2024; docs/METHODS.md §7",
    needs={"*": ("attention", "norms"), ("grad", True): ("attention_grad",)},
)
def tokentm(
    chain: Chain,
    *,
    necc: Necc = "range",
    length: bool = True,
    grad: bool = True,
    ffn: bool = True,
    init: Init = "norm",
    identity_path: IdentityPath = "drop",
) -> xr.DataArray | xr.Dataset:
    """Token-transformation-weighted attention propagation (docs/METHODS.md §7).

    ``C_0 = diag(‖e⁰_j‖)``; per block ``U_l = I + Ā·diag(w)`` (MSA) and
    ``V_l = I + diag(w^F)`` (FFN); ``C_l = V_l·U_l·C_{l−1}``; read out ``C_L``.
    With ``ffn=False, necc="none", length=False, init="identity"`` it equals
    :func:`vitlens.methods.generic_attention` exactly.

    Parameters
    ----------
    necc
        ``"range"`` (default), ``"softmax"`` or ``"none"``. *vitlens' choice.*
    length
        Multiply by the length ratio ``λ_j = ‖t_j‖/‖u_j‖`` (default True).
    grad
        ``Ā = E_h[(∂y_c/∂A ⊙ A)⁺]`` (default, class-specific) or ``E_h[A]``.
    ffn
        Include the FFN term ``V_l`` (default True).
    init
        ``"norm"``: ``C_0 = diag(‖e⁰‖)`` (default); ``"identity"``: ``C_0 = I``.
    layers, heads, start_layer, per_layer
        As for rollout.
    identity_path
        ``"drop"`` (default) leaves out the part of ``C_L`` that never crossed an
        attention (the product with every ``Ā`` set to 0: residual and FFN scaling
        only); ``"keep"`` returns ``C_L`` as it is.  *vitlens' choice, for
        average-pooled read-outs (Swin, ``global_pool="avg"`` ViTs)*: there every
        token is read out, and its own attention-free path — a token-wise FFN
        rescaling, the same for every class — would otherwise dominate the map.
        With a CLS read-out that path ends on the prefix token, which the map
        excludes, so both settings give the same map.
    merge, by_stage
        As for :func:`~vitlens.methods.rollout`.

    Examples
    --------
    >>> import numpy as np, timm, vitlens as vl
    >>> model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=3)
    >>> cap = vl.capture(model, np.zeros((1, 32, 32, 3)))
    >>> vl.explain(cap, "tokentm", necc="softmax").attrs["necc"]
    'softmax'
    """
    necc_kind = necc
    check("tokentm", necc=necc_kind, identity_path=identity_path, init=init)
    cv = chain.cv
    names = ("attention_grad", "attention") if grad else ("attention",)
    steps = {}
    for l in chain.chosen:
        stage = cv.stage_of(l)
        a = chain.fused(l, *names, clamp=grad)
        w = transformation_weights(stage, l, "msa", necc_kind, length)
        wf = transformation_weights(stage, l, "ffn", necc_kind, length) if ffn else None
        # r·V·U = (r ⊙ (1 + w^F))·(I + G(Ā)·diag(w))
        steps[l] = Step(l, a, pre=None if wf is None else 1 + wf, post=w)
    final = None
    if init == "norm":
        e0 = cv.stages[0].tensor("token_norm")[:, 0]
        final = lambda r: r * e0  # noqa: E731 - r·C_0 with C_0 = diag(‖e⁰‖)
    options = {"necc": necc_kind, "length": length, "grad": grad, "ffn": ffn, "init": init,
               "identity_path": identity_path}
    return chain.finish("tokentm", steps, options, final=final, identity_path=identity_path)
