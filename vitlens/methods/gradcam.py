"""Grad-CAM for transformers: on attention heads (Chefer 2021's baseline) or on features."""

from __future__ import annotations

import torch
import xarray as xr

from ..errors import OptionError
from .maps import token_map
from .operators import HeadSelection, grid_factor, heads_for, select_layers, view
from ..registry import METHOD_INFO, register_method
from .options import GradcamOn, check

@register_method(
    "gradcam",
    title="Grad-CAM",
    caption="Grad-CAM on the attention heads of block {l} (heads weighted by their gradient) for class {cls}",
    class_specific=True,
    per_layer=False,
    defaults={"cls": {"on": "attention"}, "avg": {"on": "features"}},
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

    ``on=None`` picks the registry's default for the capture's read-out:
    ``"attention"`` under a CLS read-out, ``"features"`` under any other (average,
    attention pool; Swin, average-pooled ViTs).

    ``on="attention"``: in the chosen block (default last), per
    head ``cam_h = A[h, CLS, patches]``, weight ``w_h`` = spatial mean of
    ``∂y_c/∂A[h, CLS, patches]``; map ``= max(0, mean_h(w_h·cam_h))`` — heads play
    the role of channels.

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
    if on is None:  # the registry's default for this read-out (CLS: attention, average: features)
        on = METHOD_INFO["gradcam"].defaults_for(cv).get("on", "attention")
    check("gradcam", on=on)
    if on == "attention":
        if cv.readout != "cls":
            raise OptionError("gradcam on='attention' needs a CLS token; use on='features' for this model.")
        layer = select_layers(cv, layers if layers is not None else cv.all_layers[-1])[-1]
        stage = cv.stage_of(layer)
        i, p = stage.layer_index(layer), stage.num_prefix
        a = stage.tensor("attention")[:, i, :, 0, p:]  # (B, H, patches)
        g = stage.tensor("attention_grad")[:, i, :, 0, p:]
        hs = heads_for(heads, layer, a.shape[1])
        w = g[:, hs].mean(-1, keepdim=True)
        cam = (w * a[:, hs]).mean(1).clamp(min=0)
        values = cam.reshape(-1, *stage.grid)
        return token_map(cv, values, "gradcam", {"on": on, "layers": [layer], "heads": heads})
    if layers is not None or heads is not None:
        raise OptionError("gradcam on='features' uses the final norm's output: it takes no layers= or heads=.")
    last = cv.stages[-1]
    f = last.tensor("features")[:, last.num_prefix :]  # (B, N, C)
    g = last.tensor("features_grad")[:, last.num_prefix :]
    cam = (g.mean(1, keepdim=True) * f).sum(-1).clamp(min=0).reshape(-1, *last.grid)
    values = cam
    first = cv.stages[0]
    if last.grid != first.grid:  # Swin: bilinear onto the first-stage grid (cropped where a
        # merged odd grid hangs over the image edge)
        fy, fx = grid_factor(last, first)
        values = torch.nn.functional.interpolate(
            cam[:, None], size=(last.grid[0] * fy, last.grid[1] * fx), mode="bilinear", align_corners=False
        )[:, 0, : first.grid[0], : first.grid[1]]
    return token_map(cv, values, "gradcam", {"on": on})
