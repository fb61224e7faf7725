"""A headless ``transformers`` vision backbone with a head of your own: :func:`with_head`.

A bare ``ViTModel``, ``DeiTModel``, ``Dinov2Model``, ``CLIPVisionModel`` or
``SiglipVisionModel`` has no logits, so there is nothing class-specific to
explain. A linear probe on its features (or a small MLP, or a zero-shot head
of text embeddings) gives it logits; ``vl.with_head(backbone, head)`` joins the
two into one model vitlens explains like any classifier:

    ``logits = head(pool(backbone(pixel_values)))``

``pool`` picks the backbone's pooled vector (the first listed is the default):

=============================================  ===============================================================
backbone                                       pools
=============================================  ===============================================================
``ViTModel``, ``DeiTModel``                    ``"cls"`` (CLS after the final norm), ``"mean"`` (patch
                                               tokens), ``"pooler"`` (``tanh(dense(CLS))``, the model's pooler)
``Dinov2Model``, ``Dinov2WithRegistersModel``  ``"cls"``, ``"mean"`` (patch tokens; registers left out)
``CLIPVisionModel``                            ``"cls"`` (``pooler_output``: ``post_layernorm`` of CLS)
``SiglipVisionModel``                          ``"pooler"`` (the attention-pool head), ``"mean"``
=============================================  ===============================================================

Each backbone is declared once, by its family's module (a
:class:`~vitlens.models.hf_common.Backbone`: its pools, blocks and read-out); the
code here reads the declarations and names no backbone.

``head`` is an ``nn.Linear``, a :class:`SimilarityHead` (scaled cosine
similarity with fixed embeddings, e.g. CLIP/SigLIP text embeddings), or an
``nn.Sequential`` of those with element-wise activations (ReLU, GELU, SiLU,
Tanh, LeakyReLU), ``Dropout``, ``Identity``, ``LayerNorm`` and ``BatchNorm1d``.

LRP rule of the head (:func:`head_relevance`): αβ through every Linear (the
biases take none), a :class:`SimilarityHead` as the Linear ``scale · ê_j`` on
``x / ‖x‖`` (the positive factor ``1/‖x‖`` passes relevance on, and the αβ rule
does not change when its input is scaled), the activations and norms pass
relevance on unchanged (the identity rule vitlens uses for GELU and the
LayerNorms inside the blocks). The pooler's ``dense`` and ``tanh`` are the same
rule; the pools themselves use the read-out rules of :class:`~vitlens.models.parts.Readout`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import OptionError, UnsupportedModelError
from ..hf_common import Backbone, HFAdapter, backbones, declared
from ..lrp_rules import linear_alphabeta
from ..registry import register_adapter

#: modules a head may hold between its Linears: relevance passes them unchanged
PASS_THROUGH = (nn.ReLU, nn.GELU, nn.SiLU, nn.Tanh, nn.LeakyReLU, nn.Dropout, nn.Identity, nn.LayerNorm,
                nn.BatchNorm1d)


class SimilarityHead(nn.Module):
    """``scale · ⟨x / ‖x‖, e_j / ‖e_j‖⟩ + bias``: one logit per fixed embedding ``e_j``.

    The zero-shot head of CLIP and SigLIP with precomputed text embeddings
    (``scale = logit_scale.exp()``, SigLIP's ``bias = logit_bias``), or a
    nearest-prototype classifier. The embeddings are a buffer, not a parameter.

    Examples
    --------
    >>> head = SimilarityHead(torch.eye(3)[:2], scale=10.0)
    >>> head(torch.tensor([[2.0, 0.0, 0.0]]))
    tensor([[10.,  0.]])
    """

    def __init__(self, embeddings: torch.Tensor, scale: float | torch.Tensor = 1.0,
                 bias: float | torch.Tensor = 0.0):
        super().__init__()
        e = torch.as_tensor(embeddings).detach()
        if e.ndim != 2 or not e.is_floating_point() or e.shape[0] == 0:
            raise OptionError(f"SimilarityHead takes a (classes, features) float tensor of embeddings; got "
                              f"shape {tuple(e.shape)}, dtype {e.dtype}.")
        norms = e.norm(dim=-1, keepdim=True)
        if not torch.isfinite(e).all() or (norms == 0).any():
            raise OptionError("SimilarityHead: every embedding must be finite and non-zero.")
        self.register_buffer("embeddings", e / norms)
        self.register_buffer("scale", torch.as_tensor(scale, dtype=e.dtype).detach().reshape(()))
        self.register_buffer("bias", torch.as_tensor(bias, dtype=e.dtype).detach().reshape(()))
        if float(self.scale) <= 0:
            raise OptionError(f"SimilarityHead: scale must be positive, got {float(self.scale)}.")

    @property
    def in_features(self) -> int:
        return int(self.embeddings.shape[1])

    @property
    def out_features(self) -> int:
        return int(self.embeddings.shape[0])

    @property
    def weight(self) -> torch.Tensor:
        """``scale · ê``: the Linear the head applies to ``x / ‖x‖`` (its LRP weight)."""
        return self.scale * self.embeddings

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=-1) @ self.weight.T + self.bias


def head_layers(head: nn.Module) -> list[nn.Module]:
    """``head`` as a flat list of layers, checked against what :func:`head_relevance` has rules for."""
    if isinstance(head, nn.Sequential):
        layers = [m for child in head for m in head_layers(child)]
    elif isinstance(head, (nn.Linear, SimilarityHead, *PASS_THROUGH)):
        layers = [head]
    else:
        raise UnsupportedModelError(
            f"vl.with_head: a {type(head).__name__} in the head has no LRP rule in vitlens. A head is an "
            "nn.Linear, a vl.SimilarityHead, or an nn.Sequential of those with element-wise activations "
            f"({', '.join(c.__name__ for c in PASS_THROUGH)})."
        )
    return layers


def _scoring(layers: Sequence[nn.Module]) -> list[nn.Module]:
    return [m for m in layers if isinstance(m, (nn.Linear, SimilarityHead))]


def head_relevance(layers: Sequence[nn.Module], z: torch.Tensor, relevance: torch.Tensor) -> torch.Tensor:
    """Relevance on the head's input ``z`` (B, C) from ``relevance`` at its output (see the module docstring).

    Examples
    --------
    >>> layers = [nn.Linear(2, 2, bias=False), nn.ReLU(), nn.Linear(2, 1, bias=False)]
    >>> with torch.no_grad():
    ...     _ = layers[0].weight.copy_(torch.tensor([[1.0, 1.0], [1.0, -1.0]]))
    ...     _ = layers[2].weight.fill_(1.0)
    >>> head_relevance(layers, torch.tensor([[1.0, 3.0]]), torch.ones(1, 1))
    tensor([[0.2500, 0.7500]])
    """
    with torch.no_grad():  # relevance is never differentiated
        inputs = [z]
        for m in layers[:-1]:
            inputs.append(m(inputs[-1]))
        r = relevance
        for m, x in zip(reversed(layers), reversed(inputs), strict=True):
            if isinstance(m, (nn.Linear, SimilarityHead)):
                r = linear_alphabeta(x, m.weight, r)
    return r


def _is_transformers(module: nn.Module) -> bool:
    return type(module).__module__.startswith("transformers.")


class HeadedModel(nn.Module):
    """``head(pool(backbone(pixel_values)))``: a headless transformers backbone with a head. See :func:`with_head`."""

    def __init__(self, backbone: nn.Module, head: nn.Module, pool: str, class_names: list[str] | None,
                 image_processor: Any = None, declaration: Backbone | None = None):
        super().__init__()
        self._image_processor = image_processor
        self.backbone = backbone
        self.head = head
        self.pool = pool
        self.config = backbone.config
        #: what vitlens knows of the backbone's class (its family's declaration)
        self.declaration = declaration if declaration is not None else backbones()[type(backbone).__name__]
        self.num_prefix = self.declaration.num_prefix(backbone)
        if class_names is not None:
            self.vitlens_class_names = [str(c) for c in class_names]
        name = getattr(backbone, "vitlens_name", None)
        if name:
            self.vitlens_name = f"{name} + head"

    @property
    def vitlens_image_processor(self) -> Any:
        """The image processor given to :func:`with_head`, else the backbone's (``vl.load_model("hf:...")``)."""
        if self._image_processor is not None:
            return self._image_processor
        return getattr(self.backbone, "vitlens_image_processor", None)

    @vitlens_image_processor.setter
    def vitlens_image_processor(self, value: Any) -> None:
        self._image_processor = value

    def pooled(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The backbone's pooled vector (B, C): the head's input."""
        return self.declaration.pooled(self.backbone(pixel_values=pixel_values), self.pool, self.num_prefix)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Logits (B, classes) of a normalised batch."""
        return self.head(self.pooled(pixel_values))


def with_head(backbone: nn.Module, head: nn.Module, *, pool: str | None = None,
              class_names: Sequence[str] | None = None, image_processor: Any = None) -> HeadedModel:
    """Join a headless ``transformers`` vision backbone and a head into a model vitlens explains.

    Parameters
    ----------
    backbone
        A ``ViTModel``, ``DeiTModel``, ``Dinov2Model``, ``Dinov2WithRegistersModel``,
        ``CLIPVisionModel`` or ``SiglipVisionModel`` (e.g. from
        ``vl.load_model("hf:<dir>")``, which also brings its image processor).
    head
        ``nn.Linear``, :class:`SimilarityHead`, or an ``nn.Sequential`` of those with
        element-wise activations, dropout and norms (see :mod:`vitlens.models.families.hf_headed`).
    pool
        Which pooled vector the head reads: ``"cls"``, ``"mean"`` or ``"pooler"``,
        as the backbone offers (the table above; default: the first).
    class_names
        One name per logit (default ``"0"``, ``"1"``, ...).
    image_processor
        The backbone's ``transformers`` image processor, when it does not carry one
        already (``vl.load_model("hf:...")`` attaches it; a model you split yourself
        may not have it).

    The backbone and the head are used, not copied: the result shares their
    weights, and a capture leaves both as it found them.

    Examples
    --------
    >>> import torch, transformers, vitlens as vl
    >>> cfg = transformers.ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
    ...                              intermediate_size=32, image_size=16, patch_size=8)
    >>> backbone = transformers.ViTModel(cfg, add_pooling_layer=False).eval()
    >>> processor = transformers.ViTImageProcessor(size={"height": 16, "width": 16})
    >>> model = vl.with_head(backbone, torch.nn.Linear(16, 3), class_names=["cat", "dog", "fox"],
    ...                      image_processor=processor)
    >>> cap = vl.capture(model, torch.rand(1, 16, 16, 3).numpy())
    >>> cap.attrs["family"], cap.attrs["class_names"]
    ('hf_headed', ['cat', 'dog', 'fox'])
    """
    kind = type(backbone).__name__
    known = backbones() if isinstance(backbone, nn.Module) and _is_transformers(backbone) else {}
    if kind not in known:
        has_head = kind in {c.name for c in declared()}
        hint = (f" A {kind} already has logits: pass it to vl.capture as it is." if has_head else
                " A timm model takes its head from timm: timm.create_model(..., num_classes=N)."
                if type(backbone).__module__.startswith("timm.") else "")
        raise UnsupportedModelError(
            f"vl.with_head takes a headless transformers backbone ({', '.join(backbones())}); got {kind}.{hint}"
        )
    if not isinstance(head, nn.Module):
        raise OptionError(f"vl.with_head: head must be a torch.nn.Module (e.g. nn.Linear); got {type(head).__name__}.")
    pools = known[kind].pools
    pool = pools[0] if pool is None else pool
    if pool not in pools:
        raise OptionError(f"vl.with_head: a {kind} offers pool={' or '.join(map(repr, pools))}; got {pool!r}.")
    known[kind].check(backbone, pool)
    layers = head_layers(head)
    scoring = _scoring(layers)
    if not scoring:
        raise OptionError("vl.with_head: the head has no nn.Linear or vl.SimilarityHead to make logits with.")
    width = int(backbone.config.hidden_size)
    if scoring[0].in_features != width:
        raise OptionError(f"vl.with_head: the head takes {scoring[0].in_features} features, but the {kind}'s "
                          f"pooled vector has {width}.")
    classes = scoring[-1].out_features
    if class_names is not None and len(class_names) != classes:
        raise OptionError(f"vl.with_head: {len(class_names)} class names for a head with {classes} outputs.")
    return HeadedModel(backbone, head, pool, None if class_names is None else list(class_names), image_processor,
                       known[kind])


@register_adapter
class HFHeadedAdapter(HFAdapter):
    """A :class:`HeadedModel`: the backbone's blocks, read out by its pool and the user's head."""

    family = "hf_headed"

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return type(model) is HeadedModel

    def __init__(self, model: nn.Module):
        super().__init__(model)
        backbone, spec = model.backbone, model.declaration
        name = f"vl.with_head({spec.name})"
        layers = head_layers(model.head)
        scoring = _scoring(layers)  # none: an embedding model (its "logits" are the pooled embedding)
        self._classes = scoring[-1].out_features if scoring else int(backbone.config.hidden_size)
        self.stages = [spec.stage(backbone, self.input_size, name)]

        def rule(before: Sequence[nn.Module]) -> Callable:
            return functools.partial(head_relevance, [*before, *layers])

        self.final, self.head = spec.readout(backbone, model.pool, model.head, rule, model.num_prefix)

    @property
    def num_classes(self) -> int:
        return self._classes

    def class_names(self) -> list[str]:
        names = getattr(self.model, "vitlens_class_names", None)
        if names is None or len(names) != self.num_classes:
            return [str(i) for i in range(self.num_classes)]
        return list(names)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=x)

    def features(self) -> tuple[nn.Module, str]:
        if self.readout == "cls" and self.model.declaration.keyword_attention:
            return self.parts[-1].norm1, "output"  # the attention module is called with keywords only
        return super().features()

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "backbone": type(self.model.backbone).__name__, "pool": self.model.pool}


def embedding_model(backbone: nn.Module, pool: str | None = None) -> HeadedModel | None:
    """A headless backbone as a model whose output is its pooled embedding (``vl.targets``), else None.

    The head is ``nn.Identity``: the "logits" are the pooled vector (CLS after the final norm for
    DINOv2, the attention pool for a SigLIP tower), one per embedding channel, which a
    :class:`vitlens.targets.Target` such as ``similarity`` turns into the scalar to explain.
    """
    kind = type(backbone).__name__
    known = backbones() if isinstance(backbone, nn.Module) and _is_transformers(backbone) else {}
    if kind not in known:
        return None
    pools = known[kind].pools
    return HeadedModel(backbone, nn.Identity(), pools[0] if pool is None else pool, None, None, known[kind])
