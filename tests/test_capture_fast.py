"""The fast capture path against the explicit one (issue: seven maps for 1.5× a backward pass).

Capture runs timm attention on its fused scaled-dot-product path and rebuilds
the probabilities and their gradient afterwards (``Recorder.probs`` /
``probs_grad``); it freezes the parameters (no weight gradients); it does not
keep fc2's and fc1's inputs (rebuilt in the LRP pass); it stores each block as
soon as the LRP walk has passed it. ``hooks.FUSED_ATTENTION = False`` is the
explicit path (the probabilities hooked where the model computes them). Both
must give the same capture: the same arrays to rounding and maps that agree
(corr > 0.9999) on the shipped trained models, for all seven methods.
"""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import timm
import torch
from conftest import make_swin, make_vit

import vitlens as vl
from vitlens.models import adapter_for

hooks = importlib.import_module("vitlens.capture.hooks")


def _both(monkeypatch, model, images, **kw):
    caps = {}
    for fused in (True, False):
        monkeypatch.setattr(hooks, "FUSED_ATTENTION", fused)
        caps[fused] = vl.capture(model, images, progress=False, **kw)
    return caps[True], caps[False]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["vit-shapes", "swin-shapes"])
def test_fast_path_maps_match_the_explicit_path_on_trained_models(monkeypatch, name):
    model = vl.load_model(name)
    fast, explicit = _both(monkeypatch, model, vl.datasets.shapes(12, seed=11))
    for stage in [k for k in fast.children if k.startswith("stage")]:
        for var in ("attention", "attention_grad"):
            a, b = fast[stage][var].values, explicit[stage][var].values
            assert np.abs(a - b).max() <= 1e-4 * np.abs(b).max(), (stage, var)
        # LRP divides by sums that can nearly cancel, so rounding moves single entries more. On
        # swin-shapes the relevance is that sensitive on the explicit path alone (inputs scaled
        # by 1 + 1e-6: corr 0.98 per stage), so only the maps are compared there.
        if name == "vit-shapes":
            a, b = fast[stage].attention_relevance.values.ravel(), explicit[stage].attention_relevance.values.ravel()
            assert np.corrcoef(a, b)[0, 1] > 0.9999, stage
    for method in vl.methods.explainable_methods(fast):
        if name == "swin-shapes" and method == "transformer_attribution":
            # Not reproducible to rounding (docs/METHODS.md, "Sensitivity to rounding"): the LRP
            # rules divide by sums that nearly cancel on this model. The explicit path against
            # itself, inputs scaled by 1 + 1e-6: corr 0.990 (fast vs explicit: 0.9992).
            continue
        a = vl.explain(fast, method).values.ravel()
        b = vl.explain(explicit, method).values.ravel()
        assert np.corrcoef(a, b)[0, 1] > 0.9999, method


@pytest.mark.parametrize("family", ["vit", "swin", "eva02", "beit"])
def test_fused_probabilities_and_gradients_equal_the_explicit_ones(monkeypatch, family):
    """Random-initialised members of each family with a fused switch (rotary, position bias,
    shifted windows): attention and its gradient to rounding; maps without LRP to corr 1."""
    if family == "vit":
        model, size = make_vit(), 32
    elif family == "swin":
        model, size = make_swin(), 64
    else:
        name = {"eva02": "eva02_tiny_patch14_224", "beit": "beit_base_patch16_224"}[family]
        torch.manual_seed(0)
        kw = dict(img_size=56) if family == "eva02" else dict(img_size=64, embed_dim=64, num_heads=4)
        model, size = timm.create_model(name, num_classes=5, depth=2, **kw).eval(), kw["img_size"]
    assert any(hasattr(p.attn.module, "fused_attn") for p in adapter_for(model).parts)
    images = np.random.default_rng(1).random((2, size, size, 3)).astype(np.float32)
    fast, explicit = _both(monkeypatch, model, images, target=[0, 1])
    for stage in [k for k in fast.children if k.startswith("stage")]:
        for var in ("attention", "attention_grad"):
            np.testing.assert_allclose(fast[stage][var].values, explicit[stage][var].values,
                                       rtol=1e-4, atol=1e-5 * np.abs(explicit[stage][var].values).max())
    for method in ("attention", "rollout", "gradcam", "generic_attention", "lnstat", "tokentm"):
        a, b = vl.explain(fast, method).values.ravel(), vl.explain(explicit, method).values.ravel()
        if np.ptp(b) == 0:  # a flat map (e.g. Grad-CAM clipped to 0 at random init): equal, then
            np.testing.assert_allclose(a, b, atol=1e-6)
        else:
            assert np.corrcoef(a, b)[0, 1] > 0.9999, method


