"""Adapter for timm ``VisionTransformer``: ViT, DeiT (distilled), registers, LayerScale,
qk-norm, GLU/SwiGLU MLPs, res-post-norm blocks, fc_norm, attention-pool (``map``) heads,
average read-outs with or without prefix tokens, hybrid (CNN-stem) patch embeddings.
"""

from __future__ import annotations

import torch
from torch import nn

from ...errors import UnsupportedModelError
from ..adapter import Adapter, StageInfo
from ..parts import AttentionPart, BlockPart, LinearPart, MlpPart, Readout
from ..registry import register_adapter, register_refusal, timm_class

is_vit = timm_class("vision_transformer", "VisionTransformer")


def mlp_part(mlp: nn.Module, where: str) -> MlpPart:
    """timm's ``Mlp``, ``GluMlp`` (``SwiGLUPacked``) or ``SwiGLU`` as an :class:`MlpPart`."""
    from timm.layers import GluMlp, Mlp, SwiGLU

    kind = type(mlp)
    if kind is Mlp:  # eval: fc2's input is norm(act(fc1 output)) (dropout off), cheap to rebuild
        return MlpPart(mlp, "plain", LinearPart(mlp.fc2), fc1=LinearPart(mlp.fc1),
                       hidden=lambda h: mlp.norm(mlp.act(h)))
    if kind is GluMlp:
        if getattr(mlp, "chunk_dim", -1) != -1:
            raise UnsupportedModelError(f"{where}: a GluMlp gated along dim {mlp.chunk_dim} is not supported.")
        return MlpPart(mlp, "glu", LinearPart(mlp.fc2), fc1=LinearPart(mlp.fc1), gate_last=bool(mlp.gate_last),
                       hidden=lambda h: mlp.norm(_glu(h, mlp.act, bool(mlp.gate_last))))
    if kind is SwiGLU:  # eval: fc2's input is norm(act(fc1_g output) · fc1_x output), cheap to rebuild
        return MlpPart(mlp, "swiglu", LinearPart(mlp.fc2), fc1_g=LinearPart(mlp.fc1_g), fc1_x=LinearPart(mlp.fc1_x),
                       hidden=lambda g, x: mlp.norm(mlp.act(g) * x))
    raise UnsupportedModelError(
        f"{where} has a {type(mlp).__name__} MLP; vitlens explains timm's Mlp, GluMlp/SwiGLUPacked and SwiGLU."
    )


def timm_attention(attn: nn.Module, **terms: object) -> AttentionPart:
    """A timm attention module as an :class:`AttentionPart`: its probabilities at ``attn_drop``,
    ``num_heads`` heads, output ``proj``; ``terms`` are the family's own (q/k/v maps, norms,
    scale, position terms), as :class:`AttentionPart` names them."""
    return AttentionPart(module=attn, probs=attn.attn_drop, num_heads=int(attn.num_heads),
                         proj=LinearPart(attn.proj), **terms)  # type: ignore[arg-type]


def timm_qkv(attn: nn.Module) -> LinearPart:
    """timm's fused ``qkv`` Linear, with the q/k/v biases that Eva, Beit and Swin v2 keep outside
    it (``q_bias``, ``k_bias`` (zeros), ``v_bias``) where the module has them."""
    if getattr(attn, "q_bias", None) is None:
        return LinearPart(attn.qkv)

    def bias() -> torch.Tensor:
        return torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))

    return LinearPart(attn.qkv, extra_bias=bias)


def _glu(h: torch.Tensor, act: nn.Module, gate_last: bool) -> torch.Tensor:
    """timm's ``GluMlp`` gate on ``fc1``'s output ``h``: ``x1·act(x2)`` if ``gate_last``, else ``act(x1)·x2``."""
    x1, x2 = h.chunk(2, dim=-1)
    return x1 * act(x2) if gate_last else act(x1) * x2


def residual_scale(module: nn.Module | None) -> nn.Module | None:
    return None if module is None or isinstance(module, nn.Identity) else module


