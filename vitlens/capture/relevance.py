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
    """Inverse of :func:`_split_heads` for the three relevances."""
    r = torch.stack([r_q, r_k, r_v])  # (3, B, H, N, hd)
    _, b, h, n, hd = r.shape
    return r.permute(1, 3, 0, 2, 4).reshape(b, n, 3 * h * hd)


def _minus_bias(out: torch.Tensor, linear: nn.Linear) -> torch.Tensor:
    """A Linear's bias-free output ``x Wᵀ`` from its recorded output."""
    return out if linear.bias is None else out - linear.bias


def _attention_branch_relevance(attn: nn.Module, lin: dict, probs: torch.Tensor, r_out: torch.Tensor,
                                bias: torch.Tensor | None = None):
    """Relevance at the attention branch input (qkv's input) and at the attention probabilities.

    ``lin`` holds the recorded (input, output) of ``qkv`` and ``proj``; ``probs``
    the recorded attention. ``bias``: Swin's position bias + shift mask, whose
    share of the logits' relevance is dropped (a documented leak).
    """
    qkv_in, qkv_out = lin["qkv"]
    o_cat, proj_out = lin["proj"]
    q, k, v = _split_heads(qkv_out, attn.num_heads).unbind(0)
    q, k = getattr(attn, "q_norm", nn.Identity())(q), getattr(attn, "k_norm", nn.Identity())(k)
    qs, kt = q * attn.scale, k.transpose(-2, -1)
    b, n, _ = r_out.shape
    r_o = linear_alphabeta(o_cat, attn.proj.weight, r_out, _minus_bias(proj_out, attn.proj))
    r_o = r_o.reshape(b, n, attn.num_heads, -1).transpose(1, 2)
    r_probs, r_v = matmul_lrp0(probs, v, r_o)
    # softmax passes relevance on unchanged; then the Q·Kᵀ bilinear rule
    r_q, r_kt = matmul_lrp0(qs, kt, r_probs, z=None if bias is None else qs @ kt + bias)
    r_qkv = _merge_heads(r_q, r_kt.transpose(-2, -1), r_v)
    return linear_alphabeta(qkv_in, attn.qkv.weight, r_qkv, _minus_bias(qkv_out, attn.qkv)), r_probs


def _mlp_relevance(block: nn.Module, lin: dict, x2: torch.Tensor, r_out: torch.Tensor) -> torch.Tensor:
    """Relevance at ``x2`` for ``x3 = x2 + ls2(fc2(norm(act(fc1(norm2(x2))))))``."""
    mlp = block.mlp
    h2, f1_out = lin["fc1"]
    g, f2_out = lin["fc2"]
    f = getattr(block, "ls2", nn.Identity())(f2_out)
    r_res, r_f = residual_add(x2, f, r_out)
    r_g = linear_alphabeta(g, mlp.fc2.weight, r_f, _minus_bias(f2_out, mlp.fc2))
    return r_res + linear_alphabeta(h2, mlp.fc1.weight, r_g, _minus_bias(f1_out, mlp.fc1))


def _vit_block(block: nn.Module, rec: Recorder, layer: int, r_out: torch.Tensor):
    x, x2, lin = rec.block_inputs[layer], rec.mlp_inputs[layer], rec.linears[layer]
    r_x2 = _mlp_relevance(block, lin, x2, r_out)
    r_res, r_a = residual_add(x, x2 - x, r_x2)
    r_h1, r_probs = _attention_branch_relevance(block.attn, lin, rec.attention[layer].detach(), r_a)
    return r_res + r_h1, r_probs


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


def _swin_bias(block: nn.Module, batch: int) -> torch.Tensor:
    attn = block.attn
    bias = attn._get_rel_pos_bias()  # (1, heads, N, N)
    mask = block.attn_mask
    if mask is None:
        return bias
    nw, n, _ = mask.shape
    full = bias.unsqueeze(1) + mask.view(1, nw, 1, n, n)  # (1, nW, heads, N, N)
    return full.expand(batch, -1, -1, -1, -1).reshape(batch * nw, attn.num_heads, n, n)


def _swin_block(block: nn.Module, rec: Recorder, layer: int, r_out: torch.Tensor):
    x, lin = rec.block_inputs[layer], rec.linears[layer]
    b, h, w, c = x.shape
    window, shift = tuple(block.window_size), tuple(block.shift_size)
    x2 = rec.mlp_inputs[layer]  # (B, H·W, C)
    r_x2 = _mlp_relevance(block, lin, x2, r_out.reshape(b, h * w, c)).reshape(b, h, w, c)
    r_res, r_a = residual_add(x, x2.reshape(b, h, w, c) - x, r_x2)
    r_hw, r_probs = _attention_branch_relevance(
        block.attn, lin, rec.attention[layer].detach(), _to_windows(r_a, window, shift), _swin_bias(block, b)
    )
    return r_res + _from_windows(r_hw, window, shift, (h, w)), r_probs


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


def attention_relevance(adapter: Adapter, rec: Recorder, targets: torch.Tensor) -> dict[int, torch.Tensor]:
    """LRP relevance at every block's attention probabilities, keyed by global layer.

    Also stores, for tests and diagnostics, the relevance total entering each
    block in ``rec.relevance_totals[layer] = (in, out)`` (per image), and for
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
                    r, out[layer] = walk(block, rec, layer, r)
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