def test_fused_capture_runs_scaled_dot_product_attention_and_restores_the_model(monkeypatch, images32):
    """The fused path really runs (SDPA is called once per block, the probability hooks never
    fire), and the model comes back as it was: fused flags, requires_grad, no .grad written."""
    vit = make_vit()  # its own: no other test has run a backward pass through it
    calls = []
    real = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    flags = [blk.attn.fused_attn for blk in vit.blocks]
    vit.blocks[0].attn.qkv.weight.requires_grad_(False)  # a partly frozen model stays partly frozen
    before = {n: p.requires_grad for n, p in vit.named_parameters()}
    cap = vl.capture(vit, images32, progress=False)
    assert len(calls) == len(vit.blocks)
    assert [blk.attn.fused_attn for blk in vit.blocks] == flags
    assert {n: p.requires_grad for n, p in vit.named_parameters()} == before
    assert all(p.grad is None for p in vit.parameters())
    np.testing.assert_allclose(cap["stage0"].attention.sum("key").values, 1.0, rtol=1e-5)


@pytest.mark.parametrize("keep", [["attention"], ["attention", "ln", "norms"]])
def test_a_capture_with_no_pass_after_its_forward_takes_the_models_explicit_attention(monkeypatch, images32, keep):
    """With nothing to differentiate or walk back, capture does not run the fused kernel and
    compute the probabilities again: the model computes them explicitly and capture keeps those
    (no scaled-dot-product call). They agree with a full (fused) capture's to rounding, and the
    fused flags come back as they were."""
    vit = make_vit()
    calls = []
    real = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    flags = [blk.attn.fused_attn for blk in vit.blocks]
    kept = []  # probabilities the Recorder is asked for after the forward: none, each went out as computed
    probs = hooks.Recorder.probs
    monkeypatch.setattr(hooks.Recorder, "probs", lambda self, layer: kept.append(layer) or probs(self, layer))
    part = vl.capture(vit, images32, keep=keep, progress=False)
    assert calls == [] and kept == [] and [blk.attn.fused_attn for blk in vit.blocks] == flags
    full = vl.capture(vit, images32, progress=False)
    assert len(calls) == len(vit.blocks)
    np.testing.assert_allclose(part["stage0"].attention.values, full["stage0"].attention.values, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(part.logits.values, full.logits.values, rtol=1e-5, atol=1e-6)
    monkeypatch.setattr(hooks, "FUSED_ATTENTION", False)  # a full capture on the explicit path: the same bits
    explicit = vl.capture(vit, images32, progress=False)
    np.testing.assert_array_equal(part["stage0"].attention.values, explicit["stage0"].attention.values)


@pytest.mark.parametrize("family", ["vit", "eva02"])
def test_each_blocks_heads_are_laid_out_once_for_the_probabilities_their_gradient_and_the_lrp_step(monkeypatch,
                                                                                                   family):
    """q, k, v per head are formed once per block (one pass over the q/k/v output, EVA's outside biases
    added), contiguous, and shared by the rebuilt probabilities, their gradient and the LRP step."""
    from vitlens.models.parts import AttentionPart

    if family == "vit":
        model, size = make_vit(), 32
    else:
        torch.manual_seed(0)
        model, size = timm.create_model("eva02_tiny_patch14_224", num_classes=5, depth=2, img_size=56).eval(), 56
    images = np.random.default_rng(1).random((2, size, size, 3)).astype(np.float32)
    made = []
    real = AttentionPart.project
    monkeypatch.setattr(AttentionPart, "project", lambda self, h, lin=None: made.append(real(self, h, lin)) or made[-1])
    cap = vl.capture(model, images, progress=False)
    assert len(made) == len(adapter_for(model).parts)
    assert all(t.is_contiguous() for heads in made for t in heads)
    monkeypatch.setattr(hooks, "FUSED_ATTENTION", False)  # the explicit path: probabilities as the model computed them
    explicit = vl.capture(model, images, progress=False)
    for var in ("attention", "attention_grad"):
        np.testing.assert_allclose(cap["stage0"][var].values, explicit["stage0"][var].values, rtol=1e-4,
                                   atol=1e-5 * np.abs(explicit["stage0"][var].values).max())
    a, b = cap["stage0"].attention_relevance.values.ravel(), explicit["stage0"].attention_relevance.values.ravel()
    assert np.corrcoef(a, b)[0, 1] > 0.9999  # LRP divides by sums that can nearly cancel: rounding moves entries


def test_capture_does_not_keep_the_mlp_inputs_it_rebuilds(vit, images32):
    """fc2's input (the MLP's widest activation) and fc1's are rebuilt, not recorded; the
    rebuilt fc2 input equals what the model fed fc2."""
    ad = adapter_for(vit)
    seen = {}
    handle = vit.blocks[1].mlp.fc2.register_forward_hook(lambda m, i, o: seen.update(fc2_in=i[0].detach()))
    try:
        x = torch.as_tensor(images32).permute(0, 3, 1, 2).contiguous()
        with hooks.Recorder(ad, keep_block_inputs=True) as rec, torch.no_grad():
            vit(x)
            lin = rec.linears[1]
            assert lin["fc2"][0] is None and lin["fc1"][0] is None
            assert lin["qkv"][0] is not None  # the attention input stays (rebuilding it needs the window layout)
            torch.testing.assert_close(ad.parts[1].mlp.hidden(lin["fc1"][1]), seen["fc2_in"])
    finally:
        handle.remove()


@pytest.mark.parametrize("name, firsts", [("eva02_tiny_patch14_224", ("fc1",)),
                                          ("eva02_base_patch14_224.mim_in22k", ("fc1_g", "fc1_x"))],
                         ids=["GluMlp", "SwiGLU"])
def test_capture_does_not_keep_the_gated_mlp_inputs_it_rebuilds(name, firsts):
    """The gated MLPs of EVA02 (timm's packed GluMlp and SwiGLU): fc2's input and the first Linears'
    are rebuilt, not recorded; the rebuilt fc2 input is exactly what the model fed fc2."""
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=3, depth=2, img_size=56).eval()
    ad = adapter_for(model)
    seen = {}
    handle = model.blocks[1].mlp.fc2.register_forward_hook(lambda m, i, o: seen.update(fc2_in=i[0].detach()))
    try:
        with hooks.Recorder(ad, keep_block_inputs=True) as rec, torch.no_grad():
            model(torch.randn(2, 3, 56, 56))
            lin = rec.linears[1]
            assert lin["fc2"][0] is None and all(lin[f][0] is None for f in firsts)
            rebuilt = ad.parts[1].mlp.hidden(*(lin[f][1] for f in firsts))
            assert torch.equal(rebuilt, seen["fc2_in"])
    finally:
        handle.remove()


