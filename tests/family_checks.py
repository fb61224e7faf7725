"""Checks every supported family must pass (used by tests/test_family_*.py and test_coverage.py).

Each check compares vitlens against something computed without vitlens's
adapters: timm's own modules called by hand, autograd on a probed copy of the
model, or a hand-computed relevance total.
"""

from __future__ import annotations

import copy
from contextlib import nullcontext

import numpy as np
import torch
from torch import nn

import vitlens as vl
from vitlens.capture.hooks import Recorder
from vitlens.capture.relevance import attention_relevance
from vitlens.capture.text import bind_text
from vitlens.models import adapter_for, hf_common
from vitlens.coverage.timm_names import bias_free

#: LRP conservation tolerance (relative to the block's relevance total): float32 sums.
CONSERVATION_RTOL = 1e-4


def bound_adapter(model: nn.Module, text: torch.Tensor | None = None):
    """The model's adapter; an image-text model's with the prompts ``text`` (token ids) as its classes."""
    return bind_text(adapter_for(model), text)


def forward_logits(ad, x: torch.Tensor) -> torch.Tensor:
    """The logits the adapter explains (a timm model's output; a transformers model's ``logits``)."""
    return ad.logits(x) if hasattr(ad, "logits") else ad.model(x)


def attention_grads_by_autograd(model: nn.Module, x: torch.Tensor, target: list[int],
                                text: torch.Tensor | None = None) -> list[torch.Tensor]:
    """∂y_target/∂A of every block by plain autograd on a copy: a zero tensor is added to the
    probabilities where the adapter says they appear (each attention's ``probs`` module, in the
    model's explicit attention) and differentiated — no vitlens hook or recorder involved."""
    m = copy.deepcopy(model).eval()
    ad = bound_adapter(m, text)
    deltas: dict[int, torch.Tensor] = {}

    def probe(layer: int):
        def hook(module, inputs, out):
            deltas[layer] = torch.zeros_like(out, requires_grad=True)
            return out + deltas[layer]
        return hook

    for part in ad.parts:
        if hasattr(part.attn.module, "fused_attn"):
            part.attn.module.fused_attn = False
    handles = [p.attn.probs.register_forward_hook(probe(i)) for i, p in enumerate(ad.parts)]
    explicit = getattr(ad, "explicit_attention", None)
    try:
        with explicit() if explicit is not None else nullcontext():
            logits = forward_logits(ad, x)
    finally:
        for h in handles:
            h.remove()
    y = logits.gather(1, torch.as_tensor(target)[:, None]).sum()
    return list(torch.autograd.grad(y, [deltas[i] for i in range(len(ad.parts))]))


def assert_attention_grads_equal_autograd(model: nn.Module, x: torch.Tensor, target: list[int],
                                          text: torch.Tensor | None = None):
    """The captured ``attention_grad`` of every block (windows included) equals autograd's ∂y/∂A.

    Returns the capture (of ``x`` for ``target``)."""
    cap = vl.capture(model, x, target=target, text=text)
    n = x.shape[0]
    got = stacked(cap, "attention_grad")
    want = attention_grads_by_autograd(model, x, target, text)
    assert len(got) == len(want) == len(adapter_for(model).parts)
    for layer, (g, e) in enumerate(zip(got, want, strict=True)):
        if g.ndim == e.ndim + 1:  # windows: (B·nW, heads, M², M²) → (B, heads, nW, M², M²)
            e = e.view(n, -1, *e.shape[1:]).transpose(1, 2)
        assert np.abs(g).max() > 0, f"block {layer}: no gradient reached the attention"
        np.testing.assert_allclose(g, e.numpy(), atol=1e-6, err_msg=f"block {layer}")
    return cap


def attention_inputs(model: nn.Module, x: torch.Tensor, attn_modules: list[nn.Module]) -> list[tuple]:
    """(input, kwargs) each attention module received in a plain forward (torch hooks only)."""
    seen: list[tuple] = []
    handles = [m.register_forward_pre_hook(lambda mod, a, kw: seen.append((mod, a[0].detach(), dict(kw))),
                                           with_kwargs=True) for m in attn_modules]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    order = {id(m): i for i, m in enumerate(attn_modules)}
    return [s[1:] for s in sorted(seen, key=lambda s: order[id(s[0])])]


