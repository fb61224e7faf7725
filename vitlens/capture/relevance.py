"""The LRP pass of Transformer Attribution, run at capture time.

Starting from relevance 1 on the explained logit, relevance flows backwards
through the read-out, every block and (Swin) every patch merging. The walk only
knows the vocabulary of :mod:`vitlens.models.parts`; each part applies its own
rule (its ``relevance`` method, built on :mod:`vitlens.models.lrp_rules`). What
arrives at each block's attention probabilities (after the bilinear halving) is
kept as ``attention_relevance``.

The forward pass records what the rules need (block inputs and outputs, MLP
inputs, attention inputs and keyword arguments, each Linear's input and output,
the attention probabilities), so nothing is rerun.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..models.adapter import Adapter, StageInfo
from ..models.lrp_rules import residual_add
from ..models.parts import BlockPart
from .hooks import Recorder
from ..models.windows import from_windows, to_windows


def _active_tokens(r: torch.Tensor) -> torch.Tensor | None:
    """Indices of the tokens that carry relevance, when at most half of them do; else None.

    Token-wise rules (Linear, residual add) give nothing to a token that
    receives nothing, so they may skip it: after a CLS read-out the last
    block's MLP and output projection run on one token instead of all.
    """
    active = r.ne(0).any(-1).any(0)
    rows = active.nonzero().squeeze(1)
    return rows if 2 * rows.numel() <= active.numel() else None


def _scatter(r: torch.Tensor, rows: torch.Tensor, n: int) -> torch.Tensor:
    full = r.new_zeros(r.shape[0], n, *r.shape[2:])
    full[:, rows] = r
    return full


def _block(part: BlockPart, stage: StageInfo, rec: Recorder, layer: int, r_out: torch.Tensor,
           to_input: bool = True) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Relevance at the block input (tokens, (B, N, C)) and at its attention probabilities."""
    kept = rec.batch
    x, x2, out = kept.block_inputs[layer], kept.mlp_inputs[layer], kept.block_outputs[layer]
    lin = kept.linears[layer]
    n = x.shape[1]
    token_wise = {**part.mlp.linears(), "proj": part.attn.proj}
    rows = None if stage.window is not None else _active_tokens(r_out)
    if rows is not None:  # token-wise rules on the tokens that carry relevance only
        x, x2, out, r_out = x[:, rows], x2[:, rows], out[:, rows], r_out[:, rows]
        lin = {**lin, **{k: tuple(None if t is None else t[:, rows] for t in lin[k]) for k in token_wise if k in lin}}
    # out = x2 + ls2·M(x2): the residual, then the branch (scale and norms: identity rule)
    r_x2, r_m = residual_add(x2, out - x2, r_out)
    mlp_in = x2 if part.post_norm else _mlp_input(part, lin, x2)
    r_x2.add_(part.mlp.relevance(mlp_in, r_m, lin))
    # x2 = x + ls1·A(x)
    r_res, r_a = residual_add(x, x2 - x, r_x2)
    if stage.window is not None:
        r_a = to_windows(r_a.reshape(r_a.shape[0], *stage.grid, -1), stage.window,
                         stage.shifts[stage.layers.index(layer)], stage.pad_first)
    proj_rec = lin.get("proj")
    if proj_rec is None:
        raise RuntimeError(f"block {layer}: the attention's output projection was not recorded")
    r_o = part.attn.proj.relevance(proj_rec[0], r_a, proj_rec)
    if rows is not None:
        r_res, r_o = _scatter(r_res, rows, n), _scatter(r_o, rows, n)
    probs = rec.probs(layer)  # first: rebuilding them keeps the scores the relevance step reuses
    r_h, r_probs = part.attn.relevance(kept.attn_inputs[layer], probs, r_o, rec.attn_linears(layer),
                                       kept.attn_ctx.get(layer, {}), to_input, rec.scores(layer), rec.heads(layer))
    if r_h is None:
        return None, r_probs
    if stage.window is not None:
        r_h = from_windows(r_h, stage.window, stage.shifts[stage.layers.index(layer)], stage.grid, stage.pad_first)
        r_h = r_h.reshape(r_h.shape[0], -1, r_h.shape[-1])
    return r_res.add_(r_h), r_probs


