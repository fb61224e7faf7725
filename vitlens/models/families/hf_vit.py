"""Adapters for ``transformers``' plain ViTs: ViT, DeiT (with teacher), DINOv2 (with registers).

All are pre-norm blocks over ``[prefix tokens, patch grid row-major]`` with split
q/k/v projections; they differ in module names, prefix tokens, LayerScale,
MLP kind and head:

======================================  ===================  ============================
class                                   prefix tokens        read-out
======================================  ===================  ============================
``ViTForImageClassification``           cls                  CLS (after the final norm)
``DeiTForImageClassification``          cls, dist            CLS
``DeiTForImageClassificationWithTeacher`` cls, dist          mean of the CLS and dist heads
``Dinov2ForImageClassification``        cls                  ``[CLS, mean of patches]``
``Dinov2WithRegistersForImageClassification`` cls, registers  ``[CLS, mean of patches]``
======================================  ===================  ============================

DINOv2's head reads a concatenation of the CLS token and the patch mean
(:class:`ConcatReadout`). It is recorded as a ``"cls"`` read-out, so the
attention-based methods read the CLS row; gradients, Grad-CAM and the LRP pass
(whose head rule splits the relevance between the two halves exactly) see the
whole head.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ...errors import UnsupportedModelError
from ..adapter import StageInfo
from ..hf_common import TINY_BLOCKS, TINY_IMAGE, Backbone, HFAdapter, HFClass, layer_scale, mlp_part, split_attention
from ..lrp_rules import linear_alphabeta, mean_lrp0
from ..parts import BlockPart, Readout
from ..registry import register_adapter


@dataclass(frozen=True, eq=False)
class ViTBackbone(Backbone):
    """A ViT-like backbone: pre-norm layers at ``layers``, each with ``norms`` (norm1, attention,
    norm2) and, for DINOv2, LayerScales ``scales``; its final norm is ``layernorm``."""

    layers: str = "layers"
    norms: tuple[str, str, str] = ("layernorm_before", "attention", "layernorm_after")
    scales: tuple[str, str] | None = None

    def num_prefix(self, backbone: nn.Module) -> int:
        return len(prefix_kinds(backbone))

    def stage(self, backbone: nn.Module, input_size: tuple[int, int], name: str) -> StageInfo:
        return vit_stage(backbone, input_size, name)

    def readout(self, backbone: nn.Module, pool: str, head: nn.Module,
                rule: Callable[[Sequence[nn.Module]], Callable], num_prefix: int) -> tuple[nn.Module, Readout]:
        if pool == "pooler":  # tanh(dense(CLS)): two more layers for the head's rule
            return backbone.layernorm, Readout("cls", head, head_rule=rule([backbone.pooler.dense,
                                                                          backbone.pooler.activation]))
        if pool == "cls":
            return backbone.layernorm, Readout("cls", head, head_rule=rule([]))
        return backbone.layernorm, Readout("avg", head, start=num_prefix, head_rule=rule([]))


@dataclass(frozen=True, eq=False)
class ViTClassifier(HFClass):
    """A ViT-like image classifier: its backbone at ``body``, read out as ``readout``:
    ``"cls"``, ``"cls+dist"`` (DeiT with teacher: the mean of a CLS and a distillation head)
    or ``"cls+mean"`` (DINOv2: one head over ``[CLS, mean of patches]``)."""

    body: str = "vit"
    readout: str = "cls"


_DINOV2 = dict(layers="encoder.layer", norms=("norm1", "attention", "norm2"), scales=("layer_scale1", "layer_scale2"))
_TINY = {**TINY_BLOCKS, **TINY_IMAGE}
_TINY_DINOV2 = {**{k: v for k, v in _TINY.items() if k != "intermediate_size"}, "mlp_ratio": 2}
_TINY_REGISTERS = {**_TINY_DINOV2, "num_register_tokens": 2}

#: the headless backbones (vl.with_head), and the classifiers built on them
BACKBONES = (
    ViTBackbone("ViTModel", "ViTConfig", _TINY, pools=("cls", "mean", "pooler")),
    ViTBackbone("DeiTModel", "DeiTConfig", _TINY, pools=("cls", "mean", "pooler")),
    ViTBackbone("Dinov2Model", "Dinov2Config", _TINY_DINOV2, pools=("cls", "mean"), **_DINOV2),
    ViTBackbone("Dinov2WithRegistersModel", "Dinov2WithRegistersConfig", _TINY_REGISTERS, pools=("cls", "mean"),
                **_DINOV2),
)
CLASSIFIERS = (
    ViTClassifier("ViTForImageClassification", "ViTConfig", _TINY, body="vit"),
    ViTClassifier("DeiTForImageClassification", "DeiTConfig", _TINY, body="deit"),
    ViTClassifier("DeiTForImageClassificationWithTeacher", "DeiTConfig", _TINY, body="deit", readout="cls+dist"),
    ViTClassifier("Dinov2ForImageClassification", "Dinov2Config", _TINY_DINOV2, body="dinov2", readout="cls+mean"),
    ViTClassifier("Dinov2WithRegistersForImageClassification", "Dinov2WithRegistersConfig", _TINY_REGISTERS,
                  body="dinov2_with_registers", readout="cls+mean"),
)
_LAYOUTS = {b.name: b for b in BACKBONES}


@dataclass
class ConcatReadout(Readout):
    """``head([fc_norm(x_cls), mean of tokens start..N])`` (DINOv2's classifier).

    LRP rule: αβ through ``head`` over the concatenation; the CLS half goes to
    the CLS token, the mean half to the patch tokens by LRP-0 through the mean.
    """

    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(torch.cat([tokens[:, 0], tokens[:, self.start:].mean(1)], -1))

    def relevance(self, tokens: torch.Tensor, onehot: torch.Tensor) -> torch.Tensor:
        c = tokens.shape[-1]
        x = tokens[:, self.start:]
        joined = torch.cat([tokens[:, 0], x.mean(1)], -1)
        r_joined = linear_alphabeta(joined, self.head.weight, onehot)
        r = torch.zeros_like(tokens)
        r[:, 0] = r_joined[:, :c]
        r[:, self.start:] = mean_lrp0(x, r_joined[:, c:], dim=1)
        return r


def _get(module: nn.Module, path: str) -> nn.Module:
    for name in path.split("."):
        module = getattr(module, name)
    return module


def prefix_kinds(backbone: nn.Module) -> list[str]:
    """The tokens before the patch grid: CLS, then DeiT's distillation token or DINOv2's registers."""
    kinds = ["cls"]
    if getattr(backbone.embeddings, "distillation_token", None) is not None:
        kinds.append("dist")
    return kinds + ["register"] * int(getattr(backbone.config, "num_register_tokens", 0) or 0)


def vit_stage(backbone: nn.Module, input_size: tuple[int, int], name: str) -> StageInfo:
    """The one stage of a ViT/DeiT/DINOv2 backbone (one of :data:`BACKBONES`) at ``input_size``."""
    layout = _LAYOUTS[type(backbone).__name__]
    layers_path, (n1, att, n2), scales = layout.layers, layout.norms, layout.scales
    try:
        layers = list(_get(backbone, layers_path))
    except AttributeError:
        import transformers

        raise UnsupportedModelError(
            f"{name}: no {layers_path} in its {type(backbone).__name__}; vitlens explains the module layout of "
            f"transformers >= 5 (installed: {transformers.__version__}); upgrade transformers."
        ) from None
    if not layers:
        raise UnsupportedModelError(f"{name} has no transformer layers.")
    parts = []
    for i, layer in enumerate(layers):
        where = f"{name} layer {i}"
        parts.append(BlockPart(
            module=layer,
            norm1=getattr(layer, n1),
            attn=split_attention(getattr(layer, att), where),
            norm2=getattr(layer, n2),
            mlp=mlp_part(layer.mlp, where),
            ls1=layer_scale(getattr(layer, scales[0])) if scales else None,
            ls2=layer_scale(getattr(layer, scales[1])) if scales else None,
        ))
    cfg = backbone.config
    kinds = prefix_kinds(backbone)
    h, w = input_size
    p = cfg.patch_size
    patch = (int(p[0]), int(p[1])) if isinstance(p, (list, tuple)) else (int(p), int(p))
    if h % patch[0] or w % patch[1]:
        raise UnsupportedModelError(f"{name}: {h}x{w} inputs are not tiled by {patch[0]}x{patch[1]} patches.")
    return StageInfo(index=0, parts=parts, layers=list(range(len(parts))), grid=(h // patch[0], w // patch[1]),
                     stride=patch, num_heads=parts[0].attn.num_heads, num_prefix=len(kinds), prefix_kinds=kinds)


@register_adapter
class HFViTAdapter(HFAdapter):
    """``transformers`` ViT, DeiT and DINOv2 image classifiers."""

    family = "hf_vit"
    classes = CLASSIFIERS
    backbones = BACKBONES

    def __init__(self, model: nn.Module):
        super().__init__(model)
        declared = self.declaration_of(model)
        backbone = getattr(model, declared.body)
        self.stages = [vit_stage(backbone, self.input_size, type(model).__name__)]
        self.final = backbone.layernorm
        self.head = self._readout(model, declared.readout, self.stages[0].num_prefix)

    @staticmethod
    def _readout(model: nn.Module, readout: str, num_prefix: int) -> Readout:
        name = type(model).__name__
        if readout == "cls+dist":
            head, dist = model.cls_classifier, model.distillation_classifier
            if not (isinstance(head, nn.Linear) and isinstance(dist, nn.Linear)):
                raise UnsupportedModelError(f"{name} has no classifier heads (num_labels=0).")
            return Readout("cls", head, head_dist=dist)
        head = model.classifier
        if not isinstance(head, nn.Linear):
            raise UnsupportedModelError(
                f"{name} has no classifier head (num_labels=0); vitlens explains class logits: "
                "load it with num_classes=..."
            )
        if readout == "cls+mean":
            return ConcatReadout("cls", head, start=num_prefix)
        return Readout("cls", head)

    @property
    def distilled(self) -> bool:
        return self.declaration_of(self.model).readout == "cls+dist"
