"""Explanation methods against their definitions (docs/METHODS.md)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import xarray as xr
from conftest import make_swin, make_vit, random_images

import vitlens as vl
from vitlens.capture.hooks import Recorder
from vitlens.capture.relevance import attention_relevance
from vitlens.methods import lrp
from vitlens.models import adapter_for


def corr(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
    return float(np.corrcoef(a, b)[0, 1])


@pytest.fixture(scope="module")
def vit_cap():
    return vl.capture(make_vit(depth=4, seed=11), random_images(3, 32, seed=4))


@pytest.fixture(scope="module")
def swin_cap():
    return vl.capture(make_swin(seed=12), random_images(2, 64, seed=5))


# -- independent re-implementations on the captured tensors (ViT) ------------------------
def _reference_maps(cap):
    st = cap["stage0"]
    A, G, RA = st.attention.values, st.attention_grad.values, st.attention_relevance.values
    b, nl, _, n, _ = A.shape
    eye = np.eye(n)
    out = {k: [] for k in ("attention", "rollout", "generic_attention", "transformer_attribution", "gradcam")}
    for i in range(b):
        roll, gen, ta = eye.copy(), eye.copy(), eye.copy()
        for l in range(nl):
            roll = 0.5 * (eye + A[i, l].mean(0)) @ roll
            gen = gen + np.clip(G[i, l] * A[i, l], 0, None).mean(0) @ gen
            if l >= 1:
                ta = (eye + np.clip(G[i, l] * RA[i, l], 0, None).mean(0)) @ ta
        out["rollout"].append(roll[0, 1:])
        out["generic_attention"].append(gen[0, 1:])
        out["transformer_attribution"].append(ta[0, 1:])
        out["attention"].append(A[i, -1].mean(0)[0, 1:])
        a, g = A[i, -1][:, 0, 1:], G[i, -1][:, 0, 1:]
        out["gradcam"].append(np.maximum((g.mean(-1, keepdims=True) * a).mean(0), 0))
    return {k: np.stack(v) for k, v in out.items()}


@pytest.mark.parametrize("method", ["attention", "rollout", "generic_attention", "transformer_attribution", "gradcam"])
def test_maps_agree_with_independent_reimplementation(vit_cap, method):
    ref = _reference_maps(vit_cap)[method]
    got = vl.explain(vit_cap, method)
    assert got.dims == ("sample", "y", "x") and got.shape == (3, 4, 4)
    for i in range(3):
        assert corr(got.values[i].ravel(), ref[i]) > 0.999
    np.testing.assert_allclose(got.values.reshape(3, -1), ref, rtol=1e-4, atol=1e-7)


def test_rollout_rows_sum_to_one(vit_cap):
    # the rollout product of row-stochastic matrices is row-stochastic: the CLS row sums to 1
    full = vl.explain(vit_cap, "rollout")
    cls_part = 1 - full.sum(("y", "x"))
    assert (cls_part > 0).all() and (cls_part < 1).all()
    st = vit_cap["stage0"]
    n = st.token.size
    r = np.eye(n)
    for l in range(st.layer.size):
        r = 0.5 * (np.eye(n) + st.attention.values[0, l].mean(0)) @ r
        np.testing.assert_allclose(r.sum(1), 1.0, atol=1e-5)
    np.testing.assert_allclose(full.values[0].ravel(), r[0, 1:], rtol=1e-5)


# -- LRP ----------------------------------------------------------------------------------
def test_alphabeta_linear_rule_on_a_hand_computed_example():
    x = torch.tensor([[1.0, -2.0]])
    w = torch.tensor([[1.0, 1.0], [2.0, -1.0], [-1.0, 0.5]])
    # Z = W⁺x⁺ + W⁻x⁻ = [1, 2+2, 0]; S = R/Z = [1, .25, 0] (0 where Z = 0)
    # R_in = x⁺⊙W⁺ᵀS + x⁻⊙W⁻ᵀS = [1·(1 + .5), 0] + [0, −2·(−.25)] = [1.5, 0.5]
    r = lrp.linear_alphabeta(x, w, torch.tensor([[1.0, 1.0, 1.0]]))
    torch.testing.assert_close(r, torch.tensor([[1.5, 0.5]]))


def test_residual_rescaling_keeps_each_images_total():
    torch.manual_seed(0)
    a, b = torch.randn(2, 5, 3), torch.randn(2, 5, 3)
    r = torch.randn(2, 5, 3)
    r[1] *= 7  # images with very different totals must not mix
    ra, rb = lrp.residual_add(a, b, r)
    torch.testing.assert_close((ra + rb).sum((1, 2)), r.sum((1, 2)))
    ra0, rb0 = lrp.residual_add(a[:1], b[:1], r[:1])
    torch.testing.assert_close(ra[:1], ra0)
    torch.testing.assert_close(rb[:1], rb0)


def test_bilinear_rule_halves_and_conserves():
    torch.manual_seed(1)
    a, b = torch.rand(1, 4, 5), torch.rand(1, 5, 3)
    r = torch.rand(1, 4, 3)
    ra, rb = lrp.matmul_lrp0(a, b, r)
    torch.testing.assert_close(ra.sum(), r.sum() / 2)
    torch.testing.assert_close(rb.sum(), r.sum() / 2)


def test_safe_division_clamps_tiny_denominators_and_is_the_plain_quotient_otherwise():
    """Hand-computed: |den| below 1e-9 is clamped (sign kept), den = 0 gives 0, a NaN stays NaN;
    where no |den| is below 1e-9 the result is the plain quotient bit for bit, laid out
    contiguously even from strided operands (the attention rules multiply it with matrices next)."""
    num = torch.tensor([1.0, 2.0, -3.0, 4.0, 5.0], dtype=torch.float64)
    den = torch.tensor([2.0, 1e-12, -1e-12, 0.0, -4.0], dtype=torch.float64)
    torch.testing.assert_close(lrp.safe_div(num, den), torch.tensor([0.5, 2e9, 3e9, 0.0, -1.25], dtype=torch.float64))
    assert torch.isnan(lrp.safe_div(num[:1], torch.tensor([float("nan")], dtype=torch.float64))).all()
    torch.manual_seed(3)
    n, d = torch.randn(4, 3, 5, 6).transpose(1, 2), torch.randn(4, 3, 5, 6).transpose(1, 2).add_(10.0)
    got = lrp.safe_div(n, d)
    assert got.is_contiguous() and torch.equal(got, n / d)
    big = torch.full((2, 3), 2.0)  # broadcasting: the shape and dtype of num / den
    assert torch.equal(lrp.safe_div(big, torch.tensor([1.0, 4.0, 8.0])), big / torch.tensor([1.0, 4.0, 8.0]))


def test_alphabeta_gives_zero_not_nan_where_z_is_zero():
    x = torch.tensor([[0.0, 0.0], [1.0, 2.0]])  # a zero token: every Z of its row is 0
    w = torch.tensor([[1.0, -1.0], [0.5, 2.0]])
    r = lrp.linear_alphabeta(x, w, torch.ones(2, 2), out=x @ w.T)
    assert torch.isfinite(r).all() and r[0].eq(0).all()
    torch.testing.assert_close(r[1].sum(), torch.tensor(2.0))  # the other token conserves


def _relevance(model, x, **kw):
    ad = adapter_for(model)
    with Recorder(ad, keep_block_inputs=True) as rec:
        logits = model(x)
        return attention_relevance(ad, rec, logits.argmax(-1), **kw)


def test_lrp_shortcuts_change_nothing(monkeypatch):
    """Skipping tokens without relevance (the last block after a CLS read-out) and the
    first block's qkv step give the relevance of the full dense pass."""
    import importlib

    relevance = importlib.import_module("vitlens.capture.relevance")
    model, x = make_vit(depth=3, seed=6), torch.randn(2, 3, 32, 32)
    calls = []
    active = relevance._active_tokens
    monkeypatch.setattr(relevance, "_active_tokens", lambda r: calls.append(active(r)) or calls[-1])
    fast = _relevance(model, x)
    assert calls[0] is not None and calls[0].tolist() == [0]  # CLS only, in the last block
    monkeypatch.setattr(relevance, "_active_tokens", lambda r: None)
    full = _relevance(model, x, to_input=True)
    for layer in full:
        torch.testing.assert_close(fast[layer], full[layer], rtol=1e-5, atol=1e-9)


