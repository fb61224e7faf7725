"""Adapter for timm ``Eva``: EVA, EVA02, DINOv3, ``vit_*_rope_*``, PE-core and similar.

Rotary position embeddings on q and k (the model hands each block its rotary
table as ``rope=``; capture records it), fused or split q/k/v with separate
q/v biases, SwiGLU / GLU MLPs, an inner attention norm, LayerScale
(``gamma_1``/``gamma_2``), registers, post-norm blocks, CLS, average and
attention-pool read-outs.
"""

from __future__ import annotations

import torch
from torch import nn

from ...errors import UnsupportedModelError
from ..parts import AttentionPart, BlockPart, LinearPart, Readout
from ..registry import register_adapter, timm_class
from .vit import TokenGridAdapter, attention_pool_readout, mlp_part, require_linear_head, timm_attention, timm_qkv

is_eva = timm_class("eva", "Eva")


class _Gamma(nn.Module):
    """``gamma * x``: EVA's residual scale as a module (not installed in the model)."""

    def __init__(self, gamma: torch.Tensor):
        super().__init__()
        self.gamma = gamma

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gamma * x


def _rotary(attn: nn.Module):
    """Apply the recorded rotary table to the patch tokens of q and k, as EVA's attention does."""
    from timm.layers import apply_rot_embed_cat

    npt = int(getattr(attn, "num_prefix_tokens", 0))
    half = bool(getattr(attn, "rotate_half", False))

    def rotary(q: torch.Tensor, k: torch.Tensor, ctx: dict) -> tuple[torch.Tensor, torch.Tensor]:
        rope = ctx.get("rope")
        if rope is None:
            return q, k
        q = torch.cat([q[:, :, :npt], apply_rot_embed_cat(q[:, :, npt:], rope, half=half)], 2)
        k = torch.cat([k[:, :, :npt], apply_rot_embed_cat(k[:, :, npt:], rope, half=half)], 2)
        return q, k

    return rotary


def eva_attention(attn: nn.Module, where: str) -> AttentionPart:
    from timm.layers import AttentionRope
    from timm.models.eva import EvaAttention

    if type(attn) not in (EvaAttention, AttentionRope):
        raise UnsupportedModelError(f"{where} has {type(attn).__name__} attention; vitlens explains EvaAttention and AttentionRope.")
    if getattr(attn, "gate", None) is not None:
        raise UnsupportedModelError(f"{where} has gated attention (a sigmoid gate on the heads), which vitlens cannot explain.")
    if int(getattr(attn, "num_kv_heads", attn.num_heads)) != int(attn.num_heads):
        raise UnsupportedModelError(
            f"{where} uses grouped-query attention ({attn.num_kv_heads} key/value heads for {attn.num_heads} query "
            "heads), which vitlens cannot explain yet; vitlens explains models whose blocks all keep one key/value "
            "head per query head, e.g. vit_base_patch16_sapiens2 (Sapiens2 keeps full attention in its first and "
            "last 8 blocks, which is every block of the 0.1B model)."
        )
    if attn.qkv is not None:
        maps = dict(qkv=timm_qkv(attn))
    else:
        maps = dict(q=LinearPart(attn.q_proj), k=LinearPart(attn.k_proj), v=LinearPart(attn.v_proj))
    return timm_attention(
        attn,
        q_norm=attn.q_norm,
        k_norm=attn.k_norm,
        scale=float(attn.scale),
        rotary=_rotary(attn),
        inner_norm=attn.norm,
        **maps,
    )


@register_adapter
class EvaAdapter(TokenGridAdapter):
    """Token layout: ``num_prefix_tokens`` prefix tokens (CLS, registers), then the patch grid row-major."""

    family = "eva"
    timm_modules = ("eva",)
    matches = staticmethod(is_eva)

    @staticmethod
    def block_part(b: nn.Module, where: str) -> BlockPart:
        from timm.models.eva import EvaBlock, EvaBlockPostNorm

        if type(b) not in (EvaBlock, EvaBlockPostNorm):
            raise UnsupportedModelError(f"{where} is a {type(b).__name__}; vitlens explains EvaBlock and EvaBlockPostNorm.")
        gamma_1, gamma_2 = getattr(b, "gamma_1", None), getattr(b, "gamma_2", None)
        return BlockPart(
            module=b,
            norm1=b.norm1,
            attn=eva_attention(b.attn, where),
            norm2=b.norm2,
            mlp=mlp_part(b.mlp, where),
            post_norm=type(b) is EvaBlockPostNorm,
            ls1=None if gamma_1 is None else _Gamma(gamma_1),
            ls2=None if gamma_2 is None else _Gamma(gamma_2),
        )

    @staticmethod
    def _readout(model: nn.Module, num_prefix: int) -> Readout:
        name = type(model).__name__
        require_linear_head(model)
        if getattr(model, "attn_pool", None) is not None:
            return attention_pool_readout(model, model.attn_pool, 0)  # EVA pools over every token
        pool = model.global_pool
        if pool == "token":
            if num_prefix == 0:
                raise UnsupportedModelError(f"{name} reads out a CLS token but has none.")
            return Readout("cls", model.head, fc_norm=model.fc_norm)
        if pool == "avg":
            return Readout("avg", model.head, fc_norm=model.fc_norm, start=num_prefix)
        raise UnsupportedModelError(
            f"{name} pools its tokens with global_pool={pool!r}; vitlens explains CLS ('token'), "
            "average ('avg') and attention-pool ('map') read-outs, not max pooling."
        )
