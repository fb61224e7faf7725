"""timm Eva: EVA02, DINOv3, vit_*_rope_*, PE-core — rotary q/k, split or fused q/k/v with
q/v biases, SwiGLU, inner attention norm, LayerScale gammas, registers, map pools.

Random-initialised timm registry configurations at depth 2 and 64 px inputs.
"""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from family_checks import (
    assert_all_maps_finite,
    assert_conserved,
    assert_geometry,
    assert_parts_describe_the_attention,
    assert_state_restored,
    assert_targets_differ,
    attention_grads_by_probe,
    attention_inputs,
    normalised,
    randomize_biases,
    stacked,
)

import vitlens as vl
from vitlens.models import adapter_for

NAMES = {
    "eva02_tiny_patch14_224": dict(img_size=56),  # rope, SwiGLU, fused qkv with q/v bias, inner norm
    "vit_small_patch16_dinov3": dict(img_size=64),  # AttentionRope, registers, LayerScale
    "vit_base_patch16_rope_reg1_gap_256": dict(img_size=64, embed_dim=96, num_heads=4),  # avg pool, registers
    "vit_pe_core_tiny_patch16_384": dict(img_size=64),  # attention-pool head
    "eva_giant_patch14_224": dict(img_size=56, embed_dim=64, num_heads=4),  # no rope, plain MLP
    "vit_medium_patch16_rope_reg1_gap_256": dict(img_size=64, embed_dim=96, num_heads=4),
}


def make(name: str) -> torch.nn.Module:
    torch.manual_seed(sum(map(ord, name)))
    return randomize_biases(timm.create_model(name, num_classes=5, depth=2, **NAMES[name]).eval())


@pytest.fixture(scope="module", params=list(NAMES))
def eva(request):
    model = make(request.param)
    return request.param, model, adapter_for(model).input_size


def _images(size, n=2, seed=0):
    return np.random.default_rng(seed).random((n, *size, 3)).astype(np.float32)


def eva_attention_by_hand(attn, h, kwargs, use_rope=True):
    """EVA attention probabilities from timm's modules: q/v bias, q/k norm, rotary on patch tokens."""
    from timm.layers import apply_rot_embed_cat

    b, n, _ = h.shape
    if attn.qkv is not None:
        bias = attn.qkv.bias
        if getattr(attn, "q_bias", None) is not None:
            bias = torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
        q, k, _ = F.linear(h, attn.qkv.weight, bias).reshape(b, n, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    else:
        q = attn.q_proj(h).reshape(b, n, attn.num_heads, -1).transpose(1, 2)
        k = attn.k_proj(h).reshape(b, n, attn.num_heads, -1).transpose(1, 2)
    q, k = attn.q_norm(q), attn.k_norm(k)
    rope = kwargs.get("rope")
    if rope is not None and use_rope:
        p, half = attn.num_prefix_tokens, getattr(attn, "rotate_half", False)
        q = torch.cat([q[:, :, :p], apply_rot_embed_cat(q[:, :, p:], rope, half=half)], 2)
        k = torch.cat([k[:, :, :p], apply_rot_embed_cat(k[:, :, p:], rope, half=half)], 2)
    return ((q * attn.scale) @ k.transpose(-2, -1)).softmax(-1)


def test_attention_equals_recomputation_with_rotary(eva):
    name, model, size = eva
    images = _images(size)
    cap = vl.capture(model, images)
    x = normalised(images, model)
    inputs = attention_inputs(model, x, [b.attn for b in model.blocks])
    with torch.no_grad():
        want = [eva_attention_by_hand(b.attn, h, kw) for b, (h, kw) in zip(model.blocks, inputs)]
        plain = [eva_attention_by_hand(b.attn, h, kw, use_rope=False) for b, (h, kw) in zip(model.blocks, inputs)]
    for got, exp, no_rope, (_, kw) in zip(stacked(cap, "attention"), want, plain, inputs):
        np.testing.assert_allclose(got, exp.numpy(), atol=1e-5)
        if kw.get("rope") is not None:  # the rotation matters: without it the attention differs
            assert np.abs(got - no_rope.numpy()).max() > 1e-4


def test_adapter_parts_reproduce_the_attention(eva):
    name, model, size = eva
    assert_parts_describe_the_attention(model, normalised(_images(size), model))


def test_attention_grad_equals_autograd(eva):
    name, model, size = eva
    images = _images(size)
    cap = vl.capture(model, images, target=[2, 0])
    grads = attention_grads_by_probe(model, normalised(images, model), [2, 0],
                                     [f"blocks.{i}.attn" for i in range(len(model.blocks))])
    for got, exp in zip(stacked(cap, "attention_grad"), grads):
        np.testing.assert_allclose(got, exp.numpy(), atol=1e-6)


def test_lrp_conserves_block_by_block_and_through_the_readout(eva):
    name, model, size = eva
    assert_conserved(model, torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(2)))


def test_all_maps_finite_and_state_restored(eva):
    name, model, size = eva
    cap = vl.capture(model, _images(size))
    assert cap.attrs["family"] == "eva"
    assert_all_maps_finite(cap)
    assert_state_restored(model, _images(size, 1))


def test_token_geometry():
    model = make("vit_small_patch16_dinov3")
    assert_geometry(model, (64, 64))


def test_value_path_uses_the_v_bias_and_inner_norm():
    """tokentm's value path of EVA02: W_O·norm(W_v h + b_v), recomputed from timm's modules."""
    model = make("eva02_tiny_patch14_224")
    images = _images((56, 56), 1)
    cap = vl.capture(model, images)
    x = normalised(images, model)
    (h, _), = attention_inputs(model, x, [model.blocks[0].attn])
    a = model.blocks[0].attn
    dim = a.qkv.weight.shape[0] // 3
    with torch.no_grad():
        v = F.linear(h, a.qkv.weight[2 * dim:], a.v_bias)
        want = F.linear(a.norm(v), a.proj.weight).norm(dim=-1)
    np.testing.assert_allclose(cap["stage0"].attn_value_norm.values[0, 0], want[0].numpy(), rtol=1e-5)


def test_dynamic_img_size_with_rotary_at_another_size():
    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch16_dinov3", num_classes=5, depth=2, img_size=64,
                              dynamic_img_size=True).eval()
    x = torch.randn(1, 3, 48, 80)
    cap = vl.capture(model, x)
    assert cap["stage0"].attrs["grid"] == [3, 5]
    inputs = attention_inputs(model, x, [b.attn for b in model.blocks])
    with torch.no_grad():
        want = [eva_attention_by_hand(b.attn, h, kw) for b, (h, kw) in zip(model.blocks, inputs)]
    for got, exp in zip(stacked(cap, "attention"), want):
        np.testing.assert_allclose(got, exp.numpy(), atol=1e-5)
    assert_all_maps_finite(cap)


def test_class_specific_maps_differ_between_targets(eva):
    name, model, size = eva  # random init
    assert_targets_differ(model, size)