def vit_block_part(block: nn.Module, where: str) -> BlockPart:
    """timm ``Block`` or ``ResPostBlock`` with ``Attention`` as a :class:`BlockPart`."""
    from timm.layers import Attention
    from timm.models.vision_transformer import Block, ResPostBlock

    if type(block) not in (Block, ResPostBlock):
        raise UnsupportedModelError(
            f"{where} is a {type(block).__name__} (parallel attention and MLP branches); vitlens explains "
            "timm's Block (pre-norm) and ResPostBlock (res-post-norm). Supported models of a similar "
            "size: vit_small_patch16_224, vit_base_patch16_224, vit_large_patch16_224."
        )
    attn = block.attn
    if type(attn) is not Attention:
        raise UnsupportedModelError(
            f"{where} has {type(attn).__name__} attention (differential or other non-softmax-probability "
            "attention); vitlens explains timm's Attention. Supported models of a similar kind: "
            "vit_wee_patch16_reg1_gap_256, vit_little_patch16_reg1_gap_256 (the same models with softmax attention)."
        )
    if getattr(attn, "gate", None) is not None:
        raise UnsupportedModelError(f"{where} has gated attention (a sigmoid gate on the heads), which vitlens cannot explain.")
    part = timm_attention(
        attn,
        qkv=LinearPart(attn.qkv),
        q_norm=attn.q_norm,
        k_norm=attn.k_norm,
        scale=float(attn.scale),
        inner_norm=getattr(attn, "norm", nn.Identity()),
    )
    return BlockPart(
        module=block,
        norm1=block.norm1,
        attn=part,
        norm2=block.norm2,
        mlp=mlp_part(block.mlp, where),
        post_norm=type(block) is ResPostBlock,
        ls1=residual_scale(getattr(block, "ls1", None)),
        ls2=residual_scale(getattr(block, "ls2", None)),
    )


def prefix_kinds(model: nn.Module, num_prefix: int) -> list[str]:
    kinds: list[str] = []
    if getattr(model, "cls_token", None) is not None:
        kinds.append("cls")
    if getattr(model, "dist_token", None) is not None:
        kinds.append("dist")
    return kinds + ["register"] * (num_prefix - len(kinds))


def token_grid_stage(model: nn.Module, parts: list[BlockPart]) -> StageInfo:
    """The one stage of a plain-grid model (timm ViT, Eva, Beit): its prefix tokens, then
    ``patch_embed``'s grid row-major, at the real pixel stride."""
    num_prefix = int(model.num_prefix_tokens)
    grid = tuple(int(g) for g in model.patch_embed.grid_size)
    return StageInfo(
        index=0,
        parts=parts,
        layers=list(range(len(parts))),
        grid=grid,  # type: ignore[arg-type]
        stride=token_stride(model, grid),  # type: ignore[arg-type]
        num_heads=parts[0].attn.num_heads,
        num_prefix=num_prefix,
        prefix_kinds=prefix_kinds(model, num_prefix),
    )


def require_linear_head(model: nn.Module) -> None:
    """Refuse a timm model without a Linear classifier: no class logits to explain."""
    if not isinstance(model.head, nn.Linear):
        raise UnsupportedModelError(
            f"{type(model).__name__} has no classifier head (num_classes=0, its head is "
            f"{type(model.head).__name__}), so it has no class logits to explain."
        )


def token_stride(model: nn.Module, grid: tuple[int, int]) -> tuple[int, int]:
    """Input pixels per token along (y, x): the patch size, times the CNN stem's reduction for
    hybrid embeddings (``HybridEmbed``: a ResNet stem, then patches on its feature map)."""
    embed = model.patch_embed
    if hasattr(embed, "feat_ratio"):
        ratio = embed.feat_ratio(as_scalar=False)
        return (int(ratio[0]), int(ratio[1]))
    p = embed.patch_size
    return (int(p[0]), int(p[1]))


