"""Adapter for timm ``SwinTransformerV2``: res-post-norm blocks, cosine attention with a
learned logit scale, continuous (MLP-generated) relative position bias, q/v biases outside
the qkv Linear, patch merging that normalises after its Linear.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ...errors import UnsupportedModelError
from ..parts import BlockPart
from ..registry import register_adapter, timm_class
from .swin import SwinAdapter
from .vit import mlp_part, timm_attention, timm_qkv

is_swin_v2 = timm_class("swin_transformer_v2", "SwinTransformerV2")


def _logit_scale(attn: nn.Module):
    def scale() -> torch.Tensor:  # (heads, 1, 1), clamped at 100 as SwinV2 does
        return torch.clamp(attn.logit_scale, max=math.log(1.0 / 0.01)).exp()

    return scale


def _position_bias(attn: nn.Module):
    """``16·sigmoid(cpb_mlp(coords))`` gathered per window position, plus the shift mask."""

    def bias(ctx: dict) -> torch.Tensor:
        n = attn.window_size[0] * attn.window_size[1]
        table = attn.cpb_mlp(attn.relative_coords_table).view(-1, attn.num_heads)
        b = table[attn.relative_position_index.view(-1)].view(n, n, -1).permute(2, 0, 1)
        b = 16 * torch.sigmoid(b)  # (heads, N, N)
        mask = ctx.get("mask")
        return b if mask is None else b.unsqueeze(0) + mask.unsqueeze(1)

    return bias


@register_adapter
class SwinV2Adapter(SwinAdapter):
    """Tokens of a stage are its (rows × cols) grid in row-major order; no prefix tokens.

    Blocks hand tokens around as (B, H, W, C); the read-out is global average pooling.
    Built as timm's Swin v1 (:class:`~vitlens.models.families.swin.SwinAdapter`), with v2's blocks.
    """

    family = "swinv2"
    timm_modules = ("swin_transformer_v2",)
    merge_norm_first = False

    matches = staticmethod(is_swin_v2)

    @staticmethod
    def _block(b: nn.Module, where: str) -> BlockPart:
        from timm.models.swin_transformer_v2 import SwinTransformerV2Block, WindowAttention

        if type(b) is not SwinTransformerV2Block or type(b.attn) is not WindowAttention:
            raise UnsupportedModelError(f"{where} is a {type(b).__name__}; vitlens explains SwinTransformerV2Block "
                                        "with its WindowAttention.")
        a = b.attn
        attn = timm_attention(a, qkv=timm_qkv(a), logit_scale=_logit_scale(a), position_bias=_position_bias(a))
        return BlockPart(module=b, norm1=b.norm1, attn=attn, norm2=b.norm2, mlp=mlp_part(b.mlp, where), post_norm=True)