@pytest.mark.parametrize("name, per_block", [("eva02_tiny_patch14_224", 1), ("beit_base_patch16_224", 2)])
def test_a_qkv_map_the_model_calls_outside_its_module_is_computed_once_per_block(monkeypatch, name, per_block):
    """EVA and BEiT call ``F.linear`` on the fused qkv weight with q/v biases of their own, so
    the module's hook never fires. EVA then hands q to its q norm, a module: capture reads the
    whole output off that view and computes nothing again (1 call per block, the model's).
    BEiT has no such module: capture computes the output once per block (for the rebuilt
    probabilities, their gradient and the LRP step alike), not once per use, and lets it go
    with the block."""
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=5, depth=2, img_size=56 if "eva" in name else 64,
                              **({} if "eva" in name else dict(embed_dim=64, num_heads=4))).eval()
    weights = {id(b.attn.qkv.weight): i for i, b in enumerate(model.blocks)}
    calls: list[int] = []
    real = torch.nn.functional.linear

    def counted(input, weight, bias=None):  # noqa: A002 (F.linear's own keyword names)
        if id(weight) in weights:
            calls.append(weights[id(weight)])
        return real(input, weight, bias)

    monkeypatch.setattr(torch.nn.functional, "linear", counted)
    released = []
    real_release = hooks.Recorder.release

    def release(self, layer):
        filled = list(self._filled.get(layer, []))
        real_release(self, layer)
        released.append((filled, not any(n in self.linears.get(layer, {}) for n in filled)))

    monkeypatch.setattr(hooks.Recorder, "release", release)
    size = model.patch_embed.img_size
    images = np.random.default_rng(0).random((2, *size, 3)).astype(np.float32)
    vl.capture(model, images, progress=False)
    # per block: the model's own forward, then (BEiT) capture's one call (value path for tokentm aside)
    assert sorted(calls) == sorted([i for i in range(len(model.blocks)) for _ in range(per_block)]), calls
    assert [f for f, _ in released] == [[] if per_block == 1 else ["qkv"]] * len(model.blocks)
    assert all(gone for _, gone in released)


