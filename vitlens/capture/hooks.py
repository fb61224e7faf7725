"""The only place vitlens touches a model: hooks that record a forward pass.

:class:`Recorder` is a context manager. On entry it puts the model in eval mode,
stops the parameters requiring gradients (capture needs activation gradients
only), switches every timm attention module to its fused scaled-dot-product
path (:data:`FUSED_ATTENTION`; modules without that switch run explicitly and
their probabilities are hooked), and installs forward hooks on the parts the
adapter describes (:mod:`vitlens.models.parts`: block, norms, attention,
probabilities, MLP, Linears) — never on modules found by timm name. A fused
block's probabilities and their gradient are rebuilt after the backward pass
from its recorded input (:meth:`Recorder.probs`, :meth:`Recorder.probs_grad`).
On exit — also after an exception — it removes the hooks and restores the fused
flags, ``requires_grad`` and train/eval mode, leaving the user's model exactly
as it was."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from torch import nn

from ..models.adapter import Adapter
from ..models.windows import from_windows, padded_size
from .handles import HookSet
from .memory import trim_heap

#: Run timm attention modules on their fused scaled-dot-product path during
#: capture (every module with a ``fused_attn`` switch; timm leaves it off for
#: some, e.g. Swin) and rebuild the probabilities and their gradient from what
#: the fused pass leaves (:meth:`Recorder.probs`, :meth:`Recorder.probs_grad`).
#: The autograd graph then keeps no (B, heads, N, N) tensor. ``False`` switches
#: every module to its explicit path instead. A capture with no pass after its
#: forward (no gradient, no LRP) asks for the explicit path itself (``fused=False``):
#: with no graph to spare, keeping the probabilities the model computes is cheaper
#: than computing them again. Either way the flags are restored.
FUSED_ATTENTION = True

_TRIM_EVERY = 32 * 2**20  # trim the heap after about this much attention (and its block's records) is released


def _token_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token mean and (biased) std over channels: what a LayerNorm divides by, less eps.

    Two passes (the mean, then the norm of the centred tokens): as exact as
    ``torch.std_mean`` (within float32 rounding) and several times faster on CPU.
    """
    x = x.float()
    mean = x.mean(-1)
    return mean, (x - mean.unsqueeze(-1)).norm(dim=-1).div_(x.shape[-1] ** 0.5)


