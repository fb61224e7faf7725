"""Adapter for ``transformers``' ``CLIPModel``: image–text similarity as the logits.

A capture of a CLIP model explains *why this image matches this prompt*: the
"classes" are text prompts (``vl.capture(model, images, text=[...])``, see
:mod:`vitlens.capture.text`), and the logit of prompt ``j`` is the model's own
``logits_per_image[:, j]``:

    ``s_j = exp(logit_scale) · ⟨e / ‖e‖, t_j / ‖t_j‖⟩``,  ``e = W_proj · post_layernorm(x_cls)``

with ``t_j`` the prompt's projected text embedding, computed once per capture
without gradients (the text tower is not explained). The vision tower is a
pre-norm ViT (``layer_norm1``, ``self_attn``, ``layer_norm2``, ``mlp``) over
``[CLS, patches]``, read out at the CLS token.

LRP: the similarity is linear in ``e / ‖e‖``; the read-out's Linear is
``W_j = exp(logit_scale) · t̂_j · W_proj``, applied to ``post_layernorm(x_cls)``
(αβ rule; the norms, including the per-image ``1/‖e‖`` — a positive factor
that scales every prompt's logit alike —, pass relevance on).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ...errors import OptionError, UnsupportedModelError
from ..adapter import StageInfo
from ..hf_common import TINY_BLOCKS, TINY_IMAGE, Backbone, HFAdapter, HFClass, mlp_part, split_attention
from ..parts import BlockPart, Readout
from ..registry import register_adapter

#: a tiny text tower for image-text models (token ids 3..99 are prompts in the coverage check)
TINY_TEXT = dict(vocab_size=100, max_position_embeddings=16, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                 **TINY_BLOCKS)


def _pooled(out: Any) -> torch.Tensor:
    """``get_*_features`` returns a tensor (transformers 4) or an output object (5)."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def tower_stage(vision: nn.Module, input_size: tuple[int, int], num_prefix: int, name: str) -> StageInfo:
    """The one stage of a CLIP/SigLIP vision tower (``layer_norm1``, ``self_attn``, ``layer_norm2``, ``mlp``)."""
    layers = list(vision.encoder.layers)
    if not layers:
        raise UnsupportedModelError(f"{name} has no vision layers.")
    parts = [
        BlockPart(module=layer, norm1=layer.layer_norm1,
                  attn=split_attention(layer.self_attn, f"{name} vision layer {i}", proj="out_proj"),
                  norm2=layer.layer_norm2, mlp=mlp_part(layer.mlp, f"{name} vision layer {i}"))
        for i, layer in enumerate(layers)
    ]
    h, w = input_size
    p = int(vision.config.patch_size)
    return StageInfo(index=0, parts=parts, layers=list(range(len(parts))), grid=(h // p, w // p),
                     stride=(p, p), num_heads=parts[0].attn.num_heads, num_prefix=num_prefix,
                     prefix_kinds=["cls"] * num_prefix)


@dataclass(frozen=True, eq=False)
class TowerBackbone(Backbone):
    """A CLIP or SigLIP vision tower alone (``CLIPVisionModel``, ``SiglipVisionModel``).

    Its attention modules are called with keywords only, so Grad-CAM's features of a
    CLS read-out are the last block's norm1 output."""

    keyword_attention: bool = True

    def stage(self, backbone: nn.Module, input_size: tuple[int, int], name: str) -> StageInfo:
        return tower_stage(backbone, input_size, self.num_prefix(backbone), name)


@dataclass(frozen=True, eq=False)
class CLIPVisionBackbone(TowerBackbone):
    """``CLIPVisionModel``: its pooled vector (``"cls"``) is ``post_layernorm`` of the CLS token."""

    def pooled(self, output: Any, pool: str, num_prefix: int) -> torch.Tensor:
        return output.pooler_output

    def readout(self, backbone: nn.Module, pool: str, head: nn.Module,
                rule: Callable[[Sequence[nn.Module]], Callable], num_prefix: int) -> tuple[nn.Module, Readout]:
        # the read-out takes the last layer's output tokens (post_layernorm acts on the CLS token only)
        return (backbone.encoder.layers[-1],
                Readout("cls", head, fc_norm=backbone.post_layernorm, head_rule=rule([])))


class ImageTextAdapter(HFAdapter):
    """Base of the image–text adapters: a pre-norm ViT vision tower scored against prompts.

    Subclasses build :attr:`stages` and :attr:`final`, and say how the pooled
    image embedding becomes the read-out (:meth:`_readout`) and how similarities
    are formed (:attr:`logit_bias`).
    """

    needs_text = True

    def _tower(self, vision: nn.Module, num_prefix: int) -> None:
        self.stages = [tower_stage(vision, self.input_size, num_prefix, type(self.model).__name__)]
        self.prompts: list[str] = []
        self.text_embeds: torch.Tensor | None = None
        self.input_ids: torch.Tensor | None = None

    # -- prompts --------------------------------------------------------------------------
    def bind_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                  prompts: list[str]) -> "ImageTextAdapter":
        """This adapter with the prompts as its classes (text embeddings computed once)."""
        model = self.model
        device = next(model.parameters()).device
        with torch.no_grad():
            t = _pooled(model.get_text_features(
                input_ids=input_ids.to(device),
                attention_mask=None if attention_mask is None else attention_mask.to(device)))
        t = t / t.norm(dim=-1, keepdim=True)
        self.text_embeds = t
        self.prompts = list(prompts)
        self.input_ids = input_ids.detach().cpu()
        self.head = self._readout(t)
        return self

    def _readout(self, text_embeds: torch.Tensor) -> Readout:
        raise NotImplementedError

    def _bound(self) -> torch.Tensor:
        if self.text_embeds is None:
            raise OptionError(
                f"{type(self.model).__name__} scores images against text: pass the prompts, e.g. "
                "vl.capture(model, images, text=['a photo of a dog', 'a photo of a cat'])."
            )
        return self.text_embeds

    @property
    def num_classes(self) -> int:
        return int(self._bound().shape[0])

    def class_names(self) -> list[str]:
        self._bound()
        return list(self.prompts)

    def logit_bias(self) -> torch.Tensor | float:
        return 0.0

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """``logits_per_image``: scaled cosine similarity of the image with every prompt."""
        t = self._bound()
        e = _pooled(self.model.get_image_features(pixel_values=x))
        e = e / e.norm(dim=-1, keepdim=True)
        return self.model.logit_scale.exp() * e @ t.T + self.logit_bias()

    def _similarity_head(self, text_embeds: torch.Tensor, projection: torch.Tensor | None) -> nn.Linear:
        """``W = exp(logit_scale) · t̂ (· W_proj)`` as a Linear (see the module docstring)."""
        weight = self.model.logit_scale.exp() * text_embeds
        if projection is not None:
            weight = weight @ projection
        head = nn.Linear(weight.shape[1], weight.shape[0], bias=False).to(weight.device, weight.dtype)
        with torch.no_grad():
            head.weight.copy_(weight)
        return head

    def features(self) -> tuple[nn.Module, str]:
        if self.readout == "cls":  # the last layer's attention input (called with keywords: norm1's output)
            return self.parts[-1].norm1, "output"
        return super().features()

    def describe(self) -> dict[str, Any]:
        self._bound()  # no prompts: the error that says to pass text= (before any read-out is described)
        # the token ids let a widget capture again for another prompt (JSON: attrs stay flat)
        ids = [] if self.input_ids is None else self.input_ids.tolist()
        return {**super().describe(), "text_input_ids": json.dumps(ids)}