def _relevance_totals(model, x):
    ad = adapter_for(model)
    with Recorder(ad, keep_block_inputs=True) as rec:
        logits = model(x)
        attention_relevance(ad, rec, logits.argmax(-1), to_input=True)
    return rec.relevance_totals


def test_lrp_relevance_is_conserved_block_by_block_on_a_bias_free_vit():
    model = make_vit(depth=4, qkv_bias=False, seed=3)
    for m in model.modules():
        if isinstance(m, torch.nn.Linear) and m.bias is not None:
            torch.nn.init.zeros_(m.bias)
    totals = _relevance_totals(model, torch.randn(2, 3, 32, 32))
    for layer, (r_in, r_out) in totals.items():
        torch.testing.assert_close(r_in, r_out, rtol=1e-4, atol=1e-5)  # tolerance: float32 sums
    assert set(totals) == {0, 1, 2, 3}


def test_lrp_leak_on_swin_comes_only_from_position_bias_and_masks():
    model = make_swin(seed=4)
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "relative_position_bias_table"):
                m.relative_position_bias_table.zero_()
    totals = _relevance_totals(model, torch.randn(2, 3, 64, 64))
    for layer, (r_in, r_out) in totals.items():
        # unshifted windows conserve exactly; shifted ones leak only through the −100 mask (tiny)
        torch.testing.assert_close(r_in, r_out, rtol=1e-3, atol=1e-4)
    biased = _relevance_totals(make_swin(seed=4), torch.randn(2, 3, 64, 64))
    leak = max(float((i - o).abs().max()) for i, o in biased.values())
    assert leak > 1e-3  # with position bias the documented leak is real (and measured here)


# -- sanity reductions ---------------------------------------------------------------------
def _with(cap: xr.DataTree, stage: str, name: str, values) -> xr.DataTree:
    tree = cap.copy(deep=True)
    ds = tree[stage].to_dataset(inherit=False)
    ds[name] = (ds[name].dims, values)
    tree[stage] = xr.DataTree(ds)
    return tree


