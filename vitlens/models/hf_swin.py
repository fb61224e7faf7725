"""Adapter for ``transformers``' ``SwinForImageClassification`` (Swin v1).

The same computation as timm's Swin in other names: stages of pre-norm window
blocks (``layernorm_before``, window attention with a relative position bias
and, every second block, a cyclic shift with its mask; ``layernorm_after``,
``mlp``) over ``(B, H·W, C)`` tokens, patch merging at the *end* of a stage
(timm: at the start of the next), a final LayerNorm and an average-pooled
classifier. Windows, shifts and merges follow timm's conventions (the same
window partition, ``roll(-shift)``, parent order ``(0,0), (1,0), (0,1), (1,1)``),
so capture and the LRP walk treat both alike. Grids that need padded windows
are refused, as for timm.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import UnsupportedModelError
from .adapter import StageInfo
from .hf_common import HFAdapter, mlp_part, split_attention
from .parts import BlockPart, MergePart, Readout
from .registry import register_adapter


@dataclass
class TokenMergePart(MergePart):
    """Patch merging whose input is ``(B, H·W, C)`` tokens of a ``grid`` (transformers' layout)."""

    grid: tuple[int, int] = (0, 0)

    def relevance(self, x: torch.Tensor, r_out: torch.Tensor) -> torch.Tensor:
        if x.ndim == 3:
            x = x.reshape(x.shape[0], *self.grid, x.shape[-1])
        return super().relevance(x, r_out)


def _window_and_shift(layer: nn.Module, grid: tuple[int, int]) -> tuple[int, int]:
    """What ``SwinLayer.set_shift_and_window_size`` makes of the window at this grid."""
    window, shift = int(layer.window_size), int(layer.shift_size)
    if min(grid) <= window:
        return min(grid), 0
    return window, shift


def _bias(layer: nn.Module, grid: tuple[int, int]):
    """Relative position bias (+ shift mask) the layer adds to its logits: (nW or 1, heads, N, N)."""

    def bias(ctx: dict) -> torch.Tensor:
        rel = layer.attention.relative_position_bias()[0]  # (heads, N, N)
        mask = layer.get_attn_mask(grid[0], grid[1], dtype=rel.dtype, device=rel.device)
        return rel.unsqueeze(0) if mask is None else rel.unsqueeze(0) + mask.unsqueeze(1)

    return bias


@register_adapter
class HFSwinAdapter(HFAdapter):
    """``transformers`` Swin v1 image classifiers."""

    family = "hf_swin"
    classes = ("SwinForImageClassification",)

    def __init__(self, model: nn.Module):
        super().__init__(model)
        name = type(model).__name__
        swin = model.swin
        if not isinstance(model.classifier, nn.Linear):
            raise UnsupportedModelError(f"{name} has no classifier head (num_labels=0).")
        h, w = self.input_size
        layer_index, self.stages, self._merges = 0, [], {}
        stages = list(swin.encoder.layers)
        for s, stage in enumerate(stages):
            blocks = list(stage.blocks)
            if not blocks:
                raise UnsupportedModelError(f"{name}: stage {s} has no blocks.")
            grid = tuple(int(r) for r in blocks[0].input_resolution)
            parts, shifts, window = [], [], None
            for b, layer in enumerate(blocks):
                where = f"{name} stage {s} block {b}"
                ws, shift = _window_and_shift(layer, grid)  # type: ignore[arg-type]
                if grid[0] % ws or grid[1] % ws:
                    raise UnsupportedModelError(
                        f"{where}: the {grid[0]}x{grid[1]} grid is not divisible by its {ws}x{ws} window "
                        "(padded windows are not supported); use an input size whose stage grids are "
                        "multiples of the window size."
                    )
                if ws != int(layer.attention.relative_position_bias.window_size[0]):
                    raise UnsupportedModelError(f"{where}: its window shrinks below the position-bias table.")
                window = (ws, ws)
                shifts.append((shift, shift))
                attn = split_attention(layer.attention, where)
                attn.position_bias = _bias(layer, grid)  # type: ignore[arg-type]
                parts.append(BlockPart(module=layer, norm1=layer.layernorm_before, attn=attn,
                                       norm2=layer.layernorm_after, mlp=mlp_part(layer.mlp, where)))
            self.stages.append(StageInfo(
                index=s, parts=parts, layers=list(range(layer_index, layer_index + len(parts))),
                grid=grid,  # type: ignore[arg-type]
                stride=(h // grid[0], w // grid[1]), num_heads=parts[0].attn.num_heads,
                window=window, shifts=shifts,
            ))
            layer_index += len(parts)
            down = stage.downsample
            if down is not None and s + 1 < len(stages):
                if grid[0] % 2 or grid[1] % 2:
                    raise UnsupportedModelError(f"{name}: stage {s} grid {grid} cannot be merged 2x2 without padding.")
                self._merges[s + 1] = TokenMergePart(down, down.reduction, down.norm, norm_first=True,
                                                      grid=grid)  # type: ignore[arg-type]
        self.final = swin.layernorm
        self.head = Readout("avg", model.classifier, start=0)

    def merges(self) -> dict[int, MergePart]:
        return dict(self._merges)

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        # a SwinLayer returns (hidden_states, attention weights)
        if isinstance(x, tuple):
            x = x[0]
        return x.reshape(x.shape[0], -1, x.shape[-1])
