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
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from ...errors import UnsupportedModelError
from ..hf_common import HFAdapter, HFClass, mlp_part, split_attention
from ..parts import AttentionPart, BlockPart, LinearPart, MergePart, MlpPart, Readout
from ..registry import register_adapter
from ..windows import WindowBlock, padded_size, window_stages

#: a tiny Swin: 32 px in patches of 2, windows of 4, two stages of 2 blocks
_TINY = dict(image_size=32, patch_size=2, embed_dim=16, depths=[2, 2], num_heads=[2, 4], window_size=4)


@dataclass
class TokenMergePart(MergePart):
    """Patch merging whose input is ``(B, H·W, C)`` tokens of a ``grid`` (transformers' layout)."""

    grid: tuple[int, int] = (0, 0)

    def relevance(self, x: torch.Tensor, r_out: torch.Tensor) -> torch.Tensor:
        if x.ndim == 3:
            x = x.reshape(x.shape[0], *self.grid, x.shape[-1])
        return super().relevance(x, r_out)


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
    """``transformers`` Swin v1 image classifiers.

    The stages are built once for v1 and v2 (:func:`~vitlens.models.windows.window_stages`);
    a version says how one block is described (:meth:`_block`), where its body is and
    whether its patch merging normalises before its Linear.
    """

    family = "hf_swin"
    classes = (HFClass("SwinForImageClassification", "SwinConfig", dict(_TINY, mlp_ratio=2)),)
    body = "swin"
    merge_norm_first = True

    def __init__(self, model: nn.Module):
        super().__init__(model)
        name = type(model).__name__
        body = getattr(model, self.body)
        if not isinstance(model.classifier, nn.Linear):
            raise UnsupportedModelError(f"{name} has no classifier head (num_labels=0).")
        stages = list(body.encoder.layers)
        grids = stage_grids(body)
        self.stages = window_stages(name, [(stage.blocks, *grids[s]) for s, stage in enumerate(stages)], self._block,
                                    pad_first=True)
        self._merges: dict[int, MergePart] = {}
        for s, stage in enumerate(stages[:-1]):
            down = stage.downsample
            if down is not None:  # merges at the end of stage s: vitlens' (timm's) start of stage s + 1
                self._merges[s + 1] = TokenMergePart(down, down.reduction, down.norm,  # an odd grid is padded first
                                                      norm_first=self.merge_norm_first, grid=grids[s][0])
        self.final = body.layernorm
        self.head = Readout("avg", model.classifier, start=0)

    @staticmethod
    def _block(layer: nn.Module, grid: tuple[int, int], where: str) -> WindowBlock:
        window, shift = int(layer.window_size), int(layer.shift_size)
        if min(grid) <= window:  # what SwinLayer.set_shift_and_window_size makes of the window at this grid
            window, shift = min(grid), 0
        if window != int(layer.attention.relative_position_bias.window_size[0]):
            raise UnsupportedModelError(f"{where}: its window shrinks below the position-bias table.")
        attn = split_attention(layer.attention, where)
        attn.position_bias = _bias(layer, padded_size(grid, (window, window)))
        part = BlockPart(module=layer, norm1=layer.layernorm_before, attn=attn, norm2=layer.layernorm_after,
                         mlp=mlp_part(layer.mlp, where))
        return WindowBlock(part, (window, window), (shift, shift))

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
    classes = (HFClass("Swinv2ForImageClassification", "Swinv2Config", dict(_TINY, mlp_ratio=2.0)),)
    body = "swinv2"
    merge_norm_first = False

    @staticmethod
    def _block(layer: nn.Module, grid: tuple[int, int], where: str) -> WindowBlock:
        window, shift = int(layer.window_size), int(layer.shift_size)  # fixed at build time in v2
        sa = layer.attention.self
        attn = AttentionPart(
            module=layer.attention, probs=sa.dropout, num_heads=int(sa.num_attention_heads),
            proj=LinearPart(layer.attention.output.dense), q=LinearPart(sa.query), k=LinearPart(sa.key),
            v=LinearPart(sa.value), logit_scale=_v2_logit_scale(sa),
            position_bias=_v2_bias(layer, padded_size(grid, (window, window))),
        )
        mlp = MlpPart(layer.output, "plain", LinearPart(layer.output.dense), fc1=LinearPart(layer.intermediate.dense))
        part = _PostNormMlpBlock(module=layer, norm1=layer.layernorm_before, attn=attn, norm2=layer.layernorm_after,
                                 mlp=mlp, post_norm=True, mlp_in=layer.intermediate)
        return WindowBlock(part, (window, window), (shift, shift))

    def explicit_attention(self) -> AbstractContextManager[None]:
        return nullcontext()  # always explicit
