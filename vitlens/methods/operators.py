"""Shared maths of the attention-propagation methods.

Every propagation method (rollout, transformer_attribution, generic_attention,
lnstat, tokentm, and single-block attention) multiplies one operator per block
and reads out a row of the product. Here each block's operator has the form::

    O_l = diag(pre) · (α·I + β·G(X_l)·diag(post))

where ``X_l`` is a fused per-head quantity — a dense (N, N) matrix for ViT, or
one (M², M²) block per window for Swin, whose global operator is
``G = Pᵀ·blockdiag(X_w)·P``. The map is ``r · O_L ··· O_s`` (then ``·Pm`` at each
Swin patch merging), computed right-to-left as a *row vector*: never a dense
Ns×Ns matrix for Swin (cost O(Ns·M²) per block), always in float64
(:data:`ACCUMULATE`; see docs/METHODS.md, "Average read-out"). :func:`dense_operator`
builds the dense matrices only for tests and teaching.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
import xarray as xr

from ..capture.attrs import decode_tree
from ..capture.layout import CaptureLayout, StageLayout, capture_layout, missing_variable
from ..errors import OptionError
from .options import IdentityPath, Merge, check


# -- reading the capture -------------------------------------------------------------
@dataclass
class StageView:
    """One stage of a capture as torch tensors (float32), plus its layout (:class:`StageLayout`)."""

    layout: StageLayout
    ds: xr.Dataset
    tree: xr.DataTree
    window_token: torch.Tensor | None = None  # (layer, window, M²) int64
    _cache: dict[str, torch.Tensor] = field(default_factory=dict)

    def __getattr__(self, name: str) -> Any:  # name, index, layers, grid, stride, num_prefix, num_tokens
        if name.startswith("_") or name == "layout":
            raise AttributeError(name)
        return getattr(self.layout, name)

    @property
    def windowed(self) -> bool:
        return self.window_token is not None

    def tensor(self, name: str) -> torch.Tensor:
        if name not in self._cache:
            if name not in self.ds:
                raise missing_variable(self.tree, name, self.name)
            self._cache[name] = torch.from_numpy(np.asarray(self.ds[name].values, dtype=np.float32))
        return self._cache[name]

    def layer_index(self, layer: int) -> int:
        return self.layers.index(layer)

    def window_index(self, layer: int) -> torch.Tensor:
        """``window_token`` at ``layer`` with padded positions sent to the spare slot ``num_tokens``.

        Gathering from a row with one zero appended (:func:`with_spare`) gives a
        padded position nothing; scattering into it and dropping the spare slot
        throws away what a padded key received.
        """
        key = f"window_index/{layer}"
        if key not in self._cache:
            wt = self.window_token[self.layer_index(layer)]
            self._cache[key] = torch.where(wt < 0, self.num_tokens, wt)
        return self._cache[key]

    def window_valid(self, layer: int) -> torch.Tensor:
        """(nW, M²) bool: which window positions hold a token (not padding)."""
        return self.window_token[self.layer_index(layer)] >= 0


def with_spare(x: torch.Tensor) -> torch.Tensor:
    """(B, N) → (B, N + 1) with a zero in the spare slot that padded window positions point to."""
    return torch.nn.functional.pad(x, (0, 1))


@dataclass
class CaptureView:
    """What the methods need from a capture DataTree: its layout and its stages' tensors."""

    tree: xr.DataTree
    layout: CaptureLayout
    stages: list[StageView]

    @property
    def readout(self) -> str:
        return self.layout.readout

    @property
    def family(self) -> str:
        return self.layout.family

    @property
    def all_layers(self) -> list[int]:
        return self.layout.layers

    def stage_of(self, layer: int) -> StageView:
        return self.stages[self.layout.stages.index(self.layout.stage_of(layer))]

    @property
    def num_samples(self) -> int:
        return int(self.tree["sample"].size)


