"""The LRP pass of Transformer Attribution, run at capture time.

Starting from relevance 1 on the explained logit, relevance flows backwards
through the head, every block and (Swin) every patch merging, by the rules in
:mod:`vitlens.methods.lrp`. What arrives at each block's attention probabilities
(after the bilinear halving) is kept as ``attention_relevance``.

The forward pass records what the rules need (block inputs, MLP inputs, each
Linear's input and output, the attention probabilities), so nothing is rerun.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..methods.lrp import linear_alphabeta, matmul_lrp0, mean_lrp0, residual_add
from ..models.adapter import Adapter
from .hooks import Recorder


def _split_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, N, 3·D) qkv → (3, B, heads, N, head_dim), timm's layout."""
    b, n, c = t.shape
    return t.reshape(b, n, 3, heads, c // (3 * heads)).permute(2, 0, 3, 1, 4)


def _merge_heads(r_q: torch.Tensor, r_k: torch.Tensor, r_v: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`_split_heads` for the three relevances (one copy each)."""
    b, h, n, hd = r_q.shape
    out = r_q.new_empty(b, n, 3, h, hd)
    for i, r in enumerate((r_q, r_k, r_v)):
        out[:, :, i].copy_(r.transpose(1, 2))
    return out.reshape(b, n, 3 * h * hd)


def _linear(linear: nn.Linear, recorded: tuple[torch.Tensor, torch.Tensor], relevance: torch.Tensor) -> torch.Tensor:
    """αβ rule through ``linear`` from its recorded (input, output)."""
    x, out = recorded
    return linear_alphabeta(x, linear.weight, relevance, out=out, bias=linear.bias)


def _attention_branch_relevance(attn: nn.Module, lin: dict, probs: torch.Tensor, r_o: torch.Tensor,
                                bias: torch.Tensor | None = None, to_input: bool = True):
    """Relevance at the attention branch input (qkv's input) and at the attention probabilities.

    ``r_o``: relevance at the output projection's input (heads concatenated);
    ``lin`` holds the recorded (input, output) of ``qkv``; ``probs`` the
    recorded attention. ``bias``: Swin's position bias + shift mask, whose
    share of the logits' relevance is dropped (a documented leak). With
    ``to_input=False`` the (costly) qkv step is skipped and ``None`` returned
    for the input.
    """
    q, k, v = _split_heads(lin["qkv"][1], attn.num_heads).unbind(0)
    b, n, _ = r_o.shape
    r_probs, r_v = matmul_lrp0(probs, v, r_o.reshape(b, n, attn.num_heads, -1).transpose(1, 2))
    if not to_input:
        return None, r_probs
    q, k = getattr(attn, "q_norm", nn.Identity())(q), getattr(attn, "k_norm", nn.Identity())(k)
    qs, kt = q * attn.scale, k.transpose(-2, -1)
    # softmax passes relevance on unchanged; then the Q·Kᵀ bilinear rule
    z = None
    if bias is not None:  # logits of each window: (B·nW, heads, N, N) + (nW, heads, N, N)
        z = qs @ kt
        z.view(-1, bias.shape[0], *z.shape[1:]).add_(bias)
    r_q, r_kt = matmul_lrp0(qs, kt, r_probs, z=z)
    r_qkv = _merge_heads(r_q, r_kt.transpose(-2, -1), r_v)
    return _linear(attn.qkv, lin["qkv"], r_qkv), r_probs


def _mlp_relevance(block: nn.Module, lin: dict, x2: torch.Tensor, r_out: torch.Tensor) -> torch.Tensor:
    """Relevance at ``x2`` for ``x3 = x2 + ls2(fc2(norm(act(fc1(norm2(x2))))))``."""
    mlp = block.mlp
    f = getattr(block, "ls2", nn.Identity())(lin["fc2"][1])
    r_res, r_f = residual_add(x2, f, r_out)
    r_g = _linear(mlp.fc2, lin["fc2"], r_f)
    return r_res.add_(_linear(mlp.fc1, lin["fc1"], r_g))


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


def _vit_block(block: nn.Module, rec: Recorder, layer: int, r_out: torch.Tensor, to_input: bool = True):
    x, x2, lin = rec.block_inputs[layer], rec.mlp_inputs[layer], rec.linears[layer]
    n = x.shape[1]
    rows = _active_tokens(r_out)
    if rows is not None:  # token-wise rules on the tokens that carry relevance only
        x, x2, r_out = x[:, rows], x2[:, rows], r_out[:, rows]
        lin = {**lin, **{k: tuple(t[:, rows] for t in lin[k]) for k in ("fc1", "fc2", "proj")}}
    r_x2 = _mlp_relevance(block, lin, x2, r_out)
    r_res, r_a = residual_add(x, x2 - x, r_x2)
    r_o = _linear(block.attn.proj, lin["proj"], r_a)
    if rows is not None:
        r_res, r_o = _scatter(r_res, rows, n), _scatter(r_o, rows, n)
    r_h1, r_probs = _attention_branch_relevance(block.attn, lin, rec.attention[layer].detach(), r_o,
                                                to_input=to_input)
    return (None if r_h1 is None else r_res.add_(r_h1)), r_probs


# -- Swin windows ---------------------------------------------------------------
def _to_windows(x: torch.Tensor, window: tuple[int, int], shift: tuple[int, int]) -> torch.Tensor:
    """(B, H, W, C) → (B·nW, M², C) after the cyclic shift, as timm's Swin does."""
    b, h, w, c = x.shape
    if any(shift):
        x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
    mh, mw = window
    x = x.reshape(b, h // mh, mh, w // mw, mw, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, mh * mw, c)


def _from_windows(xw: torch.Tensor, window: tuple[int, int], shift: tuple[int, int], hw: tuple[int, int]) -> torch.Tensor:
    """Inverse of :func:`_to_windows` (also the transpose: it is a permutation)."""
    h, w = hw
    mh, mw = window
    c = xw.shape[-1]
    x = xw.reshape(-1, h // mh, w // mw, mh, mw, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, h, w, c)
    if any(shift):
        x = torch.roll(x, shifts=shift, dims=(1, 2))
    return x


def _swin_bias(block: nn.Module) -> torch.Tensor:
    """Position bias + shift mask added to the attention logits: (nW or 1, heads, N, N)."""
    bias = block.attn._get_rel_pos_bias()[0]  # (heads, N, N)
    mask = block.attn_mask  # (nW, N, N) or None
    return bias.unsqueeze(0) if mask is None else bias.unsqueeze(0) + mask.unsqueeze(1)


def _swin_block(block: nn.Module, rec: Recorder, layer: int, r_out: torch.Tensor, to_input: bool = True):
    x, lin = rec.block_inputs[layer], rec.linears[layer]
    b, h, w, c = x.shape
    window, shift = tuple(block.window_size), tuple(block.shift_size)
    x2 = rec.mlp_inputs[layer]  # (B, H·W, C)
    r_x2 = _mlp_relevance(block, lin, x2, r_out.reshape(b, h * w, c)).reshape(b, h, w, c)
    r_res, r_a = residual_add(x, x2.reshape(b, h, w, c) - x, r_x2)
    r_o = _linear(block.attn.proj, lin["proj"], _to_windows(r_a, window, shift))
    r_hw, r_probs = _attention_branch_relevance(
        block.attn, lin, rec.attention[layer].detach(), r_o, _swin_bias(block), to_input
    )
    if r_hw is None:
        return None, r_probs
    return r_res.add_(_from_windows(r_hw, window, shift, (h, w))), r_probs


def _merge_relevance(merge: nn.Module, x: torch.Tensor, r_out: torch.Tensor) -> torch.Tensor:
    """Patch merging: LayerNorm (pass-through) then a Linear over the four parents."""
    b, h, w, c = x.shape
    cat = x.reshape(b, h // 2, 2, w // 2, 2, c).permute(0, 1, 3, 4, 2, 5).flatten(3)
    r_cat = linear_alphabeta(merge.norm(cat), merge.reduction.weight, r_out)
    return r_cat.reshape(b, h // 2, w // 2, 2, 2, c).permute(0, 1, 4, 2, 3, 5).reshape(b, h, w, c)


# -- heads ------------------------------------------------------------------------
def _head_relevance(adapter: Adapter, feats: torch.Tensor, onehot: torch.Tensor) -> torch.Tensor:
    """Relevance on the final norm's output tokens from a one-hot at the logits."""
    model = adapter.model
    if adapter.family == "swin":
        b, h, w, c = feats.shape
        tokens = feats.reshape(b, h * w, c)
        pooled = tokens.mean(1)
        r_pooled = linear_alphabeta(pooled, model.head.fc.weight, onehot)
        return mean_lrp0(tokens, r_pooled, dim=1).reshape(b, h, w, c)
    r = torch.zeros_like(feats)
    fc_norm = getattr(model, "fc_norm", nn.Identity())
    if adapter.readout == "avg":
        start = model.num_prefix_tokens
        pooled = fc_norm(feats[:, start:].mean(1))
        r_pooled = linear_alphabeta(pooled, model.head.weight, onehot)
        r[:, start:] = mean_lrp0(feats[:, start:], r_pooled, dim=1)
        return r
    if getattr(model, "head_dist", None) is not None:  # distilled DeiT: mean of two heads
        z0 = F.linear(feats[:, 0], model.head.weight, model.head.bias) / 2
        z1 = F.linear(feats[:, 1], model.head_dist.weight, model.head_dist.bias) / 2
        r0, r1 = residual_add(z0, z1, onehot)
        r[:, 0] = linear_alphabeta(feats[:, 0], model.head.weight, r0)
        r[:, 1] = linear_alphabeta(feats[:, 1], model.head_dist.weight, r1)
        return r
    r[:, 0] = linear_alphabeta(fc_norm(feats[:, 0]), model.head.weight, onehot)
    return r


def attention_relevance(adapter: Adapter, rec: Recorder, targets: torch.Tensor, *,
                        to_input: bool = False) -> dict[int, torch.Tensor]:
    """LRP relevance at every block's attention probabilities, keyed by global layer.

    Also stores, for tests and diagnostics, the relevance total entering each
    block in ``rec.relevance_totals[layer] = (in, out)`` (per image; for the
    first block only with ``to_input=True``, which carries the pass through
    its qkv projection to the embeddings, a step no map needs), and for
    Swin each parent token's share of its merged token's relevance in
    ``rec.merge_shares[parent_stage]`` (B, N_parent).
    """
    rec.paused = True
    try:
        with torch.no_grad():
            x_last = rec.final_input
            feats = adapter.final_norm()(x_last)
            num_classes = adapter.num_classes
            onehot = F.one_hot(targets.to(feats.device), num_classes).to(feats.dtype)
            r = _head_relevance(adapter, feats, onehot)
            out: dict[int, torch.Tensor] = {}
            rec.relevance_totals = {}
            for stage in reversed(adapter.stages):
                for layer, block in zip(reversed(stage.layers), reversed(stage.blocks)):
                    total_out = r.reshape(r.shape[0], -1).sum(1)
                    walk = _swin_block if adapter.family == "swin" else _vit_block
                    r, out[layer] = walk(block, rec, layer, r, to_input or layer > 0)
                    if r is not None:
                        rec.relevance_totals[layer] = (r.reshape(r.shape[0], -1).sum(1), total_out)
                merge = adapter.merges().get(stage.index)
                if merge is not None:
                    r_child = r.sum(-1)  # (B, h, w) relevance of each merged token
                    r = _merge_relevance(merge, rec.merge_inputs[stage.index], r)
                    # each parent's share of its merged token's relevance (for merge="lrp")
                    child = r_child.repeat_interleave(2, 1).repeat_interleave(2, 2)
                    share = r.sum(-1) / child.abs().clamp_min(1e-12).copysign(child)
                    rec.merge_shares[stage.index - 1] = share.masked_fill(child == 0, 0.25).flatten(1)
            return out
    finally:
        rec.paused = False
