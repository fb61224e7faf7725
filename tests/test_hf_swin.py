"""transformers Swin v1 and v2: a random timm Swin copied into ``SwinForImageClassification`` /
``Swinv2ForImageClassification``, both explained.

timm's Swin captures are themselves tested against recomputations (tests/test_capture.py,
tests/test_family_swinv2.py); with the same weights every captured array and all seven
maps of the transformers model must agree with them. transformers' own eager
``output_attentions`` (the last block of each stage) is a second, independent reference.
Every test runs on both versions; v2 adds res-post-norm blocks, cosine attention with a
learned logit scale and the continuous (MLP) position bias.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
timm = pytest.importorskip("timm")

import vitlens as vl  # noqa: E402
from vitlens.capture.hooks import Recorder  # noqa: E402
from vitlens.capture.relevance import attention_relevance  # noqa: E402
from vitlens.models import adapter_for, hf_common  # noqa: E402
from family_checks import assert_padding_gets_nothing, assert_parts_describe_the_attention, zero_hf_swin_biases  # noqa: E402

SIZE = 32
ARCH = dict(patch_size=2, window_size=4, embed_dim=16, depths=(2, 2), num_heads=(2, 4), mlp_ratio=2)
VERSIONS = ("v1", "v2")
#: timm name, transformers class and config, attribute of the body, adapter family
SPEC = {
    "v1": ("swin_tiny_patch4_window7_224", "SwinForImageClassification", "SwinConfig", "swin", "hf_swin"),
    "v2": ("swinv2_tiny_window8_256", "Swinv2ForImageClassification", "Swinv2Config", "swinv2", "hf_swinv2"),
}
#: per-image correlation of the LRP relevances of the two captures (v1 with the 0.3/0.05 spread: 1e-4)
RELEVANCE_CORR = {"v1": 0.9999, "v2": 0.999}


def timm_swin(version: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = timm.create_model(SPEC[version][0], img_size=SIZE, num_classes=3, **ARCH).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if version == "v2" and ("cpb_mlp" in name or "logit_scale" in name):
                continue
            p.add_(torch.randn_like(p) * (0.3 if p.ndim >= 2 else (0.05 if version == "v1" else 0.1)))
    return model


def _block_weights(version: str, t: dict, src: str, dst: str) -> dict:
    """One block's weights, timm's names (``src``) → transformers' (``dst``)."""
    out = {}
    if version == "v1":
        names = (("norm1", "layernorm_before"), ("norm2", "layernorm_after"), ("attn.proj", "attention.o_proj"),
                 ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2"))
    else:
        names = (("norm1", "layernorm_before"), ("norm2", "layernorm_after"), ("attn.proj", "attention.output.dense"),
                 ("mlp.fc1", "intermediate.dense"), ("mlp.fc2", "output.dense"))
    for a, h in names:
        for kind in ("weight", "bias"):
            out[f"{dst}{h}.{kind}"] = t[f"{src}{a}.{kind}"]
    if version == "v1":
        for kind in ("weight", "bias"):
            for name, w in zip(("q_proj", "k_proj", "v_proj"), t[f"{src}attn.qkv.{kind}"].chunk(3, 0)):
                out[f"{dst}attention.{name}.{kind}"] = w
        out[f"{dst}attention.relative_position_bias.relative_position_bias_table"] = \
            t[f"{src}attn.relative_position_bias_table"]
        return out
    q, k, v = t[f"{src}attn.qkv.weight"].chunk(3, 0)
    att = f"{dst}attention.self."
    out.update({f"{att}query.weight": q, f"{att}key.weight": k, f"{att}value.weight": v,
                f"{att}query.bias": t[f"{src}attn.q_bias"], f"{att}value.bias": t[f"{src}attn.v_bias"],
                f"{att}logit_scale": t[f"{src}attn.logit_scale"]})
    for kind in ("0.weight", "0.bias", "2.weight"):
        out[f"{att}continuous_position_bias_mlp.{kind}"] = t[f"{src}attn.cpb_mlp.{kind}"]
    return out


def hf_swin_from_timm(version: str, model: torch.nn.Module) -> torch.nn.Module:
    _, cls, config, body, _ = SPEC[version]
    cfg = getattr(transformers, config)(
        image_size=SIZE, patch_size=ARCH["patch_size"], embed_dim=ARCH["embed_dim"], depths=list(ARCH["depths"]),
        num_heads=list(ARCH["num_heads"]), window_size=ARCH["window_size"],
        mlp_ratio=ARCH["mlp_ratio"] if version == "v1" else float(ARCH["mlp_ratio"]), num_labels=3,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, drop_path_rate=0.0)
    hf = getattr(transformers, cls)(cfg).eval()
    t = model.state_dict()
    out = {
        f"{body}.embeddings.patch_embeddings.projection.weight": t["patch_embed.proj.weight"],
        f"{body}.embeddings.patch_embeddings.projection.bias": t["patch_embed.proj.bias"],
        f"{body}.embeddings.norm.weight": t["patch_embed.norm.weight"],
        f"{body}.embeddings.norm.bias": t["patch_embed.norm.bias"],
        f"{body}.layernorm.weight": t["norm.weight"], f"{body}.layernorm.bias": t["norm.bias"],
        "classifier.weight": t["head.fc.weight"], "classifier.bias": t["head.fc.bias"],
    }
    for s, depth in enumerate(ARCH["depths"]):
        for b in range(depth):
            out.update(_block_weights(version, t, f"layers.{s}.blocks.{b}.", f"{body}.encoder.layers.{s}.blocks.{b}."))
        if s + 1 < len(ARCH["depths"]):  # timm merges at the start of stage s+1, transformers at the end of s
            for kind in ("norm.weight", "norm.bias", "reduction.weight"):
                out[f"{body}.encoder.layers.{s}.downsample.{kind}"] = t[f"layers.{s + 1}.downsample.{kind}"]
    hf.load_state_dict(out, strict=True)
    hf.vitlens_image_processor = transformers.ViTImageProcessor(
        size={"height": SIZE, "width": SIZE}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    return hf


@pytest.fixture(scope="module", params=[VERSIONS[0], pytest.param(VERSIONS[1], marks=pytest.mark.slow)])  # v2: in make test
def pair(request):
    model = timm_swin(request.param)
    return request.param, model, hf_swin_from_timm(request.param, model)


def _pixels(n=3, seed=1):
    return torch.randn(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def _corr(a, b):
    a, b = a.ravel() - a.mean(), b.ravel() - b.mean()
    return float(a @ b / np.sqrt((a @ a) * (b @ b)))


def _body(model):
    return model.swinv2 if hasattr(model, "swinv2") else model.swin


def test_converted_swin_gives_the_same_logits(pair):
    _, model, hf = pair
    x = _pixels()
    with torch.no_grad():
        a, b = model(x), hf(pixel_values=x).logits
    assert a.abs().max() > 0.1
    np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=1e-4, atol=1e-5)


def test_capture_layout_and_every_array_agree_with_timm(pair):
    version, model, hf = pair
    x, target = _pixels(), [0, 2, 1]
    cap_t, cap_h = vl.capture(model, x, target=target), vl.capture(hf, x, target=target)
    assert cap_h.attrs["family"] == SPEC[version][4] and cap_h.attrs["readout"] == "avg"
    assert list(cap_h.children) == list(cap_t.children) == ["stage0", "stage1"]
    for stage in ("stage0", "stage1"):
        st_h, st_t = cap_h[stage], cap_t[stage]
        assert st_h.attention.dims == st_t.attention.dims
        np.testing.assert_array_equal(st_h.window_token.values, st_t.window_token.values)
        np.testing.assert_allclose(st_h.attention.sum("key").values, 1.0, atol=1e-5)
        for var in ("attention", "attention_grad", "ln_mean", "ln_std", "token_norm",
                    "attn_value_norm", "mlp_out_norm", "block_out_norm"):
            np.testing.assert_allclose(st_h[var].values, st_t[var].values, rtol=1e-3, atol=1e-5,
                                       err_msg=f"{stage}/{var}")
        # LRP divides by sums that can be near zero, so float32 rounding (1e-6 here) moves a few
        # relevances by ~1e-4 — a 1e-6 change of the input moves timm's own relevances more. Compare
        # each image's relevances as a whole.
        for i in range(3):
            assert _corr(st_h.attention_relevance.values[i], st_t.attention_relevance.values[i]) > \
                RELEVANCE_CORR[version], (stage, i)
    np.testing.assert_allclose(cap_h["stage1"].features.values, cap_t["stage1"].features.values, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("target", [None, [0, 2, 1, 1]], ids=["predicted", "given"])
def test_all_seven_maps_agree_with_timm(pair, target):
    version, model, hf = pair
    x = _pixels(4, seed=2)
    cap_t, cap_h = (vl.capture(m, x, target=target, keep=("all", *vl.methods.extra_groups())) for m in (model, hf))
    if target is not None:
        for stage in ("stage0", "stage1"):  # LRP: compared as a whole per image
            for i in range(4):
                assert _corr(cap_h[stage].attention_relevance.values[i],
                             cap_t[stage].attention_relevance.values[i]) > 0.999, (stage, i)
    maps_t, maps_h = vl.explain(cap_t, "all"), vl.explain(cap_h, "all")
    worst = {}
    for name in vl.METHODS:
        corrs = [_corr(maps_t[name].values[i], maps_h[name].values[i]) for i in range(4)
                 if maps_t[name].values[i].std() > 0]
        assert len(corrs) >= 3, name
        worst[name] = min(corrs)
    print(f"worst per-image correlation timm vs transformers, Swin {version}:", worst)
    assert all(c > 0.999 for c in worst.values()), worst


def _eager(model):
    m = copy.deepcopy(model)
    if hasattr(m, "swin"):  # Swinv2 computes its attention explicitly anyway
        m.set_attn_implementation("eager")
    return m


def test_last_attention_of_each_stage_and_its_gradient_equal_transformers_eager(pair):
    _, _, hf = pair
    x, target = _pixels(2), [1, 2]
    cap = vl.capture(hf, x, target=target)
    out = _eager(hf)(pixel_values=x, output_attentions=True)  # one per stage: its last block
    grads = torch.autograd.grad(out.logits.gather(1, torch.tensor(target)[:, None]).sum(), out.attentions)
    for stage, a, g in zip(("stage0", "stage1"), out.attentions, grads):
        nw = a.shape[0] // 2
        a = a.detach().view(2, nw, *a.shape[1:]).transpose(1, 2).numpy()
        g = g.view(2, nw, *g.shape[1:]).transpose(1, 2).numpy()
        np.testing.assert_allclose(cap[stage].attention.values[:, -1], a, atol=1e-6)
        np.testing.assert_allclose(cap[stage].attention_grad.values[:, -1], g, rtol=1e-5, atol=1e-6)


def _without_biases(version: str, model: torch.nn.Module) -> torch.nn.Module:
    """v1: no Linear biases nor relative position tables; v2: also its continuous position bias ≈ 0."""
    if version == "v2":
        return zero_hf_swin_biases(model)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Linear) and m.bias is not None:
                m.bias.zero_()
            if hasattr(m, "relative_position_bias_table"):
                m.relative_position_bias_table.zero_()
    return model


@pytest.mark.parametrize("seed", [0, 4])
def test_lrp_leak_comes_only_from_position_bias_and_masks(pair, seed):
    version, _, hf = pair
    model = _without_biases(version, hf_swin_from_timm(version, timm_swin(version, seed=seed)))
    ad = adapter_for(model)
    with Recorder(ad, keep_block_inputs=True) as rec:
        logits = ad.logits(_pixels(2))
        attention_relevance(ad, rec, logits.argmax(-1), to_input=True)
    assert set(rec.relevance_totals) == {0, 1, 2, 3}
    for r_in, r_out in rec.relevance_totals.values():
        # unshifted windows conserve exactly; shifted ones leak only through the -100 mask (tiny)
        torch.testing.assert_close(r_in, r_out, rtol=1e-3, atol=1e-4)


def test_capture_restores_the_swin_after_an_exception(pair):
    _, _, hf = pair
    model = copy.deepcopy(hf)
    model.train()
    hooks = [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()]

    def explode(module, inputs, output):
        raise RuntimeError("boom")

    handle = _body(model).encoder.layers[1].blocks[0].register_forward_hook(explode)
    with pytest.raises(RuntimeError, match="boom"):
        vl.capture(model, _pixels(1))
    handle.remove()
    assert model.config._attn_implementation == hf.config._attn_implementation
    assert all(m.training for m in model.modules())
    assert [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()] == hooks
    assert len(hf_common._PROBES) == 0


def test_explorer_shows_the_same_panels_as_for_timm(pair):
    from vitlens.widgets import Explorer, HeadGrid

    _, model, hf = pair
    x = _pixels(1)
    ex_t, ex_h = Explorer(vl.capture(model, x), layer=1), Explorer(vl.capture(hf, x), layer=1)
    for ex in (ex_t, ex_h):
        ex.select_patch(3, 5)
    maps_t, maps_h = ex_t.panel_maps(), ex_h.panel_maps()
    for name in maps_t:
        np.testing.assert_allclose(maps_h[name], maps_t[name], rtol=1e-3, atol=1e-5, err_msg=name)
    assert len(ex_h.figure.data[ex_h._grid_trace].x) > 0  # windows drawn
    HeadGrid(ex_h.cap, layer=3)


def test_parts_describe_the_attention_the_model_computed(pair):
    """Position bias + shift mask included: the description reproduces every window's probabilities."""
    _, _, hf = pair
    ad = adapter_for(hf)
    with Recorder(ad, keep_block_inputs=True) as rec, torch.no_grad():
        ad.logits(_pixels(2))
        for layer, part in enumerate(ad.parts):
            z = part.attn.logits(rec.attn_inputs[layer], rec.attn_ctx.get(layer, {}), rec.linears[layer])
            torch.testing.assert_close(z.softmax(-1), rec.attention[layer], atol=1e-5, rtol=1e-4)


# -- grids transformers pads (pad first, then the cyclic shift) ------------------------------------------
def padded_hf(v2: bool, depths=(2, 2, 2), seed: int = 0) -> torch.nn.Module:
    """56 px, patch 4, windows of 4: grids 14 (padded to 16), 7 (padded to 8) and 4 (merged from the odd 7)."""
    torch.manual_seed(seed)
    cls, cfg = ((transformers.Swinv2ForImageClassification, transformers.Swinv2Config) if v2 else
                (transformers.SwinForImageClassification, transformers.SwinConfig))
    model = cls(cfg(image_size=56, patch_size=4, embed_dim=16, depths=list(depths), num_heads=[2, 2, 4][:len(depths)],
                    window_size=4, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                    drop_path_rate=0.0)).eval()
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed)
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * (0.3 if p.ndim >= 2 else 0.05))
    model.vitlens_image_processor = transformers.ViTImageProcessor(
        size={"height": 56, "width": 56}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    return model


def _hf_layers(model):
    body = model.swinv2 if hasattr(model, "swinv2") else model.swin
    return [b for st in body.encoder.layers for b in st.blocks]


@pytest.mark.parametrize("v2", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_window_layout_of_a_padded_grid_is_transformers_own(v2):
    """window_token, and the window maps of the LRP walk, against transformers' own maybe_pad,
    cyclic shift and window_partition / window_reverse (applied here to a grid of ids)."""
    from vitlens.models.windows import from_windows, to_windows

    mod = (transformers.models.swinv2.modeling_swinv2 if v2 else transformers.models.swin.modeling_swin)
    model = padded_hf(v2)
    cap = vl.capture(model, torch.randn(1, 3, 56, 56, generator=torch.Generator().manual_seed(3)), grads=False)
    layers = iter(_hf_layers(model))
    for name in ("stage0", "stage1", "stage2"):
        gh, gw = cap[name].attrs["grid"]
        for i in range(cap[name]["layer"].size):
            layer = next(layers)
            ws, shift = int(cap[name].attrs["window_size"][0]), int(cap[name].attrs["shift_size"][i][0])
            ids = torch.arange(1.0, gh * gw + 1).reshape(1, gh, gw, 1)  # 0 is left for the padding
            ph, pw = (-(-gh // ws) * ws, -(-gw // ws) * ws)
            t = torch.nn.functional.pad(ids, (0, 0, 0, pw - gw, 0, ph - gh))
            t = torch.roll(t, (-shift, -shift), (1, 2))
            want = mod.window_partition(t, ws).reshape(-1, ws * ws).long() - 1
            np.testing.assert_array_equal(cap[name].window_token.values[i], want.numpy(), err_msg=f"{name}[{i}]")
            x = torch.randn(2, gh, gw, 3)
            win = to_windows(x, (ws, ws), (shift, shift), pad_first=True)
            t = torch.roll(torch.nn.functional.pad(x, (0, 0, 0, pw - gw, 0, ph - gh)), (-shift, -shift), (1, 2))
            torch.testing.assert_close(win, mod.window_partition(t, ws).reshape(-1, ws * ws, 3))
            back = torch.roll(mod.window_reverse(win.reshape(-1, ws, ws, 3), ws, ph, pw), (shift, shift), (1, 2))
            torch.testing.assert_close(from_windows(win, (ws, ws), (shift, shift), (gh, gw), pad_first=True),
                                       back[:, :gh, :gw])
    assert (cap["stage0"].window_token.values < 0).any() and (cap["stage1"].window_token.values < 0).any()


@pytest.mark.parametrize("v2", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_padded_grids_capture_attention_and_gradients_as_transformers_computes_them(v2):
    model = padded_hf(v2)
    x, target = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(5)), [1, 2]
    cap = vl.capture(model, x, target=target)
    assert [cap[f"stage{s}"].attrs["grid"] for s in range(3)] == [[14, 14], [7, 7], [4, 4]]
    assert [cap[f"stage{s}"].attrs["stride"] for s in range(3)] == [[4, 4], [8, 8], [16, 16]]
    out = _eager(model)(pixel_values=x, output_attentions=True)  # one per stage: its last block
    grads = torch.autograd.grad(out.logits.gather(1, torch.tensor(target)[:, None]).sum(), out.attentions)
    for stage, a, g in zip(("stage0", "stage1", "stage2"), out.attentions, grads, strict=True):
        nw = a.shape[0] // 2
        a = a.detach().view(2, nw, *a.shape[1:]).transpose(1, 2).numpy()
        g = g.view(2, nw, *g.shape[1:]).transpose(1, 2).numpy()
        np.testing.assert_allclose(cap[stage].attention.values[:, -1], a, atol=1e-6)
        np.testing.assert_allclose(cap[stage].attention_grad.values[:, -1], g, rtol=1e-5, atol=1e-6)
    assert_parts_describe_the_attention(model, x)  # every block's softmax, padded-grid masks included
    maps = vl.explain(cap, "all", per_layer=False)
    for m in maps.data_vars:
        assert maps[m].shape == (2, 14, 14) and np.isfinite(maps[m].values).all(), m
    assert_padding_gets_nothing(cap)


@pytest.mark.parametrize("v2", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_padded_grids_conserve_relevance_without_biases(v2):
    model = zero_hf_swin_biases(padded_hf(v2, seed=4))
    ad = adapter_for(model)
    with Recorder(ad, keep_block_inputs=True) as rec:
        x = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(7))
        attention_relevance(ad, rec, ad.logits(x).argmax(-1), to_input=True)
    totals = rec.relevance_totals
    assert set(totals) == set(range(6))
    for layer in range(1, 6):  # block 0's step into the embeddings: see test_swin_padded.py
        torch.testing.assert_close(totals[layer][0], totals[layer][1], rtol=1e-3, atol=1e-4, msg=f"block {layer}")
    for last in (1, 3):  # through both mergings, the odd 7 → 4 one included
        torch.testing.assert_close(totals[last][1], totals[last + 1][0], rtol=1e-4, atol=1e-6)