def view(cap: xr.DataTree) -> CaptureView:
    """The capture as the methods read it (its layout from :func:`~vitlens.capture.layout.capture_layout`)."""
    layout = capture_layout(cap)  # refuses anything that is not a capture
    cap = decode_tree(cap)  # a saved capture read with plain xr.open_datatree keeps JSON attrs
    stages = []
    for stage in layout.stages:
        ds = cap[stage.name].to_dataset()
        wt = torch.from_numpy(ds["window_token"].values.astype(np.int64)) if "window_token" in ds else None
        stages.append(StageView(layout=stage, ds=ds, tree=cap, window_token=wt))
    return CaptureView(cap, layout, stages)


# -- options --------------------------------------------------------------------------
HeadSelection = None | int | Sequence[int] | Mapping[int, Sequence[int]]


def select_layers(cv: CaptureView, layers: int | Iterable[int] | None, start_layer: int = 0) -> list[int]:
    """Global block indices entering the aggregation (sorted)."""
    if layers is None:
        chosen = list(cv.all_layers)
    else:
        chosen = cv.layout.check_layers([layers] if isinstance(layers, (int, np.integer)) else layers)
    chosen = sorted({l for l in chosen if l >= start_layer})
    if not chosen:
        raise OptionError(
            f"no layer left to aggregate (layers={layers!r}, start_layer={start_layer}); select at least one block."
        )
    return chosen


def heads_for(heads: HeadSelection, layer: int, num_heads: int) -> list[int]:
    """Head indices entering ``E_h`` at ``layer``; ``heads`` may map layer → heads."""
    if heads is None:
        return list(range(num_heads))
    if isinstance(heads, Mapping):
        chosen = heads.get(layer, range(num_heads))
    elif isinstance(heads, (int, np.integer)):
        chosen = [int(heads)]
    else:
        chosen = heads
    out = sorted({int(h) for h in chosen})
    if not out:
        raise OptionError(f"no head selected for layer {layer}; select at least one head.")
    if out[0] < 0 or out[-1] >= num_heads:
        raise OptionError(f"heads {out} out of range at layer {layer}, which has {num_heads} heads (0..{num_heads - 1}).")
    return out


def pick_heads(x: torch.Tensor, heads: list[int]) -> tuple[torch.Tensor, bool]:
    """``x[:, heads]``, or ``x`` itself when ``heads`` are all of them (no copy); and whether it is a copy."""
    if heads == list(range(x.shape[1])):
        return x, False
    return x[:, heads], True


def head_mean(x: torch.Tensor, heads: list[int], clamp: bool = False, owned: bool = False) -> torch.Tensor:
    """``E_h[x]`` over the selected heads (dim 1), clamping at 0 per head first if asked.

    ``owned``: ``x`` is a temporary of the caller's, so the clamp may overwrite it
    (a capture's own arrays are never written).
    """
    x, copied = pick_heads(x, heads)
    owned = owned or copied
    if clamp:
        x = x.clamp_(min=0) if owned else x.clamp(min=0)
    return x.mean(1)


# -- the operator chain --------------------------------------------------------------------
@dataclass
class Step:
    """``O = diag(pre)·(α·I + β·G(x)·diag(post))`` for one block.

    ``x``: (B, N, N) for ViT, (B, nW, M², M²) for Swin windows.
    ``pre``/``post``: (B, N) or None (ones).
    """

    layer: int
    x: torch.Tensor
    alpha: float = 1.0
    beta: float = 1.0
    pre: torch.Tensor | None = None
    post: torch.Tensor | None = None


