"""Head statistics: one number per image, block and head, registered with :func:`vitlens.registry.register_stat`."""

from __future__ import annotations

from .ablation_effect import ablation_effect

__all__ = ["ablation_effect"]
