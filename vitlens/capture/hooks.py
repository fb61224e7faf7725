"""The only place vitlens touches a model: hooks that record a forward pass.

:class:`Recorder` is a context manager. On entry it puts the model in eval mode,
switches every attention module to timm's explicit (non-fused) path so the
attention probabilities exist as a tensor, and installs forward hooks on the
parts the adapter describes (:mod:`vitlens.models.parts`: block, norms,
attention, probabilities, MLP, Linears) — never on modules found by timm name. On exit —
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
    ``ln2_mean``, ``ln2_std`` (of the inputs of the block's two norms),
    ``token_norm`` (block input), ``attn_value_norm``, ``attn_value_cos``,
    ``attn_out_norm``, ``mlp_in_norm``, ``mlp_out_norm``, ``mlp_cos``,
    ``block_out_norm``; ``attention[layer]`` keeps the attention probabilities
    *with* their autograd graph (for gradients), and ``features`` the adapter's
    feature tensor (for Grad-CAM on features) with its graph. With
    ``keep_block_inputs`` it also keeps what the LRP pass needs, detached:
    ``block_inputs``, ``mlp_inputs`` and ``block_outputs`` (tokens, (B, N, C)),
    ``attn_inputs`` and ``attn_ctx`` (the attention module's input in its own
    layout and its keyword arguments: masks, rotary tables), every Linear's
    (input, output) in ``linears``, ``final_input`` and ``merge_inputs``.
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
        self.block_outputs: dict[int, torch.Tensor] = {}
        self.attn_inputs: dict[int, torch.Tensor] = {}
        self.attn_ctx: dict[int, dict[str, Any]] = {}
        self.features: torch.Tensor | None = None
        self.final_input: torch.Tensor | None = None
        self.final_output: torch.Tensor | None = None
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
            for part in self.adapter.parts:
                attn = part.attn.module
                if hasattr(attn, "fused_attn"):
                    self._saved_fused.append((attn, attn.fused_attn))
                    attn.fused_attn = False
            explicit = getattr(self.adapter, "explicit_attention", None)  # e.g. transformers' attn_implementation
            if explicit is not None:
                self._explicit = explicit()
                self._explicit.__enter__()
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
        explicit, self._explicit = getattr(self, "_explicit", None), None
        if explicit is not None:
            explicit.__exit__(None, None, None)
        for module, training in self._saved_training:
            module.training = training
        self._saved_training.clear()

    # -- hooks --------------------------------------------------------------
    def _install(self) -> None:
        ad = self.adapter
        hook = self._handles.append
        for layer, part in enumerate(ad.parts):
            hook(part.module.register_forward_pre_hook(self._on_block_input(layer, part)))
            hook(part.norm1.register_forward_hook(self._on_norm1(layer, part)))
            hook(part.attn.probs.register_forward_hook(self._on_attention(layer)))
            hook(part.norm2.register_forward_hook(self._on_norm2(layer)))
            hook(part.mid.register_forward_pre_hook(self._on_mid(layer)))
            hook(part.mlp.module.register_forward_hook(self._on_mlp(layer)))
            hook(part.module.register_forward_hook(self._on_block(layer)))
        hook(ad.final_norm().register_forward_hook(self._on_final_norm))
        module, where = ad.features()
        if where == "input":
            hook(module.register_forward_pre_hook(self._on_features_input))
        else:
            hook(module.register_forward_hook(self._on_features))
        if self.keep_block_inputs:
            for stage, merge in ad.merges().items():
                hook(merge.module.register_forward_hook(self._on_merge(stage)))
            # the attention input and keyword arguments, and every Linear's input and output
            for layer, part in enumerate(ad.parts):
                hook(part.attn.module.register_forward_pre_hook(self._on_attn_input(layer), with_kwargs=True))
                for name, lin in part.linears().items():
                    hook(lin.module.register_forward_hook(self._on_linear(layer, name)))

    def _on_block_input(self, layer: int, part: Any):
        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            if self.paused:
                return
            with torch.no_grad():
                u = self.adapter.tokens(inputs[0]).detach()
                self.records[layer]["token_norm"] = u.float().norm(dim=-1)
                self._pending[layer]["u"] = u
                if part.post_norm:  # the attention reads the block input itself
                    self._value_path(layer, part, u, u)
                if self.keep_block_inputs:
                    self.block_inputs[layer] = u

        return hook

    def _value_path(self, layer: int, part: Any, h: torch.Tensor, u: torch.Tensor) -> None:
        t = part.attn.value_path(h)
        rec = self.records[layer]
        rec["attn_value_norm"] = t.float().norm(dim=-1)
        rec["attn_value_cos"] = _cosine(t, u)

    def _on_norm1(self, layer: int, part: Any):
        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            if self.paused:
                return
            with torch.no_grad():
                rec = self.records[layer]
                rec["ln1_mean"], rec["ln1_std"] = _token_stats(self.adapter.tokens(inputs[0]))
                if not part.post_norm:
                    self._value_path(layer, part, self.adapter.tokens(output.detach()), self._pending[layer]["u"])

        return hook

    def _on_attn_input(self, layer: int):
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if self.paused:
                return
            self.attn_inputs[layer] = (args[0] if args else kwargs["hidden_states"]).detach()
            self.attn_ctx[layer] = {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}

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
                rec = self.records[layer]
                rec["ln2_mean"], rec["ln2_std"] = _token_stats(self.adapter.tokens(inputs[0]))

        return hook

    def _on_mid(self, layer: int):
        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            if self.paused:
                return
            with torch.no_grad():
                x2 = self.adapter.tokens(inputs[0]).detach()
                rec = self.records[layer]
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
                out = self.adapter.tokens(output).detach()
                self.records[layer]["block_out_norm"] = out.float().norm(dim=-1)
                if self.keep_block_inputs:
                    self.block_outputs[layer] = out

        return hook

    def _on_final_norm(self, module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        if not self.paused:
            self.final_input = inputs[0].detach()
            self.final_output = output.detach()

    def _on_features(self, module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        if not self.paused:
            self.features = output

    def _on_features_input(self, module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        if not self.paused:
            self.features = inputs[0]

    def _on_merge(self, stage: int):
        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            if self.paused:
                return
            self.merge_inputs[stage] = inputs[0].detach()

        return hook
