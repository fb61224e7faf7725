"""timm Eva: EVA02, DINOv3, vit_*_rope_*, PE-core — rotary q/k, split or fused q/k/v with
q/v biases, SwiGLU, inner attention norm, LayerScale gammas, registers, map pools.

Random-initialised timm registry configurations at depth 2 and 64 px inputs
(``family_models.EVA_NAMES``). The contract every family keeps is generated in
test_family_contract.py; here: attention against a recomputation with the rotary
embedding, the value path, and dynamic input sizes.
"""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from family_checks import (
    assert_all_maps_finite,
    assert_attention_equals_by_hand,
    attention_inputs,
    normalised,
    stacked,
)
from family_models import EVA_NAMES as NAMES
from family_models import images as _family_images
from family_models import make_eva as make

import vitlens as vl
from vitlens.models import adapter_for


@pytest.fixture(scope="module", params=list(NAMES))
def eva(request):
    model = make(request.param)
    return request.param, model, adapter_for(model).input_size


def _images(size, n=2, seed=0):
    return _family_images(size, n, seed)


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
    cap, inputs, _ = assert_attention_equals_by_hand(model, _images(size), eva_attention_by_hand)
    with torch.no_grad():
        plain = [eva_attention_by_hand(b.attn, h, kw, use_rope=False) for b, (h, kw) in zip(model.blocks, inputs)]
    for got, no_rope, (_, kw) in zip(stacked(cap, "attention"), plain, inputs):
        if kw.get("rope") is not None:  # the rotation matters: without it the attention differs
            assert np.abs(got - no_rope.numpy()).max() > 1e-4


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
    cap, _, _ = assert_attention_equals_by_hand(model, torch.randn(1, 3, 48, 80), eva_attention_by_hand)
    assert cap["stage0"].attrs["grid"] == [3, 5]
    assert_all_maps_finite(cap)
