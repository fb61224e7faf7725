"""Adapter for ``transformers``' ``BeitForImageClassification``.

Pre-norm blocks over ``[CLS, patches]`` with split q/k/v (``k_proj`` without a
bias), a relative position bias (per layer, shared, or none) that the layer
passes to its attention as ``attention_mask`` — recorded with the attention's
keyword arguments and added to the logits in the LRP pass (its share of the
relevance dropped, the documented leak) —, LayerScale ``lambda_1``/``lambda_2``
(plain parameters: the residual rule reads the scaled branch from the block's
recorded streams) and a read-out that averages the patch tokens and
normalises them (``use_mean_pooling``, the default) or takes the CLS token.
"""

from __future__ import annotations

import torch
from torch import nn

from ...errors import UnsupportedModelError
from ..adapter import StageInfo
from ..hf_common import TINY_BLOCKS, TINY_IMAGE, HFAdapter, HFClass, mlp_part, split_attention
from ..parts import BlockPart, Readout
from ..registry import register_adapter


def _bias_from_kwargs(ctx: dict) -> torch.Tensor | None:
    """The position bias the layer handed its attention: ``attention_mask`` (1, heads, N, N)."""
    mask = ctx.get("attention_mask")
    return None if mask is None else mask[0]


@register_adapter
class HFBeitAdapter(HFAdapter):
    """``transformers`` BEiT image classifiers."""

    family = "hf_beit"
    classes = (HFClass("BeitForImageClassification", "BeitConfig",
                       dict(use_relative_position_bias=True, **TINY_BLOCKS, **TINY_IMAGE)),)

    def __init__(self, model: nn.Module):
        super().__init__(model)
        name = type(model).__name__
        beit = model.beit
        if not isinstance(model.classifier, nn.Linear):
            raise UnsupportedModelError(f"{name} has no classifier head (num_labels=0).")
        parts = []
        for i, layer in enumerate(beit.layers):
            where = f"{name} layer {i}"
            attn = split_attention(layer.attention, where)
            attn.position_bias = _bias_from_kwargs
            parts.append(BlockPart(module=layer, norm1=layer.layernorm_before, attn=attn,
                                   norm2=layer.layernorm_after, mlp=mlp_part(layer.mlp, where)))
        if not parts:
            raise UnsupportedModelError(f"{name} has no transformer layers.")
        pooler = beit.pooler
        self.final = beit.layernorm
        if pooler is not None and pooler.layernorm is not None:
            self.head = Readout("avg", model.classifier, fc_norm=pooler.layernorm, start=1)
        else:
            self.head = Readout("cls", model.classifier)
        h, w = self.input_size
        p = int(model.config.patch_size)
        self.stages = [StageInfo(index=0, parts=parts, layers=list(range(len(parts))), grid=(h // p, w // p),
                                 stride=(p, p), num_heads=parts[0].attn.num_heads, num_prefix=1,
                                 prefix_kinds=["cls"])]
