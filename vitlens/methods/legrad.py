"""LeGrad (Bousselham et al., ICCV 2025): gradients of each layer's own prediction at its attention."""

from __future__ import annotations

from typing import Any

import torch
import xarray as xr

from ..errors import CaptureFormatError, OptionError
from .maps import token_map
from .operators import HeadSelection, heads_for, onto_grid, select_layers, view
from ..registry import register_method
from .options import LegradScore, check



@register_method(
    "legrad",
    title="LeGrad",
    caption="LeGrad: gradient of each block's own prediction at its attention, averaged over {blocks}, "
            "for class {cls}",
    class_specific=True,
    per_layer=True,
    reference="Bousselham et al., ICCV 2025; docs/METHODS.md §9",
    needs={"*": ("legrad",)},
)
def legrad(
    cap: xr.DataTree,
    *,
    layers: int | list[int] | None = None,
    heads: HeadSelection = None,
    score: LegradScore = "mean",
    per_layer: bool = False,
) -> xr.DataArray:
    """LeGrad: ``mean_l E_h[mean_q (∂s^l/∂A^l)⁺]`` over the key tokens (docs/METHODS.md §9).

    ``s^l`` is block ``l``'s output read out as if it were the last block's;
    ``∂s^l/∂A^l`` its gradient at the block's own attention probabilities (captured
    with ``keep=("all", "legrad")``), clamped at 0, averaged over the query rows,
    the selected heads and the selected blocks; prefix keys are dropped.

    Parameters
    ----------
    layers
        Blocks averaged (default: every block whose tokens the head can read — all of
        a ViT's, the last stage of a Swin; other stages' blocks in ``layers`` are left out).
    heads
        Heads averaged (default all; a dict maps layer → heads).
    score
        ``"mean"`` (default): ``head(norm(mean of all tokens))``, as the authors' code and
        ``torchcam.methods.LeGrad`` read a layer out; ``"readout"``: the model's own
        read-out (CLS token, patch mean, attention pool) of the layer's tokens.
    per_layer
        The cumulative map after each selected block (dim ``layer``): the mean over the
        selected blocks up to it; the last is the map itself.

    Examples
    --------
    >>> import numpy as np, timm, vitlens as vl
    >>> model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=3)
    >>> cap = vl.capture(model, np.zeros((1, 32, 32, 3)), target=1, keep=("all", "legrad"))
    >>> vl.explain(cap, "legrad", per_layer=True).dims
    ('sample', 'layer', 'y', 'x')
    """
    check("legrad", score=score)
    cv = view(cap)
    last, first = cv.stages[-1], cv.stages[0]
    name = f"legrad_{score}"
    if name not in last.ds:
        raise CaptureFormatError(
            f"this capture has no {name!r}: LeGrad runs a pass of its own, made only when asked for. "
            "Capture with vl.capture(model, images, keep=('all', 'legrad'))."
        )
    asked = select_layers(cv, layers if layers is not None else last.layers)
    chosen = [l for l in asked if l in last.layers]  # a merged stage's blocks have another width than the head's
    if not chosen:
        raise OptionError(f"legrad: blocks {asked} have tokens the head cannot read (another stage's width); "
                          f"choose among {last.layers}.")
    grads = last.tensor(name)  # (B, layer, H, N)
    gh, gw = last.grid
    maps = []
    for layer in chosen:
        g = grads[:, last.layer_index(layer)]
        g = g[:, heads_for(heads, layer, g.shape[1])].mean(1)[:, last.num_prefix:].reshape(-1, gh, gw)
        maps.append(onto_grid(g, last, first))
    stacked = torch.stack(maps, 1)
    options: dict[str, Any] = {"layers": chosen, "heads": heads, "score": score, "per_layer": per_layer}
    if per_layer:
        counts = torch.arange(1, len(chosen) + 1, dtype=stacked.dtype).reshape(1, -1, 1, 1)
        return token_map(cv, stacked.cumsum(1) / counts, "legrad", options, chosen)
    return token_map(cv, stacked.mean(1), "legrad", options)