def test_the_value_path_comes_from_the_recorded_v_map_where_it_ran_on_the_tokens(monkeypatch, vit, images32):
    """tokentm's value path ``W_O·v_j`` takes ``v`` from the fused qkv map's recorded output
    (no second v matmul) where that map ran on the block's normalised tokens; where it did not
    run through its module and no view of its output reaches a module (BEiT's q/v biases) the
    value path is computed from the tokens."""
    from vitlens.models.parts import AttentionPart

    calls = []
    real = AttentionPart.value_path
    monkeypatch.setattr(AttentionPart, "value_path", lambda self, h: (calls.append(1), real(self, h))[1])
    cap = vl.capture(vit, images32, progress=False)
    assert calls == []
    x = torch.as_tensor(images32).permute(0, 3, 1, 2)
    x = (x - torch.tensor(vit.pretrained_cfg["mean"])[:, None, None]) / torch.tensor(vit.pretrained_cfg["std"])[:, None, None]
    with torch.no_grad():
        h = vit.norm_pre(vit._pos_embed(vit.patch_embed(x)))
        for i, blk in enumerate(vit.blocks):
            t = real(adapter_for(vit).parts[i].attn, blk.norm1(h))
            np.testing.assert_allclose(cap["stage0"].attn_value_norm.values[:, i], t.norm(dim=-1).numpy(), rtol=1e-5)
            h = blk(h)
    torch.manual_seed(0)
    eva = timm.create_model("eva02_tiny_patch14_224", num_classes=3, depth=2, img_size=56).eval()
    vl.capture(eva, np.random.default_rng(0).random((1, 56, 56, 3)).astype(np.float32), progress=False)
    assert calls == []  # EVA's qkv output is read where it splits q off
    beit = timm.create_model("beit_base_patch16_224", num_classes=3, depth=2, img_size=64, embed_dim=64,
                             num_heads=4).eval()
    vl.capture(beit, np.random.default_rng(0).random((1, 64, 64, 3)).astype(np.float32), progress=False)
    assert len(calls) == 2  # one per block: BEiT's qkv runs outside its module


def _with_qv_biases(name: str, **kw):
    """A small EVA or BEiT (seed 0) whose q/v biases are random (timm starts them at 0)."""
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=3, depth=2, **kw).eval()
    with torch.no_grad():
        for b in model.blocks:
            b.attn.q_bias.normal_()
            b.attn.v_bias.normal_()
    return model


_SMALL = {"eva02_tiny_patch14_224": dict(img_size=56),
          "beit_base_patch16_224": dict(img_size=64, embed_dim=64, num_heads=4)}