def _cosine(a: torch.Tensor, b: torch.Tensor, norm_a: torch.Tensor, norm_b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity over channels from the two tokens' norms (already recorded); 0 where one is 0."""
    return torch.linalg.vecdot(a.float(), b.float()).div_((norm_a * norm_b).clamp_min_(1e-12))


def _reads_split_q(attn: Any) -> bool:
    """Whether the fused q/k/v output of ``attn`` can be read where the model splits q off:
    a fused map with a bias added outside its module, and a q norm the model itself calls."""
    return (attn.fused and attn.qkv.extra_bias is not None
            and any(m is attn.q_norm for m in attn.module.children()))


def _fused_output_of_q(q: torch.Tensor) -> torch.Tensor | None:
    """The (B, N, 3·C) tensor whose ``reshape(B, N, 3, heads, hd).permute(2, 0, 3, 1, 4)[0]`` is ``q``
    (B, heads, N, hd): the fused q/k/v output, read off the view without a copy. None for any other layout."""
    if q.ndim != 4:
        return None
    b, heads, n, hd = q.shape
    c3 = 3 * heads * hd
    if q.stride() != (n * c3, hd, c3, 1):
        return None
    offset = q.storage_offset()
    if (offset + b * n * c3) * q.element_size() > q.untyped_storage().nbytes():
        return None
    return q.as_strided((b, n, c3), (n * c3, c3, 1), offset)


def _windowed_shape(h: torch.Tensor, stage: Any) -> tuple[int, ...]:
    """The shape of the tokens ``h`` (B, N, C) of a Swin stage cut into its (padded) windows: (B·nW, M², C)."""
    (mh, mw), (ph, pw) = stage.window, padded_size(stage.grid, stage.window)
    return (h.shape[0] * (ph // mh) * (pw // mw), mh * mw, h.shape[-1])


def _per_layer() -> defaultdict[int, dict[str, Any]]:
    return defaultdict(dict)


@dataclass
class BatchRecords:
    """Everything a :class:`Recorder` holds about one batch; :meth:`Recorder.reset` starts a fresh one.

    Tensors are detached unless said otherwise; keys are global block indices.
    """

    records: defaultdict[int, dict[str, torch.Tensor]] = field(default_factory=_per_layer)
    """Per block: ``ln1_mean``, ``ln1_std``, ``ln2_mean``, ``ln2_std``, token norms, value-path records."""
    attention: dict[int, torch.Tensor] = field(default_factory=dict)
    """Hooked probabilities *with* their graph; a fused block's, once rebuilt (:meth:`Recorder.probs`)."""
    features: torch.Tensor | None = None
    """The adapter's feature tensor for Grad-CAM on features, with its graph."""
    final_input: torch.Tensor | None = None
    final_output: torch.Tensor | None = None
    # kept for the LRP pass (``keep_block_inputs``); fused blocks always keep attn_inputs and q/k/v maps
    block_inputs: dict[int, torch.Tensor] = field(default_factory=dict)
    block_outputs: dict[int, torch.Tensor] = field(default_factory=dict)
    mlp_inputs: dict[int, torch.Tensor] = field(default_factory=dict)
    attn_inputs: dict[int, torch.Tensor] = field(default_factory=dict)
    attn_ctx: dict[int, dict[str, Any]] = field(default_factory=dict)
    """The attention module's keyword arguments (masks, rotary tables)."""
    linears: defaultdict[int, dict[str, tuple[torch.Tensor | None, torch.Tensor]]] = field(default_factory=_per_layer)
    """Per block, every hooked Linear's ``(input, output)`` (input None where the LRP pass rebuilds it)."""
    merge_inputs: dict[int, torch.Tensor] = field(default_factory=dict)
    attn_out: dict[int, torch.Tensor] = field(default_factory=dict)
    """Fused blocks: the heads' output O, with its graph (what the backward pass differentiates)."""
    # written by the LRP pass (:mod:`vitlens.capture.relevance`)
    relevance_totals: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    merge_shares: dict[int, torch.Tensor] = field(default_factory=dict)
    # internal bookkeeping of the hooks
    grads: dict[int, torch.Tensor | None] = field(default_factory=dict)
    """Gradients of :meth:`Recorder.grad_targets`, after the backward pass."""
    pending: defaultdict[int, dict[str, Any]] = field(default_factory=_per_layer)
    """Tensors one hook leaves for a later hook of the same block."""
    filled: dict[int, list[str]] = field(default_factory=dict)
    """q/k/v records computed by :meth:`Recorder.attn_linears`, not hooked."""
    scores: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    stored_attention: set[int] = field(default_factory=set)
    """Blocks whose hooked probabilities went to :attr:`Recorder.store_attention` as they were computed."""
    heads: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    """q, k, v per head (:meth:`Recorder.heads`), kept until the block is released."""
    freed: int = 0
    """Bytes of attention released since the last heap trim."""


#: The per-batch records readable as attributes of the Recorder itself, as tests and the coverage
#: harnesses read them: ``rec.attention`` is ``rec.batch.attention``; ``rec._filled`` (its old
#: private name) is ``rec.batch.filled``.
_READABLE = {f.name: f.name for f in fields(BatchRecords) if f.name not in ("grads", "pending", "scores", "freed")}
_READABLE["_filled"] = "filled"


class Recorder(HookSet):
    """Record the internals of one forward pass per batch.

    After ``model(x)`` inside the context, :attr:`batch` (a :class:`BatchRecords`,
    fresh after each :meth:`reset`) holds the batch's records: LayerNorm statistics
    and token norms per block, the attention probabilities *with* their autograd
    graph (for gradients), the Grad-CAM features with theirs and, with
    ``keep_block_inputs``, what the LRP pass needs (block, MLP and attention
    inputs, every Linear's input and output, merge inputs). Its public fields
    read as attributes of the Recorder too (``rec.attention``). With
    ``param_grads=False`` the model's parameters stop requiring gradients inside
    the context (restored on exit), so autograd keeps only what the activation
    gradients need and computes no weight gradients. ``ln=False`` / ``norms=False``
    skip the per-token LayerNorm statistics / token norms and value-path records (the
    capture's ``ln`` and ``norms`` groups) when the capture does not keep them: the
    value path costs a matmul per block, the statistics a few passes over the tokens.
    """

    def __init__(self, adapter: Adapter, *, keep_block_inputs: bool = False, param_grads: bool = True,
                 fused: bool | None = None, ln: bool = True, norms: bool = True):
        self.adapter = adapter
        self.ln, self.norms = ln, norms
        self.fused = FUSED_ATTENTION if fused is None else fused
        self.fused_layers: set[int] = set()
        self.keep_block_inputs = keep_block_inputs
        self.param_grads = param_grads
        self._saved_requires_grad: list[tuple[nn.Parameter, bool]] = []
        self._handles: list[Any] = []
        self._value_from: dict[int, str] = {}  # layer -> the hooked Linear whose output gives the value path
        self._split_from: set[int] = set()  # layers whose fused q/k/v output is read where q is split off
        self.paused = False  # hooks do nothing while the LRP pass reruns modules
        #: where hooked probabilities go as the forward pass computes them, instead of being kept
        #: (``(layer, probabilities)``; a capture with no pass after its forward sets it per batch)
        self.store_attention: Callable[[int, torch.Tensor], None] | None = None
        #: block → token indices entering it that an intervention replaced (constants: the LRP pass stops there)
        self.constant_tokens: dict[int, list[int]] = {}
        self._saved_fused: list[tuple[nn.Module, bool]] = []
        self._saved_training: list[tuple[nn.Module, bool]] = []
        self.reset()

    def reset(self) -> None:
        """Start a new batch: forget everything recorded about the last one."""
        self.batch = BatchRecords()

    def __getattr__(self, name: str) -> Any:
        if name in _READABLE:  # only reached for names the Recorder itself does not have
            return getattr(self.__dict__["batch"], _READABLE[name])
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    # -- context ------------------------------------------------------------
    def __enter__(self) -> "Recorder":
        model = self.adapter.model
        try:
            self._saved_training = [(m, m.training) for m in model.modules()]
            model.eval()
            if not self.param_grads:  # capture needs activation gradients only: autograd saves less
                # only what requires a gradient now (inference tensors cannot be switched back)
                self._saved_requires_grad = [(p, True) for p in model.parameters()
                                             if p.requires_grad and not p.is_inference()]
                for p, _ in self._saved_requires_grad:
                    p.requires_grad_(False)
            self.fused_layers = set()
            for layer, part in enumerate(self.adapter.parts):
                attn = part.attn.module
                if not hasattr(attn, "fused_attn"):
                    continue
                self._saved_fused.append((attn, attn.fused_attn))
                attn.fused_attn = self.fused  # the same maths either way (timm's own two paths)
                if self.fused:
                    self.fused_layers.add(layer)
            explicit = getattr(self.adapter, "explicit_attention", None)  # e.g. transformers' attn_implementation
            if explicit is not None:
                self._explicit = explicit()
                self._explicit.__enter__()
            self._install()
        except BaseException:
            self._remove()
            raise
        return self

    def _remove(self) -> None:
        super()._remove()
        for attn, flag in self._saved_fused:
            attn.fused_attn = flag
        self._saved_fused.clear()
        explicit, self._explicit = getattr(self, "_explicit", None), None
        if explicit is not None:
            explicit.__exit__(None, None, None)
        for module, training in self._saved_training:
            module.training = training
        self._saved_training.clear()
        for p, flag in self._saved_requires_grad:
            p.requires_grad_(flag)
        self._saved_requires_grad.clear()

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
        for layer in sorted(self.fused_layers):
            hook(ad.parts[layer].attn.output_module().register_forward_pre_hook(self._on_attn_out(layer)))
        if self.keep_block_inputs:
            for stage, merge in ad.merges().items():
                hook(merge.module.register_forward_hook(self._on_merge(stage)))
        # the attention input and keyword arguments, and every Linear's input and output (LRP);
        # fused layers always keep the attention's input and q/k/v maps, to rebuild the probabilities;
        # other layers whose value path is recorded hook only the v map (its output gives the value path)
        self._value_from, self._split_from = {}, set()
        for layer, part in enumerate(ad.parts):
            keeps = self.keep_block_inputs or layer in self.fused_layers
            if not (keeps or self.norms):
                continue
            # the value path (tokentm) from the hooked v map's output, where it runs on the tokens as they are
            v_name = "qkv" if part.attn.fused else "v"
            split = _reads_split_q(part.attn)
            if split:  # F.linear with biases of the model's own: its output is read where q is split off
                self._split_from.add(layer)
                hook(part.attn.q_norm.register_forward_pre_hook(self._on_q_split(layer, keeps)))
            if split or part.attn.linears()[v_name].extra_bias is None:  # (Swin: on the windows, put back)
                self._value_from[layer] = v_name
            if keeps or split:
                hook(part.attn.module.register_forward_pre_hook(self._on_attn_input(layer), with_kwargs=True))
            if keeps:
                names = part.linears() if self.keep_block_inputs else part.attn.linears()
            else:
                names = {v_name: part.attn.linears()[v_name]} if layer in self._value_from and not split else {}
            # inputs the LRP pass rebuilds cheaply are not kept: fc2's (from fc1's output) and,
            # before a pre-norm MLP, fc1's (norm2 of the kept MLP input)
            rebuilt = part.mlp.rebuilt_inputs() if not part.post_norm else set()
            for name, lin in names.items():
                if self.keep_block_inputs or name != "proj":
                    hook(lin.module.register_forward_hook(self._on_linear(layer, name, name in rebuilt, keeps)))

    def _on_block_input(self, layer: int, part: Any):
        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            if self.paused:
                return
            with torch.no_grad():
                u = self.adapter.tokens(inputs[0]).detach()
                if self.norms:
                    self.batch.records[layer]["token_norm"] = u.float().norm(dim=-1)
                    self.batch.pending[layer]["u"] = u
                    if part.post_norm:  # the attention reads the block input itself
                        self._value_path(layer, part, u, u)
                if self.keep_block_inputs:
                    self.batch.block_inputs[layer] = u

        return hook

    def _value_path(self, layer: int, part: Any, h: torch.Tensor, u: torch.Tensor) -> None:
        """The value-path records (tokentm); where the v map's hook is to fire, left to it
        (:meth:`_value_path_from_linear`: its output saves a matmul), else computed now."""
        if layer in self._value_from:
            self.batch.pending[layer]["value_path"] = (h, u)
            return
        self._store_value_path(layer, part.attn.value_path(h), u)

    def _store_value_path(self, layer: int, t: torch.Tensor, u: torch.Tensor) -> None:
        rec = self.batch.records[layer]
        rec["attn_value_norm"] = t.float().norm(dim=-1)
        rec["attn_value_cos"] = _cosine(t, u, rec["attn_value_norm"], rec["token_norm"])

    def _value_path_from_linear(self, layer: int, x: torch.Tensor, out: torch.Tensor) -> None:
        """The v map ran on ``x``: the value path from its output, when ``x`` is the tokens it was left for."""
        pending = self.batch.pending[layer].pop("value_path", None)
        if pending is None:
            return
        h, u = pending
        attn = self.adapter.parts[layer].attn
        stage = self.adapter.stage_of_layer(layer)
        with torch.no_grad():
            if stage.window is None:
                same = x.shape == h.shape and x.data_ptr() == h.data_ptr() and x.stride() == h.stride()
                t = attn.value_path_of(out.detach()) if same else attn.value_path(h)
            elif x.shape == _windowed_shape(h, stage):  # the map ran on the windows of the block's tokens
                shift, b = stage.shifts[stage.layers.index(layer)], h.shape[0]
                t = attn.value_path_of(out.detach(), lambda v: from_windows(
                    v, stage.window, shift, stage.grid, stage.pad_first).reshape(b, -1, v.shape[-1]))
            else:
                t = attn.value_path(h)
            self._store_value_path(layer, t, u)

    def _value_path_left(self, layer: int) -> None:
        """At the MLP: a value path the v map's hook did not take is computed from its tokens."""
        pending = self.batch.pending[layer].pop("value_path", None)
        if pending is not None:
            self._store_value_path(layer, self.adapter.parts[layer].attn.value_path(pending[0]), pending[1])

    def _on_norm1(self, layer: int, part: Any):
        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            if self.paused:
                return
            with torch.no_grad():
                rec = self.batch.records[layer]
                if self.ln:
                    rec["ln1_mean"], rec["ln1_std"] = _token_stats(self.adapter.tokens(inputs[0]))
                if self.norms and not part.post_norm:
                    self._value_path(layer, part, self.adapter.tokens(output.detach()), self.batch.pending[layer]["u"])

        return hook

    def _on_attn_input(self, layer: int):
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if self.paused:
                return
            self.batch.attn_inputs[layer] = (args[0] if args else kwargs["hidden_states"]).detach()
            self.batch.attn_ctx[layer] = {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}

        return hook

    def _on_linear(self, layer: int, name: str, rebuilt: bool = False, record: bool = True):
        """The Linear's input and output recorded (unless ``record`` is off) and, for the v map, the value path."""
        value = self._value_from.get(layer) == name and layer not in self._split_from
        # a map with a bias added outside its module whose module runs after all (timm's qkv_bias_separate):
        # the model adds that bias into the output in place, so the record takes a copy of it as it is now
        copy = self.adapter.parts[layer].linears()[name].extra_bias is not None and layer not in self._split_from

        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            if self.paused:
                return
            if record:
                out = output.detach()
                self.batch.linears[layer][name] = (None if rebuilt else inputs[0].detach(), out.clone() if copy else out)
            if value:
                self._value_path_from_linear(layer, inputs[0], output)

        return hook

    def _on_q_split(self, layer: int, record: bool = True):
        """The fused q/k/v output a model computes with ``F.linear`` (q/v biases of its own), read off
        the ``q`` view it hands its q norm: recorded like a hooked Linear's output (unless ``record``
        is off), so it is not computed again (:meth:`attn_linears`), and the value path is taken from it."""
        attn = self.adapter.parts[layer].attn

        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            if self.paused:
                return
            full = _fused_output_of_q(inputs[0])
            h = self.batch.attn_inputs.get(layer)
            if full is None or h is None:
                return  # not the layout of a split fused output: the record is computed as before
            with torch.no_grad():
                full = full.detach()
                # the map's input is the attention input (None); this replaces a hooked module's record
                # whose output the model then added its biases into (qkv_bias_separate)
                if record:
                    self.batch.linears[layer]["qkv"] = (None, full - attn.qkv.extra_bias())
                self._value_path_from_linear(layer, h, full)

        return hook

    def _on_attn_out(self, layer: int):
        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            if not self.paused:
                self.batch.attn_out[layer] = inputs[0]

        return hook

    # -- attention of fused layers ----------------------------------------------------
    def grad_targets(self) -> list[torch.Tensor]:
        """Per block, the tensor to differentiate: the probabilities, or O for a fused block."""
        kept = self.batch
        return [kept.attn_out[l] if l in self.fused_layers else kept.attention[l] for l in range(len(self.adapter.parts))]

    def finish_attention(self, grads: list[torch.Tensor | None] | None = None) -> None:
        """Keep the gradients of :meth:`grad_targets` (after the backward pass) for
        :meth:`probs_grad`, and let go of the fused blocks' graph tensors."""
        self.batch.grads = {} if grads is None else dict(enumerate(grads))
        self.batch.attn_out.clear()
        if grads is not None:  # the graph is gone: give its pages back before the outputs fill
            trim_heap()  # (without a backward pass there was no graph: a trim would only cost page faults)

    def attn_linears(self, layer: int) -> dict[str, tuple[torch.Tensor | None, torch.Tensor]]:
        """Block ``layer``'s Linear records, with the q/k/v maps' outputs filled in where
        their module never ran (EVA, BEiT and SwinV2 call ``F.linear`` on the fused
        ``qkv`` weight with biases of their own): computed once here, from the
        recorded attention input, instead of at each use; :meth:`release` drops them."""
        lin = self.batch.linears[layer]
        h = self.batch.attn_inputs.get(layer)
        if h is None:
            return lin
        for name, part in self.adapter.parts[layer].attn.linears().items():
            if name != "proj" and name not in lin:
                with torch.no_grad():  # the module's own output: LinearPart adds any outside bias itself
                    lin[name] = (None, torch.nn.functional.linear(h, part.weight, part.module.bias))
                self.batch.filled.setdefault(layer, []).append(name)
        return lin

    def scores(self, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """The ``(a, bᵀ, logits)`` a fused block's probabilities were rebuilt from, kept for
        the LRP pass until :meth:`release` (None for a block whose probabilities were hooked)."""
        return self.batch.scores.get(layer)

    def heads(self, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Block ``layer``'s q, k, v per head (:meth:`AttentionPart.project` of its recorded input and
        maps), computed once for the rebuilt probabilities, their gradient and the LRP step;
        :meth:`release` drops them."""
        got = self.batch.heads.get(layer)
        if got is None:
            with torch.no_grad():
                got = self.adapter.parts[layer].attn.project(self.batch.attn_inputs[layer], self.attn_linears(layer))
            self.batch.heads[layer] = got
        return got

    def probs(self, layer: int) -> torch.Tensor:
        """Block ``layer``'s attention probabilities; a fused block's are rebuilt here
        (outside autograd, once) from its recorded input and q/k maps."""
        if layer not in self.batch.attention:
            attn = self.adapter.parts[layer].attn
            with torch.no_grad():
                kept = self.batch
                scores = attn.scores(kept.attn_inputs[layer], kept.attn_ctx.get(layer, {}), heads=self.heads(layer))
                self.batch.attention[layer] = scores[2].softmax(-1)
                if self.keep_block_inputs:  # the LRP pass reuses them
                    self.batch.scores[layer] = scores
        return self.batch.attention[layer].detach()

    def probs_grad(self, layer: int) -> torch.Tensor:
        """``∂y/∂A`` of block ``layer``: kept as is, or ``(∂y/∂O)·Vᵀ`` for a fused block."""
        g = self.batch.grads.get(layer)
        if layer not in self.fused_layers:
            return g if g is not None else torch.zeros_like(self.probs(layer))
        if g is None:
            return torch.zeros_like(self.probs(layer))
        with torch.no_grad():
            return self.adapter.parts[layer].attn.probabilities_grad(g, self.batch.attn_inputs[layer],
                                                                     v=self.heads(layer)[2])

    def release(self, layer: int) -> None:
        """Drop what is kept of block ``layer``'s attention (once it is stored)."""
        a = self.batch.attention.pop(layer, None)
        self.batch.grads.pop(layer, None)
        self.batch.scores.pop(layer, None)
        self.batch.heads.pop(layer, None)
        for name in self.batch.filled.pop(layer, ()):
            self.batch.linears.get(layer, {}).pop(name, None)
        # only the LRP walk frees what the forward pass kept (each block's records, as it passes): return
        # their pages now and then. Otherwise what is freed here is the block's rebuilt attention, whose
        # pages the next block's reuses: a trim would hand them back only to fault them in again.
        if a is not None and a.device.type == "cpu" and self.keep_block_inputs:
            self.batch.freed += a.numel() * a.element_size()
            if self.batch.freed >= _TRIM_EVERY:  # the block's records went too (LRP walk): return their pages
                self.batch.freed = 0
                trim_heap()

    def _on_attention(self, layer: int):
        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            if self.paused:
                return
            if self.store_attention is not None:  # written out now and let go: the next block reuses the memory
                self.store_attention(layer, output.detach())
                self.batch.stored_attention.add(layer)
                return
            self.batch.attention[layer] = output

        return hook

    def _on_norm2(self, layer: int):
        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            if self.paused or not self.ln:
                return
            with torch.no_grad():
                rec = self.batch.records[layer]
                rec["ln2_mean"], rec["ln2_std"] = _token_stats(self.adapter.tokens(inputs[0]))

        return hook

    def _on_mid(self, layer: int):
        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            if self.paused:
                return
            with torch.no_grad():
                x2 = self.adapter.tokens(inputs[0]).detach()
                if self.norms:
                    rec = self.batch.records[layer]
                    rec["mlp_in_norm"] = x2.float().norm(dim=-1)
                    u = self.batch.pending[layer].pop("u")
                    rec["attn_out_norm"] = (x2.float() - u.float()).norm(dim=-1)
                    self._value_path_left(layer)
                    self.batch.pending[layer]["x2"] = x2
                if self.keep_block_inputs:
                    self.batch.mlp_inputs[layer] = x2

        return hook

    def _on_mlp(self, layer: int):
        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            if self.paused or not self.norms:
                return
            with torch.no_grad():
                f = self.adapter.tokens(output).detach()
                x2 = self.batch.pending[layer].pop("x2")
                rec = self.batch.records[layer]
                rec["mlp_out_norm"] = f.float().norm(dim=-1)
                rec["mlp_cos"] = _cosine(f, x2, rec["mlp_out_norm"], rec["mlp_in_norm"])

        return hook

    def _on_block(self, layer: int):
        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            if self.paused:
                return
            with torch.no_grad():
                out = self.adapter.tokens(output).detach()
                if self.norms:
                    self.batch.records[layer]["block_out_norm"] = out.float().norm(dim=-1)
                if self.keep_block_inputs:
                    self.batch.block_outputs[layer] = out

        return hook

    def _on_final_norm(self, module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        if not self.paused:
            self.batch.final_input = inputs[0].detach()
            self.batch.final_output = output.detach()

    def _on_features(self, module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        if not self.paused:
            self.batch.features = output

    def _on_features_input(self, module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        if not self.paused:
            self.batch.features = inputs[0]

    def _on_merge(self, stage: int):
        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            if self.paused:
                return
            self.batch.merge_inputs[stage] = inputs[0].detach()

        return hook
