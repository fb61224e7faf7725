"""timm Beit (BEiT, BEiT v2): relative position bias per block or shared, q/v biases,
LayerScale gammas, average or CLS read-out. Random init, depth 2, 64 px."""

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
    relevance_totals,
    stacked,
)

import vitlens as vl

CONFIGS = {
    "beit_base_patch16_224": dict(),
    "beitv2_base_patch16_224": dict(global_pool="token"),
    "beit_shared_bias": dict(use_shared_rel_pos_bias=True, use_rel_pos_bias=False, use_abs_pos_emb=True),
}


def make(key: str) -> torch.nn.Module:
    torch.manual_seed(sum(map(ord, key)))
    name = key if key in timm.list_models("beit*") else "beit_base_patch16_224"
    model = timm.create_model(name, num_classes=5, depth=2, img_size=64, embed_dim=64, num_heads=4, **CONFIGS[key])
    return randomize_biases(model.eval())


@pytest.fixture(scope="module", params=list(CONFIGS))
def beit(request):
    return request.param, make(request.param)


def _images(n=2, seed=0):
    return np.random.default_rng(seed).random((n, 64, 64, 3)).astype(np.float32)


def beit_attention_by_hand(attn, h, kwargs):
    b, n, _ = h.shape
    bias = torch.cat((attn.q_bias, attn.k_bias, attn.v_bias)) if attn.q_bias is not None else None
    q, k, _ = F.linear(h, attn.qkv.weight, bias).reshape(b, n, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    logits = (q * attn.scale) @ k.transpose(-2, -1)
    if attn.relative_position_bias_table is not None:
        logits = logits + attn._get_rel_pos_bias()
    if kwargs.get("shared_rel_pos_bias") is not None:
        logits = logits + kwargs["shared_rel_pos_bias"]
    return logits.softmax(-1)


def test_attention_equals_recomputation_with_relative_position_bias(beit):
    key, model = beit
    images = _images()
    cap = vl.capture(model, images)
    x = normalised(images, model)
    inputs = attention_inputs(model, x, [b.attn for b in model.blocks])
    with torch.no_grad():
        want = [beit_attention_by_hand(b.attn, h, kw) for b, (h, kw) in zip(model.blocks, inputs)]
    for got, exp in zip(stacked(cap, "attention"), want):
        np.testing.assert_allclose(got, exp.numpy(), atol=1e-5)


def test_adapter_parts_reproduce_the_attention(beit):
    key, model = beit
    assert_parts_describe_the_attention(model, normalised(_images(), model))


def test_attention_grad_equals_autograd(beit):
    key, model = beit
    images = _images()
    cap = vl.capture(model, images, target=[3, 1])
    grads = attention_grads_by_probe(model, normalised(images, model), [3, 1],
                                     [f"blocks.{i}.attn" for i in range(len(model.blocks))])
    for got, exp in zip(stacked(cap, "attention_grad"), grads):
        np.testing.assert_allclose(got, exp.numpy(), atol=1e-6)


def test_lrp_conserves_without_position_bias_and_leaks_only_through_it(beit):
    key, model = beit
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    assert_conserved(model, x)  # bias-free copy: tables zeroed too
    from family_checks import zero_biases

    biased = zero_biases(model)
    with torch.no_grad():
        for m in biased.modules():
            if getattr(m, "relative_position_bias_table", None) is not None:
                m.relative_position_bias_table.normal_(0, 1.0)
    totals, _ = relevance_totals(biased, x)
    leak = max(float((i - o).abs().max() / o.abs().max()) for i, o in totals.values())
    assert leak > 1e-4  # the position bias's share of the logits is dropped (documented)


def test_all_maps_finite_and_state_restored(beit):
    key, model = beit
    cap = vl.capture(model, _images())
    assert cap.attrs["family"] == "beit"
    assert cap.attrs["readout"] == ("cls" if key == "beitv2_base_patch16_224" else "avg")
    assert_all_maps_finite(cap)
    assert_state_restored(model, _images(1))


def test_token_geometry():
    assert_geometry(make("beit_base_patch16_224"), (64, 64))


def test_class_specific_maps_differ_between_targets(beit):
    key, model = beit  # random init
    assert_targets_differ(model, (64, 64))
