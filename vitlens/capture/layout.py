"""The one reader of a capture's layout: stages, grids, strides, windows, prefix tokens, heads.

Capture writes each stage's layout into its node's attrs (from the model side's
:class:`~vitlens.models.adapter.StageInfo`); methods, widgets and figures read it
back here, and only here. Maps are drawn on the *first-stage* token grid (ViT: the
only grid; Swin: the finest, e.g. 56×56 for Swin-T at 224 px): a token of a coarser
stage covers ``factor × factor`` first-stage tokens (the ratio of the strides).

:func:`missing_variable` is the one message for a capture that lacks what a view
needs: it names the call that makes it (``grads=True``, or the ``keep=`` group).

Examples
--------
>>> import numpy as np, timm, vitlens as vl
>>> from vitlens.capture.layout import capture_layout
>>> model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=3)
>>> layout = capture_layout(vl.capture(model, np.zeros((1, 32, 32, 3))))
>>> layout.grid, layout.stride, layout.first.num_prefix, layout.readout
((4, 4), (8, 8), 1, 'cls')
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import xarray as xr

from ..errors import CaptureFormatError, OptionError
from .attrs import decoded, json_attr

Query = tuple[int, int] | None


@dataclass(frozen=True)
class StageLayout:
    """One stage of a capture: its blocks, token grid, stride, heads, prefix tokens and windows."""

    name: str
    index: int
    layers: tuple[int, ...]
    grid: tuple[int, int]
    stride: tuple[int, int]  # input pixels per token along (y, x)
    num_heads: int
    num_prefix: int
    window: tuple[int, int] | None
    factor: int  # first-stage tokens per stage token, along each axis (stride ratio)
    shifts: tuple[tuple[int, int], ...] = ()  # Swin: cyclic shift of each block's windows

    def shift(self, layer: int) -> tuple[int, int]:
        return self.shifts[self.layers.index(layer)] if self.shifts else (0, 0)

    @property
    def num_tokens(self) -> int:
        return self.num_prefix + self.grid[0] * self.grid[1]

    @property
    def windowed(self) -> bool:
        return self.window is not None

    @property
    def shape_text(self) -> str:
        return f"{self.grid[0]}×{self.grid[1]}"


@dataclass(frozen=True)
class CaptureLayout:
    """The stages of a capture and the first-stage grid every map is drawn on."""

    stages: tuple[StageLayout, ...]
    family: str
    readout: str
    input_size: tuple[int, int]

    @property
    def first(self) -> StageLayout:
        return self.stages[0]

    @property
    def grid(self) -> tuple[int, int]:
        return self.first.grid

    @property
    def stride(self) -> tuple[int, int]:
        return self.first.stride

    @property
    def layers(self) -> list[int]:
        return [l for s in self.stages for l in s.layers]

    @property
    def windowed(self) -> bool:
        return self.first.window is not None

    def check_layers(self, layers: Iterable[int]) -> list[int]:
        """``layers`` as ints, or the one OptionError naming the layers this capture has."""
        chosen = [int(l) for l in layers]
        every = self.layers
        bad = [l for l in chosen if l not in every]
        if bad:
            what = f"layer {bad[0]} is" if len(bad) == 1 else f"layers {bad} are"
            raise OptionError(f"{what} not in this capture; it has layers {every[0]}..{every[-1]}.")
        return chosen

    def stage_of(self, layer: int) -> StageLayout:
        self.check_layers([layer])
        return next(s for s in self.stages if layer in s.layers)

    def default_query(self) -> Query:
        """The read-out token (``None``) under a CLS read-out; otherwise the centre patch."""
        if self.readout == "cls" and self.first.num_prefix > 0:
            return None
        return (self.grid[0] // 2, self.grid[1] // 2)

    def all_heads(self) -> dict[int, frozenset[int]]:
        return {s.index: frozenset(range(s.num_heads)) for s in self.stages}


def _attr(attrs: Any, key: str, default: Any = None) -> Any:
    """An attribute as written by capture, also from a tree read with plain xarray (JSON text)."""
    return decoded(attrs).get(key, default)


def stage_names(cap: xr.DataTree) -> list[str]:
    """The capture's stage nodes in order (``stage0``, ``stage1``, …)."""
    return sorted((n for n in cap.children if n.startswith("stage")), key=lambda n: int(n.removeprefix("stage")))


