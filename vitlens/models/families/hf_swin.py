"""Adapters for ``transformers``' ``SwinForImageClassification`` and ``Swinv2ForImageClassification``.

The same computation as timm's Swin in other names: stages of pre-norm window
blocks (``layernorm_before``, window attention with a relative position bias
and, every second block, a cyclic shift with its mask; ``layernorm_after``,
``mlp``) over ``(B, H·W, C)`` tokens, patch merging at the *end* of a stage
(timm: at the start of the next), a final LayerNorm and an average-pooled
classifier. Windows, shifts and merges follow timm's conventions (the same
window partition, ``roll(-shift)``, parent order ``(0,0), (1,0), (0,1), (1,1)``),
so capture and the LRP walk treat both alike. A grid that is not a multiple of
its window is padded as transformers pads it: *before* the cyclic shift (timm:
after it; ``StageInfo.pad_first``). Stage grids are counted from the patch grid
through the mergings (an odd grid merges into its ceiling half), not read from
``input_resolution``, which transformers floors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..windows import padded_size
from ...errors import UnsupportedModelError
from ..adapter import StageInfo
from ..hf_common import HFAdapter, mlp_part, split_attention
from ..parts import BlockPart, MergePart, Readout
from ..registry import register_adapter


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


def stage_grids(body: nn.Module) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """Each stage's token grid and stride (input pixels per token): the patch grid and
    patch size, then ⌈grid / 2⌉ and twice the stride after each merging (what the forward
    pass computes; ``input_resolution`` floors an odd grid)."""
    grid = tuple(int(g) for g in body.embeddings.patch_grid)
    stride = tuple(int(p) for p in body.embeddings.patch_embeddings.patch_size)
    out = []
    for stage in body.encoder.layers:
        out.append((grid, stride))
        if stage.downsample is not None:
            grid = (-(-grid[0] // 2), -(-grid[1] // 2))
            stride = (2 * stride[0], 2 * stride[1])
    return out  # type: ignore[return-value]


def _bias(layer: nn.Module, grid: tuple[int, int]):
    """Relative position bias (+ shift mask) the layer adds to its logits: (nW or 1, heads, N, N).

    ``grid``: the stage grid padded to whole windows (transformers builds its mask there)."""

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
        layer_index, self.stages, self._merges = 0, [], {}
        stages = list(swin.encoder.layers)
        grids = stage_grids(swin)
        for s, stage in enumerate(stages):
            blocks = list(stage.blocks)
            if not blocks:
                raise UnsupportedModelError(f"{name}: stage {s} has no blocks.")
            grid, stride = grids[s]
            parts, shifts, window = [], [], None
            for b, layer in enumerate(blocks):
                where = f"{name} stage {s} block {b}"
                ws, shift = _window_and_shift(layer, grid)  # type: ignore[arg-type]
                if window is not None and window != (ws, ws):
                    raise UnsupportedModelError(f"{where}: its window differs from the stage's first block's.")
                if ws != int(layer.attention.relative_position_bias.window_size[0]):
                    raise UnsupportedModelError(f"{where}: its window shrinks below the position-bias table.")
                window = (ws, ws)
                shifts.append((shift, shift))
                attn = split_attention(layer.attention, where)
                attn.position_bias = _bias(layer, padded_size(grid, (ws, ws)))  # type: ignore[arg-type]
                parts.append(BlockPart(module=layer, norm1=layer.layernorm_before, attn=attn,
                                       norm2=layer.layernorm_after, mlp=mlp_part(layer.mlp, where)))
            self.stages.append(StageInfo(
                index=s, parts=parts, layers=list(range(layer_index, layer_index + len(parts))),
                grid=grid, stride=stride, num_heads=parts[0].attn.num_heads,
                window=window, shifts=shifts, pad_first=True,
            ))
            layer_index += len(parts)
            down = stage.downsample
            if down is not None and s + 1 < len(stages):  # an odd grid is padded by one row/column first
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


# -- Swin v2 ---------------------------------------------------------------------------------------
@dataclass
class _PostNormMlpBlock(BlockPart):
    """A res-post-norm block whose MLP is two modules (``intermediate``, ``output``): the stream
    entering the MLP branch is the first one's input; the MLP output is the second one's output."""

    mlp_in: nn.Module | None = None

    @property
    def mid(self) -> nn.Module:
        return self.mlp_in if self.mlp_in is not None else super().mid


def _v2_logit_scale(attn: nn.Module):
    def scale() -> torch.Tensor:  # (heads, 1, 1), clamped as the model does
        return torch.clamp(attn.logit_scale, max=math.log(1.0 / 0.01)).exp()

    return scale


def _v2_bias(layer: nn.Module, grid: tuple[int, int]):
    """16·sigmoid(cpb) position bias, plus the shift mask (which transformers' Swinv2 adds twice)."""
    attn = layer.attention.self

    def bias(ctx: dict) -> torch.Tensor:
        table = attn.continuous_position_bias_mlp(attn.relative_coords_table).view(-1, attn.num_attention_heads)
        n = attn.window_size[0] * attn.window_size[1]
        rel = table[attn.relative_position_index.view(-1)].view(n, n, -1).permute(2, 0, 1)
        rel = 16 * torch.sigmoid(rel)
        mask = layer.get_attn_mask(grid[0], grid[1], dtype=rel.dtype, device=rel.device)
        return rel.unsqueeze(0) if mask is None else rel.unsqueeze(0) + 2 * mask.unsqueeze(1)

    return bias


@register_adapter
class HFSwinv2Adapter(HFSwinAdapter):
    """``transformers`` Swin v2: res-post-norm blocks, cosine attention, continuous position bias,
    patch merging that normalises after its Linear.

    transformers' Swinv2 computes its attention explicitly (no attention interface): the
    probabilities are the output of its attention dropout module.
    """

    family = "hf_swinv2"
    classes = ("Swinv2ForImageClassification",)

    def __init__(self, model: nn.Module):
        HFAdapter.__init__(self, model)
        from ..parts import AttentionPart, LinearPart, MlpPart

        name = type(model).__name__
        body = model.swinv2
        if not isinstance(model.classifier, nn.Linear):
            raise UnsupportedModelError(f"{name} has no classifier head (num_labels=0).")
        layer_index, self.stages, self._merges = 0, [], {}
        stages = list(body.encoder.layers)
        grids = stage_grids(body)
        for s, stage in enumerate(stages):
            blocks = list(stage.blocks)
            grid, stride = grids[s]
            parts, shifts = [], []
            for b, layer in enumerate(blocks):
                where = f"{name} stage {s} block {b}"
                ws, shift = int(layer.window_size), int(layer.shift_size)  # fixed at build time in v2
                if ws != int(blocks[0].window_size):
                    raise UnsupportedModelError(f"{where}: its window differs from the stage's first block's.")
                sa = layer.attention.self
                attn = AttentionPart(
                    module=layer.attention, probs=sa.dropout, num_heads=int(sa.num_attention_heads),
                    proj=LinearPart(layer.attention.output.dense), q=LinearPart(sa.query), k=LinearPart(sa.key),
                    v=LinearPart(sa.value), logit_scale=_v2_logit_scale(sa),
                    position_bias=_v2_bias(layer, padded_size(grid, (ws, ws))),  # type: ignore[arg-type]
                )
                mlp = MlpPart(layer.output, "plain", LinearPart(layer.output.dense),
                              fc1=LinearPart(layer.intermediate.dense))
                parts.append(_PostNormMlpBlock(module=layer, norm1=layer.layernorm_before, attn=attn,
                                               norm2=layer.layernorm_after, mlp=mlp, post_norm=True,
                                               mlp_in=layer.intermediate))
                shifts.append((shift, shift))
            self.stages.append(StageInfo(
                index=s, parts=parts, layers=list(range(layer_index, layer_index + len(parts))),
                grid=grid, stride=stride, num_heads=parts[0].attn.num_heads,
                window=(int(blocks[0].window_size),) * 2, shifts=shifts, pad_first=True,  # type: ignore[arg-type]
            ))
            layer_index += len(parts)
            down = stage.downsample
            if down is not None and s + 1 < len(stages):  # an odd grid is padded by one row/column first
                self._merges[s + 1] = TokenMergePart(down, down.reduction, down.norm, norm_first=False,
                                                      grid=grid)  # type: ignore[arg-type]
        self.final = body.layernorm
        self.head = Readout("avg", model.classifier, start=0)

    def explicit_attention(self):
        from contextlib import nullcontext

        return nullcontext()  # always explicit