def swin_attention_by_hand(model: nn.Module, x: torch.Tensor, window_partition, logits, pre_norm: bool) -> list:
    """Each block's probabilities ``(B, heads, nW, N, N)`` of a timm Swin (v1 or v2), recomputed from its
    modules: (``norm1`` first for the pre-norm v1), roll by the shift, ``window_partition`` (the
    family's own), ``logits(attn, windows)``, the shift mask, softmax."""
    out = []
    with torch.no_grad():
        h = model.patch_embed(x)
        for stage in model.layers:
            h = stage.downsample(h)
            for blk in stage.blocks:
                t = blk.norm1(h) if pre_norm else h
                sh, sw = blk.shift_size
                t = torch.roll(t, (-sh, -sw), (1, 2))
                win = window_partition(t, blk.window_size).flatten(1, 2)
                a = blk.attn
                bw, n, _ = win.shape
                scores = logits(a, win)
                if blk.attn_mask is not None:
                    nw = blk.attn_mask.shape[0]
                    scores = (scores.view(-1, nw, a.num_heads, n, n) + blk.attn_mask[None, :, None]).view(bw, -1, n, n)
                probs = scores.softmax(-1)
                nw = probs.shape[0] // x.shape[0]
                out.append(probs.view(x.shape[0], nw, a.num_heads, n, n).transpose(1, 2))
                h = blk(h)
    return out


def assert_attention_equals_by_hand(model: nn.Module, inputs, by_hand) -> tuple:
    """The captured attention of every block equals ``by_hand(attn, h, kwargs)``, computed from
    the model's own attention modules on the input each received (``inputs``: pictures or a
    ready tensor). Returns ``(capture, [(h, kwargs)] per block, [by_hand probabilities])``."""
    cap = vl.capture(model, inputs)
    x = inputs if isinstance(inputs, torch.Tensor) else normalised(inputs, model)
    received = attention_inputs(model, x, [b.attn for b in model.blocks])
    with torch.no_grad():
        want = [by_hand(b.attn, h, kw) for b, (h, kw) in zip(model.blocks, received, strict=True)]
    got = stacked(cap, "attention")
    assert len(got) == len(want)
    for layer, (g, e) in enumerate(zip(got, want)):
        np.testing.assert_allclose(g, e.numpy(), atol=1e-5, err_msg=f"block {layer}")
    return cap, received, want


def assert_padding_gets_nothing(cap, stages=("stage0", "stage1")) -> None:
    """Swin at a padded size: a padded query is cropped away, so its attention gradient and
    relevance are exactly 0, and the real queries' are not (``stages``: the padded ones)."""
    for stage in stages:
        pad = cap[stage].window_token.values < 0  # (layer, window, query)
        for var in ("attention_grad", "attention_relevance"):
            v = np.moveaxis(cap[stage][var].values, 2, 1)  # (sample, head, layer, window, query, key)
            assert np.abs(v[:, :, pad]).max() == 0, (stage, var)
            assert np.abs(v[:, :, ~pad]).max() > 0, (stage, var)


def zero_hf_swin_biases(model: nn.Module) -> nn.Module:
    """A transformers Swin / Swinv2 without additive biases, in place: Linear biases, relative
    position tables, and Swinv2's continuous position bias driven to 16·sigmoid(−100) ≈ 0."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") and "continuous_position_bias_mlp" not in name:
                p.zero_()
        for m in model.modules():
            if hasattr(m, "relative_position_bias_table"):
                m.relative_position_bias_table.zero_()
            cpb = getattr(m, "continuous_position_bias_mlp", None)
            if cpb is not None:
                cpb[0].weight.zero_()
                cpb[0].bias.fill_(1.0)
                cpb[2].weight.fill_(-100.0 / cpb[2].weight.shape[1])
    return model


def stacked(cap, var: str) -> list[np.ndarray]:
    """``cap[stage][var]`` per global layer, in layer order."""
    out = []
    for name in sorted(cap.children, key=lambda n: int(n.removeprefix("stage"))):
        ds = cap[name]
        out += [ds[var].values[:, i] for i in range(ds["layer"].size)]
    return out


def zero_biases(model: nn.Module, seed: int = 0) -> nn.Module:
    """A bias-free copy with unit-gain Linear weights and LayerScale at 1
    (:func:`vitlens.coverage.timm_names.bias_free`, which the coverage check uses too)."""
    return bias_free(model, seed)


def bias_free_copy(model: nn.Module) -> nn.Module:
    """A copy without additive biases: a timm model's by :func:`zero_biases`, a transformers
    model's as the coverage check makes it (Linear and attention-pool biases, position tables,
    Swinv2's continuous position bias)."""
    if isinstance(adapter_for(model), hf_common.HFAdapter):
        from vitlens.coverage.transformers_classes import _bias_free

        return _bias_free(model)
    return zero_biases(model)


def relevance_totals(model: nn.Module, x: torch.Tensor, text: torch.Tensor | None = None):
    """Per block (in, out) relevance totals and the read-out's total, from the capture's LRP pass."""
    ad = bound_adapter(model, text)
    with Recorder(ad, keep_block_inputs=True) as rec:
        logits = forward_logits(ad, x)
        target = logits.argmax(-1)
        attention_relevance(ad, rec, target, to_input=True)
    with torch.no_grad():
        onehot = torch.nn.functional.one_hot(target, ad.num_classes).float()
        head_total = ad.head.relevance(ad.tokens(rec.final_output), onehot).reshape(x.shape[0], -1).sum(1)
    return rec.relevance_totals, head_total


