"""Interventions: switch heads off (ablation) or take activations from other images (patching).

An intervention is a capture option, applied by hooks that :class:`Intervening`
installs on the modules the parts vocabulary names and removes on exit (also
after an exception), so the model is left exactly as it was:

- a head's output is its slice of the input of the attention's output projection
  (:meth:`~vitlens.models.parts.AttentionPart.heads_output_module`, shaped
  (B[·nW], N, heads·hd): Swin windows are rows, so a head is replaced in every
  window of its block). The hook multiplies the chosen heads' channels by 0;
  a replacement value ``v`` (the reference mean, or another image's output) is
  added after the projection as ``W_O·v`` — the same sum, with ``v`` a constant of
  the forward pass: no gradient reaches the replaced head's attention, and the LRP
  pass gives ``v`` no relevance (like a bias).
- the residual stream of chosen tokens entering a block is replaced by another
  image's (:meth:`~vitlens.models.adapter.Adapter.with_tokens`); those tokens are
  constants too (no gradient, no relevance flows back through them).

:func:`patch` and :func:`head_importance` are built on the same hooks;
``vl.capture(..., ablate=, ablation=, reference=)`` takes the options.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
import xarray as xr
from torch import nn

from ..errors import CaptureFormatError, OptionError
from ..models.adapter import Adapter
from .attrs import json_attr, json_text
from .handles import HookSet
from .layout import stage_names

Ablation = Literal["zero", "mean"]
#: How ablated heads are replaced: by zeros, or by their mean output over a reference set.
ABLATIONS: tuple[str, ...] = ("zero", "mean")

HeadSpec = Mapping[int, Iterable[int] | int | str]


# -- the resolved intervention -------------------------------------------------------------------
@dataclass
class Intervention:
    """What to change in a forward pass, resolved for one model.

    ``heads``: block → heads whose output is replaced. ``values`` (``mode`` "mean"
    or "patch"): block → replacement of the heads' concatenated output,
    (S, nW, N, heads·hd) with S = 1 (used for every image) or one row per image;
    only the channels of ``heads[layer]`` are read. ``token_layer``/``token_index``/
    ``token_values`` (S, k, C): the residual stream of those tokens entering that
    block. ``source``: how the values were made (for the capture's attrs).
    """

    mode: Literal["zero", "mean", "patch"] = "zero"
    heads: dict[int, tuple[int, ...]] = field(default_factory=dict)
    values: dict[int, torch.Tensor] = field(default_factory=dict)
    token_layer: int | None = None
    token_index: tuple[int, ...] = ()
    token_values: torch.Tensor | None = None
    source: dict[str, Any] = field(default_factory=dict)

    @property
    def per_image(self) -> bool:
        """Whether the values hold one row per image (patching) instead of one for all."""
        rows = [v.shape[0] for v in self.values.values()]
        if self.token_values is not None:
            rows.append(self.token_values.shape[0])
        return any(r > 1 for r in rows) or self.mode == "patch"

    def rows(self, start: int, stop: int) -> "Intervention":
        """The intervention for images ``start:stop`` (per-image values sliced; shared ones kept)."""
        def cut(v: torch.Tensor) -> torch.Tensor:
            return v if v.shape[0] == 1 else v[start:stop]

        return replace(self, values={l: cut(v) for l, v in self.values.items()},
                       token_values=None if self.token_values is None else cut(self.token_values))

    def describe(self) -> dict[str, Any]:
        """A JSON-able record of the intervention (the capture's ``intervention`` attribute)."""
        out: dict[str, Any] = {"kind": "patch" if self.mode == "patch" else "ablate"}
        if self.heads:
            out["heads"] = {str(l): list(h) for l, h in sorted(self.heads.items())}
        if self.mode != "patch":
            out["ablation"] = self.mode
        if self.token_layer is not None:
            out["tokens"] = list(self.token_index)
            out["layer"] = self.token_layer
        out.update(self.source)
        return out

    def digest(self) -> str:
        """blake2b of the description and every value (for run fingerprints and caches)."""
        h = hashlib.blake2b(json_text(self.describe()).encode(), digest_size=16)
        for l in sorted(self.values):
            h.update(self.values[l].detach().float().cpu().contiguous().numpy().tobytes())
        if self.token_values is not None:
            h.update(self.token_values.detach().float().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()


def parse_heads(adapter: Adapter, spec: HeadSpec | None, what: str = "ablate") -> dict[int, tuple[int, ...]]:
    """``{layer: heads}`` checked against the model: global block indices, heads of that block's
    stage; a single head or ``"all"`` is accepted for a block's heads.

    Examples
    --------
    >>> import timm
    >>> from vitlens.models import adapter_for
    >>> model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=3, depth=2)
    >>> parse_heads(adapter_for(model), {1: [2, 0], 0: "all"})
    {0: (0, 1, 2), 1: (0, 2)}
    """
    if spec is None:
        return {}
    if not isinstance(spec, Mapping):
        raise OptionError(f"{what}= takes a dict block → heads, e.g. {{3: [0, 2]}}; got {type(spec).__name__}.")
    layers = len(adapter.parts)
    out: dict[int, tuple[int, ...]] = {}
    for layer, heads in spec.items():
        if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)) or not 0 <= int(layer) < layers:
            raise OptionError(f"{what}=: block {layer!r} does not exist; the model has blocks 0..{layers - 1}.")
        n = adapter.parts[int(layer)].attn.num_heads
        if isinstance(heads, str):
            if heads != "all":
                raise OptionError(f"{what}=: block {layer} takes a list of heads or 'all'; got {heads!r}.")
            heads = range(n)
        elif isinstance(heads, (int, np.integer)):
            heads = [heads]
        chosen = sorted({int(h) for h in heads})
        bad = [h for h in chosen if not 0 <= h < n]
        if bad:
            raise OptionError(f"{what}=: block {layer} has heads 0..{n - 1}; got {bad}.")
        if chosen:
            out[int(layer)] = tuple(chosen)
    return dict(sorted(out.items()))


def _heads_mask(adapter: Adapter, layer: int, heads: Iterable[int], like: torch.Tensor) -> torch.Tensor:
    attn = adapter.parts[layer].attn
    mask = like.new_zeros(int(attn.proj.weight.shape[1]))
    for h in heads:
        mask[attn.head_channels(h)] = 1
    return mask


# -- the hooks -------------------------------------------------------------------------------------
@dataclass
class _LayerState:
    mask: torch.Tensor  # (R, C) with R = 1 (every row) or one row per image of the batch
    value: torch.Tensor | None  # (S, nW, N, C), S = 1 or R


class Intervening(HookSet):
    """Context manager: the hooks of one intervention on ``adapter``'s model (removed on exit).

    ``record_heads``: keep the heads' outputs as they reach the projection, per block,
    in :attr:`head_outputs` ((B, nW, N, C) after the intervention), for the blocks
    given (``True``: all). ``record_tokens``: keep the residual stream entering that
    block, before any replacement, in :attr:`block_tokens` (B, N, C). ``every_block``: hook
    every block's heads (head importance switches them through :meth:`set_states`).
    Enter it after :class:`~vitlens.capture.hooks.Recorder`, so that the recorder sees
    a head's output before it is replaced (its gradient is then 0 for an ablated head).
    """

    def __init__(self, adapter: Adapter, intervention: Intervention | None = None, *,
                 record_heads: bool | Iterable[int] = False, record_tokens: int | None = None,
                 every_block: bool = False):
        self.adapter = adapter
        self.intervention = intervention or Intervention()
        layers = range(len(adapter.parts))
        self.record_heads = set(layers if record_heads is True else (record_heads or ()))
        self.record_tokens = record_tokens
        self.every_block = every_block
        self.head_outputs: dict[int, torch.Tensor] = {}
        self.block_tokens: dict[int, torch.Tensor] = {}
        self.states: dict[int, _LayerState] = {}
        self._handles: list[Any] = []
        self._rows: Intervention = self.intervention

    def _remove(self) -> None:
        super()._remove()
        self.states.clear()

    def _install(self) -> None:
        ad, iv = self.adapter, self.intervention
        hooked = set(range(len(ad.parts))) if self.every_block else set(iv.heads) | self.record_heads
        for layer in sorted(hooked):
            attn = ad.parts[layer].attn
            module = attn.heads_output_module()
            self._handles.append(module.register_forward_pre_hook(self._on_heads(layer)))
            if iv.values:
                self._handles.append(module.register_forward_hook(self._on_projected(layer)))
        for layer in {iv.token_layer, self.record_tokens} - {None}:
            block = ad.parts[layer].module  # first: every other hook sees the patched stream
            self._handles.append(block.register_forward_pre_hook(self._on_block(layer), prepend=True))
        self.select(0, None)

    def select(self, start: int, stop: int | None) -> None:
        """Use the values of images ``start:stop`` (per-image values) for the next forward."""
        iv = self.intervention
        self._rows = iv.rows(start, stop) if stop is not None and iv.per_image else iv
        self.states = {}
        for layer, heads in iv.heads.items():
            w = self.adapter.parts[layer].attn.proj.weight
            self.states[layer] = _LayerState(_heads_mask(self.adapter, layer, heads, w)[None],
                                             self._rows.values.get(layer))

    def set_states(self, states: dict[int, _LayerState]) -> None:
        """Replace the per-block masks and values (head importance: one ablation per row)."""
        self.states = states

    def _on_heads(self, layer: int):
        def hook(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
            o = args[0]
            state = self.states.get(layer)
            if state is not None:
                o = _times_rows(o, 1 - state.mask.to(o.dtype))
            if layer in self.record_heads:
                kept = o.detach()
                if state is not None and state.value is not None:  # what the projection's sum receives
                    nw = state.value.shape[1]
                    kept = (kept.reshape(-1, nw, *kept.shape[1:])
                            + state.value.to(kept.dtype) * state.mask.to(kept.dtype)[:, None, None, :])
                self.head_outputs[layer] = kept.reshape(-1, *kept.shape[-2:])  # (B·nW, N, C)
            return None if state is None else (o, *args[1:])

        return hook

    def _on_projected(self, layer: int):
        def hook(module: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> torch.Tensor | None:
            state = self.states.get(layer)
            if state is None or state.value is None:
                return None
            v = state.value.to(out.dtype) * state.mask.to(out.dtype)[:, None, None, :]
            added = F.linear(v, module.weight.to(out.dtype))  # (S or R, nW, N, C_out)
            nw = added.shape[1]
            return (out.reshape(-1, nw, *out.shape[1:]) + added).reshape(out.shape)

        return hook

    def _on_block(self, layer: int):
        ad = self.adapter

        def hook(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
            if not args:
                raise OptionError(f"block {layer} was called without a positional input; its tokens cannot be "
                                  "patched.")
            x = args[0]
            if layer == self.record_tokens:
                self.block_tokens[layer] = ad.tokens(x).detach()
            iv = self._rows
            if layer != iv.token_layer or iv.token_values is None:
                return None
            index = torch.as_tensor(iv.token_index, device=x.device)
            return (ad.with_tokens(x, index, iv.token_values.to(x.device)), *args[1:])

        return hook


def _times_rows(o: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``o`` (R·nW, N, C) times ``keep`` (R or 1, C), row ``r`` of ``keep`` for the nW rows of image ``r``."""
    if keep.shape[0] == 1:
        return o * keep
    r = keep.shape[0]
    return (o.reshape(r, -1, *o.shape[1:]) * keep[:, None, None, :]).reshape(o.shape)


# -- what interventions read from other images -------------------------------------------------------
def _forward(adapter: Adapter, x: torch.Tensor) -> torch.Tensor:
    return adapter.logits(x) if hasattr(adapter, "logits") else adapter.model(x)


def _batches(pixels: torch.Tensor, batch_size: int, device: torch.device, dtype: torch.dtype,
             progress: bool, desc: str) -> Iterator[torch.Tensor]:
    starts = range(0, pixels.shape[0], batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc=desc, unit="batch")
    for start in starts:
        yield pixels[start:start + batch_size].to(device, dtype)


def _recorded(adapter: Adapter, pixels: torch.Tensor, *, heads: Iterable[int] = (), tokens: int | None = None,
              batch_size: int = 32, mean: bool = False, progress: bool = False) -> dict[Any, torch.Tensor]:
    """The heads' outputs at blocks ``heads`` ((S, nW, N, C): per image, or their mean over the images
    with ``mean=True``) and the residual stream entering block ``tokens`` (S, N, C), from no-grad forwards
    of ``pixels`` in capture's conditions (eval mode, the same attention path)."""
    from .hooks import Recorder

    heads = sorted(set(heads))
    device, dtype = _where(adapter)
    sums: dict[Any, torch.Tensor] = {}
    parts: dict[Any, list[torch.Tensor]] = {}
    with Recorder(adapter, param_grads=False) as rec, \
            Intervening(adapter, record_heads=heads, record_tokens=tokens) as hooks, torch.no_grad():
        rec.paused = True
        for x in _batches(pixels, batch_size, device, dtype, progress, "reference"):
            _forward(adapter, x)
            got: dict[Any, torch.Tensor] = {}
            for layer in heads:
                o = hooks.head_outputs.pop(layer)
                got[layer] = o.reshape(x.shape[0], -1, *o.shape[1:])  # (B, nW, N, C)
            if tokens is not None:
                got["tokens"] = hooks.block_tokens.pop(tokens)
            for key, t in got.items():
                if mean:
                    s = t.double().sum(0, keepdim=True)
                    sums[key] = s if key not in sums else sums[key] + s
                else:
                    parts.setdefault(key, []).append(t.detach().cpu())
    if mean:
        n = pixels.shape[0]
        return {k: (s / n).to(dtype).cpu() for k, s in sums.items()}
    return {k: torch.cat(v) for k, v in parts.items()}


def _where(adapter: Adapter) -> tuple[torch.device, torch.dtype]:
    param = next(adapter.model.parameters(), None)
    if param is None:
        return torch.device("cpu"), torch.float32
    return param.device, (param.dtype if param.dtype.is_floating_point else torch.float32)


def _pixels(adapter: Adapter, images: Any) -> torch.Tensor:
    from .images import prepare

    return prepare(images, adapter).pixels


def reference_means(adapter: Adapter, reference: Any, layers: Iterable[int], *, batch_size: int = 32,
                    progress: bool | None = None) -> tuple[dict[int, torch.Tensor], dict[str, Any]]:
    """The mean of each block's heads' output over ``reference``, (1, nW, N, C) per block in ``layers``.

    ``reference``: images (anything :func:`vitlens.capture` takes), or a capture or store that
    kept ``head_output`` (``keep=[..., "head_output"]``). Returns the means and a description of
    the reference for the capture's attrs.
    """
    layers = sorted(set(layers))
    if reference is None:
        raise OptionError('ablation="mean" replaces heads by their mean output over a reference set: pass '
                          "reference= (images, or a capture/store made with keep=[..., 'head_output']).")
    if isinstance(reference, xr.DataTree):
        return _means_of_capture(adapter, reference, layers)
    pixels = _pixels(adapter, reference)
    n = int(pixels.shape[0])
    progress = n > batch_size if progress is None else progress
    means = _recorded(adapter, pixels, heads=layers, batch_size=batch_size, mean=True, progress=progress)
    digest = hashlib.blake2b(pixels.numpy().tobytes(), digest_size=8).hexdigest()
    return means, {"reference": f"{n} image{'s' if n != 1 else ''}", "reference_digest": digest}


def _means_of_capture(adapter: Adapter, cap: xr.DataTree, layers: list[int]) -> tuple[dict[int, torch.Tensor], dict]:
    means: dict[int, torch.Tensor] = {}
    _, dtype = _where(adapter)
    for layer in layers:
        stage = adapter.stage_of_layer(layer)
        node = cap[stage.name] if stage.name in cap.children else None
        if node is None or "head_output" not in node.to_dataset(inherit=False):
            raise CaptureFormatError(
                "the reference capture holds no head_output, the heads' outputs that mean-ablation averages; "
                "capture the reference with vl.capture(model, images, keep=[..., 'head_output']) (or "
                "grads=False, keep=['head_output'] for just that), or pass the images as reference=.")
        if "layer" not in node.coords or layer not in node["layer"].values:
            raise CaptureFormatError(f"the reference capture has no block {layer}: is it a capture of this model?")
        out = node["head_output"].sel(layer=layer).astype(np.float64).mean("sample").values  # (H, [nW,] N, hd)
        t = torch.from_numpy(np.asarray(out))
        if t.ndim == 3:
            t = t.unsqueeze(1)  # one window
        heads, nw, n, hd = t.shape
        expected = adapter.parts[layer].attn.proj.weight.shape[1]
        if heads * hd != expected:
            raise CaptureFormatError(f"the reference capture's block {layer} has {heads}×{hd} head channels; "
                                     f"this model's has {expected}: is it a capture of this model?")
        means[layer] = t.permute(1, 2, 0, 3).reshape(1, nw, n, heads * hd).to(dtype)
    n = int(cap["sample"].size)
    return means, {"reference": f"a capture of {n} image{'s' if n != 1 else ''}"}


def resolve(adapter: Adapter, ablate: HeadSpec | None, ablation: str, reference: Any, *,
            for_importance: bool = False, batch_size: int = 32, progress: bool | None = None) -> Intervention | None:
    """The :class:`Intervention` of capture's ``ablate=``/``ablation=``/``reference=`` options.

    With ``for_importance`` (capture's ``ablation_effect`` group) a mean is taken for every block,
    since every head is ablated in turn.
    """
    if ablation not in ABLATIONS:
        raise OptionError(f"ablation={ablation!r}; choose from {list(ABLATIONS)}.")
    heads = parse_heads(adapter, ablate)
    if not heads and not for_importance:
        if reference is not None:
            raise OptionError("reference= is the set mean-ablation averages over: pass ablate={block: [heads]} "
                              'and ablation="mean" with it.')
        return None
    if ablation == "zero":
        if reference is not None:
            raise OptionError('reference= is only read by ablation="mean"; a zero ablation needs none.')
        return Intervention("zero", heads)
    layers = range(len(adapter.parts)) if for_importance else heads
    values, source = reference_means(adapter, reference, layers, batch_size=batch_size, progress=progress)
    return Intervention("mean", heads, values, source=source)


# -- head importance: every head ablated in turn, batched -----------------------------------------------
def ablation_effects(adapter: Adapter, x: torch.Tensor, targets: torch.Tensor, logits: torch.Tensor,
                     hooks: Intervening, *, rows: int, progress: bool = False) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Per block, the drop of each image's target logit and probability when each head alone is ablated:
    ``{layer: (logit_drop (B, heads), probability_drop (B, heads))}``.

    The (block, head) pairs are run as variants of the batch, as many per forward as fit in
    ``rows`` rows (the batch repeated, each copy with its own head switched off), without
    gradients. The mean (``ablation="mean"``) is ``hooks.intervention.values``.
    """
    b = x.shape[0]
    pairs = [(l, h) for l, part in enumerate(adapter.parts) for h in range(part.attn.num_heads)]
    per_forward = max(1, rows // b)
    values = hooks.intervention.values if hooks.intervention.mode == "mean" else {}
    clean_logit = logits.gather(1, targets[:, None])[:, 0].float()
    clean_p = logits.float().softmax(-1).gather(1, targets[:, None])[:, 0]
    drop = {l: torch.zeros(b, p.attn.num_heads) for l, p in enumerate(adapter.parts)}
    pdrop = {l: torch.zeros(b, p.attn.num_heads) for l, p in enumerate(adapter.parts)}
    chunks = [pairs[i:i + per_forward] for i in range(0, len(pairs), per_forward)]
    if progress:
        from tqdm.auto import tqdm

        chunks = tqdm(chunks, desc="ablations", unit="forward", leave=False)
    saved, recording = hooks.states, hooks.record_heads
    hooks.record_heads = set()
    try:
        for chunk in chunks:
            k = len(chunk)
            states: dict[int, _LayerState] = {}
            for i, (layer, head) in enumerate(chunk):
                if layer not in states:
                    w = adapter.parts[layer].attn.proj.weight
                    states[layer] = _LayerState(w.new_zeros(k * b, w.shape[1]), values.get(layer))
                states[layer].mask[i * b:(i + 1) * b, adapter.parts[layer].attn.head_channels(head)] = 1
            hooks.set_states(states)
            with torch.no_grad():
                out = _forward(adapter, x.repeat(k, *([1] * (x.ndim - 1)))).float()
            tgt = targets.repeat(k)
            logit = out.gather(1, tgt[:, None])[:, 0].reshape(k, b)
            p = out.softmax(-1).gather(1, tgt[:, None])[:, 0].reshape(k, b)
            for i, (layer, head) in enumerate(chunk):
                drop[layer][:, head] = (clean_logit - logit[i]).cpu()
                pdrop[layer][:, head] = (clean_p - p[i]).cpu()
    finally:
        hooks.set_states(saved)
        hooks.record_heads = recording
    return {l: (drop[l], pdrop[l]) for l in drop}


def head_output_array(o: torch.Tensor, batch: int, heads: int) -> torch.Tensor:
    """(B·nW, N, heads·hd) → (B, heads, N, hd), or (B, heads, nW, N, hd) for windows (as attention is laid out)."""
    nw = o.shape[0] // batch
    t = o.reshape(batch, nw, o.shape[1], heads, -1).permute(0, 3, 1, 2, 4)
    return t[:, :, 0] if nw == 1 and o.shape[0] == batch else t


# -- public entry points -------------------------------------------------------------------------------
def _digest(pixels: torch.Tensor) -> str:
    return hashlib.blake2b(pixels.detach().float().cpu().contiguous().numpy().tobytes(), digest_size=8).hexdigest()


def _token_index(adapter: Adapter, layer: int, tokens: Any) -> tuple[int, ...]:
    stage = adapter.stage_of_layer(layer)
    gh, gw = stage.grid
    items = [tokens] if isinstance(tokens, (int, np.integer)) or (
        isinstance(tokens, tuple) and len(tokens) == 2 and all(isinstance(t, (int, np.integer)) for t in tokens)) \
        else list(tokens)
    out = []
    for t in items:
        if isinstance(t, (tuple, list)) and len(t) == 2:
            r, c = int(t[0]), int(t[1])
            if not (0 <= r < gh and 0 <= c < gw):
                raise OptionError(f"tokens=: patch {(r, c)} is outside block {layer}'s {gh}×{gw} token grid.")
            out.append(stage.num_prefix + r * gw + c)
        elif isinstance(t, (int, np.integer)) and not isinstance(t, bool) and 0 <= int(t) < stage.num_tokens:
            out.append(int(t))
        else:
            raise OptionError(f"tokens=: {t!r} is neither a token index 0..{stage.num_tokens - 1} nor a patch "
                              "(row, col) of the block's grid.")
    if not out:
        raise OptionError("tokens= is empty: name at least one token.")
    return tuple(sorted(set(out)))


def patch(model: nn.Module, images: Any, source_images: Any, *, heads: HeadSpec | None = None,
          tokens: Any = None, layer: int | None = None, target: Any = None, **options: Any) -> xr.DataTree:
    """Capture ``images`` with activations taken from ``source_images`` (activation patching).

    Either the chosen heads' outputs (``heads={block: [heads]}``: each head's slice of
    the input of its output projection, in every window for Swin), or the residual
    stream of chosen tokens entering block ``layer`` (``tokens=[index or (row, col), ...]``)
    come from the source image run through the same model. One source image serves every
    image, or there is one per image. The result is an ordinary capture (one forward and
    backward of the patched model, everything recorded as :func:`vitlens.capture` does);
    its ``intervention`` attribute records the patch. Patched activations are constants of
    the forward pass: no gradient and no LRP relevance flows back through them.

    Parameters
    ----------
    model, images, target
        As for :func:`vitlens.capture`.
    source_images
        The images the activations are taken from (one, or one per image).
    heads
        ``{block: [heads]}`` (global block indices, ``"all"`` for every head of a block).
    tokens, layer
        Token indices (as the capture's ``token`` coordinate) or patches ``(row, col)`` of
        block ``layer``'s grid, whose residual stream entering block ``layer`` is patched.
    **options
        Further :func:`vitlens.capture` options (``grads``, ``keep``, ``dtype``, ...).

    Examples
    --------
    >>> import numpy as np, timm, vitlens as vl
    >>> model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=3, depth=2)
    >>> a, b = np.random.default_rng(0).random((2, 32, 32, 3))
    >>> cap = vl.patch(model, a, b, heads={1: "all"})
    >>> cap.attrs["intervention"]
    '{"heads": {"1": [0, 1, 2]}, "kind": "patch", "source": "1 image", "source_digest": "..."}'
    >>> same = vl.patch(model, a, a, tokens=[(0, 0), (1, 1)], layer=1)  # an image patched with itself
    >>> bool(np.allclose(same["logits"], vl.capture(model, a)["logits"], atol=1e-6))
    True
    """
    from ..models import adapter_for
    from .api import capture
    from .text import bind_inputs

    if (heads is None) == (tokens is None):
        raise OptionError("vl.patch takes heads={block: [heads]} or tokens=[...] with layer=, one of the two.")
    if "intervention" in options or "ablate" in options:
        raise OptionError("vl.patch makes its own intervention; for an ablation use vl.capture(..., ablate=...).")
    adapter = bind_inputs(adapter_for(model), options.get("text"), options.get("processor"))
    source = _pixels(adapter, source_images)
    n = int(_pixels(adapter, images).shape[0])
    if source.shape[0] not in (1, n):
        raise OptionError(f"{source.shape[0]} source images for {n} images: give one source for all, or one per image.")
    about = {"source": f"{source.shape[0]} image{'s' if source.shape[0] != 1 else ''}", "source_digest": _digest(source)}
    batch = int(options.get("batch_size") or 32)
    if heads is not None:
        chosen = parse_heads(adapter, heads, "heads")
        if not chosen:
            raise OptionError("heads= names no head: give {block: [heads]}.")
        values = _recorded(adapter, source, heads=chosen, batch_size=batch)
        iv = Intervention("patch", chosen, values, source=about)
    else:
        if layer is None or isinstance(layer, bool) or not isinstance(layer, (int, np.integer)) \
                or not 0 <= int(layer) < len(adapter.parts):
            raise OptionError(f"tokens= patches the residual stream entering a block: pass layer= one of "
                              f"0..{len(adapter.parts) - 1}; got {layer!r}.")
        index = _token_index(adapter, int(layer), tokens)
        stream = _recorded(adapter, source, tokens=int(layer), batch_size=batch)["tokens"]
        iv = Intervention("patch", token_layer=int(layer), token_index=index,
                          token_values=stream[:, list(index)], source=about)
    return capture(model, images, target, intervention=iv, **options)


def importance_of(cap: xr.DataTree) -> xr.Dataset:
    """The ``ablation_effect`` and ``ablation_probability_drop`` groups of a capture as one Dataset
    ``(sample, layer, head)`` (NaN where a block has fewer heads than the widest stage: Swin).

    Examples
    --------
    >>> import numpy as np, timm, vitlens as vl
    >>> model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=3, depth=2)
    >>> cap = vl.capture(model, np.random.default_rng(0).random((2, 32, 32, 3)), keep=["all", "ablation_effect"])
    >>> importance_of(cap)["ablation_effect"].dims
    ('sample', 'layer', 'head')
    """
    stages = stage_names(cap)
    nodes = [cap[s].to_dataset(inherit=False) for s in stages]
    if not nodes or any("ablation_effect" not in ds for ds in nodes):
        raise CaptureFormatError(
            "this capture holds no ablation effects: they need the model, one forward per head; run "
            "vl.head_importance(model, images) or vl.capture(model, images, keep=[..., 'ablation_effect']).")
    width = max(int(ds.sizes["head"]) for ds in nodes)
    parts = []
    for name, ds in zip(stages, nodes, strict=True):
        part = ds[["ablation_effect", "ablation_probability_drop"]].reindex(head=np.arange(width))
        parts.append(part.assign_coords(stage=("layer", [int(name.removeprefix("stage"))] * ds.sizes["layer"])))
    out = xr.concat(parts, "layer").rename(ablation_probability_drop="probability_drop").drop_attrs(deep=False)
    out = out.assign_coords(sample=cap["sample"].values, target=("sample", np.asarray(cap["target"].values)))
    out["ablation_effect"].attrs.update(unit="logit", description="drop of the target logit when the head alone is "
                                        "ablated (clean minus ablated)")
    out["probability_drop"].attrs.update(unit="probability", description="drop of the target's softmax "
                                         "probability when the head alone is ablated")
    how = json_attr(cap.attrs, "ablation_effect", {})
    out.attrs.update(model=str(cap.attrs.get("model", "")), **{k: str(v) for k, v in how.items()})
    return out


def head_importance(model: nn.Module, images: Any, target: Any = None, *, ablation: str = "zero",
                    reference: Any = None, batch_size: int | None = None, store: Any = None, resume: bool = False,
                    progress: bool | None = None, device: Any = None) -> xr.Dataset:
    """How much each head matters to each image's prediction: every head ablated alone, in turn.

    ``ablation_effect (sample, layer, head)`` is the drop of the target logit (clean minus
    ablated; positive: the head supports the target) and ``probability_drop`` the drop of
    its softmax probability. The L×H ablated forwards run without gradients, as variants of
    each batch (the batch repeated, one head switched off in each copy), so a model costs
    about L×H forwards per image; a progress bar counts them. With ``store=`` the results
    stream into a zarr store batch by batch (resumable, as :func:`vitlens.capture`).
    NaN marks a head a block does not have (Swin stages with fewer heads).

    Parameters
    ----------
    model, images, target
        As for :func:`vitlens.capture` (``target=None``: each image's predicted class).
    ablation, reference
        ``"zero"``, or ``"mean"`` with a reference set (see :func:`vitlens.capture`).
    batch_size
        Images per batch, and rows per ablated forward (default 32).
    store, resume, progress, device
        As for :func:`vitlens.capture`.

    Examples
    --------
    >>> import numpy as np, timm, vitlens as vl
    >>> model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=3, depth=2)
    >>> imp = vl.head_importance(model, np.random.default_rng(0).random((4, 32, 32, 3)))
    >>> imp["ablation_effect"].shape, list(imp.data_vars)
    ((4, 2, 3), ['ablation_effect', 'probability_drop'])
    """
    from .api import capture

    tree = capture(model, images, target, grads=False, keep=["ablation_effect"], ablation=ablation,
                   reference=reference, batch_size=batch_size, store=store, resume=resume, progress=progress,
                   device=device)
    return importance_of(tree)


def stored_values(intervention: Intervention, adapter: Adapter) -> dict[str, dict[str, tuple[tuple[str, ...], Any]]]:
    """The mean a mean-ablated capture replaced its heads with, as stage variables
    ``ablation_mean (ablated_layer, head, [window,] query, head_dim)`` (so that the capture can be
    redone, e.g. for another class: :func:`intervention_of`)."""
    if intervention.mode != "mean" or not intervention.heads:
        return {}
    out: dict[str, dict[str, tuple[tuple[str, ...], Any]]] = {}
    for stage in adapter.stages:
        layers = [l for l in stage.layers if l in intervention.heads]
        if not layers:
            continue
        arrays = [head_output_array(intervention.values[l].reshape(-1, *intervention.values[l].shape[-2:]), 1,
                                    stage.num_heads)[0] for l in layers]
        dims = ("ablated_layer", "head", *(("window",) if stage.window is not None else ()), "query", "head_dim")
        out[stage.name] = {"ablation_mean": (dims, torch.stack(arrays).float().numpy()),
                           "ablated_layer": (("ablated_layer",), np.asarray(layers, dtype=np.int64))}
    return out


def intervention_of(cap: xr.DataTree, adapter: Adapter) -> Intervention | None:
    """The intervention a capture was made with, to make it again (``None``: none).

    Zero ablations are rebuilt from the ``intervention`` attribute, mean ablations also from
    the stored ``ablation_mean``; a patched capture cannot be (its sources are not stored).
    """
    text = cap.attrs.get("intervention")
    if not text:
        return None
    about = json_attr(cap.attrs, "intervention")
    heads = parse_heads(adapter, {int(l): h for l, h in about.get("heads", {}).items()})
    if about.get("kind") != "ablate":
        raise CaptureFormatError("this capture was patched from other images, which it does not store: run "
                                 "vl.patch(model, images, source_images, ..., target=class) for another class.")
    if about.get("ablation") == "zero":
        return Intervention("zero", heads)
    values = {}
    for layer in heads:
        stage = adapter.stage_of_layer(layer)
        ds = cap[stage.name].to_dataset(inherit=False)
        if "ablation_mean" not in ds:
            raise CaptureFormatError("this mean-ablated capture holds no ablation_mean: capture it again with "
                                     "vl.capture(model, images, ablate=..., ablation='mean', reference=...).")
        t = torch.from_numpy(np.asarray(ds["ablation_mean"].sel(ablated_layer=layer).values))
        if t.ndim == 3:
            t = t.unsqueeze(1)
        h, nw, n, hd = t.shape
        values[layer] = t.permute(1, 2, 0, 3).reshape(1, nw, n, h * hd).to(_where(adapter)[1])
    source = {k: v for k, v in about.items() if k.startswith("reference")}
    return Intervention("mean", heads, values, source=source)