def attention_pool_readout(model: nn.Module, pool: nn.Module, start: int) -> Readout:
    from timm.layers import AttentionPoolLatent, Mlp

    name = type(model).__name__
    if type(pool) is not AttentionPoolLatent:
        raise UnsupportedModelError(
            f"{name} pools with {type(pool).__name__}; vitlens explains timm's AttentionPoolLatent "
            "(global_pool='map', e.g. SigLIP), CLS and average read-outs."
        )
    if pool.mlp is not None and type(pool.mlp) is not Mlp:
        raise UnsupportedModelError(f"{name}: its attention pool has a {type(pool.mlp).__name__} MLP.")
    if pool.pool not in ("token", "avg"):
        raise UnsupportedModelError(f"{name}: its attention pool keeps {pool.latent_len} latents unpooled.")
    return Readout("map", model.head, fc_norm=model.fc_norm, start=start, pool=pool)


class TokenGridAdapter(Adapter):
    """A timm model of one plain token grid (ViT, Eva, Beit): ``model.blocks`` in order, each
    described by :meth:`block_part`, then ``model.norm`` and the read-out :meth:`_readout`.

    Subclasses give the two (and :meth:`matches`); the stage is :func:`token_grid_stage`.
    """

    def __init__(self, model: nn.Module):
        super().__init__(model)
        name = type(model).__name__
        if len(model.blocks) == 0:
            raise UnsupportedModelError(f"{name} has no transformer blocks.")
        parts = [self.block_part(b, f"{name} block {i}") for i, b in enumerate(model.blocks)]
        self.final = model.norm
        self.head = self._readout(model, int(model.num_prefix_tokens))
        self.stages = [token_grid_stage(model, parts)]

    @staticmethod
    def block_part(block: nn.Module, where: str) -> BlockPart:
        """Block ``block`` (named ``where`` in messages) as a :class:`BlockPart`, or a refusal."""
        raise NotImplementedError

    @staticmethod
    def _readout(model: nn.Module, num_prefix: int) -> Readout:
        raise NotImplementedError


@register_adapter
class ViTAdapter(TokenGridAdapter):
    """Token layout: ``num_prefix_tokens`` prefix tokens, then the patch grid row-major."""

    family = "vit"
    timm_modules = ("vision_transformer", "vision_transformer_hybrid", "deit")
    matches = staticmethod(is_vit)

    @staticmethod
    def block_part(block: nn.Module, where: str) -> BlockPart:
        return vit_block_part(block, where)

    @staticmethod
    def _readout(model: nn.Module, num_prefix: int) -> Readout:
        name = type(model).__name__
        require_linear_head(model)
        head = model.head
        pool = getattr(model, "global_pool", "token")
        with_prefix = bool(getattr(model, "pool_include_prefix", False))
        if getattr(model, "attn_pool", None) is not None:
            return attention_pool_readout(model, model.attn_pool, 0 if with_prefix else num_prefix)
        if pool == "token":
            if num_prefix == 0:
                raise UnsupportedModelError(f"{name} reads out a CLS token but has none.")
            dist = getattr(model, "head_dist", None)
            return Readout("cls", head, fc_norm=model.fc_norm, head_dist=dist)
        if pool == "avg":
            kind = "avg_with_prefix" if with_prefix and num_prefix else "avg"
            return Readout(kind, head, fc_norm=model.fc_norm, start=num_prefix)
        raise UnsupportedModelError(
            f"{name} pools its tokens with global_pool={pool!r}; vitlens explains CLS ('token'), "
            "average ('avg') and attention-pool ('map') read-outs, not max pooling."
        )

    @property
    def distilled(self) -> bool:
        return getattr(self.model, "head_dist", None) is not None


register_refusal(
    timm_class("cait", "Cait"),
    "CaiT's class-attention blocks (ClassAttn, the CLS token joins after the patch blocks) and talking-heads attention",
    "deit3_* (ViT with LayerScale) or eva02_* models",
)
register_refusal(
    timm_class("xcit", "Xcit"),
    "XCiT's cross-covariance attention (attention over channels, not tokens)",
    "vit_* or deit_* models",
)
