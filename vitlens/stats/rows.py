"""One block's attention rows in one layout for ViT and Swin windows: what every head statistic reads.

A head statistic looks at attention *rows*: one query token's attention over the
keys it can see. In a ViT that is the ``(N,)`` row of the dense matrix; in a Swin
window it is the ``(M²,)`` row of the query's window, whose keys are the tokens
at the window's positions (or padding). :func:`attention_rows` gives both as
``values (sample, head, row, key)`` with, per row, the token index of every key
slot (:data:`~vitlens.models.windows.PAD` where a window position holds no
token), so a statistic is one vectorised expression for every family.
:func:`head_table` puts per-layer results into the ``(sample, layer, head)``
array of the registry's contract.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Literal

import numpy as np
import xarray as xr

from ..capture.layout import missing_variable, stage_names
from ..errors import CaptureFormatError
from ..methods.operators import StageView, view

#: Which query rows :func:`attention_rows` gives: patch tokens only, or every token (prefix too).
Queries = Literal["patch", "all"]


@dataclass(frozen=True)
class Rows:
    """Attention rows of one block: ``values[b, h, r, k]`` is query ``token[r]``'s weight on key slot ``k``.

    ``key_token[r, k]`` (or ``[0, k]``, the same for every row) is the token
    index of key slot ``k`` in the stage, negative for a padded window position.
    Token ``t < num_prefix`` is a prefix token (CLS, distillation, register).
    """

    layer: int
    values: np.ndarray  # (sample, head, row, key) float64
    token: np.ndarray  # (row,) query token
    key_token: np.ndarray  # (row or 1, key) key token, < 0 for padding
    num_prefix: int
    center: np.ndarray  # (token, 2): pixel centre (y, x) in input pixels; NaN for prefix tokens

    @property
    def real_key(self) -> np.ndarray:
        """(row or 1, key): the slot holds a token (not padding)."""
        return self.key_token >= 0

    @property
    def patch_key(self) -> np.ndarray:
        """(row or 1, key): the slot holds a patch token."""
        return self.key_token >= self.num_prefix

    @property
    def prefix_key(self) -> np.ndarray:
        """(row or 1, key): the slot holds a prefix token."""
        return self.real_key & ~self.patch_key

    def row_sum(self, weights: np.ndarray) -> np.ndarray:
        """``Σ_k values[b, h, r, k] · weights[r, k]`` as (sample, head, row): one product, no temporaries.

        ``weights``: (row or 1, key), e.g. a key mask or the mask times the key distances.
        """
        weights = np.asarray(weights, dtype=np.float64)
        if weights.shape[0] == 1:  # the same keys for every row (ViT): a matrix-vector product
            return self.values @ weights[0]
        return np.einsum("bhrk,rk->bhr", self.values, weights, optimize=True)

    def key_distance(self) -> np.ndarray:
        """(row or 1, key): Euclidean distance in input pixels from the query to each patch key (0 elsewhere)."""
        keys = self.center[np.where(self.patch_key, self.key_token, self.num_prefix)]  # a patch stands in
        d = np.linalg.norm(keys - self.center[self.token][:, None, :], axis=-1)
        return np.where(self.patch_key, d, 0.0)


def stage_nodes(cap: xr.DataTree) -> list[StageView]:
    """The capture's stages (as the methods read them), each checked to hold attention."""
    stages = view(cap).stages
    missing = [s.name for s in stages if "attention" not in s.ds]
    if missing:  # the one message for a missing variable, and where statistics can come from instead
        raise CaptureFormatError(f"{missing_variable(cap, 'attention', missing[0])} Head statistics can also be "
                                 "stored as the capture runs: vl.capture(..., stats=...).")
    return stages


