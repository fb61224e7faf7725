"""Model loading and the adapters that give capture one surface over every supported family
(timm ViT/DeiT/EVA/BEiT/Swin v1-v2, transformers ViT/DeiT/DINOv2/BEiT/Swin/CLIP/SigLIP)."""

from __future__ import annotations

from .adapter import Adapter, StageInfo
from .loading import load_model
from .registry import adapter_for, register_adapter, register_refusal


def available(curves: bool = False) -> dict[str, dict]:
    """Shipped models by name, with their configuration and held-out scores.

    Shown (printed, or as a notebook cell's value) it is a table of names,
    architectures and held-out scores; each entry is the model's configuration.
    The training curves are left out unless ``curves=True``.

    Examples
    --------
    >>> import vitlens as vl
    >>> sorted(vl.models.available())
    ['swin-shapes', 'vit-shapes']
    >>> print(vl.models.available())
    model        family  input  classes  one-object top-1  two-object: both in top 2  held-out images  one-object, 2 unseen seeds [95 % CI]
    swin-shapes  swin    64×64        8            95.1 %                     90.1 %  1000 + 1000                       95.5 % [94.5, 96.3]
    vit-shapes   vit     64×64        8            96.3 %                     93.3 %  1000 + 1000                       98.2 % [97.5, 98.7]
    >>> "curve" in vl.models.available(curves=True)["vit-shapes"]["train"]
    True
    """
    from .. import zoo

    return zoo.Catalog(zoo.available(), curves=curves)


def embedding_model(model: object) -> object | None:
    """A headless backbone (``Dinov2Model``, a SigLIP tower, ...) as a model whose output is its pooled
    embedding, for targets that read the embedding (``vl.targets.similarity``); None for any other model.

    Examples
    --------
    >>> import torch, vitlens as vl
    >>> vl.models.embedding_model(torch.nn.Linear(2, 2)) is None
    True
    """
    if not type(model).__module__.startswith("transformers."):
        return None
    from .families.hf_headed import embedding_model as headless

    return headless(model)  # type: ignore[arg-type]


__all__ = ["Adapter", "embedding_model", "StageInfo", "adapter_for", "available", "load_model", "register_adapter", "register_refusal"]
