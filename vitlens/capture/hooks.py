"""The only place vitlens touches a model: hooks that record a forward pass.

:class:`Recorder` is a context manager. On entry it puts the model in eval mode,
switches every attention module to timm's explicit (non-fused) path so the
attention probabilities exist as a tensor, and installs forward hooks. On exit —
also after an exception — it removes the hooks and restores the fused flags and
train/eval mode, leaving the user's model exactly as it was.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch
from torch import nn

from ..models.adapter import Adapter


def _token_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token mean and (biased) std over channels: what a LayerNorm divides by, less eps."""
    std, mean = torch.std_mean(x.float(), -1, correction=0)
    return mean, std


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return nn.functional.cosine_similarity(a.float(), b.float(), dim=-1, eps=1e-12)


class Recorder:
    """Record the internals of one forward pass per batch.

    After ``model(x)`` inside the context, ``records[layer][name]`` holds detached
    tensors for block ``layer`` (global index): ``ln1_mean``, ``ln1_std``,
    ``ln2_mean``, ``ln2_std``, ``token_norm`` (block input), ``attn_value_norm``,
    ``attn_value_cos``, ``attn_out_norm``, ``mlp_in_norm``, ``mlp_out_norm``,
    ``mlp_cos``, ``block_out_norm``; ``attention[layer]`` keeps the attention
    probabilities *with* their autograd graph (for gradients), ``block_inputs``
    the detached block inputs and ``final_input`` the final norm's input (for
    the LRP pass), and ``features`` the adapter's feature module output (for
    Grad-CAM on features) with its graph.
    """

    def __init__(self, adapter: Adapter, *, keep_block_inputs: bool = False):
        self.adapter = adapter
        self.keep_block_inputs = keep_block_inputs
        self._handles: list[Any] = []
        self.paused = False  # hooks do nothing while the LRP pass reruns modules
        self._saved_fused: list[tuple[nn.Module, bool]] = []
        self._saved_training: list[tuple[nn.Module, bool]] = []
        self.reset()

    def reset(self) -> None:
        self.records: dict[int, dict[str, torch.Tensor]] = defaultdict(dict)
        self.attention: dict[int, torch.Tensor] = {}
        self.block_inputs: dict[int, torch.Tensor] = {}
        self.features: torch.Tensor | None = None
        self.final_input: torch.Tensor | None = None
        self.merge_inputs: dict[int, torch.Tensor] = {}
        self.relevance_totals: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.linears: dict[int, dict[str, tuple[torch.Tensor, torch.Tensor]]] = defaultdict(dict)
        self.mlp_inputs: dict[int, torch.Tensor] = {}
        self.merge_shares: dict[int, torch.Tensor] = {}
        self._pending: dict[int, dict[str, torch.Tensor]] = defaultdict(dict)

    # -- context ------------------------------------------------------------
    def __enter__(self) -> "Recorder":
        model = self.adapter.model
        try:
            self._saved_training = [(m, m.training) for m in model.modules()]
            model.eval()
            for block in self.adapter.blocks:
                attn = self.adapter.attention_module(block)
                if hasattr(attn, "fused_attn"):
                    self._saved_fused.append((attn, attn.fused_attn))
                    attn.fused_attn = False
            self._install()
        except BaseException:
            self._restore()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self._restore()

    def _restore(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for attn, flag in self._saved_fused:
            attn.fused_attn = flag
        self._saved_fused.clear()
        for module, training in self._saved_training:
            module.training = training
        self._saved_training.clear()

    # -- hooks --------------------------------------------------------------
    def _install(self) -> None:
        ad = self.adapter
        for layer, block in enumerate(ad.blocks):
            self._handles += [
                block.norm1.register_forward_hook(self._on_norm1(layer, block)),
                ad.attention_probs_module(block).register_forward_hook(self._on_attention(layer)),
                block.norm2.register_forward_hook(self._on_norm2(layer)),
                block.mlp.register_forward_hook(self._on_mlp(layer)),
                block.register_forward_hook(self._on_block(layer)),
            ]
        self._handles.append(ad.final_norm().register_forward_hook(self._on_final_norm))
        self._handles.append(ad.feature_module().register_forward_hook(self._on_features))
        if self.keep_block_inputs:
            for stage, merge in ad.merges().items():
                self._handles.append(merge.register_forward_hook(self._on_merge(stage)))
            # inputs and outputs of every Linear the LRP pass crosses: no recompute needed
            for layer, block in enumerate(ad.blocks):
                attn = ad.attention_module(block)
                for name, module in (("qkv", attn.qkv), ("proj", attn.proj), ("fc1", block.mlp.fc1), ("fc2", block.mlp.fc2)):
                    self._handles.append(module.register_forward_hook(self._on_linear(layer, name)))

    def _on_norm1(self, layer: int, block: nn.Module):
        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            if self.paused:
                return
            with torch.no_grad():
                u = self.adapter.tokens(inputs[0]).detach()
                rec = self.records[layer]
                rec["ln1_mean"], rec["ln1_std"] = _token_stats(u)
                rec["token_norm"] = u.float().norm(dim=-1)
                t = self.adapter.value_path(block, output.detach())
                rec["attn_value_norm"] = t.float().norm(dim=-1)
                rec["attn_value_cos"] = _cosine(t, u)
                self._pending[layer]["u"] = u
                if self.keep_block_inputs:
                    self.block_inputs[layer] = inputs[0].detach()

        return hook

    def _on_linear(self, layer: int, name: str):
        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            if self.paused:
                return
            self.linears[layer][name] = (inputs[0].detach(), output.detach())

        return hook

    def _on_attention(self, layer: int):
        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            if self.paused:
                return
            self.attention[layer] = output

        return hook

    def _on_norm2(self, layer: int):
        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            if self.paused:
                return
            with torch.no_grad():
                x2 = self.adapter.tokens(inputs[0]).detach()
                rec = self.records[layer]
                rec["ln2_mean"], rec["ln2_std"] = _token_stats(x2)
                rec["mlp_in_norm"] = x2.float().norm(dim=-1)
                u = self._pending[layer].pop("u")
                rec["attn_out_norm"] = (x2.float() - u.float()).norm(dim=-1)
                self._pending[layer]["x2"] = x2
                if self.keep_block_inputs:
                    self.mlp_inputs[layer] = x2

        return hook

    def _on_mlp(self, layer: int):
        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            if self.paused:
                return
            with torch.no_grad():
                f = self.adapter.tokens(output).detach()
                x2 = self._pending[layer].pop("x2")
                rec = self.records[layer]
                rec["mlp_out_norm"] = f.float().norm(dim=-1)
                rec["mlp_cos"] = _cosine(f, x2)

        return hook

    def _on_block(self, layer: int):
        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            if self.paused:
                return
            with torch.no_grad():
                self.records[layer]["block_out_norm"] = self.adapter.tokens(output).float().norm(dim=-1)

        return hook

    def _on_final_norm(self, module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        if not self.paused:
            self.final_input = inputs[0].detach()

    def _on_features(self, module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        if not self.paused:
            self.features = output

    def _on_merge(self, stage: int):
        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            if self.paused:
                return
            self.merge_inputs[stage] = inputs[0].detach()

        return hook
