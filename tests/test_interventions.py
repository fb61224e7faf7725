"""Interventions: head ablation, activation patching and head importance (issue #28).

The reference for an ablation is a forward written here from the model's own
modules: the attention module of the ablated block is replaced, in a copy of the
model, by an explicit attention (no fused kernel) that sets the head's slice of
its output to zero before the output projection — for timm's ViT, Swin (windows,
shifted windows, two stages), EVA02 (rotary embedding) and transformers' ViT.
"""

from __future__ import annotations

import copy
import json
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import vitlens as vl
from vitlens.capture import api
from vitlens.capture.interventions import importance_of
from vitlens.errors import CaptureFormatError, OptionError
from vitlens.models import adapter_for

from conftest import make_swin, make_vit, random_images
from family_checks import model_state


def _pixels(model, images):
    from vitlens.capture.images import prepare

    return prepare(images, adapter_for(model)).pixels


def _zeroed(o: torch.Tensor, heads, hd: int, value: torch.Tensor | None = None) -> torch.Tensor:
    """``o`` (B[·nW], N, C) with the heads' channels set to 0, or to ``value`` (nW, N, C) in every image."""
    o = o.clone()
    for h in heads:
        c = slice(h * hd, (h + 1) * hd)
        if value is None:
            o[..., c] = 0
        else:
            nw = value.shape[0]
            o.view(-1, nw, *o.shape[1:])[..., c] = value[..., c]
    return o


# -- explicit attentions with heads zeroed, written from each family's own modules --------------------------
def _vit_attention(heads, value=None):
    def forward(self, x, attn_mask=None, is_causal=False):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k = self.q_norm(q), self.k_norm(k)
        a = ((q * self.scale) @ k.transpose(-2, -1)).softmax(-1)
        o = (a @ v).transpose(1, 2).reshape(b, n, -1)
        return self.proj(_zeroed(self.norm(o), heads, self.head_dim, value))

    return forward


