"""Adapter for ``transformers``' ``SiglipModel``: image–text similarity with an attention-pool head.

SigLIP's vision tower is a pre-norm ViT over patch tokens only (no CLS), a
final ``post_layernorm`` and a multi-head attention pool
(``SiglipMultiheadAttentionPoolingHead``: a learned probe attends over the
tokens with ``nn.MultiheadAttention``, then a residual MLP). The logit of prompt
``j`` is the model's own ``logits_per_image[:, j]``:

    ``s_j = exp(logit_scale) · ⟨e / ‖e‖, t̂_j⟩ + logit_bias``,  ``e = pool(post_layernorm(x))``

Read-out ``"map"``: the read-out row is the probe's attention over the tokens
(mean over heads), as for timm's attention-pool heads.

LRP rule of the pool (:class:`ProbePoolReadout`), as for timm's ``map`` head:
αβ through the similarity head ``exp(logit_scale)·t̂`` (the bias takes none;
``1/‖e‖`` passes relevance on); the residual MLP by ``residual_add`` and αβ;
``out_proj`` by αβ; ``o = Σ_j a_j v_j`` by LRP-0 with the attention held fixed
(the probe is a parameter: all of ``o``'s relevance goes to the values); αβ
through the value projection.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import OptionError, UnsupportedModelError
from ..hf_common import TINY_BLOCKS, TINY_IMAGE, HFClass
from ..lrp_rules import linear_alphabeta, residual_add, safe_div
from ..parts import LinearPart, MlpPart, Readout
from ..registry import register_adapter
from .hf_clip import TINY_TEXT, ImageTextAdapter, TowerBackbone


@dataclass
class ProbePoolReadout(Readout):
    """``head(pool(tokens))`` with SigLIP's probe attention pool as ``pool``."""

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        b, n, c = t.shape
        h = self.pool.attention.num_heads
        return t.reshape(b, n, h, c // h).transpose(1, 2)

    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mha = self.pool.attention
        c = x.shape[-1]
        w, b = mha.in_proj_weight, mha.in_proj_bias
        bias = (None, None, None) if b is None else (b[:c], b[c:2 * c], b[2 * c:])
        probe = self.pool.probe.expand(x.shape[0], -1, -1)
        q = F.linear(probe, w[:c], bias[0])
        k = F.linear(x, w[c:2 * c], bias[1])
        v = F.linear(x, w[2 * c:], bias[2])
        return self._heads(q), self._heads(k), self._heads(v)

    def _attention(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        return ((q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)).softmax(-1)  # (B, heads, 1, N)

    def pool_weights(self, tokens: torch.Tensor) -> torch.Tensor:
        """Each token's weight in the pooled vector, mean over heads, (B, N)."""
        q, k, _ = self._qkv(tokens)
        return self._attention(q, k).mean((1, 2))

    def relevance(self, tokens: torch.Tensor, onehot: torch.Tensor) -> torch.Tensor:
        p, mha = self.pool, self.pool.attention
        q, k, v = self._qkv(tokens)
        a = self._attention(q, k)
        av = a @ v  # (B, heads, 1, hd)
        b, _, _, hd = av.shape
        o = av.transpose(1, 2).reshape(b, 1, -1)
        y = mha.out_proj(o)
        hidden = p.layernorm(y)
        f = p.mlp(hidden)
        pooled = (y + f)[:, 0]
        r_top = torch.zeros_like(y)
        r_top[:, 0] = self.head_relevance(pooled, onehot)
        r_y, r_f = residual_add(y, f, r_top)
        mlp = MlpPart(p.mlp, "plain", LinearPart(p.mlp.fc2), fc1=LinearPart(p.mlp.fc1))
        r_y = r_y.add_(mlp.relevance(hidden, r_f, {"fc2": (p.mlp.activation_fn(p.mlp.fc1(hidden)), f)}))
        r_o = linear_alphabeta(o, mha.out_proj.weight, r_y)  # (B, 1, C)
        s = safe_div(self._heads(r_o), av)  # (B, heads, 1, hd)
        r_v = v * (a.transpose(-2, -1) @ s)  # (B, heads, N, hd): o = a·v with a held fixed
        r_v = r_v.transpose(1, 2).reshape(tokens.shape)
        c = tokens.shape[-1]
        return linear_alphabeta(tokens, mha.in_proj_weight[2 * c:], r_v)


@dataclass(frozen=True, eq=False)
class SiglipVisionBackbone(TowerBackbone):
    """``SiglipVisionModel``: patch tokens only; ``"pooler"`` is its attention-pool head."""

    def num_prefix(self, backbone: nn.Module) -> int:
        return 0

    def check(self, backbone: nn.Module, pool: str) -> None:
        if pool == "pooler" and not getattr(backbone, "use_head", False):
            raise OptionError("vl.with_head: this SiglipVisionModel has no attention-pool head "
                              "(vision_use_head=False); use pool='mean'.")

    def readout(self, backbone: nn.Module, pool: str, head: nn.Module,
                rule: Callable[[Sequence[nn.Module]], Callable], num_prefix: int) -> tuple[nn.Module, Readout]:
        if pool == "pooler":
            return backbone.post_layernorm, ProbePoolReadout("map", head, start=0, pool=backbone.head,
                                                             head_rule=rule([]))
        return backbone.post_layernorm, Readout("avg", head, start=0, head_rule=rule([]))


_TINY_VISION = {**TINY_BLOCKS, **TINY_IMAGE}


@register_adapter
class HFSiglipAdapter(ImageTextAdapter):
    """``SiglipModel``: the vision tower (attention-pool head) explained against text prompts."""

    family = "hf_siglip"
    classes = (HFClass("SiglipModel", "SiglipConfig", dict(text_config=TINY_TEXT, vision_config=_TINY_VISION)),)
    backbones = (SiglipVisionBackbone("SiglipVisionModel", "SiglipVisionConfig", _TINY_VISION,
                                      pools=("pooler", "mean")),)

    def __init__(self, model: nn.Module):
        super().__init__(model)
        self.vision_config = model.config.vision_config
        vision = model.vision_model
        if not getattr(vision, "use_head", False) or type(vision.head).__name__ != "SiglipMultiheadAttentionPoolingHead":
            raise UnsupportedModelError(
                f"{type(model).__name__}: vitlens explains SigLIP's vision tower read out by its attention-pool "
                "head (vision_use_head=True, as in every pretrained SigLIP)."
            )
        mha = vision.head.attention
        if not mha._qkv_same_embed_dim or mha.bias_k is not None or mha.dropout:
            raise UnsupportedModelError(f"{type(model).__name__}: an attention pool with separate k/v sizes, "
                                        "k/v biases or dropout is not supported.")
        self._tower(vision, num_prefix=0)
        self.final = vision.post_layernorm

    def _readout(self, text_embeds: torch.Tensor) -> Readout:
        head = self._similarity_head(text_embeds, None)
        return ProbePoolReadout("map", head, start=0, pool=self.model.vision_model.head,
                                embed_norm=lambda z: z.norm(dim=-1, keepdim=True))

    def logit_bias(self) -> torch.Tensor:
        return self.model.logit_bias
