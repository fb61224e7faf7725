"""AttnLRP and CP-LRP (Achtibat et al., ICML 2024; Ali et al., ICML 2022): LRP relevance of the tokens."""

from __future__ import annotations

from typing import Any

import torch
import xarray as xr

from ..errors import CaptureFormatError
from .maps import token_map
from .operators import CaptureView, grid_factor, onto_grid, select_layers, view
from ..registry import register_method
from .options import Softmax, check

#: ``softmax=`` → the capture group (and variable ``<group>_relevance``) the map reads
GROUPS = {"cp": "attnlrp_cp", "attnlrp": "attnlrp"}


def relevance_of(cv: CaptureView, layer: int, group: str) -> torch.Tensor:
    """(B, N) relevance of the tokens entering block ``layer``, read from the capture."""
    stage = cv.stage_of(layer)
    name = f"{group}_relevance"
    if name not in stage.ds:
        raise CaptureFormatError(
            f"this capture has no {name!r}: AttnLRP runs a pass of its own, made only when asked for. "
            f"Capture with vl.capture(model, images, keep=('all', {group!r}))."
        )
    return stage.tensor(name)[:, stage.layer_index(layer)]


def _on_first_grid(cv: CaptureView, layer: int, r: torch.Tensor) -> torch.Tensor:
    """Patch-token relevance of block ``layer``'s input on the first stage's grid, keeping its total:
    a token of a merged stage spreads its relevance evenly over the first-stage tokens it covers."""
    stage, first = cv.stage_of(layer), cv.stages[0]
    gh, gw = stage.grid
    grid = r[:, stage.num_prefix:].reshape(-1, gh, gw)
    if stage is first:
        return grid
    fy, fx = grid_factor(stage, first)
    return onto_grid(grid, stage, first) / (fy * fx)


@register_method(
    "attnlrp",
    title="AttnLRP",
    caption="LRP relevance of the tokens entering block {l} (AttnLRP rules, gradient × input), for class {cls}",
    class_specific=True,
    per_layer=True,
    variant_captions={("softmax", "cp"): "CP-LRP: LRP relevance of the tokens entering block {l}, attention held "
                                         "constant (AttnLRP rules elsewhere), for class {cls}"},
    reference="Achtibat et al., ICML 2024 (AttnLRP); Ali et al., ICML 2022 (CP-LRP); docs/METHODS.md §8",
    needs={("softmax", "cp"): ("attnlrp_cp",), ("softmax", "attnlrp"): ("attnlrp",)},
)
def attnlrp(
    cap: xr.DataTree,
    *,
    softmax: Softmax = "cp",
    layers: int | list[int] | None = None,
    per_layer: bool = False,
) -> xr.DataArray:
    """LRP relevance of the patch tokens from one modified backward pass (docs/METHODS.md §8).

    Relevance is gradient × input through the model with the AttnLRP rules: the ε-rule
    on every Linear (gradient × input, the bias takes its share), the identity rule
    through norms (their scale held) and element-wise activations, the uniform rule
    (half each) on products of two activations. ``softmax="cp"`` (default; what ``lxt``
    applies to ViTs, CP-LRP) holds the attention probabilities constant, so all
    relevance of ``A·V`` goes to the values and relevance is conserved block by block;
    ``softmax="attnlrp"`` also sends half of it through the softmax to the queries and
    keys (AttnLRP's softmax rule, which does not conserve).

    Parameters
    ----------
    softmax
        ``"cp"`` or ``"attnlrp"``: which capture pass the map reads
        (``keep=("all", "attnlrp_cp")`` or ``keep=("all", "attnlrp")``).
    layers
        The map is the relevance of the tokens entering the lowest selected block
        (default: all blocks, i.e. the embedded patches).
    per_layer
        One map per selected block: the relevance of the tokens entering it.

    Examples
    --------
    >>> import numpy as np, timm, vitlens as vl
    >>> model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=3)
    >>> cap = vl.capture(model, np.zeros((1, 32, 32, 3)), target=1, keep=("all", "attnlrp_cp"))
    >>> vl.explain(cap, "attnlrp").dims
    ('sample', 'y', 'x')
    """
    check("attnlrp", softmax=softmax)
    cv = view(cap)
    chosen = select_layers(cv, layers)
    group = GROUPS[softmax]
    maps = [_on_first_grid(cv, l, relevance_of(cv, l, group)) for l in chosen]
    options: dict[str, Any] = {"softmax": softmax, "layers": chosen, "per_layer": per_layer}
    if per_layer:
        return token_map(cv, torch.stack(maps, 1), "attnlrp", options, chosen)
    return token_map(cv, maps[0], "attnlrp", options)