def test_the_fused_output_read_off_q_is_the_models_own_with_biases_and_value_path():
    """The record read off EVA's q view is its module output (the q/v biases left to
    ``LinearPart``), equal to ``F.linear`` of the attention input; the value path taken
    from it equals the definition ``W_O·v_j``; vitlens's own later calls of the q norm
    (rebuilding the probabilities) leave it as it is."""
    model = _with_qv_biases("eva02_tiny_patch14_224", **_SMALL["eva02_tiny_patch14_224"])
    ad = adapter_for(model)
    x = torch.randn(2, 3, 56, 56)
    with hooks.Recorder(ad, keep_block_inputs=True, param_grads=False) as rec:
        with torch.no_grad():
            model(x)
        for layer, part in enumerate(ad.parts):
            assert layer in rec._split_from
            h = rec.attn_inputs[layer]
            got = rec.linears[layer]["qkv"][1]
            torch.testing.assert_close(got, torch.nn.functional.linear(h, part.attn.qkv.weight))
            dim = h.shape[-1]
            v = torch.nn.functional.linear(h, part.attn.qkv.weight[2 * dim:], model.blocks[layer].attn.v_bias)
            want = torch.nn.functional.linear(part.attn.inner_norm(v), part.attn.proj.weight)
            torch.testing.assert_close(rec.records[layer]["attn_value_norm"], want.norm(dim=-1))
            kept = got.clone()
            part.attn.q_norm(torch.randn(2, part.attn.num_heads, h.shape[1], dim // part.attn.num_heads))
            rec.probs(layer)  # calls the q norm on the rebuilt q
            torch.testing.assert_close(rec.linears[layer]["qkv"][1], kept, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["eva02_tiny_patch14_224", "beit_base_patch16_224"])
def test_a_bias_added_after_the_module_gives_the_same_capture(name):
    """``qkv_bias_separate``: EVA and BEiT run their qkv module, then add the q/v biases in
    place into the module's output. The capture must equal the ``F.linear`` path's, array
    for array (before, the module's record took the in-place bias and the part added it
    again). EVA's record is read off q; BEiT's is a copy taken in the module's hook."""
    model = _with_qv_biases(name, **_SMALL[name])
    size = _SMALL[name]["img_size"]
    images = np.random.default_rng(1).random((2, size, size, 3)).astype(np.float32)
    one = vl.capture(model, images, progress=False)
    for b in model.blocks:
        b.attn.qkv_bias_separate = True
    two = vl.capture(model, images, progress=False)
    for var in one["stage0"].data_vars:
        np.testing.assert_allclose(two["stage0"][var].values, one["stage0"][var].values, rtol=1e-5, atol=1e-6,
                                   err_msg=var)


@pytest.mark.parametrize("size", [64, 40], ids=["whole-windows", "padded-windows"])
def test_swin_takes_the_value_path_from_the_qkv_map_it_ran_on_the_windows(monkeypatch, size):
    """Swin's fused qkv map runs on the shifted (and padded) windows of the block's tokens: tokentm's
    value path takes ``v`` from its recorded output, put back in token order (no second v matmul per
    block), and equals the value path computed from the tokens."""
    from vitlens.models.parts import AttentionPart

    model = make_swin(img_size=size)  # 40 px: a 10×10 grid in 4×4 windows, padded to 12×12, then 5×5 in 4×4
    images = np.random.default_rng(2).random((2, size, size, 3)).astype(np.float32)
    calls = []
    real = AttentionPart.value_path
    monkeypatch.setattr(AttentionPart, "value_path", lambda self, h: (calls.append(1), real(self, h))[1])
    got = vl.capture(model, images, keep=["norms"], progress=False)
    assert calls == []
    # the value path from the tokens: the v map's output not used (left to the MLP's hook)
    monkeypatch.setattr(hooks.Recorder, "_value_path_from_linear", lambda self, layer, x, out: None)
    want = vl.capture(model, images, keep=["norms"], progress=False)
    assert len(calls) == len(model.layers[0].blocks) + len(model.layers[1].blocks)
    for stage in ("stage0", "stage1"):
        for var in ("attn_value_norm", "attn_value_cos"):
            np.testing.assert_allclose(got[stage][var].values, want[stage][var].values, rtol=1e-5, atol=1e-6)
