"""LeGrad's per-layer gradients, at capture time (Bousselham et al., ICCV 2025).

For every block ``l`` whose tokens the read-out can read (every block of a ViT;
the last stage of a Swin), the block's output tokens are read out as if they were
the final ones, giving a per-layer score ``s^l``, and ``∂s^l/∂A^l`` — the gradient
of that score with respect to the block's *own* attention probabilities — is
taken, clamped at 0 and averaged over the query rows. What is kept per image is
``(layer, head, token)``: small, and all :func:`vitlens.methods.legrad` needs.

Two read-outs of an intermediate block (both are captured):

* ``"mean"`` — the final norm applied to the mean of all tokens, then the
  model's head: what the authors' code (``ln_post(x.mean(...))``) and
  ``torchcam.methods.LeGrad`` do (a head that reads several tokens, such as
  DINOv2's ``[CLS, patch mean]``, reads that mean in each place);
* ``"readout"`` — the model's own read-out of the normalised tokens (the CLS
  token, the patch mean, the attention pool).

The pass is one forward (attention written out so that the probabilities have a
graph: :class:`~vitlens.capture.attnlrp.ExplicitAttentionMode`) and, per block and
read-out, one backward through that block's tail and the head.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..models.adapter import Adapter
from ..models.windows import window_tokens
from .attnlrp import ExplicitAttentionMode
from .targets import Outputs

#: the two per-layer read-outs LeGrad can use (see the module docstring)
SCORES = ("mean", "readout")


def scored_layers(adapter: Adapter) -> list[int]:
    """The blocks whose output the read-out can read: those of the last stage (every block of a ViT)."""
    return list(adapter.stages[-1].layers)


def _final(adapter: Adapter) -> Callable[[torch.Tensor], torch.Tensor]:
    final = adapter.final_norm()
    if any(final is b for b in adapter.blocks):  # the read-out takes the last block's output as it is
        return lambda t: t
    return final


def layer_outputs(adapter: Adapter, z: torch.Tensor, score: str, logits: torch.Tensor) -> Outputs:
    """What the read-out makes of block output ``z`` (as if it were the last block's), for ``score``."""
    assert adapter.head is not None
    last, head, final = adapter.stages[-1], adapter.head, _final(adapter)
    tokens = adapter.tokens(final(z))
    if score == "readout":
        pooled = head.pooled(tokens)
        out = head.logits(tokens)
    else:  # the read-out of a sequence whose every token is the normalised mean of all of them
        mean = final(adapter.tokens(z).mean(1, keepdim=True))
        same = mean.expand(-1, max(head.start, 1 + (head.head_dist is not None)) + 1, -1)
        pooled = head.pooled(same)
        out = head.logits(same)
    if out.shape != logits.shape:  # a headless embedding model: the "logits" are the pooled embedding
        out = pooled
    return Outputs(out, tokens, pooled, last.num_prefix, tuple(last.grid))


def _per_key(adapter: Adapter, layer: int, grad: torch.Tensor, batch: int) -> torch.Tensor:
    """(B[·nW], H, Q, K) clamped gradient → (B, H, N): mean over the stage's query tokens, per key token."""
    stage = adapter.stage_of_layer(layer)
    g = grad.clamp_min(0)
    if stage.window is None:
        return g.mean(-2)
    shift = stage.shifts[stage.layers.index(layer)]
    index = torch.as_tensor(window_tokens(stage.grid, stage.window, shift, stage.pad_first), device=g.device)
    n = stage.num_tokens
    keys = g.sum(-2).reshape(batch, -1, g.shape[1], g.shape[-1]).transpose(1, 2)  # (B, H, nW, M²)
    slot = torch.where(index < 0, n, index).reshape(-1)  # padded window positions go to a spare slot
    out = keys.new_zeros(batch, g.shape[1], n + 1)
    out.index_add_(2, slot, keys.reshape(batch, g.shape[1], -1))
    return out[..., :n] / n


def legrad_gradients(adapter: Adapter, x: torch.Tensor, explained: Callable[[Outputs], torch.Tensor],
                     ) -> dict[str, dict[int, torch.Tensor]]:
    """Per score (``"mean"``, ``"readout"``) and scored block: ``mean_q (∂s^l/∂A^l)⁺`` as (B, H, N).

    ``explained(outputs) -> (B,)`` is the capture's target. The model's state (eval mode,
    frozen parameters) is the caller's (:class:`~.hooks.Recorder`, paused).
    """
    layers = scored_layers(adapter)
    probs: dict[int, torch.Tensor] = {}
    outputs: dict[int, torch.Tensor] = {}
    current: list[int | None] = [None]

    def enter(layer: int):
        def hook(module: Any, args: Any) -> None:
            current[0] = layer
        return hook

    def leave(module: Any, args: Any, out: Any) -> None:
        current[0] = None

    def block_out(layer: int):
        def hook(module: Any, args: Any, out: Any) -> None:
            outputs[layer] = out[0] if isinstance(out, tuple) else out
        return hook

    def on_probs(p: torch.Tensor) -> None:
        if current[0] is not None and current[0] not in probs:
            probs[current[0]] = p

    handles = []
    for layer in layers:
        part = adapter.parts[layer]
        handles += [part.attn.module.register_forward_pre_hook(enter(layer)),
                    part.attn.module.register_forward_hook(leave),
                    part.module.register_forward_hook(block_out(layer))]
    result: dict[str, dict[int, torch.Tensor]] = {s: {} for s in SCORES}
    try:
        with torch.enable_grad(), ExplicitAttentionMode(on_probs):
            x = x.detach().requires_grad_(True)
            logits = adapter.logits(x) if hasattr(adapter, "logits") else adapter.model(x)
        for score in SCORES:
            for layer in layers:
                with torch.enable_grad():
                    y = explained(layer_outputs(adapter, outputs[layer], score, logits))
                (g,) = torch.autograd.grad(y.sum(), probs[layer], retain_graph=True)
                result[score][layer] = _per_key(adapter, layer, g.detach().float(), x.shape[0])
    finally:
        for h in handles:
            h.remove()
    return result


__all__ = ["SCORES", "legrad_gradients", "layer_outputs", "scored_layers"]