def capture_layout(cap: xr.DataTree) -> CaptureLayout:
    """Read the layout of a capture (no arrays are loaded).

    Raises
    ------
    CaptureFormatError
        ``cap`` is not a capture from :func:`vitlens.capture` / :func:`vitlens.open`.
    """
    if not isinstance(cap, xr.DataTree) or "vitlens_version" not in cap.attrs:
        raise CaptureFormatError(
            f"expected a capture from vl.capture or vl.open (an xarray.DataTree); got {type(cap).__name__}."
        )
    names = stage_names(cap)
    if not names:
        raise CaptureFormatError("this capture has no stage nodes (stage0, ...); capture again with vl.capture.")
    stages = []
    first_stride = None
    for name in names:
        node = cap[name]
        grid = tuple(int(g) for g in _attr(node.attrs, "grid"))
        stride = tuple(int(s) for s in _attr(node.attrs, "stride"))
        first_stride = first_stride or stride
        window = _attr(node.attrs, "window_size")
        stages.append(
            StageLayout(
                name=name,
                index=int(_attr(node.attrs, "stage")),
                layers=tuple(int(v) for v in node["layer"].values),
                grid=grid,  # type: ignore[arg-type]
                stride=stride,  # type: ignore[arg-type]
                num_heads=int(_attr(node.attrs, "num_heads")),
                num_prefix=int(_attr(node.attrs, "num_prefix_tokens")),
                window=tuple(int(w) for w in window) if window is not None else None,  # type: ignore[arg-type]
                factor=stride[0] // first_stride[0],
                shifts=tuple(tuple(int(v) for v in sh) for sh in _attr(node.attrs, "shift_size", ())),  # type: ignore[misc]
            )
        )
    h, w = (int(v) for v in _attr(cap.attrs, "input_size")[-2:])
    return CaptureLayout(tuple(stages), str(cap.attrs["family"]), str(cap.attrs["readout"]), (h, w))


#: The variables of the ``norms`` group (TokenTM's token and value-path norms and cosines), as capture stores them.
NORM_VARIABLES = ("token_norm", "attn_value_norm", "attn_value_cos", "attn_out_norm", "mlp_in_norm", "mlp_out_norm",
                  "mlp_cos", "block_out_norm")
#: The ``keep=`` group of :func:`vitlens.capture` that stores each variable a view reads.
KEPT_IN: dict[str, str] = {var: group for group, variables in {
    "attention": ("attention",),
    "attention_grad": ("attention_grad",),
    "attention_relevance": ("attention_relevance", "merge_share"),
    "ln": ("ln_mean", "ln_std"),
    "features": ("features", "features_grad"),
    "norms": NORM_VARIABLES,
}.items() for var in variables}
#: The variables that exist only with ``grads=True``: gradients and LRP relevances need the backward pass.
NEED_GRADS = frozenset({"attention_grad", "attention_relevance", "merge_share", "features_grad"})


def capture_options(cap: xr.DataTree) -> dict[str, Any]:
    """The options the capture was made with (``grads``, ``keep``, ``dtype``, …)."""
    return dict(json_attr(cap.attrs, "options", {}))


def missing_variable(cap: xr.DataTree, variable: str, where: str = "") -> CaptureFormatError:
    """The one error for a capture without ``variable``: what is missing and the call that makes it.

    Examples
    --------
    >>> import numpy as np, timm, vitlens as vl
    >>> model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=3)
    >>> cap = vl.capture(model, np.zeros((1, 32, 32, 3)), grads=False)
    >>> print(missing_variable(cap, "attention_grad"))
    this capture holds no 'attention_grad': it was made with grads=False, and gradients and relevances need the backward pass; capture again with grads=True: vl.capture(model, cap['image'], grads=True).
    """
    group = KEPT_IN.get(variable)
    options = capture_options(cap) if isinstance(cap, xr.DataTree) else {}
    place = f" in {where}" if where else ""
    if variable in NEED_GRADS and options.get("grads", True) is False:
        fix = ("it was made with grads=False, and gradients and relevances need the backward pass; capture "
               "again with grads=True: vl.capture(model, cap['image'], grads=True)")
    elif group is not None:
        fix = (f"capture again keeping the group that holds it: vl.capture(model, cap['image'], "
               f"keep='all') (or a keep= list with {group!r})")
    else:
        fix = "capture again with vl.capture(model, cap['image']) (keep='all')"
    return MissingVariableError(f"this capture holds no {variable!r}{place}: {fix}.", variable)


class MissingVariableError(CaptureFormatError):
    """A capture lacks a variable a method or view reads (``variable`` names it)."""

    def __init__(self, message: str, variable: str):
        super().__init__(message)
        self.variable = variable


__all__ = ["CaptureLayout", "KEPT_IN", "MissingVariableError", "NEED_GRADS", "NORM_VARIABLES", "Query", "StageLayout", "capture_layout",
           "capture_options", "missing_variable", "stage_names"]
