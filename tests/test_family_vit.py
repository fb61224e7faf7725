"""timm VisionTransformer variants: every block and head a pretrained name uses.

Random-initialised, two blocks, 32 px inputs (the variants: ``family_models.VIT_VARIANTS``).
The contract every family keeps (parts reproduce the attention, gradients equal
autograd, LRP conservation, state restored, targets differ, geometry) is generated in
test_family_contract.py; here: captured attention against a recomputation from timm's
own q/k, the read-out pools, the LRP rules of pools and GLUs on hand-computed cases,
hybrid stems, dynamic input sizes and refusals.
"""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from family_checks import (
    assert_all_maps_finite,
    assert_attention_equals_by_hand,
    assert_receptive_field_centres,
    normalised,
)
from family_models import VIT_BASE as BASE
from family_models import VIT_VARIANTS as VARIANTS
from family_models import images as _family_images
from family_models import make_vit_variant as make
from timm.layers import SwiGLU

import vitlens as vl
from vitlens.methods.operators import readout_row, view
from vitlens.models import adapter_for


@pytest.fixture(scope="module", params=list(VARIANTS))
def variant(request):
    return request.param, make(request.param)


def _images(n=2, size=32, seed=0):
    return _family_images((size, size), n, seed)


def attention_by_hand(attn, h, kwargs):
    """timm Attention's probabilities, from its own modules (explicit path)."""
    b, n, _ = h.shape
    q, k, _ = attn.qkv(h).reshape(b, n, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(q), attn.k_norm(k)
    return ((q * attn.scale) @ k.transpose(-2, -1)).softmax(-1)


def test_attention_equals_recomputation_from_q_and_k(variant):
    name, model = variant
    assert_attention_equals_by_hand(model, _images(), attention_by_hand)


@pytest.mark.parametrize("name", ["avg", "avg_with_prefix", "map", "map_no_cls", "registers_no_embed_class"])
def test_readout_row_pools_exactly_the_tokens_the_model_pools(name):
    """The methods' read-out row is nonzero on the tokens whose final features reach the logits
    (autograd), and LRP gives relevance to those tokens only."""
    model = make(name)
    images = _images(1)
    cap = vl.capture(model, images)
    row = readout_row(view(cap), view(cap).stages[0])[0].numpy()
    out = {}
    hook = model.norm.register_forward_hook(lambda m, i, o: out.setdefault("x", o))
    logits = model(normalised(images, model))
    hook.remove()
    reach = torch.autograd.grad(logits[0, 0], out["x"])[0]
    reaches = reach[0].abs().sum(-1).numpy() > 0  # tokens whose final features reach the logit
    np.testing.assert_array_equal(row != 0, reaches)
    with torch.no_grad():
        r = adapter_for(model).head.relevance(out["x"].detach(), torch.eye(5)[[0]])[0].abs().sum(-1).numpy()
    assert np.all(r[~reaches] == 0) and np.all(r[reaches] > 0)
    if cap.attrs["readout"] == "avg_with_prefix":
        np.testing.assert_allclose(row, np.full_like(row, 1 / row.size), rtol=1e-6)


def test_pool_include_prefix_is_read_out_with_the_prefix():
    model = make("avg_with_prefix")
    assert adapter_for(model).readout == "avg_with_prefix"
    assert adapter_for(make("avg")).readout == "avg"


def test_attention_pool_weights_reproduce_the_pool_output():
    """The stored read-out weights are the pool's own attention: Σ_j a_j v_j → proj → MLP
    gives the pool's output."""
    model = make("map")
    images = _images(2)
    cap = vl.capture(model, images)
    w = torch.from_numpy(cap["stage0"].readout_weights.values)  # (B, N), mean over heads
    assert torch.allclose(w.sum(-1), torch.ones(2), atol=1e-5)
    pool = model.attn_pool
    assert pool.num_heads == 3
    feats = {}
    h = model.norm.register_forward_hook(lambda m, i, o: feats.setdefault("x", o.detach()))
    with torch.no_grad():
        model(normalised(images, model))
        h.remove()
        x = feats["x"][:, model.num_prefix_tokens:]
        b, n, c = x.shape
        q = pool.q(pool.latent.expand(b, -1, -1)).reshape(b, 1, pool.num_heads, -1).transpose(1, 2)
        k, v = pool.kv(x).reshape(b, n, 2, pool.num_heads, -1).permute(2, 0, 3, 1, 4)
        a = ((q * pool.scale) @ k.transpose(-2, -1)).softmax(-1)  # (B, heads, 1, N)
        o = pool.proj((a @ v).transpose(1, 2).reshape(b, 1, c))
        o = (o + pool.mlp(pool.norm(o)))[:, 0]
        np.testing.assert_allclose(o.numpy(), pool(x).numpy(), atol=1e-5)
        np.testing.assert_allclose(w[:, model.num_prefix_tokens:].numpy(), a.mean((1, 2)).numpy(), atol=1e-6)
        assert torch.all(w[:, : model.num_prefix_tokens] == 0)


def test_attention_pool_rule_on_a_hand_computed_case():
    """Pool over two 1-d tokens, one head, no MLP: o = a1·v1 + a2·v2 (a from q·k), y = o.

    With k = v = x (kv weights 1), latent query q = 1: a = softmax(x1, x2) (scale 1),
    and all of y's relevance goes to the values in proportion a_j·x_j / y."""
    from timm.layers import AttentionPoolLatent

    from vitlens.models.parts import Readout

    pool = AttentionPoolLatent(1, num_heads=1, mlp_ratio=1.0, qkv_bias=False).eval()
    pool.mlp = None
    with torch.no_grad():
        pool.latent.fill_(1.0)
        pool.q.weight.fill_(1.0)
        pool.kv.weight.copy_(torch.tensor([[1.0], [1.0]]))
        pool.proj.weight.fill_(1.0)
        pool.proj.bias.zero_()
    pool.scale = 1.0
    head = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        head.weight.fill_(1.0)
    x = torch.tensor([[[1.0], [2.0]]])
    a = torch.softmax(torch.tensor([1.0, 2.0]), 0)
    y = float(a[0] * 1 + a[1] * 2)
    want = torch.tensor([a[0] * 1 / y, a[1] * 2 / y])
    with torch.no_grad():
        r = Readout("map", head, pool=pool).relevance(x, torch.ones(1, 1))
    torch.testing.assert_close(r[0, :, 0], want)
    torch.testing.assert_close(float(r.sum()), 1.0)


def test_glu_product_rule_on_a_hand_computed_case():
    """SwiGLU with one hidden unit: h = silu(g)·u; each factor gets half of h's relevance,
    then αβ through the 1×1 maps to the input."""
    from vitlens.models.parts import LinearPart, MlpPart

    mlp = SwiGLU(1, 1, 1)
    with torch.no_grad():
        mlp.fc1_g.weight.fill_(2.0)
        mlp.fc1_x.weight.fill_(3.0)
        mlp.fc2.weight.fill_(1.0)
        for lin in (mlp.fc1_g, mlp.fc1_x, mlp.fc2):
            lin.bias.zero_()
    part = MlpPart(mlp, "swiglu", LinearPart(mlp.fc2), fc1_g=LinearPart(mlp.fc1_g), fc1_x=LinearPart(mlp.fc1_x))
    x = torch.tensor([[0.7]])
    with torch.no_grad():
        hidden = torch.nn.functional.silu(mlp.fc1_g(x)) * mlp.fc1_x(x)
        r = part.relevance(x, torch.tensor([[1.0]]), {"fc2": (hidden, mlp.fc2(hidden))})
    torch.testing.assert_close(r, torch.tensor([[1.0]]))  # half via the gate, half via the value
    from vitlens.models.lrp_rules import product_half

    ra, rb = product_half(torch.tensor([0.8, -0.2]))
    torch.testing.assert_close(ra + rb, torch.tensor([0.8, -0.2]))
    torch.testing.assert_close(ra, torch.tensor([0.4, -0.1]))


@pytest.mark.parametrize("name,stride", [
    ("vit_tiny_r_s16_p8_224", 32), pytest.param("vit_small_resnet26d_224", 32, marks=pytest.mark.slow),
    ("vit_base_mci_224", 16)])
def test_hybrid_token_centres_sit_on_their_receptive_fields(name, stride):
    """Hybrid stems: one token per 32 (or 16) pixels, not per patch of the CNN's feature map."""
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=3, depth=1, img_size=128).eval()
    assert adapter_for(model).stages[0].stride == (stride, stride)
    assert_receptive_field_centres(model, (128, 128))
    cap = vl.capture(model, _images(1, 128), grads=False)
    maps = vl.explain(cap, "rollout")
    assert vl.to_pixels(maps).shape == (1, 128, 128)


