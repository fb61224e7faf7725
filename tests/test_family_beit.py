"""timm Beit (BEiT, BEiT v2): relative position bias per block or shared, q/v biases,
LayerScale gammas, average or CLS read-out. Random init, depth 2, 64 px
(``family_models.BEIT_CONFIGS``). The contract every family keeps is generated in
test_family_contract.py; here: attention against a recomputation with the relative
position bias, the documented LRP leak through it, and the read-out."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from family_checks import assert_attention_equals_by_hand, relevance_totals, zero_biases
from family_models import BEIT_CONFIGS as CONFIGS
from family_models import images as _family_images
from family_models import make_beit as make

import vitlens as vl


@pytest.fixture(scope="module", params=list(CONFIGS))
def beit(request):
    return request.param, make(request.param)


def _images(n=2, seed=0):
    return _family_images((64, 64), n, seed)


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
    assert_attention_equals_by_hand(model, _images(), beit_attention_by_hand)


def test_lrp_leaks_through_the_relative_position_bias(beit):
    """Conserved without biases (the contract test); with the position tables back, their share
    of the logits is dropped: the documented leak."""
    key, model = beit
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    biased = zero_biases(model)
    with torch.no_grad():
        for m in biased.modules():
            if getattr(m, "relative_position_bias_table", None) is not None:
                m.relative_position_bias_table.normal_(0, 1.0)
    totals, _ = relevance_totals(biased, x)
    leak = max(float((i - o).abs().max() / o.abs().max()) for i, o in totals.values())
    assert leak > 1e-4  # the position bias's share of the logits is dropped (documented)


def test_readout_is_the_models_pool(beit):
    key, model = beit
    cap = vl.capture(model, _images(1), grads=False)
    assert cap.attrs["readout"] == ("cls" if key == "beitv2_base_patch16_224" else "avg")
