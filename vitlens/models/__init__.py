"""Model loading and the adapters that give capture one surface over every supported family
(timm ViT/DeiT/EVA/BEiT/Swin v1-v2, transformers ViT/DeiT/DINOv2/BEiT/Swin/CLIP/SigLIP)."""

from __future__ import annotations

from .adapter import Adapter, StageInfo
from .loading import load_model
from .registry import adapter_for, register_adapter, register_refusal


def available() -> dict[str, dict]:
    """Shipped models by name, with their configuration and held-out scores.

    Examples
    --------
    >>> import vitlens as vl
    >>> sorted(vl.models.available())
    ['swin-shapes', 'vit-shapes']
    """
    from .. import zoo

    return zoo.available()


__all__ = ["Adapter", "StageInfo", "adapter_for", "available", "load_model", "register_adapter", "register_refusal"]
