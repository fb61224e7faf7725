"""The one table of the methods' choice options: their allowed values, as ``Literal`` types.

Each method annotates its options with these types and checks them with
:func:`check`, which raises the one message, as xarray checks its options
against one table (``xarray/core/options.py``). A new choice is one line here.

Examples
--------
>>> from vitlens.methods.options import CHOICES, check
>>> CHOICES["merge"]
('uniform', 'lrp')
>>> check("rollout", merge="max")
Traceback (most recent call last):
...
vitlens.errors.OptionError: rollout merge='max'; choose from ['uniform', 'lrp'].
"""

from __future__ import annotations

from typing import Any, Literal, get_args

from ..errors import OptionError

Merge = Literal["uniform", "lrp"]  # Swin patch merging: 1/4 to each parent, or the merging Linear's LRP shares
IdentityPath = Literal["drop", "keep"]  # leave out the part of a chain that never crossed an attention, or keep it
Statistic = Literal["std", "mean", "var", "norm"]  # lnstat: the token statistic entering a block's LayerNorm
StatisticNorm = Literal["max", "minmax", "none"]  # lnstat: how patch tokens' statistics are scaled
HeadFusion = Literal["mean", "max", "entropy"]  # lnstat: how heads are fused
Necc = Literal["range", "softmax", "none"]  # tokentm: the direction term
Init = Literal["norm", "identity"]  # tokentm: C_0
GradcamOn = Literal["attention", "features"]  # gradcam: heads or feature channels as channels
# attnlrp: CP-LRP (attention held, lxt's choice for ViTs) or AttnLRP (relevance through the softmax)
Softmax = Literal["cp", "attnlrp"]
LegradScore = Literal["mean", "readout"]  # legrad: the authors' score (mean of the logits' rows, torchcam) or the read-out

#: option name -> allowed values
CHOICES: dict[str, tuple[str, ...]] = {
    "merge": get_args(Merge),
    "identity_path": get_args(IdentityPath),
    "stat": get_args(Statistic),
    "stat_norm": get_args(StatisticNorm),
    "head_fusion": get_args(HeadFusion),
    "necc": get_args(Necc),
    "init": get_args(Init),
    "on": get_args(GradcamOn),
    "softmax": get_args(Softmax),
    "score": get_args(LegradScore),
}


def check(method: str, **values: Any) -> None:
    """Raise the one OptionError for the first value not in its option's :data:`CHOICES`."""
    for name, value in values.items():
        allowed = CHOICES[name]
        if value not in allowed:
            raise OptionError(f"{method + ' ' if method else ''}{name}={value!r}; choose from {list(allowed)}.")


__all__ = ["CHOICES", "GradcamOn", "HeadFusion", "IdentityPath", "Init", "LegradScore", "Merge", "Necc", "Softmax",
           "Statistic", "StatisticNorm", "check"]
