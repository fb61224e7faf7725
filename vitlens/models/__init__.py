"""Model loading and the adapters that give capture one surface over ViT and Swin."""

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
    >>> print(vl.models.available())  # doctest: +ELLIPSIS
    model        family  input  classes  one-object top-1  two-object: both in top 2  held-out images
    swin-shapes  swin    64×64        8  ...
    >>> "curve" in vl.models.available(curves=True)["vit-shapes"]["train"]
    True
    """
    from .. import zoo

    return zoo.Catalog(zoo.available(), curves=curves)


__all__ = ["Adapter", "StageInfo", "adapter_for", "available", "load_model", "register_adapter", "register_refusal"]