def _swin_attention(heads, value=None):
    def forward(self, x, mask=None):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        z = (q * self.scale) @ k.transpose(-2, -1) + self._get_rel_pos_bias()
        if mask is not None:  # the shifted block's mask, one per window
            nw = mask.shape[0]
            z = (z.view(-1, nw, self.num_heads, n, n) + mask[None, :, None]).view(-1, self.num_heads, n, n)
        o = (z.softmax(-1) @ v).transpose(1, 2).reshape(b, n, -1)
        return self.proj(_zeroed(o, heads, c // self.num_heads, value))  # every window's row: the head everywhere

    return forward


def _eva_attention(heads):
    from timm.layers import apply_rot_embed_cat

    def forward(self, x, rope=None, attn_mask=None, is_causal=False):
        b, n, c = x.shape
        bias = torch.cat((self.q_bias, self.k_bias, self.v_bias)) if self.q_bias is not None else None
        q, k, v = F.linear(x, self.qkv.weight, bias).reshape(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k = self.q_norm(q), self.k_norm(k)
        p = self.num_prefix_tokens
        q = torch.cat([q[:, :, :p], apply_rot_embed_cat(q[:, :, p:], rope)], 2)
        k = torch.cat([k[:, :, :p], apply_rot_embed_cat(k[:, :, p:], rope)], 2)
        a = ((q * self.scale) @ k.transpose(-2, -1)).softmax(-1)
        o = self.norm((a @ v).transpose(1, 2).reshape(b, n, c))
        return self.proj(_zeroed(o, heads, c // self.num_heads))

    return forward


def _hf_vit_attention(heads):
    def forward(self, hidden_states, attention_mask=None, **kwargs):
        shape = (*hidden_states.shape[:-1], -1, self.head_dim)
        q, k, v = (p(hidden_states).view(shape).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        a = ((q * self.scaling) @ k.transpose(-2, -1)).softmax(-1)
        o = (a @ v).transpose(1, 2).reshape(*hidden_states.shape[:-1], -1)
        return self.o_proj(_zeroed(o, heads, self.head_dim)), a

    return forward


def _eva():
    import timm

    torch.manual_seed(0)
    model = timm.create_model("eva02_tiny_patch14_224", num_classes=3, depth=2, img_size=56).eval()
    with torch.no_grad():  # q/v biases start at 0 in timm, the head near 0: give them values
        for b in model.blocks:
            b.attn.q_bias.normal_()
            b.attn.v_bias.normal_()
            b.attn.qkv.weight.normal_(0, 0.1)
        model.head.weight.normal_(0, 0.5)
    return model


def _hf_vit():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                                 patch_size=8, num_labels=4, intermediate_size=64, hidden_dropout_prob=0.0,
                                 attention_probs_dropout_prob=0.0)
    model = transformers.ViTForImageClassification(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0, 0.3 if p.ndim >= 2 else 0.1)
    model.vitlens_image_processor = transformers.ViTImageProcessor(
        size={"height": 32, "width": 32}, image_mean=[0.4, 0.5, 0.6], image_std=[0.2, 0.25, 0.3])
    return model


def _attention_module(family, model, layer):
    if family == "hf_vit":
        return model.vit.layers[layer].attention
    if family == "swin":
        return [b for s in model.layers for b in s.blocks][layer].attn
    return model.blocks[layer].attn


FAMILIES = {
    # family: (model, input size, {block: heads} ablated, explicit attention)
    "vit": (make_vit, 32, {1: [0, 2]}, _vit_attention),
    "swin": (make_swin, 64, {1: [1], 2: [0, 3]}, _swin_attention),  # block 1: shifted windows; 2: stage 1
    "eva02": (_eva, 56, {1: [1]}, _eva_attention),
    "hf_vit": (_hf_vit, 32, {0: [2], 1: [0]}, _hf_vit_attention),
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_zero_ablation_equals_a_forward_with_the_heads_slice_zeroed(family):
    make, size, ablate, explicit = FAMILIES[family]
    model = make()
    x = _pixels(model, random_images(2, size))
    cap = vl.capture(model, x, ablate=ablate)
    reference = copy.deepcopy(model)
    for layer, heads in ablate.items():
        attn = _attention_module(family, reference, layer)
        attn.forward = types.MethodType(explicit(heads), attn)
    with torch.no_grad():
        out = reference(x)
        want = (out.logits if hasattr(out, "logits") else out).numpy()
        clean = vl.capture(model, x, grads=False)["logits"].values
    np.testing.assert_allclose(cap["logits"].values, want, rtol=1e-5, atol=1e-5)
    assert np.abs(want - clean).max() > 1e-3  # the heads matter: the check can fail
    assert json.loads(cap.attrs["intervention"]) == {
        "kind": "ablate", "ablation": "zero", "heads": {str(l): h for l, h in ablate.items()}}


@pytest.mark.parametrize("family", ["vit", "swin"])
def test_mean_ablation_equals_a_forward_with_the_heads_slice_set_to_the_reference_mean(family):
    make, size, ablate, explicit = FAMILIES[family]
    model = make()
    x, reference = _pixels(model, random_images(2, size)), _pixels(model, random_images(3, size, seed=4))
    cap = vl.capture(model, x, ablate=ablate, ablation="mean", reference=random_images(3, size, seed=4))
    means = {}
    for layer in ablate:  # the projection's input over the reference images, by the model itself
        seen = []
        attn = _attention_module(family, model, layer)
        handle = attn.proj.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
        with torch.no_grad():
            model(reference)
        handle.remove()
        o = seen[0]
        means[layer] = o.reshape(3, -1, *o.shape[1:]).mean(0)  # (nW, N, C): per window and position
    copy_ = copy.deepcopy(model)
    for layer, heads in ablate.items():
        attn = _attention_module(family, copy_, layer)
        attn.forward = types.MethodType(explicit(heads, means[layer]), attn)
    with torch.no_grad():
        want = copy_(x).numpy()
    np.testing.assert_allclose(cap["logits"].values, want, rtol=1e-5, atol=1e-5)
    zero = vl.capture(model, x, ablate=ablate, grads=False)["logits"].values
    assert np.abs(zero - want).max() > 1e-3  # the mean is not zero: the check can fail


def test_ablating_every_head_of_a_block_removes_its_attention_branch():
    model = make_vit()
    with torch.no_grad():  # without the projection's bias the branch adds exactly its heads' terms
        model.blocks[1].attn.proj.bias.zero_()
    x = _pixels(model, random_images(2, 32))
    cap = vl.capture(model, x, ablate={1: "all"})
    without = copy.deepcopy(model)
    blk = without.blocks[1]
    blk.forward = types.MethodType(lambda self, t: t + self.ls2(self.mlp(self.norm2(t))), blk)
    with torch.no_grad():
        np.testing.assert_allclose(cap["logits"].values, without(x).numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("make,size,ablate", [(make_vit, 32, {2: [1]}), (make_swin, 64, {1: [0], 3: [2, 3]})])
def test_mean_ablation_with_a_one_image_reference_equals_patching_from_that_image(make, size, ablate):
    model = make()
    images, reference = random_images(2, size), random_images(1, size, seed=5)
    mean = vl.capture(model, images, ablate=ablate, ablation="mean", reference=reference)
    patched = vl.patch(model, images, reference, heads=ablate)
    np.testing.assert_array_equal(mean["logits"].values, patched["logits"].values)
    for method in ("transformer_attribution", "tokentm"):
        np.testing.assert_array_equal(vl.explain(mean, method).values, vl.explain(patched, method).values)
    # a capture of the reference (keep "head_output") is the same reference as its image
    ref_cap = vl.capture(model, reference, grads=False, keep=["head_output"])
    again = vl.capture(model, images, ablate=ablate, ablation="mean", reference=ref_cap)
    np.testing.assert_array_equal(mean["logits"].values, again["logits"].values)
    clean = vl.capture(model, images, grads=False)["logits"].values
    assert np.abs(clean - mean["logits"].values).max() > 1e-4


def test_mean_ablation_feeds_the_projection_the_reference_mean():
    model = make_swin()
    reference = random_images(3, 64, seed=3)
    ref = vl.capture(model, reference, grads=False, keep=["head_output"])
    cap = vl.capture(model, random_images(2, 64), ablate={3: [1]}, ablation="mean", reference=reference,
                     keep=["all", "head_output"])
    got = cap["stage1"].head_output.sel(layer=3)
    want = ref["stage1"].head_output.sel(layer=3).mean("sample")
    assert got.dims == ("sample", "head", "window", "query", "head_dim")
    np.testing.assert_allclose(got.sel(head=1).values, np.broadcast_to(want.sel(head=1).values, got.sel(head=1).shape),
                               rtol=1e-5, atol=1e-6)
    assert np.abs(got.sel(head=0).values - want.sel(head=0).values).max() > 1e-3  # other heads: their own


def test_patching_an_image_with_itself_changes_nothing(vit):
    """The forward is unchanged (patched activations are constants, so the gradients through them are not)."""
    image = random_images(1, 32)
    clean = vl.capture(vit, image)
    heads = vl.patch(vit, image, image, heads={0: "all", 1: [1], 2: "all"})
    tokens = vl.patch(vit, image, image, tokens=range(17), layer=1)
    for cap in (heads, tokens):
        np.testing.assert_allclose(cap["logits"].values, clean["logits"].values, rtol=1e-6, atol=1e-6)
        for var in ("attention", "ln_mean", "ln_std", "token_norm", "attn_out_norm", "block_out_norm"):
            np.testing.assert_allclose(cap["stage0"][var].values, clean["stage0"][var].values, rtol=1e-5,
                                       atol=1e-6, err_msg=var)
        for method in ("attention", "rollout"):  # class-agnostic: from the forward alone
            np.testing.assert_allclose(vl.explain(cap, method).values, vl.explain(clean, method).values,
                                       rtol=1e-5, atol=1e-7, err_msg=method)


@pytest.mark.parametrize("make,size", [(make_vit, 32), (make_swin, 64)])
def test_patching_every_token_at_the_first_block_gives_the_source_images_forward(make, size):
    model = make()
    images, source = random_images(2, size), random_images(2, size, seed=9)
    n = adapter_for(model).stages[0].num_tokens
    cap = vl.patch(model, images, source, tokens=range(n), layer=0)
    np.testing.assert_allclose(cap["logits"].values, vl.capture(model, source, grads=False)["logits"].values,
                               rtol=1e-5, atol=1e-6)
    some = vl.patch(model, images, source[:1], tokens=[(0, 0), (1, 2)], layer=1)  # one source for both
    stage = adapter_for(model).stages[0]
    assert json.loads(some.attrs["intervention"])["tokens"] == [stage.num_prefix, stage.num_prefix + stage.grid[1] + 2]
    assert not np.allclose(some["logits"].values, vl.capture(model, images, grads=False)["logits"].values)


def test_patched_tokens_take_no_gradient_and_no_relevance_back(vit):
    cap = vl.patch(vit, random_images(1, 32), random_images(1, 32, seed=2), tokens=range(17), layer=2)
    # every token entering block 2 is a constant: blocks 0-1 no longer reach the logit
    assert float(np.abs(cap["stage0"].attention_grad.sel(layer=[0, 1])).max()) == 0.0
    assert float(np.abs(cap["stage0"].attention_relevance.sel(layer=[0, 1])).max()) == 0.0
    assert float(np.abs(cap["stage0"].attention_grad.sel(layer=2)).max()) > 0


def test_an_ablated_head_gets_no_gradient_and_no_relevance():
    model = make_vit()
    for ablation, reference in (("zero", None), ("mean", random_images(2, 32, seed=4))):
        cap = vl.capture(model, random_images(2, 32), ablate={1: [2]}, ablation=ablation, reference=reference)
        st = cap["stage0"].sel(layer=1)
        assert float(np.abs(st.attention_grad.sel(head=2)).max()) == 0.0
        assert float(np.abs(st.attention_relevance.sel(head=2)).max()) == 0.0
        assert float(np.abs(st.attention_grad.sel(head=1)).max()) > 0
        np.testing.assert_allclose(st.attention.sum("key").values, 1.0, atol=1e-5)  # its attention is still there


@pytest.mark.slow
@pytest.mark.parametrize("make,size,ablate", [(make_vit, 32, {0: [1], 2: "all"}), (make_swin, 64, {1: [1], 2: [0, 3]})])
def test_an_ablated_capture_explains_with_every_method(make, size, ablate):
    model = make()
    for ablation in ("zero", "mean"):
        cap = vl.capture(model, random_images(2, size), ablate=ablate, ablation=ablation,
                         reference=random_images(2, size, seed=1) if ablation == "mean" else None,
                         keep=("all", *vl.methods.extra_groups()))  # AttnLRP's and LeGrad's passes too
        every = vl.explain(cap, "all")
        for method in vl.METHODS:
            assert np.isfinite(every[method].values).all(), method
        vl.Explorer(cap, model)  # the widgets read it as any capture


def test_the_model_is_restored_after_each_call_and_after_an_exception():
    model = make_vit()
    model.train()
    before = model_state(model)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    images = random_images(2, 32)
    vl.capture(model, images, ablate={1: [0]})
    vl.capture(model, images, ablate={1: [0]}, ablation="mean", reference=images)
    vl.patch(model, images, images[:1], heads={0: [1]})
    vl.patch(model, images, images[:1], tokens=[1], layer=2)
    vl.head_importance(model, images, ablation="mean", reference=images)
    assert model_state(model) == before
    calls = []

    def explode(module, inputs, output):
        calls.append(1)
        raise RuntimeError("boom")

    handle = model.blocks[2].register_forward_hook(explode)
    before = model_state(model)
    for run in (lambda: vl.capture(model, images, ablate={1: [0]}, ablation="mean", reference=images[:1]),
                lambda: vl.patch(model, images, images, tokens=[1], layer=1),
                lambda: vl.head_importance(model, images)):
        with pytest.raises(RuntimeError, match="boom"):
            run()
        assert model_state(model) == before
    assert len(calls) == 3
    handle.remove()
    for k, v in model.state_dict().items():
        assert torch.equal(v, weights[k]), k


@pytest.mark.parametrize("ablation", ["zero", "mean"])
@pytest.mark.parametrize("make,size", [(make_vit, 32), pytest.param(make_swin, 64, marks=pytest.mark.slow)])
def test_head_importance_equals_the_loop_of_single_ablations_exactly(make, size, ablation):
    model = make()
    images = random_images(3, size)
    reference = random_images(2, size, seed=7) if ablation == "mean" else None
    imp = vl.head_importance(model, images, ablation=ablation, reference=reference, batch_size=8)
    # head_importance's own forward runs the fused attention, as every capture with an intervention or an
    # ablation pass does; a plain grads=False capture would run the explicit path (the same logits to rounding)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(api, "EXPLICIT_WITHOUT_PASSES", False)
        clean = vl.capture(model, images, grads=False)
    rows = np.arange(3), clean["target"].values
    logit, p = clean["logits"].values[rows], torch.from_numpy(clean["logits"].values).softmax(-1).numpy()[rows]
    ad = adapter_for(model)
    assert imp["ablation_effect"].dims == ("sample", "layer", "head")
    for layer, part in enumerate(ad.parts):
        for head in range(imp.sizes["head"]):
            got = imp.sel(layer=layer, head=head)
            if head >= part.attn.num_heads:  # Swin: a stage with fewer heads
                assert np.isnan(got["ablation_effect"].values).all()
                continue
            one = vl.capture(model, images, target=clean["target"].values.tolist(), grads=False,
                             ablate={layer: [head]}, ablation=ablation, reference=reference)["logits"].values
            np.testing.assert_array_equal(got["ablation_effect"].values, (logit - one[rows]).astype(np.float32))
            q = torch.from_numpy(one).softmax(-1).numpy()[rows]
            np.testing.assert_array_equal(got["probability_drop"].values, (p - q).astype(np.float32))


def test_a_head_whose_output_weights_are_zero_has_importance_zero():
    model = make_vit()
    images = random_images(4, 32)
    copy_ = copy.deepcopy(model)
    with torch.no_grad():
        copy_.blocks[1].attn.proj.weight[:, 16:32] = 0  # head 1 of block 1 (head_dim 16) writes nothing
    imp = vl.head_importance(copy_, images)
    assert (imp["ablation_effect"].sel(layer=1, head=1).values == 0).all()
    assert (imp["probability_drop"].sel(layer=1, head=1).values == 0).all()
    assert (np.abs(imp["ablation_effect"].sel(layer=1, head=0).values) > 1e-4).all()
    # and in the model itself, that head's importance is exactly the change those weights make (sign and scale)
    target = vl.capture(model, images, grads=False)["target"].values
    own = vl.head_importance(model, images, target=target.tolist())
    rows = np.arange(4), target
    want = vl.capture(model, images, grads=False)["logits"].values[rows] - \
        vl.capture(copy_, images, grads=False, target=target.tolist())["logits"].values[rows]
    np.testing.assert_allclose(own["ablation_effect"].sel(layer=1, head=1).values, want, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_head_importance_streams_into_a_store(tmp_path):
    model = make_vit()
    images = random_images(5, 32)
    path = tmp_path / "imp.zarr"
    lazy = vl.head_importance(model, images, batch_size=2, store=path)
    here = vl.head_importance(model, images, batch_size=2)
    np.testing.assert_array_equal(lazy["ablation_effect"].values, here["ablation_effect"].values)
    np.testing.assert_array_equal(importance_of(vl.open(path))["probability_drop"].values,
                                  here["probability_drop"].values)
    with pytest.raises(vl.ResumeError):  # another ablation is another run
        vl.head_importance(model, images, batch_size=2, store=path, resume=True, ablation="mean", reference=images)


def test_ablation_effect_is_a_registered_head_statistic():
    from vitlens.registry import STAT_INFO, resolve_stats

    model = make_vit()
    images = random_images(2, 32)
    assert resolve_stats(["ablation_effect"]) == ["ablation_effect"]
    info = STAT_INFO["ablation_effect"]
    cap = vl.capture(model, images, keep=["all", "ablation_effect"])
    np.testing.assert_array_equal(info.function(cap).values, vl.head_importance(model, images)["ablation_effect"].values)
    with pytest.raises(CaptureFormatError, match="head_importance"):
        info.function(vl.capture(model, images))


def test_bad_interventions_are_refused_with_what_to_do(vit):
    images = random_images(1, 32)
    with pytest.raises(OptionError, match="blocks 0..2"):
        vl.capture(vit, images, ablate={3: [0]})
    with pytest.raises(OptionError, match="heads 0..2"):
        vl.capture(vit, images, ablate={0: [3]})
    with pytest.raises(OptionError, match="reference="):
        vl.capture(vit, images, ablate={0: [1]}, ablation="mean")
    with pytest.raises(OptionError, match="only read by"):
        vl.capture(vit, images, ablate={0: [1]}, reference=images)
    with pytest.raises(OptionError, match="choose from"):
        vl.capture(vit, images, ablate={0: [1]}, ablation="resample")
    with pytest.raises(CaptureFormatError, match="head_output"):
        vl.capture(vit, images, ablate={0: [1]}, ablation="mean", reference=vl.capture(vit, images))
    with pytest.raises(OptionError, match="one of the two"):
        vl.patch(vit, images, images, heads={0: [1]}, tokens=[0], layer=0)
    with pytest.raises(OptionError, match="layer="):
        vl.patch(vit, images, images, tokens=[0])
    with pytest.raises(OptionError, match="outside"):
        vl.patch(vit, images, images, tokens=[(4, 0)], layer=0)
    with pytest.raises(OptionError, match="one source for all"):
        vl.patch(vit, random_images(3, 32), random_images(2, 32), heads={0: [1]})


@pytest.mark.parametrize("ablation", ["zero", "mean"])
def test_an_ablated_capture_explained_for_another_class_is_ablated_too(ablation):
    model = make_swin()
    images = random_images(1, 64)
    reference = random_images(2, 64, seed=3) if ablation == "mean" else None
    cap = vl.capture(model, images, ablate={2: [1, 2]}, ablation=ablation, reference=reference)
    other = int(np.argsort(cap["logits"].values[0])[-2])
    ex = vl.Explorer(cap, model, method="generic_attention")
    ex.class_select.value = other
    want = vl.capture(model, images, target=other, ablate={2: [1, 2]}, ablation=ablation, reference=reference)
    np.testing.assert_array_equal(ex.classes.source(0, other)[0]["logits"].values, want["logits"].values)
    assert ex.classes.source(0, other)[0].attrs["intervention"] == cap.attrs["intervention"]


def _spread(model, seed=0):
    """Weights with some spread and biases with values (random inits leave attention near uniform)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
            elif name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
            elif "norm" in name:  # res-post-norm weights start at 0 (SwinV2): switch the branches on
                p.fill_(1.0)
    return model


def _family_model(kind):
    import timm

    torch.manual_seed(0)
    if kind == "beit":
        return _spread(timm.create_model("beit_base_patch16_224", num_classes=3, depth=2, img_size=32, patch_size=8,
                                         embed_dim=32, num_heads=4).eval()), 32
    if kind == "swinv2":
        return _spread(timm.create_model("swinv2_tiny_window8_256", img_size=64, window_size=4, depths=(2, 2),
                                         num_heads=(2, 4), embed_dim=24, num_classes=3).eval()), 64
    transformers = pytest.importorskip("transformers")
    if kind == "hf_beit":
        cfg = transformers.BeitConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                                      patch_size=8, num_labels=3, intermediate_size=64,
                                      use_relative_position_bias=True)
        model, size = transformers.BeitForImageClassification(cfg), 32
    else:
        cls = {"hf_swin": (transformers.SwinConfig, transformers.SwinForImageClassification),
               "hf_swinv2": (transformers.Swinv2Config, transformers.Swinv2ForImageClassification)}[kind]
        cfg = cls[0](image_size=64, patch_size=4, embed_dim=24, depths=[2, 2], num_heads=[2, 4], window_size=4,
                     num_labels=3)
        model, size = cls[1](cfg), 64
    model = _spread(model.eval())
    model.vitlens_image_processor = transformers.ViTImageProcessor(
        size={"height": size, "width": size}, image_mean=[0.5] * 3, image_std=[0.25] * 3)
    return model, size


@pytest.mark.parametrize("kind", ["beit", "swinv2", "hf_beit", "hf_swin", "hf_swinv2"])
def test_zero_ablation_equals_zeroing_the_heads_output_weights_in_every_family(kind):
    """A head ablated by the hook writes nothing to the residual stream, as if the columns of the output
    projection that read it were zero (BEiT, SwinV2 and transformers' BEiT, Swin and Swinv2)."""
    model, size = _family_model(kind)
    ad = adapter_for(model)
    ablate = {1: [1], len(ad.parts) - 1: [0, 3 % ad.parts[-1].attn.num_heads]}
    x = _pixels(model, random_images(2, size))
    cap = vl.capture(model, x, ablate=ablate, grads=False, keep=["attention"])
    zeroed = copy.deepcopy(model)
    parts = adapter_for(zeroed).parts
    with torch.no_grad():
        for layer, heads in ablate.items():
            for h in heads:
                parts[layer].attn.proj.weight[:, parts[layer].attn.head_channels(h)] = 0
    want = vl.capture(zeroed, x, grads=False, keep=["attention"])["logits"].values
    np.testing.assert_allclose(cap["logits"].values, want, rtol=1e-5, atol=1e-6)
    clean = vl.capture(model, x, grads=False, keep=["attention"])["logits"].values
    assert np.abs(clean - want).max() > 1e-3  # the heads matter: the check can fail