def row_parts(stage: StageView, step: Step, r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``r · O`` for a batch of row vectors ``r`` (B, N) as its two parts, in ``r``'s precision:
    the identity part ``α·(r⊙pre)`` and the attention part ``β·((r⊙pre)·G(x))⊙post``.

    The step's float32 tensors are promoted to ``r``'s dtype (float64 in
    :func:`propagate`) before the products.
    """
    x = step.x.to(r.dtype)
    if step.pre is not None:
        r = r * step.pre.to(r.dtype)
    if stage.windowed:
        wt = stage.window_index(step.layer)  # (nW, M²); padding → the spare slot N
        rw = with_spare(r)[:, wt]  # (B, nW, M²): r gathered into window layout (0 at padding)
        prod = torch.einsum("bwq,bwqk->bwk", rw, x)
        g = r.new_zeros(r.shape[0], r.shape[1] + 1)
        g[:, wt.reshape(-1)] = prod.reshape(r.shape[0], -1)  # windows tile the grid exactly once
        g = g[:, :-1]  # what padded keys received belongs to no token
    else:
        g = torch.einsum("bq,bqk->bk", r, x)
    if step.post is not None:
        g = g * step.post.to(r.dtype)
    return step.alpha * r, step.beta * g


def apply_row(stage: StageView, step: Step, r: torch.Tensor) -> torch.Tensor:
    """``r · O`` for a batch of row vectors ``r`` (B, N), in ``r``'s precision (see :func:`row_parts`)."""
    identity, attention = row_parts(stage, step, r)
    return identity + attention


def merge_row(r: torch.Tensor, grid_from: tuple[int, int], share: torch.Tensor | None = None,
              grid_to: tuple[int, int] | None = None) -> torch.Tensor:
    """``r · Pm``: a row on a merged grid onto its parent grid ``grid_to`` (default 2×).

    ``share=None``: 1/4 to each of the four parents (default ``merge="uniform"``);
    otherwise each parent's (B, N_parent) share of its merged token (``merge="lrp"``,
    the shares the LRP rule of the merging Linear gives). A parent grid with an
    odd side was padded before merging: the share of the padding is dropped.
    """
    b = r.shape[0]
    gh, gw = grid_from
    ph, pw = grid_to or (2 * gh, 2 * gw)
    r = r.reshape(b, gh, 1, gw, 1).expand(b, gh, 2, gw, 2).reshape(b, 2 * gh, 2 * gw)[:, :ph, :pw].reshape(b, ph * pw)
    return r / 4 if share is None else r * share.to(r.dtype)


def merge_shares(cv: "CaptureView", merge: Merge) -> dict[int, torch.Tensor | None]:
    """Per parent stage, the merge shares for ``merge`` (None = uniform)."""
    check("", merge=merge)
    if merge == "uniform":
        return {}
    return {s.index: s.tensor("merge_share") for s in cv.stages[:-1]}


#: Precision of the operator products. Under an average read-out the row starts
#: uniform (1/N) and the class-specific terms the blocks add can sit ~1e-8 below
#: it: float32 rounds them away (two targets, one map), float64 keeps them.
ACCUMULATE = torch.float64


def readout_row(cv: CaptureView, stage: StageView, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The read-out row ``r``: CLS one-hot, the mean of the patch rows (avg pool / Swin),
    the mean of all rows (``avg_with_prefix``), or the attention pool's weights (``map``)."""
    b, n = cv.num_samples, stage.num_tokens
    r = torch.zeros(b, n, dtype=dtype or ACCUMULATE)
    if cv.readout == "cls":
        r[:, 0] = 1.0
    elif cv.readout == "avg_with_prefix":
        r[:] = 1.0 / n
    elif cv.readout == "map" and "readout_weights" in stage.ds:
        r = stage.tensor("readout_weights").to(dtype or ACCUMULATE, copy=True)
    else:
        r[:, stage.num_prefix :] = 1.0 / (n - stage.num_prefix)
    return r


def propagate(
    cv: CaptureView,
    steps: Mapping[int, Step],
    top_layer: int,
    *,
    final: Callable[[torch.Tensor], torch.Tensor] | None = None,
    shares: Mapping[int, torch.Tensor | None] | None = None,
    collect: dict[str, torch.Tensor] | None = None,
    dense: bool = False,
    drop_identity: bool = False,
) -> torch.Tensor:
    """Read-out row of ``O_top ··· O_first`` (blocks missing from ``steps`` are identity).

    Starts at the stage of ``top_layer`` with the read-out row of that stage and
    walks down every block and patch merging to the first stage; returns the
    patch part reshaped to the first stage's grid, (B, gh, gw). ``final`` is
    applied to the first-stage row last (``· C_0`` for tokentm). ``shares``
    (from :func:`merge_shares`) picks the merge rule; ``collect`` receives each
    stage's map on its own grid (after its blocks, before merging down).
    ``dense=True`` multiplies dense matrices instead (tests and teaching only).

    ``drop_identity=True`` returns the part of the product that crossed at least
    one attention term: the full row minus its identity path (every ``β`` set to
    0), computed directly rather than by subtraction. Two rows go down the chain,
    the identity path ``b`` and the rest ``d``; each block adds to ``d`` what its
    attention term takes from either::

        b ← b·O_id,     d ← d·O + b·O_att,     O = O_id + O_att

    (for the ``(I + Ē)`` chains: ``D_l = D_{l−1} + Ē_l·(I + D_{l−1})`` with
    ``D = C − I``), so no scale of ``Ē`` is rounded away against the identity
    (docs/METHODS.md, "Average read-out").
    """
    shares = shares or {}
    top_stage = cv.stage_of(top_layer)
    start = readout_row(cv, top_stage)  # float64 (ACCUMULATE): every product below runs in it
    # rows: the rest d (the whole row when the identity path is kept) and the identity path b.
    # Every identity part is diagonal, so a read-out row that is 0 on the patches (CLS)
    # keeps its identity path on the prefix tokens: the map has no identity part to drop
    drop_identity = drop_identity and bool(start[:, top_stage.num_prefix :].any())
    rest, base = (torch.zeros_like(start), start) if drop_identity else (start, None)

    def parts(stage: StageView, step: Step, r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not dense:
            return row_parts(stage, step, r)
        identity, attention = dense_parts(stage, step)
        return (torch.einsum("bi,bij->bj", r, identity.to(r.dtype)),
                torch.einsum("bi,bij->bj", r, attention.to(r.dtype)))

    def merge(r: torch.Tensor, stage: StageView) -> torch.Tensor:
        share = shares.get(stage.index - 1)
        parent = cv.stages[cv.stages.index(stage) - 1].grid
        if not dense:
            return merge_row(r, stage.grid, share, parent)
        pm = dense_merge(stage.grid, parent).to(r.dtype)
        return torch.einsum("bi,ij->bj", r, pm) if share is None else torch.einsum("bi,ij->bj", r, pm * 4) * share.to(r.dtype)

    for stage in reversed(cv.stages[: cv.stages.index(top_stage) + 1]):
        for layer in reversed(stage.layers):
            if layer <= top_layer and layer in steps:
                identity, attention = parts(stage, steps[layer], rest)
                rest = identity + attention
                if base is not None:
                    identity, attention = parts(stage, steps[layer], base)
                    rest, base = rest + attention, identity
        if collect is not None:
            collect[stage.name] = rest[:, stage.num_prefix :].reshape(-1, *stage.grid)
        if stage.index > 0:
            rest = merge(rest, stage)
            base = None if base is None else merge(base, stage)
    first = cv.stages[0]
    if final is not None:
        rest = final(rest)
    if collect is not None and final is not None:
        collect[first.name] = rest[:, first.num_prefix :].reshape(-1, *first.grid)
    gh, gw = first.grid
    return rest[:, first.num_prefix :].reshape(-1, gh, gw)


def grid_factor(stage: StageView, first: StageView) -> tuple[int, int]:
    """First-stage tokens per ``stage`` token along (y, x): the ratio of their strides."""
    return stage.stride[0] // first.stride[0], stage.stride[1] // first.stride[1]


def onto_grid(values: torch.Tensor, stage: StageView, first: StageView) -> torch.Tensor:
    """A (B, h, w) map on ``stage``'s grid repeated onto ``first``'s (finer) grid.

    Each token covers :func:`grid_factor` first-stage tokens per axis; a grid
    merged from an odd side hangs over the edge, so the result is cropped.
    """
    fy, fx = grid_factor(stage, first)
    up = values.repeat_interleave(fy, -2).repeat_interleave(fx, -1)
    return up[..., : first.grid[0], : first.grid[1]]


# -- dense path (tests, teaching) -------------------------------------------------------------
def dense_global(stage: StageView, layer: int, x: torch.Tensor) -> torch.Tensor:
    """``G = Pᵀ·blockdiag(x_w)·P`` as a dense (B, N, N) matrix."""
    if not stage.windowed:
        return x
    wt = stage.window_index(layer)  # padding → the spare slot N, dropped below
    b = x.shape[0]
    n = stage.num_tokens
    g = torch.zeros(b, n + 1, n + 1, dtype=x.dtype)
    rows = wt[:, :, None].expand(-1, -1, wt.shape[1])
    cols = wt[:, None, :].expand(-1, wt.shape[1], -1)
    g[:, rows.reshape(-1), cols.reshape(-1)] = x.reshape(b, -1)
    return g[:, :n, :n]


def dense_parts(stage: StageView, step: Step) -> tuple[torch.Tensor, torch.Tensor]:
    """The block operator ``O`` as dense (B, N, N) matrices, in float64 (:data:`ACCUMULATE`):
    its identity part ``α·diag(pre)`` and its attention part ``β·diag(pre)·G·diag(post)``."""
    g = dense_global(stage, step.layer, step.x.to(ACCUMULATE))
    n = g.shape[-1]
    if step.post is not None:
        g = g * step.post.to(g.dtype)[:, None, :]
    identity = step.alpha * torch.eye(n, dtype=g.dtype).expand_as(g)
    attention = step.beta * g
    if step.pre is not None:
        identity = step.pre.to(g.dtype)[:, :, None] * identity
        attention = step.pre.to(g.dtype)[:, :, None] * attention
    return identity, attention


def dense_operator(stage: StageView, step: Step) -> torch.Tensor:
    """The block operator ``O`` as a dense (B, N, N) matrix, in float64 (:data:`ACCUMULATE`)."""
    identity, attention = dense_parts(stage, step)
    return identity + attention


def dense_merge(grid_from: tuple[int, int], grid_to: tuple[int, int] | None = None) -> torch.Tensor:
    """``Pm`` (N_{s+1} × N_s) with 1/4 on each of the four parents of a merged token
    (parents in the padding of an odd-sided ``grid_to`` left out)."""
    gh, gw = grid_from
    ph, pw = grid_to or (2 * gh, 2 * gw)
    pm = torch.zeros(gh, gw, ph, pw)
    for i in range(gh):
        for j in range(gw):
            pm[i, j, 2 * i : 2 * i + 2, 2 * j : 2 * j + 2] = 0.25
    return pm.reshape(gh * gw, ph * pw)


def propagate_dense(cv: CaptureView, steps: Mapping[int, Step], top_layer: int, **kwargs) -> torch.Tensor:
    """Same as :func:`propagate` through dense matrices (for tests; O(N³))."""
    return propagate(cv, steps, top_layer, dense=True, **kwargs)


def head_fused(stage: StageView, layer: int, heads: HeadSelection, *names: str, clamp: bool = False) -> torch.Tensor:
    """``E_h[Π names]`` at ``layer`` (per head, clamped at 0 first if ``clamp``).

    ``names`` are capture variables, e.g. ``("attention",)`` or
    ``("attention_grad", "attention")`` for ``E_h[(∂y/∂A ⊙ A)⁺]``. Returns
    (B, N, N) for ViT or (B, nW, M², M²) for Swin windows.
    """
    i = stage.layer_index(layer)
    x = stage.tensor(names[0])[:, i]
    for name in names[1:]:
        x = x * stage.tensor(name)[:, i]
    return head_mean(x, heads_for(heads, layer, x.shape[1]), clamp=clamp, owned=len(names) > 1)


# -- the identity path (average read-out) ---------------------------------------------------
def resolve_identity_path(cv: CaptureView, method: str, identity_path: IdentityPath | None) -> IdentityPath:
    """``identity_path``, or the registry's default for this capture's read-out when None."""
    if identity_path is None:
        from ..registry import METHOD_INFO

        identity_path = METHOD_INFO[method].defaults_for(cv).get("identity_path", "keep")
    check(method, identity_path=identity_path)
    return identity_path
