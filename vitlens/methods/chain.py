"""The chain methods' one signature and one pipeline.

Rollout, generic attention, transformer attribution, lnstat and tokentm multiply
one operator per block over a range of blocks and read the product out
(:mod:`.operators`). They take the same options — ``layers``, ``heads``,
``start_layer``, ``per_layer``, ``merge`` and ``by_stage``, documented once in
:func:`~vitlens.methods.rollout` — and end the same way (:func:`.maps.finish`).
:func:`chain_method` gives a method module's function those options: the module
writes only its per-block operators and its own options, as a pytorch-grad-cam
method overrides one function of the common pipeline.

Examples
--------
>>> import inspect, vitlens as vl
>>> list(inspect.signature(vl.methods.generic_attention).parameters)
['cap', 'layers', 'heads', 'start_layer', 'per_layer', 'merge', 'by_stage', 'identity_path']
>>> inspect.signature(vl.methods.transformer_attribution).parameters["start_layer"].default
1
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch
import xarray as xr

from .maps import finish
from .operators import CaptureView, HeadSelection, Step, head_fused, select_layers, view
from .options import Merge
from ..registry import register_method

Map = Callable[..., "xr.DataArray | xr.Dataset"]


@dataclass
class Chain:
    """One call of a chain method: its capture and the options every chain method takes.

    The capture is read (:attr:`cv`) and the blocks chosen (:attr:`chosen`) when the
    method first asks, so a method checks its own options first.
    """

    cap: xr.DataTree
    layers: list[int] | None
    heads: HeadSelection
    start_layer: int
    per_layer: bool
    merge: Merge
    by_stage: bool

    @functools.cached_property
    def cv(self) -> CaptureView:
        """The capture, read by :func:`~vitlens.methods.operators.view`."""
        return view(self.cap)

    @functools.cached_property
    def chosen(self) -> list[int]:
        """The blocks entering the product: ``layers`` (default all) from ``start_layer`` on, sorted."""
        return select_layers(self.cv, self.layers, self.start_layer)

    def fused(self, layer: int, *names: str, clamp: bool = False) -> torch.Tensor:
        """``E_h[Π names]`` of block ``layer`` over the selected heads (:func:`.operators.head_fused`)."""
        return head_fused(self.cv.stage_of(layer), layer, self.heads, *names, clamp=clamp)

    def finish(self, method: str, steps: Mapping[int, Step], options: Mapping[str, Any] | None = None,
               **kwargs: Any) -> xr.DataArray | xr.Dataset:
        """The map of ``steps``, labelled with the shared options and ``options`` (:func:`.maps.finish`)."""
        labels = {"layers": self.chosen, "heads": self.heads, "start_layer": self.start_layer, **(options or {})}
        return finish(self.cv, steps, self.chosen, method, labels, per_layer=self.per_layer, merge=self.merge,
                      by_stage=self.by_stage, **kwargs)


def chain_method(name: str, *, start_layer: int = 0, needs: Mapping[Any, Sequence[str]],
                 **registration: Any) -> Callable[[Map], Map]:
    """Make ``function(chain, **own_options)`` the method ``name``: ``(cap, *, <shared options>, **own_options)``.

    The method's signature (what :func:`vitlens.explain`, the registry and ``help``
    read) is the shared options, with ``start_layer``'s default as given, then the
    function's own keyword options; its name and docstring are the function's. It is
    registered (:func:`~vitlens.registry.register_method`) with ``registration`` as a
    per-layer method that reads ``needs`` and, under ``merge="lrp"``, the relevance at
    the attention (the merging Linear's LRP shares come from it).
    """
    needs = {**needs, ("merge", "lrp"): ("attention_relevance",)}

    def decorate(function: Map) -> Map:
        def method(
            cap: xr.DataTree,
            *,
            layers: list[int] | None = None,
            heads: HeadSelection = None,
            start_layer: int = start_layer,
            per_layer: bool = False,
            merge: Merge = "uniform",
            by_stage: bool = False,
            **options: Any,
        ) -> xr.DataArray | xr.Dataset:
            return function(Chain(cap, layers, heads, start_layer, per_layer, merge, by_stage), **options)

        shared = list(inspect.signature(method).parameters.values())[:-1]
        own = inspect.signature(function)
        method = functools.wraps(function)(method)
        method.__signature__ = own.replace(  # type: ignore[attr-defined]
            parameters=shared + [p for p in own.parameters.values() if p.kind is p.KEYWORD_ONLY])
        return register_method(name, per_layer=True, needs=needs, **registration)(method)

    return decorate
