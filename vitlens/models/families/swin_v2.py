"""Adapter for timm ``SwinTransformerV2``: res-post-norm blocks, cosine attention with a
learned logit scale, continuous (MLP-generated) relative position bias, q/v biases outside
the qkv Linear, patch merging that normalises after its Linear.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ...errors import UnsupportedModelError
from ..adapter import Adapter
from ..parts import AttentionPart, BlockPart, LinearPart, MergePart, Readout
from ..registry import register_adapter, timm_class
from .swin import stage_strides, window_stage
from .vit import mlp_part

is_swin_v2 = timm_class("swin_transformer_v2", "SwinTransformerV2")


def _qkv_bias(attn: nn.Module):
    def bias() -> torch.Tensor:
        return torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))

    return bias


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
class SwinV2Adapter(Adapter):
    """Tokens of a stage are its (rows × cols) grid in row-major order; no prefix tokens.

    Blocks hand tokens around as (B, H, W, C); the read-out is global average pooling.
    """

    family = "swinv2"
    timm_modules = ("swin_transformer_v2",)

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return is_swin_v2(model)

    def __init__(self, model: nn.Module):
        super().__init__(model)
        from timm.models.swin_transformer_v2 import PatchMerging, SwinTransformerV2Block, WindowAttention

        name = type(model).__name__
        pool_type = getattr(getattr(model.head, "global_pool", None), "pool_type", "avg")
        if pool_type != "avg" or not isinstance(model.head.fc, nn.Linear):
            raise UnsupportedModelError(
                f"{name} has a {pool_type!r}-pooled head without a Linear classifier; vitlens explains "
                "SwinV2 read out by global average pooling into class logits (num_classes > 0)."
            )
        layer = 0
        strides = stage_strides(model)
        self._merges: dict[int, MergePart] = {}
        for s, stage in enumerate(model.layers):
            if isinstance(stage.downsample, PatchMerging):
                m = stage.downsample
                self._merges[s] = MergePart(m, m.reduction, m.norm, norm_first=False)
            elif not isinstance(stage.downsample, nn.Identity):
                raise UnsupportedModelError(
                    f"{name}: stage {s} downsamples with {type(stage.downsample).__name__}; "
                    "vitlens explains timm's PatchMerging."
                )
            blocks = list(stage.blocks)
            if not blocks:
                raise UnsupportedModelError(f"{name}: stage {s} has no blocks.")
            parts = []
            for b in blocks:
                if type(b) is not SwinTransformerV2Block or type(b.attn) is not WindowAttention:
                    raise UnsupportedModelError(
                        f"{name}: stage {s} has {type(b).__name__}; vitlens explains SwinTransformerV2Block "
                        "with its WindowAttention."
                    )
                if getattr(b, "dynamic_mask", False):
                    raise UnsupportedModelError(f"{name}: dynamic shift masks (dynamic_mask=True) are not supported.")
                a = b.attn
                attn = AttentionPart(
                    module=a,
                    probs=a.attn_drop,
                    num_heads=int(a.num_heads),
                    proj=LinearPart(a.proj),
                    qkv=LinearPart(a.qkv, extra_bias=_qkv_bias(a) if a.q_bias is not None else None),
                    logit_scale=_logit_scale(a),
                    position_bias=_position_bias(a),
                )
                parts.append(BlockPart(module=b, norm1=b.norm1, attn=attn, norm2=b.norm2,
                                       mlp=mlp_part(b.mlp, f"{name} stage {s}"), post_norm=True))
            self.stages.append(window_stage(s, blocks, parts, layer, strides[s]))
            layer += len(blocks)
        self.final = model.norm
        self.head = Readout("avg", model.head.fc, start=0)

    def merges(self) -> dict[int, MergePart]:
        return dict(self._merges)
