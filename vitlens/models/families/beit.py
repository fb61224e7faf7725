"""Adapter for timm ``Beit`` (BEiT, BEiT v2): relative position bias (per block or shared),
q/v biases outside the qkv Linear, LayerScale (``gamma_1``/``gamma_2``), SwiGLU, CLS or
average read-out.
"""

from __future__ import annotations

import torch
from torch import nn

from ...errors import UnsupportedModelError
from ..adapter import Adapter
from .eva import _Gamma, _qkv_bias
from ..parts import AttentionPart, BlockPart, LinearPart, Readout
from ..registry import register_adapter, timm_class
from .vit import mlp_part, require_linear_head, token_grid_stage

is_beit = timm_class("beit", "Beit")


def _position_bias(attn: nn.Module):
    """The block's relative position bias plus the model's shared one (``shared_rel_pos_bias=``)."""

    def bias(ctx: dict) -> torch.Tensor | None:
        out = None
        if getattr(attn, "relative_position_bias_table", None) is not None:
            out = attn._get_rel_pos_bias().reshape(attn.num_heads, *attn._get_rel_pos_bias().shape[-2:])
        shared = ctx.get("shared_rel_pos_bias")
        if shared is not None:
            out = shared if out is None else out + shared
        return out

    return bias


@register_adapter
class BeitAdapter(Adapter):
    """Token layout: the CLS token, then the patch grid row-major."""

    family = "beit"
    timm_modules = ("beit",)

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return is_beit(model)

    def __init__(self, model: nn.Module):
        from timm.models.beit import Attention, Block

        super().__init__(model)
        name = type(model).__name__
        if len(model.blocks) == 0:
            raise UnsupportedModelError(f"{name} has no transformer blocks.")
        parts = []
        for i, b in enumerate(model.blocks):
            where = f"{name} block {i}"
            if type(b) is not Block or type(b.attn) is not Attention:
                raise UnsupportedModelError(f"{where} is a {type(b).__name__}; vitlens explains BEiT's Block with its Attention.")
            a = b.attn
            extra = _qkv_bias(a) if getattr(a, "q_bias", None) is not None else None
            attn = AttentionPart(
                module=a,
                probs=a.attn_drop,
                num_heads=int(a.num_heads),
                proj=LinearPart(a.proj),
                qkv=LinearPart(a.qkv, extra_bias=extra),
                scale=float(a.scale),
                position_bias=_position_bias(a),
            )
            parts.append(BlockPart(
                module=b, norm1=b.norm1, attn=attn, norm2=b.norm2, mlp=mlp_part(b.mlp, where),
                ls1=None if b.gamma_1 is None else _Gamma(b.gamma_1),
                ls2=None if b.gamma_2 is None else _Gamma(b.gamma_2),
            ))
        require_linear_head(model)
        num_prefix = int(model.num_prefix_tokens)
        pool = model.global_pool
        if pool == "avg":
            self.head = Readout("avg", model.head, fc_norm=model.fc_norm, start=num_prefix)
        elif pool:
            self.head = Readout("cls", model.head, fc_norm=model.fc_norm)
        else:
            raise UnsupportedModelError(f"{name} has no pooling (global_pool=''), so no class logits to explain.")
        self.final = model.norm
        self.stages = [token_grid_stage(model, parts)]