@register_adapter
class HFCLIPAdapter(ImageTextAdapter):
    """``CLIPModel``: the vision tower explained against text prompts, read out at CLS."""

    family = "hf_clip"
    classes = (HFClass("CLIPModel", "CLIPConfig", dict(text_config=TINY_TEXT, vision_config={**TINY_BLOCKS, **TINY_IMAGE},
                                                       projection_dim=16)),)
    backbones = (CLIPVisionBackbone("CLIPVisionModel", "CLIPVisionConfig", {**TINY_BLOCKS, **TINY_IMAGE}),)

    def __init__(self, model: nn.Module):
        super().__init__(model)
        self.vision_config = model.config.vision_config
        self._tower(model.vision_model, num_prefix=1)
        # the read-out takes the last layer's output tokens (post_layernorm acts on the CLS token only)
        self.final = self.parts[-1].module

    def _readout(self, text_embeds: torch.Tensor) -> Readout:
        head = self._similarity_head(text_embeds, self.model.visual_projection.weight)
        # post_layernorm on the CLS token, then W = scale · t̂ · W_proj
        projection = self.model.visual_projection.weight
        return Readout("cls", head, fc_norm=self.model.vision_model.post_layernorm,
                       embed_norm=lambda z: (z @ projection.T).norm(dim=-1, keepdim=True))


def _byte_chars() -> list[str]:
    """The 256 characters byte-level BPE tokenizers (GPT-2, CLIP) write bytes as."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    codes, extra = list(keep), 0
    for b in range(256):
        if b not in keep:
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]


def save_random_clip(directory: str | Any, *, seed: int = 0, image_size: int = 32, patch_size: int = 8,
                     width: int = 32, layers: int = 2, heads: int = 4, spread: float = 0.3) -> str:
    """Write a tiny random-initialised ``CLIPModel`` with its processor to ``directory``.

    For tests, docs and teaching without a network: ``vl.load_model("hf:" + directory)``
    loads it like any CLIP from the hub. The tokenizer is CLIP's byte-level BPE
    with single-character tokens (no merges), so any prompt tokenises; the image
    processor is ``CLIPImageProcessor`` at ``image_size``. Weight matrices are
    drawn with standard deviation ``spread`` (the library's 0.02 makes every
    attention map nearly uniform), biases with ``spread / 3``. Its similarities mean nothing: it is random.

    Examples
    --------
    >>> import tempfile, vitlens as vl
    >>> model = vl.load_model("hf:" + save_random_clip(tempfile.mkdtemp()), device="cpu")
    >>> type(model).__name__, type(model.vitlens_text_processor).__name__
    ('CLIPModel', 'CLIPTokenizer')
    """
    import transformers

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in _byte_chars():
        vocab.setdefault(c, len(vocab))
    for c in _byte_chars():
        vocab.setdefault(c + "</w>", len(vocab))
    tokenizer = transformers.CLIPTokenizer(vocab=vocab, merges=[])
    tower = dict(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers, num_attention_heads=heads)
    config = transformers.CLIPConfig(
        text_config=dict(vocab_size=len(vocab), max_position_embeddings=64, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1, **tower),
        vision_config=dict(image_size=image_size, patch_size=patch_size, **tower),
        projection_dim=width // 2,
    )
    torch.manual_seed(seed)
    model = transformers.CLIPModel(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                p.normal_(0.0, spread)
            elif name.endswith(".bias"):  # zero-initialised: give them a value too
                p.normal_(0.0, spread / 3)
    size = {"shortest_edge": image_size}
    image_processor = transformers.CLIPImageProcessor(size=size, crop_size={"height": image_size, "width": image_size})
    processor = transformers.CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return str(directory)