def assert_conserved(model: nn.Module, x: torch.Tensor, text: torch.Tensor | None = None,
                     rtol: float = CONSERVATION_RTOL, atol: float = 1e-5) -> None:
    """LRP conserves relevance block by block and through the read-out on a bias-free copy."""
    totals, head_total = relevance_totals(bias_free_copy(model), x, text)
    assert len(totals) == len(adapter_for(model).blocks)
    for layer, (r_in, r_out) in totals.items():
        torch.testing.assert_close(r_in, r_out, rtol=rtol, atol=atol, msg=f"block {layer}")
    torch.testing.assert_close(head_total, torch.ones_like(head_total), rtol=CONSERVATION_RTOL, atol=1e-5)
    last = max(totals)  # the final norm hands the read-out's relevance to the last block whole
    torch.testing.assert_close(totals[last][1], head_total, rtol=CONSERVATION_RTOL, atol=1e-5, msg="final norm")


def model_state(model: nn.Module):
    return (
        model.training,
        [m.training for m in model.modules()],
        [getattr(m, "fused_attn", None) for m in model.modules()],
        [(len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks)) for m in model.modules()],
        [(n, p.requires_grad, p.grad) for n, p in model.named_parameters()],
        [getattr(getattr(m, "config", None), "_attn_implementation", None) for m in model.modules()],
    )


def assert_state_restored(model: nn.Module, images: np.ndarray, text: torch.Tensor | None = None) -> None:
    """Capture leaves train mode, fused-attention flags (timm), attention implementations
    (transformers), hooks, requires_grad, gradients and weights as they were."""
    model.train()
    for m in model.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = True
    before = model_state(model)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    vl.capture(model, images, text=text)
    assert model_state(model) == before
    assert len(hf_common._PROBES) == 0  # no probe left registered for a transformers attention
    for k, v in model.state_dict().items():
        assert torch.equal(v, weights[k]), k
    model.eval()


def bright_square_token(model: nn.Module, size: tuple[int, int], cell: tuple[int, int],
                        text: torch.Tensor | None = None):
    """Light one token's pixel cell (from the capture's own centre coordinates) on a black image.

    Returns (token index of that cell, index of the token whose block-0 input
    changed most, the one-hot map of that token upsampled by ``vl.to_pixels``,
    the square's pixel box).
    """
    h, w = size
    black = np.zeros((1, h, w, 3), np.float32)
    cap0 = vl.capture(model, black, grads=False, text=text)
    st = cap0["stage0"]
    sy, sx = st.attrs["stride"]
    kinds = st["kind"].values
    rows, cols = st["row"].values, st["col"].values
    tok = int(np.flatnonzero((rows == cell[0]) & (cols == cell[1]))[0])
    cy, cx = float(st["center_y"].values[tok]), float(st["center_x"].values[tok])
    y0, x0 = int(cy - sy / 2), int(cx - sx / 2)
    img = black.copy()
    img[:, y0:y0 + sy, x0:x0 + sx] = 1.0
    cap1 = vl.capture(model, img, grads=False, text=text)
    d = np.abs(cap1["stage0"].token_norm.values[0, 0] - st.token_norm.values[0, 0])
    d[kinds != "patch"] = -1
    gh, gw = st.attrs["grid"]
    onehot = np.zeros((1, gh, gw), np.float32)
    onehot[0, cell[0], cell[1]] = 1
    import xarray as xr

    pix = vl.to_pixels(xr.DataArray(onehot, dims=("sample", "y", "x")), size=size).values[0]
    return tok, int(d.argmax()), pix, (y0, x0, sy, sx)


