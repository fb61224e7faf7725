"""The vocabulary every adapter describes its model in, with each part's LRP rule.

A transformer block is a :class:`BlockPart`: a pre-attention norm, an
:class:`AttentionPart` (how q/k/v are produced — one fused Linear or three —,
q/k norms, rotary embedding, additive position bias, cosine attention, where
the post-softmax probabilities appear, the value path and output projection),
residual scales (LayerScale), a pre-MLP norm, an :class:`MlpPart` (plain, GLU,
SwiGLU) and whether the norms sit on the branch outputs instead (res-post-norm).
A :class:`Readout` turns the final tokens into logits (CLS, average with or
without prefix tokens, attention pool); a :class:`MergePart` is Swin's patch
merging. Capture (:mod:`vitlens.capture`) and the LRP walk only ever see
these parts, never a timm class name.

The LRP rule of each part is its ``relevance`` method; the primitive rules are
in :mod:`vitlens.models.lrp_rules`. Norms (LayerNorm, RMSNorm, q/k norms, the
cosine normalisation), the softmax, activations, LayerScale and rotary
embeddings pass relevance through unchanged (the identity rule: each is
treated as a fixed token-wise or channel-wise map, as Chefer et al. treat
LayerNorm), so only Linears, products, residual additions and pools move it.

Examples
--------
>>> import torch
>>> layer = torch.nn.Linear(2, 3, bias=False).requires_grad_(False)
>>> _ = layer.weight.copy_(torch.tensor([[1.0, 1.0], [2.0, -1.0], [-1.0, 0.5]]))
>>> LinearPart(layer).relevance(torch.tensor([[1.0, -2.0]]), torch.ones(1, 3))
tensor([[1.5000, 0.5000]])
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .lrp_rules import linear_alphabeta, matmul_lrp0, mean_lrp0, product_half, residual_add

Records = dict[str, tuple[torch.Tensor, torch.Tensor]]  # name -> recorded (input, output) of a Linear
Scores = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (a, bᵀ, logits a @ bᵀ + bias) of an attention


def _identity() -> nn.Module:
    return nn.Identity()


# -- linear layers -----------------------------------------------------------------------
@dataclass
class LinearPart:
    """A Linear map. Rule: αβ (α=1, β=0); the bias takes no relevance.

    ``extra_bias``: a bias the model adds outside the module (EVA/BEiT/SwinV2
    concatenate ``q_bias, 0, v_bias`` and call ``F.linear(x, qkv.weight, bias)``,
    so the module's own hook may never fire; capture then recomputes it).
    """

    module: nn.Linear
    extra_bias: Callable[[], torch.Tensor | None] | None = None

    @property
    def weight(self) -> torch.Tensor:
        return self.module.weight

    def bias(self) -> torch.Tensor | None:
        """The full bias of the map (the module's and any added outside it)."""
        extra = self.extra_bias() if self.extra_bias is not None else None
        own = self.module.bias
        if extra is None:
            return own
        return extra if own is None else extra + own

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias())

    def values(self, x: torch.Tensor, recorded: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        """The map's output, from the recorded module output when the module ran."""
        if recorded is None:
            return self.forward(x)
        out = recorded[1]
        extra = self.extra_bias() if self.extra_bias is not None else None
        return out if extra is None else out + extra

    def relevance(self, x: torch.Tensor, r: torch.Tensor,
                  recorded: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """αβ rule from the input ``x`` (the recorded module output saves a matmul)."""
        if recorded is not None:
            inp = x if recorded[0] is None else recorded[0]
            return linear_alphabeta(inp, self.weight, r, out=recorded[1], bias=self.module.bias)
        return linear_alphabeta(x, self.weight, r)


# -- attention -----------------------------------------------------------------------------
@dataclass
class AttentionPart:
    """Multi-head self-attention ``proj(norm(softmax(a·bᵀ + bias)·v))``.

    Produced by ``qkv`` (fused, output ``[q | k | v]`` with heads inside each) or
    by ``q``, ``k``, ``v``. ``q_norm``/``k_norm`` act per head; ``rotary(q, k, ctx)``
    rotates them (``ctx`` = the keyword arguments the model passed the attention
    module, e.g. ``rope``); ``position_bias(ctx)`` is added to the logits (relative
    position bias, shift masks), shaped ``(heads, N, N)`` or ``(nW, heads, N, N)``;
    ``logit_scale()`` turns on cosine attention (SwinV2:
    ``a = normalize(q)·scale``, ``b = normalize(k)``), else ``a = q·scale``.
    ``probs`` is the module whose output is the post-softmax attention (its
    dropout); ``inner_norm`` normalises the heads' concatenation before ``proj``.

    LRP rule (:meth:`relevance`): αβ through ``proj``; ``A·V`` and ``a·bᵀ`` by the
    halved bilinear rule (:func:`~vitlens.models.lrp_rules.matmul_lrp0`), the
    logits' relevance shared with the additive bias dropped (a documented leak);
    norms, softmax, cosine normalisation and rotary pass relevance unchanged;
    αβ through the q/k/v maps, summed at the input.
    """

    module: nn.Module
    probs: nn.Module
    num_heads: int
    proj: LinearPart
    qkv: LinearPart | None = None
    q: LinearPart | None = None
    k: LinearPart | None = None
    v: LinearPart | None = None
    q_norm: nn.Module = field(default_factory=_identity)
    k_norm: nn.Module = field(default_factory=_identity)
    scale: float = 1.0
    rotary: Callable[[torch.Tensor, torch.Tensor, dict], tuple[torch.Tensor, torch.Tensor]] | None = None
    position_bias: Callable[[dict], torch.Tensor | None] | None = None
    logit_scale: Callable[[], torch.Tensor] | None = None
    inner_norm: nn.Module = field(default_factory=_identity)

    def __post_init__(self) -> None:
        if (self.qkv is None) == (self.q is None):
            raise ValueError("an AttentionPart has either a fused qkv or split q, k, v maps")

    @property
    def fused(self) -> bool:
        return self.qkv is not None

    def linears(self) -> dict[str, LinearPart]:
        """Every Linear of the part, by the name the records use."""
        maps = {"qkv": self.qkv} if self.fused else {"q": self.q, "k": self.k, "v": self.v}
        return {**{k: v for k, v in maps.items() if v is not None}, "proj": self.proj}

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        b, n, c = t.shape
        return t.reshape(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)

    def project(self, h: torch.Tensor, lin: Records | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v as (B, heads, N, head_dim), before q/k norms and rotary, each contiguous.

        The fused map's output is laid out head by head in one pass (with the bias a model
        adds outside the module, where it has one), so the products of the attention rules
        run on them without copying them again.
        """
        lin = lin or {}
        if self.fused:
            assert self.qkv is not None
            rec = lin.get("qkv")
            t = self.qkv.forward(h) if rec is None else rec[1]
            extra = self.qkv.extra_bias() if rec is not None and self.qkv.extra_bias is not None else None
            b, n, c = t.shape
            hd = c // (3 * self.num_heads)
            heads = t.new_empty(3, b, self.num_heads, n, hd)
            src = t.reshape(b, n, 3, self.num_heads, hd).permute(2, 0, 3, 1, 4)
            if extra is None:
                heads.copy_(src)
            else:  # the recorded module output plus the outside bias, as LinearPart.values adds it
                torch.add(src, extra.reshape(3, 1, self.num_heads, 1, hd), out=heads)
            q, k, v = heads.unbind(0)
            return q, k, v
        assert self.q is not None and self.k is not None and self.v is not None
        return tuple(self._heads(p.values(h, lin.get(name))).contiguous() for name, p in  # type: ignore[return-value]
                     (("q", self.q), ("k", self.k), ("v", self.v)))

    def operands(self, q: torch.Tensor, k: torch.Tensor, ctx: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """``(a, bᵀ)`` with logits ``a @ bᵀ (+ bias)``: q/k norms, rotary, scale or cosine applied."""
        q, k = self.q_norm(q), self.k_norm(k)
        if self.rotary is not None:
            q, k = self.rotary(q, k, ctx)
        if self.logit_scale is not None:
            return F.normalize(q, dim=-1) * self.logit_scale(), F.normalize(k, dim=-1).transpose(-2, -1)
        return q * self.scale, k.transpose(-2, -1)

    def bias(self, ctx: dict) -> torch.Tensor | None:
        return None if self.position_bias is None else self.position_bias(ctx)

    @staticmethod
    def add_bias(z: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """``z`` (B[·nW], heads, N, N) plus a bias (heads, N, N) or (nW, heads, N, N), in place."""
        if bias is None:
            return z
        if bias.ndim == 4:
            z.view(-1, bias.shape[0], *z.shape[1:]).add_(bias)
        else:
            z.add_(bias)
        return z

    def scores(self, h: torch.Tensor, ctx: dict | None = None, lin: Records | None = None,
               heads: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> Scores:
        """``(a, bᵀ, z)`` with the pre-softmax logits ``z = a @ bᵀ (+ bias)``, from the attention input ``h``
        (or from ``heads``, its :meth:`project` when the caller has it).

        A fused (scaled-dot-product) forward keeps none of this: capture rebuilds
        it here, outside autograd, after the backward pass has freed its graph,
        takes the probabilities as ``z.softmax(-1)`` and hands the same scores to
        :meth:`relevance` (``scores=``).
        """
        q, k, _ = heads if heads is not None else self.project(h, lin)
        return self._scores_of(q, k, ctx or {})

    def _scores_of(self, q: torch.Tensor, k: torch.Tensor, ctx: dict) -> Scores:
        a, bt = self.operands(q, k, ctx)
        return a, bt, self.add_bias(a @ bt, self.bias(ctx))

    def logits(self, h: torch.Tensor, ctx: dict | None = None, lin: Records | None = None) -> torch.Tensor:
        """Pre-softmax logits recomputed from the attention input ``h`` (tests, LRP)."""
        return self.scores(h, ctx, lin)[2]

    def probabilities_grad(self, grad_out: torch.Tensor, h: torch.Tensor, lin: Records | None = None,
                           v: torch.Tensor | None = None) -> torch.Tensor:
        """``∂y/∂A`` from ``∂y/∂O`` at the heads' output ``O = A·V`` (B[·nW], N, C): ``(∂y/∂O)·Vᵀ`` per head
        (``v``: the values of :meth:`project`, when the caller has them)."""
        if v is None:
            _, _, v = self.project(h, lin)
        b, n, _ = grad_out.shape
        g = grad_out.reshape(b, n, self.num_heads, -1).transpose(1, 2)
        return g @ v.transpose(-2, -1)

    def output_module(self) -> nn.Module:
        """The module whose input is the heads' concatenation ``O`` (B[·nW], N, C): the inner norm or ``proj``."""
        if any(m is self.inner_norm for m in self.module.children()):
            return self.inner_norm
        return self.proj.module

    def heads_output_module(self) -> nn.Module:
        """The module whose input holds each head's output as it reaches the output projection:
        ``proj`` (after any inner norm), shaped (B[·nW], N, heads·hd), head ``h`` in channels
        :meth:`head_channels` ``(h)``. Interventions (ablation, patching) replace a head's slice
        there, so that head's term ``W_O,h·o_h`` is all that changes in the branch output."""
        return self.proj.module

    def head_channels(self, head: int) -> slice:
        """The channels of head ``head`` in the heads' concatenation (heads are concatenated in order)."""
        hd = int(self.proj.weight.shape[1]) // self.num_heads
        return slice(head * hd, (head + 1) * hd)

    def value_path(self, h: torch.Tensor) -> torch.Tensor:
        """Each token's value vector after the output projection, without its bias.

        What the branch would add for a token attending only to itself:
        ``W_O·norm(v_j)`` (docs/METHODS.md's MSA transformation of a token, for tokentm).
        """
        if self.fused:
            assert self.qkv is not None
            dim = self.qkv.weight.shape[0] // 3
            bias = self.qkv.bias()
            v = F.linear(h, self.qkv.weight[2 * dim:], None if bias is None else bias[2 * dim:])
        else:
            assert self.v is not None
            v = self.v.forward(h)
        return self._project_values(v)

    def value_path_of(self, out: torch.Tensor,
                      layout: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        """:meth:`value_path` from the recorded output of the map that gives ``v``
        (``v`` itself, or the fused ``[q | k | v]``, whose last third it is).
        ``layout`` puts ``v`` back in token order first (Swin: the map ran on windows)."""
        v = out[..., 2 * out.shape[-1] // 3:] if self.fused else out
        return self._project_values(v if layout is None else layout(v))

    def _project_values(self, v: torch.Tensor) -> torch.Tensor:
        return F.linear(self.inner_norm(v), self.proj.weight)

    def relevance(self, h: torch.Tensor, probs: torch.Tensor, r_o: torch.Tensor, lin: Records,
                  ctx: dict, to_input: bool = True, scores: Scores | None = None,
                  heads: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                  ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Relevance at the attention input ``h`` and at the probabilities.

        ``r_o``: relevance at ``proj``'s input. With ``to_input=False`` the q/k/v
        step is skipped (no map needs it for the first block) and ``None`` returned.
        ``scores`` and ``heads``: :meth:`scores` and :meth:`project` of ``h`` when the
        caller has them (not recomputed).
        """
        q, k, v = heads if heads is not None else self.project(h, lin)
        b, n, _ = r_o.shape
        proj_rec = lin.get("proj")
        # z = A·V is proj's recorded input where no norm sits between (saves recomputing the product)
        av = self._heads(proj_rec[0]) if proj_rec is not None and proj_rec[0] is not None and isinstance(
            self.inner_norm, nn.Identity) and proj_rec[0].shape == r_o.shape else None
        r_probs, r_v = matmul_lrp0(probs, v, r_o.reshape(b, n, self.num_heads, -1).transpose(1, 2), z=av)
        if not to_input:
            return None, r_probs
        a, bt, z = scores if scores is not None else self._scores_of(q, k, ctx)
        r_a, r_bt = matmul_lrp0(a, bt, r_probs, z=z)
        r_q, r_k = r_a, r_bt.transpose(-2, -1)  # norms, rotary, scale: identity rule
        if self.fused:
            assert self.qkv is not None
            r_qkv = _merge_heads(r_q, r_k, r_v)
            return self.qkv.relevance(h, r_qkv, lin.get("qkv")), r_probs
        flat = [r.transpose(1, 2).reshape(b, n, -1) for r in (r_q, r_k, r_v)]
        r_h = None
        for (name, part), r in zip((("q", self.q), ("k", self.k), ("v", self.v)), flat):
            assert part is not None
            step = part.relevance(h, r, lin.get(name))
            r_h = step if r_h is None else r_h.add_(step)
        return r_h, r_probs


def _merge_heads(r_q: torch.Tensor, r_k: torch.Tensor, r_v: torch.Tensor) -> torch.Tensor:
    """(B, heads, N, hd) ×3 → (B, N, 3·heads·hd), the fused qkv layout (one copy each)."""
    b, h, n, hd = r_q.shape
    out = r_q.new_empty(b, n, 3, h, hd)
    for i, r in enumerate((r_q, r_k, r_v)):
        out[:, :, i].copy_(r.transpose(1, 2))
    return out.reshape(b, n, 3 * h * hd)


# -- MLP -------------------------------------------------------------------------------------
MLP_KINDS = ("plain", "glu", "swiglu")


@dataclass
class MlpPart:
    """The MLP branch: ``fc2(norm(act(fc1(x))))`` (plain), or a gated unit.

    ``glu``: ``fc1`` packs gate and value (``gate_last`` says which half gates,
    timm's ``GluMlp``/``SwiGLUPacked``); ``swiglu``: separate ``fc1_g`` (gate) and
    ``fc1_x`` (value), timm's ``SwiGLU``.

    LRP rule (:meth:`relevance`): αβ through ``fc2``; the inner norm and the
    activation pass relevance on; the gate·value product gives each factor half
    (:func:`~vitlens.models.lrp_rules.product_half`); αβ through the first
    Linear(s), summed at the input.

    ``hidden`` rebuilds ``fc2``'s input from the first Linear's output (plain and glu:
    ``hidden(fc1 output)``; swiglu: ``hidden(fc1_g output, fc1_x output)``), so capture
    need not keep it (it is the largest activation of a block).
    """

    module: nn.Module
    kind: str
    fc2: LinearPart
    fc1: LinearPart | None = None
    fc1_g: LinearPart | None = None
    fc1_x: LinearPart | None = None
    gate_last: bool = False
    hidden: Callable[..., torch.Tensor] | None = None

    def __post_init__(self) -> None:
        if self.kind not in MLP_KINDS:
            raise ValueError(f"MLP kind {self.kind!r}; one of {MLP_KINDS}")

    def rebuilt_inputs(self) -> set[str]:
        """The Linears whose inputs the LRP pass rebuilds (with :attr:`hidden`): ``fc2``'s from the first
        Linear's output, the first Linear's from the block's norm (pre-norm blocks only, see the Recorder)."""
        if self.hidden is None:
            return set()
        return {"fc1_g", "fc1_x", "fc2"} if self.kind == "swiglu" else {"fc1", "fc2"}

    def linears(self) -> dict[str, LinearPart]:
        names = {"fc1": self.fc1, "fc1_g": self.fc1_g, "fc1_x": self.fc1_x, "fc2": self.fc2}
        return {k: v for k, v in names.items() if v is not None}

    def relevance(self, x: torch.Tensor, r_out: torch.Tensor, lin: Records) -> torch.Tensor:
        """Relevance at the MLP's input ``x`` from the relevance at its output."""
        fc2_in = lin["fc2"][0]
        if fc2_in is None:  # not kept at capture: rebuilt from fc1's recorded output
            assert self.hidden is not None
            fc2_in = (self.hidden(lin["fc1_g"][1], lin["fc1_x"][1]) if self.kind == "swiglu"
                      else self.hidden(lin["fc1"][1]))
        r_h = self.fc2.relevance(fc2_in, r_out, (fc2_in, lin["fc2"][1]))
        if self.kind == "plain":
            assert self.fc1 is not None
            return self.fc1.relevance(x, r_h, lin.get("fc1"))
        if self.kind == "glu":  # gate and value packed in fc1's output: each half gets R/2, written in place
            assert self.fc1 is not None
            packed = r_h.new_empty(*r_h.shape[:-1], 2 * r_h.shape[-1])
            product_half(r_h, out=packed)
            return self.fc1.relevance(x, packed, lin.get("fc1"))
        r_gate, r_value = product_half(r_h)
        assert self.fc1_g is not None and self.fc1_x is not None
        return self.fc1_g.relevance(x, r_gate, lin.get("fc1_g")).add_(
            self.fc1_x.relevance(x, r_value, lin.get("fc1_x")))


# -- block ---------------------------------------------------------------------------------
@dataclass
class BlockPart:
    """One transformer block: ``x2 = x + ls1·A(norm1(x))``, ``out = x2 + ls2·M(norm2(x2))``.

    With ``post_norm`` (res-post-norm: SwinV2, timm's ``ResPostBlock``) the norms
    act on the branch outputs: ``x2 = x + norm1(A(x))``, ``out = x2 + norm2(M(x2))``.
    ``ls1``/``ls2`` are the residual scales (LayerScale ``ls1``/``ls2`` or
    ``gamma_1``/``gamma_2``), modules applied to the branch output, or ``None``.

    LRP rule: each residual addition by
    :func:`~vitlens.models.lrp_rules.residual_add` (LRP-0 shares rescaled to
    conserve per image); the residual scale and the norms pass relevance on
    (identity rule); the branches by their parts' rules.
    """

    module: nn.Module
    norm1: nn.Module
    attn: AttentionPart
    norm2: nn.Module
    mlp: MlpPart
    post_norm: bool = False
    ls1: nn.Module | None = None
    ls2: nn.Module | None = None

    @property
    def mid(self) -> nn.Module:
        """The module whose first input is ``x2``, the stream entering the MLP branch."""
        return self.mlp.module if self.post_norm else self.norm2

    def linears(self) -> dict[str, LinearPart]:
        return {**self.attn.linears(), **self.mlp.linears()}

    @property
    def embed_dim(self) -> int:
        return int(self.attn.proj.weight.shape[0])


# -- patch merging -----------------------------------------------------------------------------
@dataclass
class MergePart:
    """Swin patch merging: the 2×2 parents concatenated, a norm and a Linear (``reduction``).

    ``norm_first``: v1 normalises the concatenation before the Linear; v2 after.
    LRP rule: the norm passes relevance on; αβ through ``reduction``.
    """

    module: nn.Module
    reduction: nn.Linear
    norm: nn.Module
    norm_first: bool = True

    def relevance(self, x: torch.Tensor, r_out: torch.Tensor) -> torch.Tensor:
        """``x``: the merge input (B, H, W, C); ``r_out``: relevance on its output (B, ⌈H/2⌉, ⌈W/2⌉, C').

        An odd grid is padded by a zero row/column first, as timm pads it. The
        padding is no token: after v1's norm its entries are not zero, so they are
        kept out of the αβ sums like a bias (relevance stays on the real parents).
        """
        b, h, w, c = x.shape
        ph, pw = h + h % 2, w + w % 2
        cat = _merge_cat(F.pad(x, (0, 0, 0, pw - w, 0, ph - h)))
        inp = self.norm(cat) if self.norm_first else cat
        if (ph, pw) != (h, w):
            inp = inp * _merge_cat(F.pad(x.new_ones(1, h, w, 1), (0, 0, 0, pw - w, 0, ph - h))).repeat_interleave(c, -1)
        r_cat = linear_alphabeta(inp, self.reduction.weight, r_out)
        r = r_cat.reshape(b, ph // 2, pw // 2, 2, 2, c).permute(0, 1, 4, 2, 3, 5).reshape(b, ph, pw, c)
        return r[:, :h, :w]


def _merge_cat(x: torch.Tensor) -> torch.Tensor:
    """(B, H, W, C) with even H, W → (B, H/2, W/2, 4C): the 2×2 parents concatenated in timm's order."""
    b, h, w, c = x.shape
    return x.reshape(b, h // 2, 2, w // 2, 2, c).permute(0, 1, 3, 4, 2, 5).flatten(3)


# -- read-outs -----------------------------------------------------------------------------
READOUTS = ("cls", "avg", "avg_with_prefix", "map")


@dataclass
class Readout:
    """How the final tokens ``(B, N, C)`` become logits.

    ``"cls"``: ``head(fc_norm(x[:, 0]))`` (with ``head_dist``: the mean of the CLS
    and distillation heads, distilled DeiT). ``"avg"``: ``head(fc_norm(mean of
    tokens start..N))`` (``start`` = number of prefix tokens);
    ``"avg_with_prefix"``: the same over all tokens (timm's
    ``pool_include_prefix=True``). ``"map"``: an attention pool (timm's
    ``AttentionPoolLatent``: a learned latent query attends over tokens
    ``start..N``, then ``proj`` and a residual MLP).

    LRP rules: αβ through ``head``; ``fc_norm`` passes relevance on; the mean by
    LRP-0 (:func:`~vitlens.models.lrp_rules.mean_lrp0`). Attention pool: the
    residual MLP by :func:`residual_add` and αβ; ``proj`` by αβ; the pool's
    ``o = Σ_j a_j v_j`` by LRP-0 with the attention ``a`` held fixed (all of
    ``o``'s relevance goes to the values, ``R_{v_j} = a_j v_j · R_o / o``: the
    latent query is a parameter, so there is no input on the query side to give
    the logits' half to); αβ through the value half of ``kv``.
    """

    kind: str
    head: nn.Module
    fc_norm: nn.Module = field(default_factory=_identity)
    start: int = 0
    head_dist: nn.Linear | None = None
    pool: nn.Module | None = None
    #: the LRP rule of ``head`` when it is not one Linear: ``(head input (B, C), relevance at the logits) ->
    #: relevance at the head input`` (e.g. a user's head, :mod:`vitlens.models.families.hf_headed`)
    head_rule: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    #: image–text similarities (CLIP, SigLIP): the logits are ``head(z) / embed_norm(z)`` (the length of the
    #: image embedding); ``head`` alone is the Linear the LRP rule uses (``1/‖e‖`` passes relevance on)
    embed_norm: Callable[[torch.Tensor], torch.Tensor] | None = None

    def __post_init__(self) -> None:
        if self.kind not in READOUTS:
            raise ValueError(f"read-out {self.kind!r}; one of {READOUTS}")

    def pooled(self, tokens: torch.Tensor) -> torch.Tensor:
        """The head's input (B, C) from the final tokens (B, N, C): the pooled embedding.

        ``"cls"``: ``fc_norm`` of the CLS token; ``"avg"``/``"avg_with_prefix"``: of the token mean;
        ``"map"``: of the attention pool's output.
        """
        if self.kind == "cls":
            return self.fc_norm(tokens[:, 0])
        x = tokens[:, self.pooled_tokens_start:]
        if self.kind == "map":
            assert self.pool is not None
            return self.fc_norm(self.pool(x))
        return self.fc_norm(x.mean(1))

    def logits_of(self, z: torch.Tensor) -> torch.Tensor:
        """The logits (B, classes) from the head's input ``z`` (B, C)."""
        out = self.head(z)
        return out if self.embed_norm is None else out / self.embed_norm(z)

    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """The logits (B, classes) the read-out makes of final tokens (B, N, C) (differentiable).

        The model's own read-out applied to any tokens of the last stage's width, e.g. an
        intermediate block's (LeGrad's per-layer scores).
        """
        if self.kind == "cls" and self.head_dist is not None:  # distilled DeiT: the mean of its two heads
            return (self.head(self.fc_norm(tokens[:, 0])) + self.head_dist(tokens[:, 1])) / 2
        return self.logits_of(self.pooled(tokens))

    def head_relevance(self, z: torch.Tensor, relevance: torch.Tensor) -> torch.Tensor:
        """Relevance on the head's input ``z`` from ``relevance`` at the logits: αβ through the head's Linear."""
        if self.head_rule is not None:
            return self.head_rule(z, relevance)
        return linear_alphabeta(z, self.head.weight, relevance)

    def pool_weights(self, tokens: torch.Tensor) -> torch.Tensor:
        """Attention pool: each token's weight in the pooled vector, mean over heads and latents, (B, N)."""
        assert self.pool is not None
        a = self._pool_attention(tokens[:, self.start:])  # (B, heads, L, N')
        w = tokens.new_zeros(tokens.shape[:2])
        w[:, self.start:] = a.mean((1, 2))
        return w

    def _pool_attention(self, x: torch.Tensor) -> torch.Tensor:
        p = self.pool
        assert p is not None
        b, n, c = x.shape
        if getattr(p, "pos_embed", None) is not None:
            x = x + p.pos_embed.unsqueeze(0).to(x.dtype)
        q = p.q(p.latent.expand(b, -1, -1)).reshape(b, p.latent_len, p.num_heads, p.head_dim).transpose(1, 2)
        k = p.kv(x).reshape(b, n, 2, p.num_heads, p.head_dim).permute(2, 0, 3, 1, 4)[0]
        q, k = p.q_norm(q), p.k_norm(k)
        return ((q * p.scale) @ k.transpose(-2, -1)).softmax(-1)

    def _pool_relevance(self, x: torch.Tensor, r_pooled: torch.Tensor) -> torch.Tensor:
        p = self.pool
        assert p is not None
        b, n, c = x.shape
        xin = x + p.pos_embed.unsqueeze(0).to(x.dtype) if getattr(p, "pos_embed", None) is not None else x
        a = self._pool_attention(x)  # (B, heads, L, N)
        kv = p.kv(xin)
        v = kv.reshape(b, n, 2, p.num_heads, p.head_dim).permute(2, 0, 3, 1, 4)[1]  # (B, heads, N, hd)
        o = (a @ v).transpose(1, 2).reshape(b, p.latent_len, c)  # (B, L, C)
        y = p.proj(o)
        if p.pool == "token":
            r_y = torch.zeros_like(y)
            r_y[:, 0] = r_pooled
        elif p.pool == "avg":
            r_y = mean_lrp0(y + (p.mlp(p.norm(y)) if p.mlp is not None else 0), r_pooled, dim=1)
        else:
            raise ValueError(f"attention pool {p.pool!r}")
        if p.mlp is not None:
            hidden = p.norm(y)
            f = p.mlp(hidden)
            r_y, r_f = residual_add(y, f, r_y)
            mlp = MlpPart(p.mlp, "plain", LinearPart(p.mlp.fc2), fc1=LinearPart(p.mlp.fc1))
            r_y = r_y.add_(mlp.relevance(hidden, r_f, {"fc2": (p.mlp.act(p.mlp.fc1(hidden)), f)}))
        r_o = LinearPart(p.proj).relevance(o, r_y)  # (B, L, C)
        # o = a·v with a fixed: LRP-0 gives all of o's relevance to the values
        r_oh = r_o.reshape(b, p.latent_len, p.num_heads, p.head_dim).transpose(1, 2)  # (B, heads, L, hd)
        s = r_oh / torch.where((a @ v) == 0, torch.ones_like(r_oh), a @ v)
        s = s.masked_fill((a @ v) == 0, 0.0)
        r_v = v * (a.transpose(-2, -1) @ s)  # (B, heads, N, hd)
        r_kv = torch.cat([torch.zeros_like(r_v), r_v], 0).reshape(2, b, p.num_heads, n, p.head_dim)
        r_kv = r_kv.permute(1, 3, 0, 2, 4).reshape(b, n, 2 * c)
        w_v = p.kv.weight
        return linear_alphabeta(xin, w_v, r_kv)

    def relevance(self, tokens: torch.Tensor, onehot: torch.Tensor) -> torch.Tensor:
        """Relevance on the final tokens (B, N, C) from a one-hot (B, classes) at the logits."""
        r = torch.zeros_like(tokens)
        head = self.head
        if self.kind == "cls":
            if self.head_dist is not None:  # distilled DeiT: mean of two heads
                z0 = F.linear(tokens[:, 0], head.weight, head.bias) / 2
                z1 = F.linear(tokens[:, 1], self.head_dist.weight, self.head_dist.bias) / 2
                r0, r1 = residual_add(z0, z1, onehot)
                r[:, 0] = linear_alphabeta(tokens[:, 0], head.weight, r0)
                r[:, 1] = linear_alphabeta(tokens[:, 1], self.head_dist.weight, r1)
                return r
            r[:, 0] = self.head_relevance(self.fc_norm(tokens[:, 0]), onehot)
            return r
        start = 0 if self.kind == "avg_with_prefix" else self.start
        x = tokens[:, start:]
        if self.kind == "map":
            pooled = self.pool(x) if self.pool is not None else x.mean(1)
            r_pooled = self.head_relevance(self.fc_norm(pooled), onehot)
            r[:, start:] = self._pool_relevance(x, r_pooled)
            return r
        r_pooled = self.head_relevance(self.fc_norm(x.mean(1)), onehot)
        r[:, start:] = mean_lrp0(x, r_pooled, dim=1)
        return r

    @property
    def pooled_tokens_start(self) -> int:
        return 0 if self.kind == "avg_with_prefix" else self.start


__all__ = [
    "AttentionPart", "BlockPart", "LinearPart", "MergePart", "MlpPart", "MLP_KINDS", "READOUTS", "Readout",
    "Records",
]


def describe(part: Any) -> str:
    """One line naming a part's kind (for messages and docs)."""
    if isinstance(part, AttentionPart):
        bits = ["fused qkv" if part.fused else "split q/k/v"]
        bits += ["rotary"] if part.rotary is not None else []
        bits += ["position bias"] if part.position_bias is not None else []
        bits += ["cosine"] if part.logit_scale is not None else []
        return "attention (" + ", ".join(bits) + ")"
    if isinstance(part, MlpPart):
        return f"{part.kind} MLP"
    return type(part).__name__
