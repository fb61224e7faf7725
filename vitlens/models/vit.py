"""Adapter for timm ``VisionTransformer`` (ViT, DeiT, distilled DeiT, registers)."""

from __future__ import annotations

from torch import nn

from ..errors import UnsupportedModelError
from .adapter import Adapter, StageInfo


def is_vit(model: nn.Module) -> bool:
    from timm.models.vision_transformer import VisionTransformer

    return isinstance(model, VisionTransformer)


class ViTAdapter(Adapter):
    """Token layout: ``num_prefix_tokens`` prefix tokens, then the patch grid row-major."""

    family = "vit"

    def __init__(self, model: nn.Module):
        super().__init__(model)
        from timm.layers import Attention, Mlp
        from timm.models.vision_transformer import Block

        name = type(model).__name__
        if getattr(model, "attn_pool", None) is not None:
            raise UnsupportedModelError(
                f"{name} pools with attention (global_pool='map'); vitlens explains ViTs "
                "read out by the CLS token or by average pooling. Create the model with "
                "global_pool='token' or 'avg'."
            )
        pool = getattr(model, "global_pool", "token")
        if pool not in ("token", "avg"):
            raise UnsupportedModelError(
                f"{name} uses global_pool={pool!r}; vitlens supports 'token' (CLS) and 'avg'."
            )
        for i, block in enumerate(model.blocks):
            if type(block) is not Block or type(block.attn) is not Attention:
                raise UnsupportedModelError(
                    f"{name}: block {i} is {type(block).__name__} with "
                    f"{type(getattr(block, 'attn', None)).__name__}; vitlens explains timm's "
                    "standard pre-norm Block with Attention (ViT, DeiT, registers)."
                )
            if getattr(block.attn, "gate", None) is not None:
                raise UnsupportedModelError(f"{name}: gated attention (block {i}) is not supported.")
            if type(block.mlp) is not Mlp:
                raise UnsupportedModelError(
                    f"{name}: block {i} has a {type(block.mlp).__name__} MLP; vitlens "
                    "supports timm's plain Mlp (fc1, activation, fc2)."
                )
        if len(model.blocks) == 0:
            raise UnsupportedModelError(f"{name} has no transformer blocks.")

        self.readout = "cls" if pool == "token" else "avg"
        if self.readout == "cls" and model.num_prefix_tokens == 0:
            raise UnsupportedModelError(f"{name} reads out a CLS token but has none.")
        kinds: list[str] = []
        if getattr(model, "cls_token", None) is not None:
            kinds.append("cls")
        if getattr(model, "dist_token", None) is not None:
            kinds.append("dist")
        kinds += ["register"] * (model.num_prefix_tokens - len(kinds))
        grid = tuple(int(g) for g in model.patch_embed.grid_size)
        blocks = list(model.blocks)
        self.stages = [
            StageInfo(
                index=0,
                blocks=blocks,
                layers=list(range(len(blocks))),
                grid=grid,  # type: ignore[arg-type]
                stride=self.patch_size,
                num_heads=blocks[0].attn.num_heads,
                num_prefix=model.num_prefix_tokens,
                prefix_kinds=kinds,
            )
        ]

    def feature_module(self) -> nn.Module:
        # with a CLS read-out the final norm's patch tokens get no gradient; the
        # last block's first LayerNorm output does (through its attention)
        return self.model.blocks[-1].norm1

    @property
    def distilled(self) -> bool:
        return getattr(self.model, "head_dist", None) is not None