def assert_geometry(model: nn.Module, size: tuple[int, int], text: torch.Tensor | None = None) -> None:
    """A bright token cell lights that token first, and to_pixels puts that token's map on the cell."""
    ad = adapter_for(model)
    gh, gw = ad.stages[0].grid
    for cell in [(0, 0), (gh - 1, gw // 2), (gh // 2, gw - 1)]:
        tok, found, pix, (y0, x0, sy, sx) = bright_square_token(model, size, cell, text)
        assert found == tok, (cell, tok, found)
        py, px = np.unravel_index(pix.argmax(), pix.shape)
        assert y0 <= py < y0 + sy and x0 <= px < x0 + sx, (cell, (py, px), (y0, x0, sy, sx))


def assert_all_maps_finite(cap) -> dict:
    maps = vl.explain(cap, "all", per_layer=False)
    for m in maps.data_vars:  # every method the capture can explain
        assert np.isfinite(maps[m].values).all(), m
        assert maps[m].shape[-2:] == tuple(cap["stage0"].attrs["grid"]), m
    return maps


def normalised(images: np.ndarray, model: nn.Module) -> torch.Tensor:
    from vitlens.capture.images import prepare

    return prepare(images, adapter_for(model)).pixels


def assert_receptive_field_centres(model: nn.Module, size: tuple[int, int]) -> None:
    """Each token's pixel centre (capture coordinates) is the centroid of the input pixels its
    embedding depends on (|∂token/∂pixel| from autograd through the model's own embedding),
    within half a token stride — for CNN-stem (hybrid) embeddings, whose tokens overlap."""
    cap = vl.capture(model, np.random.default_rng(0).random((1, *size, 3)).astype(np.float32), grads=False)
    st = cap["stage0"]
    sy, sx = st.attrs["stride"]
    gh, gw = st.attrs["grid"]
    p = st.attrs["num_prefix_tokens"]
    x = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    t = model.patch_embed(x)
    t = t.flatten(1, 2) if t.ndim == 4 else t
    for r, c in [(0, 0), (gh // 2, gw // 2), (gh - 1, 1)]:
        tok = p + r * gw + c
        g = torch.autograd.grad(t[0, r * gw + c].sum(), x, retain_graph=True)[0].abs().sum((0, 1))
        w = g / g.sum()
        cy = float((w.sum(1) * torch.arange(size[0])).sum())
        cx = float((w.sum(0) * torch.arange(size[1])).sum())
        assert abs(cy - float(st["center_y"].values[tok])) < sy / 2, (r, c, cy)
        assert abs(cx - float(st["center_x"].values[tok])) < sx / 2, (r, c, cx)


def assert_parts_describe_the_attention(model: nn.Module, x: torch.Tensor, text: torch.Tensor | None = None) -> None:
    """The adapter's description of each attention (q/k/v maps, norms, rotary, position bias,
    cosine scale) reproduces the probabilities the model computed: the LRP pass splits the
    logits of the model's real attention, not of an approximation."""
    ad = bound_adapter(model, text)
    with Recorder(ad, keep_block_inputs=True, fused=False) as rec, torch.no_grad():  # the model's own probabilities
        forward_logits(ad, x)
        for layer, part in enumerate(ad.parts):
            z = part.attn.logits(rec.attn_inputs[layer], rec.attn_ctx.get(layer, {}), rec.linears[layer])
            torch.testing.assert_close(z.softmax(-1), rec.attention[layer], atol=1e-5, rtol=1e-4,
                                       msg=f"block {layer}")
        explicit = {layer: rec.attention[layer] for layer in range(len(ad.parts))}
    with Recorder(ad, keep_block_inputs=True) as rec, torch.no_grad():  # fused where timm can: rebuilt
        forward_logits(ad, x)
        for layer in range(len(ad.parts)):
            torch.testing.assert_close(rec.probs(layer), explicit[layer], atol=1e-5, rtol=1e-4,
                                       msg=f"block {layer} (fused forward)")


def randomize_biases(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every bias (Linear biases, q/v biases, LayerScale gammas stay) a nonzero value:
    timm initialises them to 0, which would hide a missing bias in a description."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if (name.endswith("bias") and p.ndim == 1) or name.endswith("relative_position_bias_table"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model


CLASS_AGNOSTIC = tuple(m for m in vl.METHODS if not vl.methods.METHOD_INFO[m].class_specific)


def assert_targets_differ(model: nn.Module, size: tuple[int, int], text: torch.Tensor | None = None) -> None:
    """Random-initialised model: class-specific maps of two targets on the same image differ
    (far above float noise); the class-agnostic ones agree.

    At random init the maps are partly degenerate, so only what holds there is asserted:
    tokentm always differs; with a CLS read-out transformer attribution and generic
    attention differ too. Under average and attention-pool read-outs those two are
    ``uniform row + Ē`` with ``Ē`` ~1e-9 at random init, flat in float32 (the numerical
    issue of class-specific maps under an average read-out, a separate methods issue),
    and Grad-CAM's ReLU can zero a random model's map.
    """
    img = np.random.default_rng(8).random((1, *size, 3)).astype(np.float32)
    cap = vl.capture(model, np.concatenate([img, img]), target=[0, 1], text=text)
    maps = vl.explain(cap, "all", per_layer=False)
    must = ["tokentm"] + (["transformer_attribution", "generic_attention"] if cap.attrs["readout"] == "cls" else [])
    for m in must:
        a, b = vl.normalize(maps[m]).values
        assert np.abs(a - b).max() > 1e-4, m
    for m in CLASS_AGNOSTIC:
        np.testing.assert_allclose(maps[m].values[0], maps[m].values[1], rtol=1e-5, atol=1e-7, err_msg=m)