def _mlp_input(part: BlockPart, lin: dict, x2: torch.Tensor) -> torch.Tensor:
    """The MLP's own input (norm2's output): the recorded input of its first Linear."""
    for name in ("fc1", "fc1_g", "fc1_x"):
        if name in lin and lin[name][0] is not None:
            return lin[name][0]
    return part.norm2(x2)  # not kept at capture: rebuilt


def attention_relevance(adapter: Adapter, rec: Recorder, targets: torch.Tensor, *,
                        to_input: bool = False, release: bool = False,
                        on_layer: Callable[[int, torch.Tensor], None] | None = None,
                        seed: torch.Tensor | None = None,
                        seed_tokens: torch.Tensor | None = None) -> dict[int, torch.Tensor]:
    """LRP relevance at every block's attention probabilities, keyed by global layer.

    Also stores, for tests and diagnostics, the relevance total entering each
    block in ``rec.batch.relevance_totals[layer] = (in, out)`` (per image; for the
    first block only with ``to_input=True``, which carries the pass through
    its q/k/v maps to the embeddings, a step no map needs), and for
    Swin each parent token's share of its merged token's relevance in
    ``rec.batch.merge_shares[parent_stage]`` (B, N_parent). With ``release=True``
    each block's records are dropped from ``rec`` once the walk has passed
    the block (capture does this: the memory is free for the next step).
    ``on_layer(layer, relevance)`` is called as each block's relevance is
    ready (capture stores it, and the block's attention, right then); the
    returned dict then stays empty. ``seed`` (B, classes) replaces the one-hot
    at the logits (a callable target: its gradient with respect to the
    logits, which is the one-hot for ``lambda out: out[:, k]``);
    ``seed_tokens`` (B, N, C) starts the pass at the final tokens instead
    (a :class:`~vitlens.capture.targets.Target` that reads the embedding).
    """
    assert adapter.head is not None
    rec.paused = True
    try:
        with torch.no_grad():
            feats = adapter.tokens(rec.final_output)
            if seed_tokens is not None:
                r = seed_tokens.to(feats.dtype)
            else:
                onehot = (F.one_hot(targets.to(feats.device), adapter.num_classes).to(feats.dtype) if seed is None
                          else seed.to(feats.dtype))
                r = adapter.head.relevance(feats, onehot)  # final norm: identity rule
            out: dict[int, torch.Tensor] = {}
            rec.batch.relevance_totals = {}
            merges = adapter.merges()
            for stage in reversed(adapter.stages):
                for layer, part in zip(reversed(stage.layers), reversed(stage.parts)):
                    total_out = r.reshape(r.shape[0], -1).sum(1)
                    r, r_probs = _block(part, stage, rec, layer, r, to_input or layer > 0)
                    cut = rec.constant_tokens.get(layer)
                    if cut is not None and r is not None:  # patched tokens: constants, no relevance flows back
                        r[:, cut] = 0
                    if on_layer is None:
                        out[layer] = r_probs
                    else:
                        on_layer(layer, r_probs)
                    del r_probs
                    if release:
                        kept = rec.batch
                        for records in (kept.block_inputs, kept.mlp_inputs, kept.block_outputs, kept.attn_inputs,
                                        kept.attn_ctx, kept.linears):
                            records.pop(layer, None)
                    if r is not None:
                        rec.batch.relevance_totals[layer] = (r.reshape(r.shape[0], -1).sum(1), total_out)
                merge = merges.get(stage.index)
                if merge is not None:
                    x = rec.batch.merge_inputs.pop(stage.index) if release else rec.batch.merge_inputs[stage.index]  # (B, H, W, C)
                    r_child = r.sum(-1).reshape(r.shape[0], *stage.grid)  # (B, h, w) per merged token
                    r = merge.relevance(x, r.reshape(r.shape[0], *stage.grid, -1))
                    # each parent's share of its merged token's relevance (for merge="lrp")
                    ph, pw = adapter.stages[adapter.stages.index(stage) - 1].grid  # an odd parent grid: cropped
                    child = r_child.repeat_interleave(2, 1).repeat_interleave(2, 2)[:, :ph, :pw]
                    share = r.sum(-1) / child.abs().clamp_min(1e-12).copysign(child)
                    rec.batch.merge_shares[stage.index - 1] = share.masked_fill(child == 0, 0.25).flatten(1)
                    r = r.reshape(r.shape[0], -1, r.shape[-1])
            return out
    finally:
        rec.paused = False
