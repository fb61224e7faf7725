"""Grad-CAM for transformers: on attention heads (Chefer 2021's baseline) or on features."""

from __future__ import annotations

import torch
import xarray as xr

from ..errors import OptionError
from .maps import token_map
from .operators import (HeadSelection, StageView, Step, apply_row, grid_factor, heads_for, readout_row,
                        select_layers, view)
from ..registry import METHOD_INFO, register_method
from .options import GradcamOn, check

@register_method(
    "gradcam",
    title="Grad-CAM",
    caption="Grad-CAM on the attention heads of block {l} (heads weighted by their gradient) for class {cls}",
    class_specific=True,
    per_layer=False,
    # chosen by evidence (docs/METHODS.md §3): heads as channels under CLS and on Swin v1 (swin-shapes),
    # features under other average read-outs
    defaults={"cls": {"on": "attention"}, "avg": {"on": "features"}, "swin": {"on": "attention"},
              "hf_swin": {"on": "attention"}},
    variant_captions={("on", "features"): "Grad-CAM on the final feature map for class {cls} (the same at every layer)"},
    layerless={"on": "features"},
    reference="Selvaraju et al. 2017, as in Chefer et al. 2021; docs/METHODS.md §3",
    needs={("on", "attention"): ("attention", "attention_grad"), ("on", "features"): ("features",)},
)
def gradcam(
    cap: xr.DataTree,
    *,
    on: GradcamOn | None = None,
    layers: int | None = None,
    heads: HeadSelection = None,
) -> xr.DataArray:
    """Grad-CAM (docs/METHODS.md §3).

    ``on=None`` picks the registry's default for the capture, chosen by evidence
    (docs/METHODS.md §3): ``"attention"`` under a CLS read-out and for Swin v1
    (timm and transformers), ``"features"`` under other average read-outs.

    ``on="attention"`` (every read-out): in the chosen block (default last), per
    head ``cam_h = r·A[h]`` over the patch columns, with ``r`` the read-out row
    (the CLS row; the mean of the query rows under an average read-out, through
    Swin's windows), weight ``w_h`` = the spatial mean of ``r·∂y_c/∂A[h]``; map
    ``= max(0, mean_h(w_h·cam_h))`` — heads play the role of channels.

    ``on="features"`` (available for every model): classic Grad-CAM on
    normalised token features reshaped to the grid — channels weighted by the
    spatial mean of their gradients, summed, ReLU. ViT: the last block's
    ``norm1`` output (the final norm's patch tokens get no gradient through a
    CLS read-out); Swin: the final norm's feature map, upsampled bilinearly to
    the first-stage grid.

    Examples
    --------
    >>> import numpy as np, timm, vitlens as vl
    >>> model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=3)
    >>> cap = vl.capture(model, np.zeros((1, 32, 32, 3)))
    >>> vl.explain(cap, "gradcam", on="features").attrs["on"]
    'features'
    """
    cv = view(cap)
    if on is None:  # the registry's default for this capture (docs/METHODS.md §3)
        on = METHOD_INFO["gradcam"].defaults_for(cv).get("on", "attention")
    check("gradcam", on=on)
    if on == "attention":
        layer = select_layers(cv, layers if layers is not None else cv.all_layers[-1])[-1]
        stage = cv.stage_of(layer)
        i, p = stage.layer_index(layer), stage.num_prefix
        a, g = stage.tensor("attention")[:, i], stage.tensor("attention_grad")[:, i]
        hs = heads_for(heads, layer, a.shape[1])
        # per head, the read-out row through its attention (the CLS row, or under an average
        # read-out the mean of the query rows) and through its gradient, on the patch columns
        r = readout_row(cv, stage, torch.float32)
        cam, grad = (torch.stack([apply_row(stage, Step(layer, x[:, h], alpha=0.0), r) for h in hs], 1)[..., p:]
                     for x in (a, g))
        w = grad.mean(-1, keepdim=True)
        values = (w * cam).mean(1).clamp(min=0).reshape(-1, *stage.grid)
        return token_map(cv, onto_first_grid(values, stage, cv.stages[0]), "gradcam",
                         {"on": on, "layers": [layer], "heads": heads})
    if layers is not None or heads is not None:
        raise OptionError("gradcam on='features' uses the final norm's output: it takes no layers= or heads=.")
    last = cv.stages[-1]
    f = last.tensor("features")[:, last.num_prefix :]  # (B, N, C)
    g = last.tensor("features_grad")[:, last.num_prefix :]
    cam = (g.mean(1, keepdim=True) * f).sum(-1).clamp(min=0).reshape(-1, *last.grid)
    return token_map(cv, onto_first_grid(cam, last, cv.stages[0]), "gradcam", {"on": on})


def onto_first_grid(values: torch.Tensor, stage: StageView, first: StageView) -> torch.Tensor:
    """A (B, h, w) map on ``stage``'s grid, bilinearly onto the first stage's grid (Swin), cropped
    where a grid merged from an odd side hangs over the image edge; the first stage's own map as it is."""
    if stage.grid == first.grid:
        return values
    fy, fx = grid_factor(stage, first)
    return torch.nn.functional.interpolate(
        values[:, None], size=(stage.grid[0] * fy, stage.grid[1] * fx), mode="bilinear", align_corners=False
    )[:, 0, : first.grid[0], : first.grid[1]]
