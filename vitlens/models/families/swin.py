"""Adapter for timm ``SwinTransformer`` (v1): windows, shifted windows, patch merging."""

from __future__ import annotations

import importlib
from collections.abc import Callable

from torch import nn

from ...errors import UnsupportedModelError
from ..adapter import Adapter, StageInfo
from ..parts import BlockPart, MergePart, Readout
from ..registry import register_adapter, timm_class
from ..windows import WindowBlock, window_stages
from .vit import mlp_part, timm_attention, timm_qkv

is_swin = timm_class("swin_transformer", "SwinTransformer")


def swin_bias(attn: nn.Module):
    """Relative position bias plus the shift mask (passed as ``mask=``): (nW or 1, heads, N, N)."""

    def bias(ctx: dict):
        b = attn._get_rel_pos_bias()[0]  # (heads, N, N)
        mask = ctx.get("mask")  # (nW, N, N) or None
        return b.unsqueeze(0) if mask is None else b.unsqueeze(0) + mask.unsqueeze(1)

    return bias


def timm_window_stages(model: nn.Module, merging: type, norm_first: bool,
                       block: Callable[[nn.Module, str], BlockPart]) -> tuple[list[StageInfo], dict[int, MergePart]]:
    """The stages and patch mergings of a timm Swin (v1 or v2); ``block(module, where)`` describes a block.

    A stage's grid is its blocks' ``input_resolution``; its stride (input pixels per
    token) the patch size, doubled at each merging (a merged odd grid hangs over the
    image edge by one token). A grid that is not a multiple of the window is padded,
    as timm pads it (see :mod:`vitlens.models.windows`).
    """
    name = type(model).__name__
    merges: dict[int, MergePart] = {}
    stages = []
    sy, sx = (int(p) for p in model.patch_embed.patch_size)
    for s, stage in enumerate(model.layers):
        down = stage.downsample
        if isinstance(down, merging):
            merges[s] = MergePart(down, down.reduction, down.norm, norm_first=norm_first)
            sy, sx = 2 * sy, 2 * sx
        elif not isinstance(down, nn.Identity):
            raise UnsupportedModelError(f"{name}: stage {s} downsamples with {type(down).__name__}; "
                                        "vitlens explains timm's PatchMerging.")
        blocks = list(stage.blocks)
        grid = tuple(int(r) for r in blocks[0].input_resolution) if blocks else (0, 0)
        stages.append((blocks, grid, (sy, sx)))

    def describe(b: nn.Module, grid: tuple[int, int], where: str) -> WindowBlock:
        if getattr(b, "dynamic_mask", False):
            raise UnsupportedModelError(f"{where}: dynamic shift masks (dynamic_mask=True) are not supported.")
        return WindowBlock(block(b, where), tuple(int(w) for w in b.window_size),  # type: ignore[arg-type]
                           tuple(int(v) for v in b.shift_size))  # type: ignore[arg-type]

    return window_stages(name, stages, describe), merges


@register_adapter
class SwinAdapter(Adapter):
    """Tokens of a stage are its (rows × cols) grid in row-major order; no prefix tokens.

    Blocks hand tokens around as (B, H, W, C); :meth:`tokens` flattens them.
    The read-out is global average pooling over the last stage.
    """

    family = "swin"
    timm_modules = ("swin_transformer",)

    matches = staticmethod(is_swin)

    #: timm's patch merging normalises before its Linear in v1 (after it in v2)
    merge_norm_first = True

    def __init__(self, model: nn.Module):
        super().__init__(model)
        pool_type = getattr(getattr(model.head, "global_pool", None), "pool_type", "avg")
        if pool_type != "avg" or not isinstance(model.head.fc, nn.Linear):
            raise UnsupportedModelError(
                f"{type(model).__name__} has a {pool_type!r}-pooled head"
                f"{'' if isinstance(model.head.fc, nn.Linear) else ' without a Linear classifier'}; vitlens "
                "explains Swin models read out by global average pooling into class logits (timm's default, "
                "num_classes > 0)."
            )
        merging = importlib.import_module(f"timm.models.{self.timm_modules[0]}").PatchMerging
        self.stages, self._merges = timm_window_stages(model, merging, self.merge_norm_first, self._block)
        self.final = model.norm
        self.head = Readout("avg", model.head.fc, start=0)

    @staticmethod
    def _block(b: nn.Module, where: str) -> BlockPart:
        from timm.layers import Mlp
        from timm.models.swin_transformer import SwinTransformerBlock, WindowAttention

        if type(b) is not SwinTransformerBlock or type(b.attn) is not WindowAttention:
            raise UnsupportedModelError(f"{where} is a {type(b).__name__}; vitlens explains Swin v1 blocks "
                                        "(SwinTransformerBlock with WindowAttention).")
        if type(b.mlp) is not Mlp:
            raise UnsupportedModelError(f"{where} has a {type(b.mlp).__name__} MLP.")
        attn = b.attn
        part = timm_attention(attn, qkv=timm_qkv(attn), scale=float(attn.scale), position_bias=swin_bias(attn))
        return BlockPart(module=b, norm1=b.norm1, attn=part, norm2=b.norm2, mlp=mlp_part(b.mlp, where))

    def merges(self) -> dict[int, MergePart]:
        return dict(self._merges)
