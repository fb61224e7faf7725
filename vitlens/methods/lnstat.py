"""LayerNorm token statistics fused with multi-head attention.

After Nguyen, Lee & Kim (arXiv 2311.11378). Two summaries of the paper disagree:
one calls the method gradient-free and class-agnostic (``grad=False``), another
describes an adaptation of Chefer et al.'s gradient-attention framework with
relation matrices and a fusion rule (``grad=True``). Both readings are
implemented; the fusion *rules* are vitlens' documented choices
(docs/METHODS.md §6), every part a switchable option recorded in the result's
attrs.
"""

from __future__ import annotations

import math

import torch
import xarray as xr

from .chain import Chain, chain_method
from .maps import minmax, token_map
from .operators import (HeadSelection, StageView, Step, heads_for,
                        onto_grid, pick_heads, resolve_identity_path, select_layers, view, with_spare)
from ..registry import METHOD_INFO
from .options import HeadFusion, IdentityPath, Statistic, StatisticNorm, check

def token_statistic(stage: StageView, layer: int, stat: Statistic, stat_norm: StatisticNorm) -> torch.Tensor:
    """``s_l[j]`` (B, N) at the input of block ``layer``'s first LayerNorm, normalised.

    Prefix tokens are excluded from the normalisation and get 1.
    """
    i = stage.layer_index(layer)
    std = stage.tensor("ln_std")[:, i, 0]
    if stat == "std":
        s = std
    elif stat == "var":
        s = std**2
    elif stat == "mean":
        s = stage.tensor("ln_mean")[:, i, 0]
    else:  # ‖x_j − μ_j‖ = std·√D for the biased std over D channels
        dim = int(stage.ds.attrs.get("embed_dim", 0)) or stage.tensor("features").shape[-1]
        s = std * math.sqrt(dim)
    p = stage.num_prefix
    patches = s[:, p:]
    if stat_norm == "max":
        patches = patches / patches.amax(1, keepdim=True).clamp_min(1e-12)
    elif stat_norm == "minmax":
        patches = torch.from_numpy(minmax(patches.numpy(), axis=1))
    out = s.clone()
    out[:, :p] = 1.0
    out[:, p:] = patches
    return out


def fuse_heads(stage: StageView, layer: int, heads: HeadSelection, head_fusion: HeadFusion, grad: bool = False) -> torch.Tensor:
    """``F_l = fuse_h(X[l])`` over the selected heads.

    ``X = A`` (``grad=False``), or ``X = (∂y_c/∂A ⊙ A)⁺`` per head (``grad=True``,
    Chefer et al.'s gradient-weighted attention). ``"entropy"`` weights the heads
    by 1 − the normalised entropy of their attention read-out row in both cases.
    """
    i = stage.layer_index(layer)
    a = stage.tensor("attention")[:, i]
    hs = heads_for(heads, layer, a.shape[1])
    a = pick_heads(a, hs)[0]  # the capture's own array when all heads are selected: never written
    x = pick_heads(stage.tensor("attention_grad")[:, i], hs)[0].mul(a).clamp_(min=0) if grad else a
    if head_fusion == "mean":
        return x.mean(1)
    if head_fusion == "max":
        return x.amax(1)
    # entropy: weight heads by 1 − normalised entropy of their read-out row
    # (the CLS row for ViT; the mean over all query rows for Swin windows / avg pool)
    ent = -(a * a.clamp_min(1e-12).log()).sum(-1) / math.log(a.shape[-1])
    if stage.num_prefix and not stage.windowed:
        ent_h = ent[..., 0]
    elif stage.windowed:  # the mean over the query rows of real tokens (not padding)
        valid = stage.window_valid(layer).to(ent.dtype)
        ent_h = (ent * valid).flatten(2).sum(-1) / valid.sum()
    else:
        ent_h = ent.flatten(2).mean(-1)
    w = (1 - ent_h).clamp_min(0)  # (B, H)
    w = w / w.sum(1, keepdim=True).clamp_min(1e-12)
    w = w.reshape(*w.shape, *([1] * (x.ndim - 2)))
    return (x * w).sum(1)