def holds_groups(cap: xr.DataTree, groups: Iterable[str]) -> bool:
    """Whether every stage of the capture holds each of the capture ``groups`` (``StatInfo.groups()``).

    A group is held where the stage has its variable (``attention``, ``attention_grad``,
    ``ablation_effect``) or variables named after it (``ln_mean``…, ``features``…).
    """
    stages = [cap[c].to_dataset(inherit=False) for c in stage_names(cap)]
    return bool(stages) and all(any(v == g or str(v).startswith(f"{g}_") for v in ds.data_vars)
                                for ds in stages for g in groups)


def _centres(stage: StageView) -> np.ndarray:
    return np.stack([stage.ds["center_y"].values, stage.ds["center_x"].values], -1).astype(np.float64)


def attention_rows(stage: StageView, layer: int, variable: str = "attention",
                   queries: Queries = "patch") -> Rows:
    """Block ``layer``'s rows of ``variable`` (``"attention"``, ``"attention_grad"``) for the chosen queries.

    ViT: the rows of the patch queries (or every token's), all ``N`` keys. Swin:
    one row per window position that holds a token (each token is a query
    exactly once per block), its ``M²`` keys the window's positions.
    """
    if variable not in stage.ds:
        raise CaptureFormatError(
            f"this capture has no '{variable}' in {stage.name}; capture again with keep='all' (and grads=True "
            f"for gradients), or with stats= to store the statistics as it runs."
        )
    i = stage.layer_index(layer)
    att = stage.ds[variable].isel(layer=i)
    first = stage.num_prefix if queries == "patch" else 0
    if not stage.windowed:
        values = np.asarray(att.transpose("sample", "head", "query", "key").values, dtype=np.float64)
        n = values.shape[-1]
        token = np.arange(first, n)
        return Rows(layer, values[:, :, first:], token, np.arange(n)[None, :], stage.num_prefix, _centres(stage))
    wt = stage.window_token[i].numpy()  # (window, M²), PAD = -1
    window, position = np.nonzero(wt >= max(first, 0))
    values = np.asarray(att.transpose("sample", "head", "window", "query", "key").values, dtype=np.float64)
    return Rows(layer, values[:, :, window, position], wt[window, position], wt[window], stage.num_prefix,
                _centres(stage))


def every_layer(cap: xr.DataTree) -> Iterator[tuple[StageView, int]]:
    """``(stage, layer)`` for every block of the capture, in order."""
    for stage in stage_nodes(cap):
        for layer in stage.layers:
            yield stage, layer


def head_table(cap: xr.DataTree, per_layer: dict[int, np.ndarray], name: str) -> xr.DataArray:
    """Per-layer ``(sample, head)`` results as ``(sample, layer, head)``; NaN for a head the layer lacks.

    Swin stages differ in head count: the ``head`` axis runs to the largest, and
    the heads a stage does not have are NaN (they do not exist; ``.mean()``
    skips them). A ``stage`` coordinate on ``layer`` says where each block sits.
    """
    from ..registry import stat_info

    stages = stage_nodes(cap)
    layers = [l for s in stages for l in s.layers]
    heads = max(s.num_heads for s in stages)
    samples = cap["sample"].values
    out = np.full((len(samples), len(layers), heads), np.nan)
    for j, layer in enumerate(layers):
        values = per_layer[layer]
        out[:, j, : values.shape[1]] = values
    info = stat_info(name)
    return xr.DataArray(
        out, dims=("sample", "layer", "head"), name=name,
        coords={"sample": samples, "layer": layers, "head": np.arange(heads),
                "stage": ("layer", [s.index for s in stages for _ in s.layers])},
        attrs={"stat": name, "unit": info.unit},
    )


def row_mean(per_row: np.ndarray, defined: np.ndarray | None = None) -> np.ndarray:
    """Mean over the rows (last axis) of ``(sample, head, row)``, counting only ``defined`` rows.

    A head with no defined row gets NaN (the statistic does not exist for it).
    """
    if defined is None:
        return per_row.mean(-1)
    count = defined.sum(-1)
    total = np.where(defined, per_row, 0.0).sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)