@pytest.mark.parametrize("which", ["vit", "swin"])
def test_lnstat_with_constant_statistic_equals_rollout(which, vit_cap, swin_cap):
    cap = vit_cap if which == "vit" else swin_cap
    for stage in cap.children:
        cap = _with(cap, stage, "ln_std", np.full(cap[stage].ln_std.shape, 0.7, np.float32))
    expected = vl.explain(cap, "rollout").values
    got = vl.explain(cap, "lnstat", stat="std", head_fusion="mean", grad=False)  # 0.7 normalises to 1, as prefixes
    np.testing.assert_allclose(got.values, expected, rtol=1e-5, atol=1e-8)
    for stage in cap.children:
        cap = _with(cap, stage, "ln_std", np.ones(cap[stage].ln_std.shape, np.float32))
    got = vl.explain(cap, "lnstat", stat="std", stat_norm="none", grad=False)
    np.testing.assert_allclose(got.values, expected, rtol=1e-5, atol=1e-8)
    # the real statistic changes the map
    real = vl.explain(vit_cap if which == "vit" else swin_cap, "lnstat", grad=False)
    assert not np.allclose(real.values, vl.explain(cap, "rollout").values, rtol=1e-3)


@pytest.mark.parametrize("which", ["vit", "swin"])
def test_tokentm_with_listed_reductions_equals_generic_attention(which, vit_cap, swin_cap):
    cap = vit_cap if which == "vit" else swin_cap
    reductions = {"ffn": False, "necc": "none", "length": False, "init": "identity", "grad": True}
    got = vl.explain(cap, "tokentm", identity_path="keep", **reductions)
    generic = vl.explain(cap, "generic_attention", identity_path="keep").values
    np.testing.assert_allclose(got.values, generic, rtol=1e-5, atol=1e-9)
    full = vl.explain(cap, "tokentm")
    assert not np.allclose(full.values / full.values.max(), got.values / got.values.max(), rtol=1e-2)
    # dropping the attention-free path: nothing changes under a CLS read-out; under
    # Swin's average pool that path is the uniform row 1/64 split 1/4 to each parent
    dropped = vl.explain(cap, "tokentm", **reductions).values
    np.testing.assert_allclose(dropped, generic - (0.0 if which == "vit" else 1 / 256), rtol=1e-5, atol=1e-8)
    # and it is generic attention's own identity_path="drop" (its default under an average read-out)
    np.testing.assert_allclose(dropped, vl.explain(cap, "generic_attention", identity_path="drop").values,
                               rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("which", ["vit", "swin"])
def test_tokentm_identity_path_option(which, vit_cap, swin_cap):
    cap = vit_cap if which == "vit" else swin_cap
    for kw in ({}, {"per_layer": True}, {"necc": "softmax", "init": "identity"}):
        drop, keep = vl.explain(cap, "tokentm", **kw), vl.explain(cap, "tokentm", identity_path="keep", **kw)
        assert drop.attrs["identity_path"] == "drop" and keep.attrs["identity_path"] == "keep"
        assert drop.dims == keep.dims and drop.name == "tokentm"
        if which == "vit":  # the CLS row of the attention-free (diagonal) product has no patch entries
            np.testing.assert_allclose(drop.values, keep.values, rtol=1e-6)  # drop runs in float64
        else:
            assert (drop.values >= -1e-7).all() and not np.allclose(drop.values, keep.values)
    if which == "swin":  # what is dropped does not depend on the class explained
        img = cap.image.values[:1]
        two = vl.capture(make_swin(seed=12), np.concatenate([img, img]), target=[0, 1])
        removed = (vl.explain(two, "tokentm", identity_path="keep") - vl.explain(two, "tokentm")).values
        np.testing.assert_allclose(removed[0], removed[1], rtol=1e-5)
        assert removed.std() > 0  # and it is not a constant (FFN and length weights)
    stages = vl.explain(cap, "tokentm", by_stage=True)
    assert stages.attrs["identity_path"] == "drop"
    with pytest.raises(vl.OptionError, match="identity_path"):
        vl.explain(cap, "tokentm", identity_path="both")


def test_tokentm_weights_follow_the_definition(vit_cap):
    from vitlens.methods.tokentm import necc

    c = torch.tensor([[1.0, 0.0, -1.0]])
    mid = float((1 - np.exp(-1)) / (np.e - np.exp(-1)))
    torch.testing.assert_close(necc(c, "range"), torch.tensor([[1.0, mid, 0.0]]))
    torch.testing.assert_close(necc(c, "softmax").sum(), torch.tensor(3.0))
    # one block, no FFN, C_0 = I, grad=False: map = CLS row of (I + E_h[A]·diag(w))
    st = vit_cap["stage0"]
    got = vl.explain(vit_cap, "tokentm", layers=[0], ffn=False, grad=False, init="identity")
    a = st.attention.values[0, 0].mean(0)
    cos = torch.from_numpy(st.attn_value_cos.values[0, 0])
    w = necc(cos[None], "range")[0].numpy() * st.attn_value_norm.values[0, 0] / st.token_norm.values[0, 0]
    expected = (np.eye(a.shape[0]) + a * w[None, :])[0, 1:]
    np.testing.assert_allclose(got.values[0].ravel(), expected, rtol=1e-5)


# -- Swin: row-vector path = dense global operators ---------------------------------------------
def test_swin_row_vector_path_equals_dense_global_operators(swin_cap, monkeypatch):
    fast = {m: vl.explain(swin_cap, m) for m in vl.methods.explainable_methods(swin_cap)}
    fast_layers = vl.explain(swin_cap, "rollout", per_layer=True)
    import sys

    from vitlens.methods import maps, operators

    attention_module = sys.modules["vitlens.methods.attention"]

    monkeypatch.setattr(maps, "propagate", operators.propagate_dense)
    monkeypatch.setattr(attention_module, "propagate", operators.propagate_dense)
    for m in fast:
        dense = vl.explain(swin_cap, m)
        np.testing.assert_allclose(fast[m].values, dense.values, rtol=1e-5, atol=1e-5 * float(abs(dense).max()))
    np.testing.assert_allclose(fast_layers.values, vl.explain(swin_cap, "rollout", per_layer=True).values, atol=1e-6)


def test_dense_swin_operator_is_a_permuted_block_diagonal(swin_cap):
    from vitlens.methods import operators

    cv = operators.view(swin_cap)
    stage = cv.stages[0]
    x = operators.head_fused(stage, 1, None, "attention")  # shifted block
    g = operators.dense_global(stage, 1, x)
    np.testing.assert_allclose(g.sum(-1).numpy(), 1.0, atol=1e-5)  # rows still sum to one
    assert int((g[0] != 0).sum()) <= 256 * 16  # each token attends within its window only
    pm = operators.dense_merge((8, 8))
    np.testing.assert_allclose(pm.sum(1).numpy(), 1.0)
    assert (pm > 0).sum() == 256


# -- class specificity ---------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["vit", "swin"])
def test_class_specific_methods_differ_between_targets(which):
    model = make_vit(depth=3, seed=21) if which == "vit" else make_swin(seed=22)
    img = random_images(1, 32 if which == "vit" else 64, seed=8)
    cap = vl.capture(model, np.concatenate([img, img]), target=[0, 1])
    maps = vl.explain(cap, "all")
    maps["lnstat_nograd"] = vl.explain(cap, "lnstat", grad=False)
    for m in ("transformer_attribution", "generic_attention", "tokentm", "gradcam", "lnstat"):
        a, b = vl.normalize(maps[m]).values
        # random-initialised models have small gradients: the difference is small
        # but far above float noise (the class-agnostic maps below agree to 1e-5)
        assert np.abs(a - b).max() > 1e-4, m
    for m in ("attention", "rollout", "lnstat_nograd"):
        np.testing.assert_allclose(maps[m].values[0], maps[m].values[1], rtol=1e-5, err_msg=m)


# -- cross-check with pytorch-grad-cam ---------------------------------------------------------
@pytest.mark.parametrize("which", ["vit", "swin"])
def test_gradcam_on_features_matches_the_grad_cam_package(which):
    """pytorch-grad-cam on the same layer: ViT last block's norm1, Swin's final norm."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    model = make_vit(depth=3, seed=31) if which == "vit" else make_swin(seed=32)
    size = 32 if which == "vit" else 64
    imgs = random_images(3, size, seed=9)
    cap = vl.capture(model, imgs, target=[0, 1, 2])
    ours = vl.explain(cap, "gradcam", on="features")

    if which == "vit":
        layer = model.blocks[-1].norm1

        def reshape(t):
            return t[:, 1:].reshape(t.shape[0], 4, 4, t.shape[-1]).permute(0, 3, 1, 2)
    else:
        layer = model.norm

        def reshape(t):
            return t.permute(0, 3, 1, 2)
    x = torch.from_numpy((imgs - 0.5) / 0.5).permute(0, 3, 1, 2).float()
    with GradCAM(model=model, target_layers=[layer], reshape_transform=reshape) as cam:
        theirs = cam(input_tensor=x, targets=[ClassifierOutputTarget(c) for c in (0, 1, 2)])
    if which == "vit":  # same grid, same bilinear upsampling: compare in pixels
        ours_px = vl.normalize(vl.to_pixels(ours)).values
        pairs = [(ours_px[i], theirs[i]) for i in range(3)]
    else:  # ours lives on the 16×16 first-stage grid: compare there (theirs pooled to it)
        pooled = theirs.reshape(3, 16, 4, 16, 4).mean((2, 4))
        pairs = [(ours.values[i], pooled[i]) for i in range(3)]
    for a, b in pairs:
        assert b.std() > 0
        assert corr(a, b) > 0.99, corr(a, b)


# -- options, variants, errors ---------------------------------------------------------------
def test_options_are_recorded_and_selections_apply(vit_cap):
    m = vl.explain(vit_cap, "rollout", heads=[0, 2], layers=range(0, 3), per_layer=True)
    assert m.dims == ("sample", "layer", "y", "x") and m.layer.values.tolist() == [0, 1, 2]
    assert m.attrs["heads"] == [0, 2] and m.attrs["layers"] == [0, 1, 2] and m.attrs["method"] == "rollout"
    assert not np.allclose(m.isel(layer=-1).values, vl.explain(vit_cap, "rollout", layers=[0, 1, 2]).values * 0 + 1)
    np.testing.assert_allclose(m.isel(layer=-1).values, vl.explain(vit_cap, "rollout", heads=[0, 2], layers=[0, 1, 2]).values)
    per_head = vl.explain(vit_cap, "attention", heads={3: [1]})
    np.testing.assert_allclose(
        per_head.values[0].ravel(), vit_cap["stage0"].attention.values[0, 3, 1, 0, 1:], rtol=1e-6
    )
    for stat in ("std", "mean", "var", "norm"):
        for fusion in ("mean", "max", "entropy"):
            out = vl.explain(vit_cap, "lnstat", stat=stat, head_fusion=fusion, stat_norm="minmax")
            assert np.isfinite(out.values).all() and out.attrs["stat"] == stat
    assert vl.explain(vit_cap, "tokentm", necc="softmax", grad=False).attrs["grad"] == "false"
    assert vl.explain(vit_cap, "transformer_attribution", start_layer=0).attrs["start_layer"] == 0


def test_statistic_maps_are_the_normalised_ln_std(vit_cap, swin_cap):
    s = vl.methods.statistic_maps(vit_cap)
    std = vit_cap["stage0"].ln_std.sel(norm="norm1").values[:, :, 1:]
    np.testing.assert_allclose(s.values.reshape(3, 4, -1), std / std.max(-1, keepdims=True), rtol=1e-5)
    assert vl.methods.statistic_maps(swin_cap).shape == (2, 4, 16, 16)


@pytest.mark.parametrize("fixture", ["deit_distilled", "vit_registers", "vit_avg"])
def test_every_method_runs_on_vit_variants(fixture, request, images32):
    model = request.getfixturevalue(fixture)
    cap = vl.capture(model, images32)
    maps = vl.explain(cap, "all", per_layer=False)  # average-pooled too: gradcam takes its registry default
    for m in maps.data_vars:
        assert maps[m].shape == (3, 4, 4) and np.isfinite(maps[m].values).all(), m
    if fixture == "vit_avg":
        assert maps["gradcam"].attrs["on"] == "features"
        # heads as channels under an average read-out: the mean of the query rows
        st = cap["stage0"]
        a, g = (st[v].values[:, -1].astype(np.float64).mean(2) for v in ("attention", "attention_grad"))  # (B, H, N)
        pre = (g.mean(-1, keepdims=True) * a).mean(1).reshape(3, 4, 4)  # before the ReLU
        got = vl.explain(cap, "gradcam", on="attention").values
        np.testing.assert_allclose(got, np.maximum(pre, 0), rtol=1e-5, atol=1e-7)
        # the other sign of the gradient shows the other half (a random model's map can be all ≤ 0)
        flipped = _with(cap, "stage0", "attention_grad", -st.attention_grad.values)
        np.testing.assert_allclose(vl.explain(flipped, "gradcam", on="attention").values, np.maximum(-pre, 0),
                                   rtol=1e-5, atol=1e-7)
        assert np.abs(pre).max() > 0


def test_bad_method_options_are_refused(vit_cap):
    with pytest.raises(vl.OptionError, match="rollout"):
        vl.explain(vit_cap, "rollot")
    with pytest.raises(vl.OptionError, match="no option"):
        vl.explain(vit_cap, "rollout", stat="std")
    with pytest.raises(vl.OptionError, match="out of range"):
        vl.explain(vit_cap, "rollout", heads=[7])
    with pytest.raises(vl.OptionError, match="at least one head"):
        vl.explain(vit_cap, "rollout", heads=[])
    with pytest.raises(vl.OptionError, match="not in this capture"):
        vl.explain(vit_cap, "rollout", layers=[9])
    with pytest.raises(vl.OptionError, match="no layer left"):
        vl.explain(vit_cap, "rollout", layers=[0], start_layer=1)
    with pytest.raises(vl.OptionError, match="stat"):
        vl.explain(vit_cap, "lnstat", stat="kurtosis")
    with pytest.raises(vl.CaptureFormatError, match="grads=True"):
        vl.explain(vl.capture(make_vit(), random_images(1, 32), grads=False), "generic_attention")
    with pytest.raises(vl.CaptureFormatError):
        vl.explain(xr.DataTree(), "rollout")


def test_methods_never_rerun_the_model(vit_cap, monkeypatch):
    import timm.models.vision_transformer as vt

    def forbidden(*a, **k):
        raise AssertionError("the model ran")

    monkeypatch.setattr(vt.VisionTransformer, "forward", forbidden)
    vl.explain(vit_cap, "all", per_layer=True)


def test_to_pixels_and_normalize(vit_cap):
    m = vl.explain(vit_cap, "rollout")
    px = vl.to_pixels(m)
    assert px.shape == (3, 32, 32) and px.attrs["method"] == "rollout"
    n = vl.normalize(px)
    np.testing.assert_allclose(n.min(("y", "x")).values, 0)
    np.testing.assert_allclose(n.max(("y", "x")).values, 1)
    # bilinear upsampling of a constant map stays constant; of a map keeps its mean roughly
    assert abs(float(px.mean()) - float(m.mean())) < 0.05 * float(m.mean())
    per = vl.normalize(vl.to_pixels(vl.explain(vit_cap, "rollout", per_layer=True), 16))
    assert per.dims == ("sample", "layer", "y", "x") and per.shape[-1] == 16


def test_maps_round_trip_through_saved_captures(vit_cap, tmp_path):
    back = vl.open(vl.save(vit_cap, tmp_path / "c.nc"))
    xr.testing.assert_allclose(vl.explain(back, "all"), vl.explain(vit_cap, "all"))


# -- Swin merges and per-stage maps ---------------------------------------------------------
def test_lrp_merge_shares_split_each_merged_token_among_its_parents(swin_cap):
    share = swin_cap["stage0"].merge_share
    assert share.dims == ("sample", "token") and share.sizes["token"] == 256
    per_child = share.values.reshape(2, 8, 2, 8, 2).sum((2, 4))  # four parents of each stage-1 token
    np.testing.assert_allclose(per_child, 1.0, atol=1e-4)
    assert "merge_share" not in swin_cap["stage1"]  # the last stage merges into nothing


@pytest.mark.parametrize("method", ["rollout", "transformer_attribution", "tokentm"])
def test_merge_rule_is_switchable_and_dense_path_agrees(swin_cap, method, monkeypatch):
    uniform = vl.explain(swin_cap, method)
    lrp_merge = vl.explain(swin_cap, method, merge="lrp")
    assert lrp_merge.attrs["merge"] == "lrp" and uniform.attrs["merge"] == "uniform"
    assert not np.allclose(uniform.values, lrp_merge.values, rtol=1e-3, atol=0)  # maps can be ~1e-10 (drop)
    from vitlens.methods import maps, operators

    monkeypatch.setattr(maps, "propagate", operators.propagate_dense)
    np.testing.assert_allclose(vl.explain(swin_cap, method, merge="lrp").values, lrp_merge.values, rtol=1e-5,
                               atol=1e-6 * float(abs(lrp_merge).max()))
    with pytest.raises(vl.OptionError, match="merge"):
        vl.explain(swin_cap, method, merge="nearest")


def test_by_stage_gives_each_stages_map_on_its_grid(swin_cap, vit_cap):
    stages = vl.explain(swin_cap, "rollout", by_stage=True)
    assert set(stages.data_vars) == {"stage0", "stage1"}
    assert stages.stage0.shape == (2, 16, 16) and stages.stage1.shape == (2, 8, 8)
    np.testing.assert_allclose(stages.stage0.values, vl.explain(swin_cap, "rollout").values, rtol=1e-6)
    # with no stage-0 block selected, the stage-0 map is the stage-1 map split 1/4 to each parent
    only_stage1 = vl.explain(swin_cap, "rollout", layers=[2, 3], by_stage=True)
    spread = np.repeat(np.repeat(only_stage1.stage1.values, 2, 1), 2, 2) / 4
    np.testing.assert_allclose(only_stage1.stage0.values, spread, rtol=1e-6)
    assert set(vl.explain(vit_cap, "tokentm", by_stage=True).data_vars) == {"stage0"}
    with pytest.raises(vl.OptionError, match="per_layer"):
        vl.explain(swin_cap, "rollout", by_stage=True, per_layer=True)


def test_lnstat_with_a_signed_statistic_stays_bounded(vit_cap):
    out = vl.explain(vit_cap, "lnstat", stat="mean")
    assert np.isfinite(out.values).all() and float(abs(out).max()) <= 1.0 + 1e-5


# -- average read-out: float64 products and the identity path ------------------------------------
def _avg_readout_reference(cap, method):
    """Independent float64 numpy map of generic_attention / transformer_attribution (dense, any stage layout)."""
    stages = [cap[n] for n in sorted(cap.children, key=lambda n: int(n.removeprefix("stage")))]
    b = cap["sample"].size
    out = []
    for i in range(b):
        r = None
        for s, st in reversed(list(enumerate(stages))):
            p = int(st.attrs["num_prefix_tokens"])
            gh, gw = (int(g) for g in st.attrs["grid"])
            n = p + gh * gw
            if r is None:
                r = np.zeros(n)
                r[p:] = 1.0 / (gh * gw)
            second = st.attention_relevance if method == "transformer_attribution" else st.attention
            for j in reversed(range(st.layer.size)):
                if method == "transformer_attribution" and int(st.layer.values[j]) < 1:
                    continue
                x = np.clip(st.attention_grad.values[i, j].astype(np.float64) * second.values[i, j], 0, None).mean(0)
                if "window_token" in st:
                    wt = st.window_token.values[j]
                    g = np.zeros((n, n))
                    for w in range(wt.shape[0]):
                        g[np.ix_(wt[w], wt[w])] = x[w]
                else:
                    g = x
                r = r + r @ g
            if s > 0:  # down the patch merging: 1/4 of each merged token to each of its four parents
                ph, pw = (int(v) for v in stages[s - 1].attrs["grid"])
                r = np.repeat(np.repeat(r[p:].reshape(gh, gw), 2, 0), 2, 1).reshape(-1) / 4
        out.append(r[int(stages[0].attrs["num_prefix_tokens"]) :])
    return np.stack(out)


@pytest.fixture(scope="module")
def avg_pair():
    """Two targets on the same images, for an average-pooled ViT and a Swin (random init)."""
    out = {}
    for which, model, size in (("vit_avg", make_vit(global_pool="avg", class_token=False, seed=3, depth=4), 32),
                               ("swin", make_swin(seed=12), 64)):
        pics = random_images(2, size, seed=5)
        out[which] = (vl.capture(model, pics, target=0), vl.capture(model, pics, target=1))
    return out


@pytest.mark.parametrize("which", ["vit_avg", "swin"])
@pytest.mark.parametrize("method", ["transformer_attribution", "generic_attention"])
def test_class_specific_part_under_average_readout_is_exact(avg_pair, which, method):
    # the difference between two targets' maps is the class-specific part: ~1e-7..1e-4 of the
    # uniform 1/N row on random-init models; float32 products get it wrong by up to ~100 %
    a, b = avg_pair[which]
    got = vl.explain(a, method, identity_path="keep").values - vl.explain(b, method, identity_path="keep").values
    want = _avg_readout_reference(a, method) - _avg_readout_reference(b, method)
    assert vl.explain(a, method, identity_path="keep").dtype == np.float64
    # tolerance: the per-block operators themselves are float32 products (relative error ~1e-7)
    np.testing.assert_allclose(got.reshape(want.shape), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    assert np.abs(want).max() > 0


@pytest.mark.parametrize("which", ["vit_avg", "swin"])
@pytest.mark.parametrize("method", ["transformer_attribution", "generic_attention"])
def test_float32_products_lose_what_float64_keeps(avg_pair, which, method, monkeypatch):
    # shrink the gradient (as a model with tiny gradients, e.g. random-init Swin-T): in float32
    # the two targets then give the very same map, in float64 (the default) they do not
    from vitlens.methods import operators

    a, b = avg_pair[which]
    small = []
    for cap in (a, b):
        for stage in cap.children:
            cap = _with(cap, stage, "attention_grad", cap[stage].attention_grad.values * 1e-5)
        small.append(cap)
    ma, mb = (vl.explain(c, method, identity_path="keep").values for c in small)
    assert not np.array_equal(ma, mb)
    monkeypatch.setattr(operators, "ACCUMULATE", torch.float32)
    ma32, mb32 = (vl.explain(c, method, identity_path="keep").values for c in small)
    assert np.array_equal(ma32, mb32)


@pytest.mark.slow
def test_random_init_swin_t_two_targets_differ():
    # the case: full-size random-init Swin-T, where float32 gave one map for both targets
    import timm

    torch.manual_seed(0)
    model = timm.create_model("swin_tiny_patch4_window7_224", num_classes=10).eval()
    pics = random_images(1, 224, seed=5)
    a, b = vl.capture(model, pics, target=0), vl.capture(model, pics, target=1)
    ma, mb = (vl.explain(c, "transformer_attribution", identity_path="keep").values for c in (a, b))
    assert not np.array_equal(ma, mb)
    da, db = (vl.explain(c, "transformer_attribution", identity_path="drop").values for c in (a, b))
    np.testing.assert_allclose(ma - mb, da - db, rtol=1e-6, atol=1e-12)  # drop removes a class-free part only


@pytest.mark.parametrize("method", ["transformer_attribution", "generic_attention"])
def test_identity_path_drop_removes_the_readout_row(avg_pair, vit_cap, swin_cap, method):
    a, _ = avg_pair["vit_avg"]
    keep, drop = vl.explain(a, method, identity_path="keep"), vl.explain(a, method, identity_path="drop")
    assert keep.attrs["identity_path"] == "keep" and drop.attrs["identity_path"] == "drop"
    np.testing.assert_allclose(drop.values, keep.values - 1 / 16, rtol=1e-9, atol=1e-15)
    assert (drop.values >= -1e-15).all()
    # Swin: the uniform 1/64 of the last stage, split 1/4 to each parent
    keep, drop = (vl.explain(swin_cap, method, identity_path=p).values for p in ("keep", "drop"))
    np.testing.assert_allclose(drop, keep - 1 / 256, rtol=1e-9, atol=1e-15)
    # CLS read-out: the identity path ends on the CLS token, which the map excludes
    np.testing.assert_array_equal(vl.explain(vit_cap, method, identity_path="drop").values,
                                  vl.explain(vit_cap, method, identity_path="keep").values)
    per = vl.explain(a, method, identity_path="drop", per_layer=True)
    np.testing.assert_allclose(per.values[:, -1], drop_values := vl.explain(a, method, identity_path="drop").values)
    stages = vl.explain(swin_cap, method, identity_path="drop", by_stage=True)
    np.testing.assert_allclose(stages.stage0.values, vl.explain(swin_cap, method, identity_path="drop").values)
    with pytest.raises(vl.OptionError, match="identity_path"):
        vl.explain(a, method, identity_path="both")


# -- the off-identity part at any scale of relevance (#30.2) -------------------------------------
def _first_order_reference(cap, method):
    """``r·Σ_l Ē_l`` carried down the merges (numpy, float64): the off-identity part of
    ``Π(I + Ē_l)`` to first order in ``Ē``, which is all of it when ``Ē`` is tiny."""
    stages = [cap[n] for n in sorted(cap.children, key=lambda n: int(n.removeprefix("stage")))]
    out = []
    for i in range(cap["sample"].size):
        r = d = None
        for s, st in reversed(list(enumerate(stages))):
            p = int(st.attrs["num_prefix_tokens"])
            gh, gw = (int(g) for g in st.attrs["grid"])
            n = p + gh * gw
            if r is None:  # the read-out row (average of the patches) and the part that crossed an attention
                r, d = np.zeros(n), np.zeros(n)
                r[p:] = 1.0 / (gh * gw)
            second = st.attention_relevance if method == "transformer_attribution" else st.attention
            for j in range(st.layer.size):
                if method == "transformer_attribution" and int(st.layer.values[j]) < 1:
                    continue
                x = np.clip(st.attention_grad.values[i, j].astype(np.float64) * second.values[i, j], 0, None).mean(0)
                if "window_token" in st:
                    wt = st.window_token.values[j]
                    for w in range(wt.shape[0]):
                        d[wt[w]] += r[wt[w]] @ x[w]
                else:
                    d = d + r @ x
            if s > 0:
                r, d = (np.repeat(np.repeat(v[p:].reshape(gh, gw), 2, 0), 2, 1).reshape(-1) / 4 for v in (r, d))
        out.append(d[int(stages[0].attrs["num_prefix_tokens"]) :])
    return np.stack(out)


@pytest.mark.parametrize("which", ["vit_avg", "swin"])
@pytest.mark.parametrize("method", ["transformer_attribution", "generic_attention"])
def test_off_identity_part_keeps_relevance_of_any_scale(avg_pair, which, method):
    # gradients ×1e-20: Ē sits ~1e-24 below the uniform read-out row, below float64's
    # resolution of it; the off-identity part is computed directly, so it is all there
    # (the map / scale equals the first-order sum; second-order terms are 1e-20 smaller)
    cap, _ = avg_pair[which]
    scale = 1e-20
    for stage in cap.children:
        cap = _with(cap, stage, "attention_grad", cap[stage].attention_grad.values * scale)
    got = vl.explain(cap, method, identity_path="drop").values
    want = _first_order_reference(cap, method)
    assert np.abs(want).max() > 0
    np.testing.assert_allclose(got.reshape(want.shape) / scale, want / scale, rtol=1e-5,
                               atol=1e-6 * np.abs(want).max() / scale)
    # with every head: the same off-identity part per layer as at the top of the chain
    per = vl.explain(cap, method, identity_path="drop", per_layer=True).values
    np.testing.assert_array_equal(per[:, -1], got)


@pytest.mark.slow
def test_transformer_attribution_on_a_random_init_average_pooled_vit_is_not_zero():
    # the case: vit_medium_patch16_gap_256 at random init, where relevance × gradient
    # terms of ~1e-18 vanished next to the identity and the map was exactly 0 for every target
    import timm

    torch.manual_seed(0)
    model = timm.create_model("vit_medium_patch16_gap_256", pretrained=False, depth=3).eval()
    pics = random_images(1, 256, seed=3)
    caps = [vl.capture(model, pics, target=t) for t in (1, 2)]
    maps = [vl.explain(c, "transformer_attribution") for c in caps]
    assert maps[0].attrs["identity_path"] == "drop"
    assert np.abs(maps[0].values).max() > 0 and not np.array_equal(maps[0].values, maps[1].values)
    for cap, m in zip(caps, maps):
        want = _first_order_reference(cap, "transformer_attribution")
        np.testing.assert_allclose(m.values.reshape(want.shape), want, rtol=1e-5, atol=1e-6 * np.abs(want).max())
    for method in ("generic_attention", "lnstat", "tokentm"):  # every chain tells the two targets apart
        a, b = (vl.explain(c, method) for c in caps)
        assert not np.array_equal(a.values, b.values), method


@pytest.mark.slow
def test_a_tiny_scaled_trained_vit_keeps_its_transformer_attribution():
    # the shipped vit-shapes, read out by average (under its CLS read-out no identity term
    # meets a patch), with its head scaled by 1e-12: gradients shrink by 1e-12, LRP relevance
    # does not (the αβ rule is scale-free); the map shrinks with them and keeps its shape
    import copy

    model = copy.deepcopy(vl.load_model("vit-shapes"))
    model.global_pool = "avg"
    with torch.no_grad():
        model.head.weight.mul_(1e-12)
        model.head.bias.mul_(1e-12)
    pics = vl.datasets.shapes(n=2, seed=7).image.values
    cap = vl.capture(model, pics)
    assert cap.attrs["readout"] == "avg"
    for method in ("transformer_attribution", "generic_attention"):
        got = vl.explain(cap, method)
        want = _first_order_reference(cap, method)
        assert np.abs(want).max() > 0
        np.testing.assert_allclose(got.values.reshape(want.shape) / 1e-12, want / 1e-12, rtol=1e-4,
                                   atol=1e-5 * np.abs(want).max() / 1e-12)


@pytest.mark.parametrize("family", ["vit", "swin"])
def test_no_method_writes_into_the_capture(request, family):
    """Methods read the capture's arrays without copying them (torch views of the numpy
    data) and clamp their own temporaries in place; the capture stays exactly as it was,
    for every method, with all heads and with a subset."""
    from conftest import random_images

    model = request.getfixturevalue(family)
    cap = vl.capture(model, random_images(2, 32 if family == "vit" else 64), progress=False)
    before = {(node.path, k): v.values.copy() for node in cap.subtree for k, v in node.dataset.data_vars.items()}
    for method in vl.methods.explainable_methods(cap):
        vl.explain(cap, method)
        if method != "gradcam":  # (Grad-CAM reads features, not heads)
            vl.explain(cap, method, heads=[0])
    for (path, k), v in before.items():
        np.testing.assert_array_equal(cap[path][k].values, v, err_msg=f"{path}/{k}")


@pytest.mark.slow
def test_gradcam_default_points_at_the_object_more_often_than_the_old_default_on_swin_shapes():
    # #30.3: Grad-CAM on the final norm's feature map (the old default under an average read-out)
    # pointed off the object on the shipped swin-shapes; the heads-as-channels form (the default
    # now, chosen in benchmarks/gradcam_layers.py, docs/METHODS.md §3) points at it
    from vitlens.metrics import segmentation_counts

    ds = vl.datasets.shapes(12, seed=31337, objects=1)  # held out: no training, test or demo seed
    cap = vl.capture(vl.load_model("swin-shapes"), ds.image, target=ds.label.values[:, 0],
                     keep=("attention", "attention_grad", "features"))
    masks = ds.mask.values[:, 0]
    new = vl.explain(cap, "gradcam")
    assert new.attrs["on"] == "attention"
    pointing = {on: float(segmentation_counts(vl.explain(cap, "gradcam", on=on), masks).pointing.mean())
                for on in ("attention", "features")}
    assert pointing["attention"] > pointing["features"] + 0.2, pointing
    np.testing.assert_array_equal(new.values, vl.explain(cap, "gradcam", on="attention").values)
