"""AttnLRP and CP-LRP at capture time: one modified backward pass (gradient × input).

Achtibat et al. (ICML 2024) write LRP for transformers as gradient × input with a
few operations' gradients changed; Ali et al.'s CP-LRP (ICML 2022) is the variant
that holds the attention probabilities constant. :class:`RelevanceMode` is a
``TorchFunctionMode`` that applies the rules of :mod:`vitlens.models.lrp_rules` to
the torch operations the model itself calls, so every family's own forward runs
unchanged (timm, transformers; windows, shifts, merges, rotary embeddings, biases):

==========================================  ==================================================
operation                                    rule
==========================================  ==================================================
``F.layer_norm``, ``F.rms_norm``             identity (σ held): :func:`held_layer_norm`, :func:`held_rms_norm`
``F.normalize``, division by an activation   the divisor held (cosine attention, ``e/‖e‖``)
element-wise activations (GELU, SiLU, ...)   identity rule: :func:`identity_rule`
``a @ b``, ``a * b`` of two activations      uniform rule (half each): :func:`uniform_product`
softmax                                      ``"attnlrp"``: gradient × input (AttnLRP's softmax
                                             rule); ``"cp"``: output held (no relevance through it)
``F.scaled_dot_product_attention``           written out as ``softmax(q·kᵀ·s + mask)·v`` with the rules above
``nn.MultiheadAttention``                    the same, written out
Linear maps, sums, rotations, scales         unchanged (gradient × input is the ε-rule, ε → 0)
==========================================  ==================================================

:func:`token_relevance` runs the pass and returns the relevance of every token
entering every block (the per-layer maps) — a pass of one forward and one
backward, on top of the capture's own.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from ..models.adapter import Adapter
from ..models.lrp_rules import (held_layer_norm, held_normalize, held_rms_norm, identity_rule,
                                uniform_product)
from .targets import FinalTokens, outputs_of

#: softmax rules: relevance through the softmax (AttnLRP) or none (CP-LRP)
SOFTMAX_RULES = ("attnlrp", "cp")

_ACTIVATIONS = (F.gelu, F.silu, F.softplus, F.mish, F.hardswish, F.elu, F.selu, F.celu, F.leaky_relu,
                torch.sigmoid, torch.Tensor.sigmoid, torch.tanh, torch.Tensor.tanh, F.sigmoid, F.tanh)
_SOFTMAX = (torch.softmax, torch.Tensor.softmax, F.softmax)
_PRODUCTS = (torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.bmm, torch.Tensor.bmm,
             torch.mul, torch.Tensor.mul, torch.Tensor.__mul__, torch.Tensor.__rmul__)
_DIVISIONS = (torch.div, torch.Tensor.div, torch.Tensor.__truediv__, torch.true_divide)


def _grad(t: Any) -> bool:
    return isinstance(t, torch.Tensor) and t.requires_grad


def _arg(args: tuple, kwargs: dict, index: int, name: str, default: Any = None) -> Any:
    return args[index] if len(args) > index else kwargs.get(name, default)


class ExplicitAttentionMode(TorchFunctionMode):
    """Write fused attention out as ``softmax(q·kᵀ·s + mask)·v`` and report every attention's
    probabilities (``on_probs``) as they are formed, with their graph (LeGrad differentiates them).

    ``F.scaled_dot_product_attention`` and ``nn.MultiheadAttention`` are computed explicitly;
    explicit paths are seen at their softmax. Nothing else changes.
    """

    def __init__(self, on_probs: Callable[[torch.Tensor], None] | None = None):
        super().__init__()
        self.on_probs = on_probs

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: D105
        kwargs = kwargs or {}
        if not torch.is_grad_enabled():
            return func(*args, **kwargs)
        return self._dispatch(func, args, kwargs)

    def _dispatch(self, func, args: tuple, kwargs: dict):
        if func in _SOFTMAX:
            return self._softmax(func(*args, **kwargs))
        if func is F.scaled_dot_product_attention:
            return self._attention(*args, **kwargs)
        if func is F.multi_head_attention_forward:
            return self._multi_head(*args, **kwargs)
        return func(*args, **kwargs)

    def _softmax(self, probs: torch.Tensor) -> torch.Tensor:
        if self.on_probs is not None and probs.requires_grad:
            self.on_probs(probs)
        return probs

    def _product(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a @ b

    def _attention(self, q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        if is_causal or enable_gqa:
            raise NotImplementedError("vitlens writes out non-causal attention without grouped queries only")
        s = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
        logits = self._product(q * s, k.transpose(-2, -1))
        if attn_mask is not None:
            logits = (logits.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool
                      else logits + attn_mask)
        return self._product(self._softmax(logits.softmax(-1)), v)

    def _multi_head(self, query, key, value, embed_dim_to_check, num_heads, in_proj_weight, in_proj_bias,
                    bias_k, bias_v, add_zero_attn, dropout_p, out_proj_weight, out_proj_bias, training=True,
                    key_padding_mask=None, need_weights=True, attn_mask=None, use_separate_proj_weight=False,
                    q_proj_weight=None, k_proj_weight=None, v_proj_weight=None, static_k=None, static_v=None,
                    average_attn_weights=True, is_causal=False):
        if (bias_k is not None or add_zero_attn or key_padding_mask is not None or attn_mask is not None
                or is_causal or static_k is not None or use_separate_proj_weight):
            raise NotImplementedError("vitlens writes out nn.MultiheadAttention without masks or added keys only")
        c = query.shape[-1]  # nn.MultiheadAttention hands (sequence, batch, channels)
        w = in_proj_weight.chunk(3)
        bias = (None, None, None) if in_proj_bias is None else in_proj_bias.chunk(3)
        heads = [F.linear(t, wi, bi).reshape(t.shape[0], t.shape[1] * num_heads, c // num_heads).transpose(0, 1)
                 for t, wi, bi in zip((query, key, value), w, bias)]
        o = self._attention(*heads)  # (B·heads, Lq, hd)
        o = o.transpose(0, 1).reshape(query.shape[0], query.shape[1], c)
        return F.linear(o, out_proj_weight, out_proj_bias), None


class RelevanceMode(ExplicitAttentionMode):
    """Apply the AttnLRP (``softmax="attnlrp"``) or CP-LRP (``"cp"``) rules to every torch call.

    Only operations on tensors that require a gradient are changed (the rest of a
    forward — hooks under ``no_grad``, constants — runs as usual).
    """

    def __init__(self, softmax: str = "cp", on_probs: Callable[[torch.Tensor], None] | None = None):
        super().__init__(on_probs)
        if softmax not in SOFTMAX_RULES:
            raise ValueError(f"softmax={softmax!r}; one of {SOFTMAX_RULES}")
        self.softmax = softmax

    def _dispatch(self, func, args: tuple, kwargs: dict):
        if func in (F.layer_norm, torch.layer_norm) and _grad(args[0]):
            return held_layer_norm(args[0], _arg(args, kwargs, 1, "normalized_shape"), _arg(args, kwargs, 2, "weight"),
                                   _arg(args, kwargs, 3, "bias"), _arg(args, kwargs, 4, "eps", 1e-5))
        if func in (F.rms_norm, torch.rms_norm) and _grad(args[0]):
            return held_rms_norm(args[0], _arg(args, kwargs, 1, "normalized_shape"), _arg(args, kwargs, 2, "weight"),
                                 _arg(args, kwargs, 3, "eps"))
        if func is F.normalize and _grad(args[0]):
            return held_normalize(args[0], _arg(args, kwargs, 1, "p", 2.0), _arg(args, kwargs, 2, "dim", 1),
                                  _arg(args, kwargs, 3, "eps", 1e-12))
        if func in _ACTIVATIONS and _grad(args[0]):
            rest = args[1:]
            return identity_rule(lambda t: func(t, *rest, **kwargs), args[0])
        if func in _PRODUCTS and len(args) == 2 and _grad(args[0]) and _grad(args[1]):
            return uniform_product(lambda a, b: func(a, b, **kwargs), args[0], args[1])
        if func in _DIVISIONS and len(args) >= 2 and _grad(args[1]):
            return func(args[0], args[1].detach(), *args[2:], **kwargs)
        return super()._dispatch(func, args, kwargs)

    def _softmax(self, probs: torch.Tensor) -> torch.Tensor:
        probs = super()._softmax(probs)
        return probs.detach() if self.softmax == "cp" else probs

    def _product(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return uniform_product(torch.matmul, a, b) if _grad(a) and _grad(b) else a @ b


def token_relevance(adapter: Adapter, x: torch.Tensor, explained: Callable[[Any], torch.Tensor],
                    softmax: str = "cp") -> tuple[list[torch.Tensor], torch.Tensor]:
    """AttnLRP relevance of each token entering each block, and the explained scores.

    ``explained(outputs) -> (B,)`` gives the scalar per image (:func:`vitlens.capture.targets.score`
    of the capture's target). Returns one ``(B, N)`` tensor per block (global order; the sum over
    channels of ``x ⊙ ∂y/∂x`` at the block's input tokens) and the scores ``(B,)``. The model's
    state (eval mode, frozen parameters, explicit attention) is the caller's (:class:`~.hooks.Recorder`).
    """
    inputs: dict[int, torch.Tensor] = {}

    def keep(layer: int):
        def hook(module: Any, args: tuple, kwargs: dict) -> None:
            inputs[layer] = args[0] if args else kwargs["hidden_states"]
        return hook

    handles = [part.module.register_forward_pre_hook(keep(l), with_kwargs=True) for l, part in enumerate(adapter.parts)]
    try:
        with torch.enable_grad(), FinalTokens(adapter) as final, RelevanceMode(softmax):
            x = x.detach().requires_grad_(True)  # a graph even when nothing before the first block needs one
            logits = adapter.logits(x) if hasattr(adapter, "logits") else adapter.model(x)
            y = explained(outputs_of(adapter, logits, final.output))
        order = sorted(inputs)
        grads = torch.autograd.grad(y.sum(), [inputs[l] for l in order], allow_unused=True)
    finally:
        for h in handles:
            h.remove()
    out = []
    for layer, g in zip(order, grads):
        t = adapter.tokens(inputs[layer]).detach()
        out.append(torch.zeros(t.shape[:2], dtype=torch.float32, device=t.device) if g is None
                   else (t.float() * adapter.tokens(g).float()).sum(-1))
    return out, y.detach()
