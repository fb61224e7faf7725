"""Re-export of the LRP rules, which live in :mod:`vitlens.models.lrp_rules` next to the parts.

Kept so ``from vitlens.methods import lrp`` keeps working; nothing in vitlens imports it.

Examples
--------
>>> from vitlens.methods import lrp
>>> lrp.linear_alphabeta is __import__("vitlens.models.lrp_rules", fromlist=["x"]).linear_alphabeta
True
"""

from __future__ import annotations

from ..models.lrp_rules import (  # noqa: F401
    EPS,
    linear_alphabeta,
    matmul_lrp0,
    mean_lrp0,
    product_half,
    residual_add,
    safe_div,
)

__all__ = ["EPS", "linear_alphabeta", "matmul_lrp0", "mean_lrp0", "product_half", "residual_add", "safe_div"]