def test_dynamic_img_size_explains_at_another_input_size():
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", **{**BASE, "dynamic_img_size": True}).eval()
    cap, _, _ = assert_attention_equals_by_hand(model, torch.randn(2, 3, 48, 40), attention_by_hand)
    assert cap["stage0"].attrs["grid"] == [6, 5] and cap.attrs["input_size"] == [3, 48, 40]
    maps = assert_all_maps_finite(cap)
    assert vl.to_pixels(maps["rollout"]).shape == (2, 48, 40)
    with pytest.raises(vl.ImageError, match="multiple"):
        vl.capture(model, torch.randn(1, 3, 50, 40))
    fixed = timm.create_model("vit_tiny_patch16_224", **BASE).eval()
    with pytest.raises(vl.ImageError, match="32"):
        vl.capture(fixed, torch.randn(1, 3, 48, 40))


@pytest.mark.parametrize("kw,names", [
    (dict(global_pool="max", class_token=False), ["max"]),
    (dict(block_fn=__import__("timm").models.vision_transformer.ParallelScalingBlock), ["ParallelScalingBlock"]),
])
def test_refusals_name_the_block_or_head_and_never_suggest_changing_the_model(kw, names):
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", **{**BASE, **kw}).eval()
    with pytest.raises(vl.UnsupportedModelError) as err:
        vl.capture(model, _images(1))
    msg = str(err.value)
    for n in names:
        assert n in msg
    assert "global_pool='token'" not in msg and "Create the model" not in msg