def fused_operator(stage: StageView, layer: int, f: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``M[i,j] = F[i,j]·s[j]``, row-renormalised (inside each window for Swin).

    Rows are divided by the sum of their absolute values, so a signed statistic
    (``stat="mean"``) stays bounded; for a non-negative statistic this is the
    plain row sum.
    """
    if stage.windowed:
        sk = with_spare(s)[:, stage.window_index(layer)][:, :, None, :]  # (B, nW, 1, M²): statistic of
        # each key in its window; 0 at padding, so a padded key takes no share of its row
    else:
        sk = s[:, None, :]
    m = f * sk
    return m / m.abs().sum(-1, keepdim=True).clamp_min(1e-12)


@chain_method(
    "lnstat",
    title="LN-statistic",
    caption="LayerNorm statistic × gradient-weighted attention, accumulated with Chefer's rule over {blocks}, "
            "for class {cls}",
    class_specific=True,
    defaults={"*": {"grad": True}},  # identity_path: "drop" for grad=True under a non-CLS read-out (below)
    variant_captions={("grad", False): "LayerNorm statistic × attention, accumulated like rollout over {blocks}"},
    reference="after Nguyen, Lee & Kim, arXiv 2311.11378; docs/METHODS.md §6",
    needs={"*": ("attention", "ln"), ("grad", True): ("attention_grad",)},
)
def lnstat(
    chain: Chain,
    *,
    stat: Statistic = "std",
    stat_norm: StatisticNorm = "max",
    head_fusion: HeadFusion = "mean",
    grad: bool | None = None,
    identity_path: IdentityPath | None = None,
) -> xr.DataArray | xr.Dataset:
    """LayerNorm-statistic × attention fusion (docs/METHODS.md §6), in either reading of the paper.

    ``grad=False`` (gradient-free, class-agnostic): ``M_l[i,j] = F_l[i,j]·s_l[j]``
    with ``F_l = E_h[A[l]]``, row-renormalised; ``R = Π 0.5·(I + M_l)``; read out.
    With a constant statistic it equals :func:`vitlens.methods.rollout` exactly.

    ``grad=True`` (gradient-weighted, class-specific): ``M_l = Ā_l·diag(s_l)``
    with ``Ā_l = E_h[(∂y_c/∂A[l] ⊙ A[l])⁺]`` (no row renormalisation), aggregated
    with Chefer et al.'s rule ``R ← R + M_l·R``; read out. With a constant
    statistic it equals :func:`vitlens.methods.generic_attention` exactly.

    Parameters
    ----------
    stat
        ``"std"`` (default), ``"mean"``, ``"var"`` or ``"norm"`` (‖x_j − μ_j‖) of
        each token entering the block's first LayerNorm. *vitlens' choice.*
    stat_norm
        ``"max"`` (patch tokens to max 1, default), ``"minmax"`` or ``"none"``;
        prefix tokens always get 1. *vitlens' choice.*
    head_fusion
        ``"mean"`` (default), ``"max"``, or ``"entropy"`` (heads weighted by
        1 − normalised entropy of their read-out row). *vitlens' choice.*
    grad
        The reading (see above). ``None``: the registry's default (``True``, the
        gradient-weighted reading; chosen from the evaluation on both shipped
        models, docs/METHODS.md §6). *vitlens' choice.*
    identity_path
        ``"drop"`` leaves out the part of ``R`` that never crossed an attention
        (the read-out row, scaled by ``0.5^L`` for ``grad=False``); ``"keep"``
        leaves it. ``None``: ``"drop"`` for ``grad=True`` under an average
        read-out (as transformer_attribution's default), ``"keep"`` otherwise
        (so ``grad=False`` with a constant statistic is rollout exactly). Under
        a CLS read-out both give the same map. *vitlens' choice.*
    layers, heads, start_layer, per_layer, merge, by_stage
        As for :func:`~vitlens.methods.rollout`.

    Examples
    --------
    >>> import numpy as np, timm, vitlens as vl
    >>> model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=3)
    >>> cap = vl.capture(model, np.zeros((1, 32, 32, 3)))
    >>> vl.explain(cap, "lnstat", stat="var").attrs["stat"]
    'var'
    >>> vl.explain(cap, "lnstat", grad=False).attrs["grad"]
    'false'
    """
    check("lnstat", stat=stat, stat_norm=stat_norm, head_fusion=head_fusion)
    cv = chain.cv
    if grad is None:
        grad = bool(METHOD_INFO["lnstat"].defaults_for(cv).get("grad", True))
    if identity_path is None:  # as transformer_attribution's default for the gradient-weighted chain
        identity_path = resolve_identity_path(cv, "transformer_attribution", None) if grad else "keep"
    identity_path = resolve_identity_path(cv, "lnstat", identity_path)
    steps = {}
    for l in chain.chosen:
        stage = cv.stage_of(l)
        f = fuse_heads(stage, l, chain.heads, head_fusion, grad=grad)
        s = token_statistic(stage, l, stat, stat_norm)
        if grad:  # r·(I + Ā·diag(s)): each source token's column scaled by its statistic
            steps[l] = Step(l, f, post=s)
        else:
            steps[l] = Step(l, fused_operator(stage, l, f, s), alpha=0.5, beta=0.5)
    options = {"stat": stat, "stat_norm": stat_norm, "head_fusion": head_fusion, "grad": grad,
               "identity_path": identity_path}
    return chain.finish("lnstat", steps, options, identity_path=identity_path)


def statistic_maps(
    cap: xr.DataTree,
    *,
    stat: Statistic = "std",
    stat_norm: StatisticNorm = "max",
    layers: list[int] | None = None,
) -> xr.DataArray:
    """The per-layer statistic ``s_l`` itself as maps ``(sample, layer, y, x)``.

    Swin stages are repeated up to the first-stage grid so all layers share one grid.

    Examples
    --------
    >>> import numpy as np, timm, vitlens as vl
    >>> model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=3)
    >>> cap = vl.capture(model, np.zeros((1, 32, 32, 3)))
    >>> vl.methods.statistic_maps(cap).dims
    ('sample', 'layer', 'y', 'x')
    """
    check("lnstat", stat=stat, stat_norm=stat_norm)
    cv = view(cap)
    chosen = select_layers(cv, layers)
    maps = []
    for l in chosen:
        stage = cv.stage_of(l)
        s = token_statistic(stage, l, stat, stat_norm)[:, stage.num_prefix :].reshape(-1, *stage.grid)
        maps.append(onto_grid(s, stage, cv.stages[0]))
    options = {"stat": stat, "stat_norm": stat_norm, "layers": chosen}
    return token_map(cv, torch.stack(maps, 1), "lnstat_statistic", options, chosen)
