"""Adapter for timm ``Beit`` (BEiT, BEiT v2): relative position bias (per block or shared),
q/v biases outside the qkv Linear, LayerScale (``gamma_1``/``gamma_2``), SwiGLU, CLS or
average read-out.
"""

from __future__ import annotations

import torch
from torch import nn

from ...errors import UnsupportedModelError
from .eva import _Gamma
from ..parts import BlockPart, Readout
from ..registry import register_adapter, timm_class
from .vit import TokenGridAdapter, mlp_part, require_linear_head, timm_attention, timm_qkv

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
class BeitAdapter(TokenGridAdapter):
    """Token layout: the CLS token, then the patch grid row-major."""

    family = "beit"
    timm_modules = ("beit",)
    matches = staticmethod(is_beit)

    @staticmethod
    def block_part(b: nn.Module, where: str) -> BlockPart:
        from timm.models.beit import Attention, Block

        if type(b) is not Block or type(b.attn) is not Attention:
            raise UnsupportedModelError(f"{where} is a {type(b).__name__}; vitlens explains BEiT's Block with its Attention.")
        a = b.attn
        attn = timm_attention(a, qkv=timm_qkv(a), scale=float(a.scale), position_bias=_position_bias(a))
        return BlockPart(
            module=b, norm1=b.norm1, attn=attn, norm2=b.norm2, mlp=mlp_part(b.mlp, where),
            ls1=None if b.gamma_1 is None else _Gamma(b.gamma_1),
            ls2=None if b.gamma_2 is None else _Gamma(b.gamma_2),
        )

    @staticmethod
    def _readout(model: nn.Module, num_prefix: int) -> Readout:
        require_linear_head(model)
        pool = model.global_pool
        if pool == "avg":
            return Readout("avg", model.head, fc_norm=model.fc_norm, start=num_prefix)
        if pool:
            return Readout("cls", model.head, fc_norm=model.fc_norm)
        raise UnsupportedModelError(f"{type(model).__name__} has no pooling (global_pool=''), so no class logits "
                                    "to explain.")
