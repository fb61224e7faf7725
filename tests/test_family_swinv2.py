"""timm SwinTransformerV2: res-post-norm, cosine attention with a logit scale, continuous
position bias (cpb MLP), q/v biases, patch merging with the norm after its Linear.
Random init, two stages of two blocks (one shifted), 64 px (``family_models.make_swin("v2")``).
The contract every family keeps is generated in test_family_contract.py; here: attention
against a recomputation, the documented LRP leak through the cpb bias, merge shares, strides."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from family_checks import normalised, relevance_totals, stacked, swin_attention_by_hand, zero_biases
from family_models import images as _family_images
from family_models import make_swin

import vitlens as vl
from vitlens.models import adapter_for


@pytest.fixture(scope="module")
def swinv2():
    return make_swin("v2")


def _images(n=2, seed=0):
    return _family_images((64, 64), n, seed)


def swinv2_attention_by_hand(model, x):
    """Each block's probabilities from timm's modules: roll, window partition, cosine logits
    times the clamped logit scale, 16·sigmoid(cpb) bias, shift mask."""
    from timm.models.swin_transformer_v2 import window_partition

    def logits(a, win):
        bw, n, _ = win.shape
        bias = torch.cat((a.q_bias, a.k_bias, a.v_bias))
        q, k, _ = F.linear(win, a.qkv.weight, bias).reshape(bw, n, 3, a.num_heads, -1).permute(2, 0, 3, 1, 4)
        logits = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
        logits = logits * torch.clamp(a.logit_scale, max=math.log(100.0)).exp()
        table = a.cpb_mlp(a.relative_coords_table).view(-1, a.num_heads)
        rpb = table[a.relative_position_index.view(-1)].view(n, n, -1).permute(2, 0, 1)
        return logits + 16 * torch.sigmoid(rpb)

    return swin_attention_by_hand(model, x, window_partition, logits, pre_norm=False)


def test_branches_are_live(swinv2):
    """Guards the fixture: a model whose branches are switched off would pass every check trivially."""
    cap = vl.capture(swinv2, _images())
    for s in ("stage0", "stage1"):
        assert np.abs(cap[s].attention_grad.values).max(axis=(0, 2, 3, 4, 5)).min() > 1e-6
        assert np.abs(cap[s].attention_relevance.values).max() > 1e-6


def test_layout_has_windows_shifts_and_merges(swinv2):
    cap = vl.capture(swinv2, _images())
    assert cap.attrs["family"] == "swinv2" and cap.attrs["readout"] == "avg"
    assert cap["stage0"].attrs["shift_size"] == [[0, 0], [2, 2]]
    assert cap["stage0"].attention.dims == ("sample", "layer", "head", "window", "query", "key")
    assert cap["stage0"].attrs["grid"] == [16, 16] and cap["stage1"].attrs["grid"] == [8, 8]


def test_attention_equals_recomputation_with_cosine_logits_and_cpb(swinv2):
    images = _images()
    cap = vl.capture(swinv2, images)
    want = swinv2_attention_by_hand(swinv2, normalised(images, swinv2))
    for got, exp in zip(stacked(cap, "attention"), want):
        np.testing.assert_allclose(got, exp.numpy(), atol=1e-5)


def test_lrp_leaks_through_the_position_bias(swinv2):
    """Without biases (cpb bias driven to 16·sigmoid(−100) ≈ 0) relevance is conserved (the
    contract test). The real model's cpb bias (≥ 0, up to 16) takes its share of the logits'
    relevance: the documented leak, measured here."""
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    free = zero_biases(swinv2)
    with torch.no_grad():
        for m in free.modules():
            if hasattr(m, "cpb_mlp"):
                m.cpb_mlp[2].weight.normal_(0, 1.0)
    totals, _ = relevance_totals(free, x)
    assert max(float((i - o).abs().max() / o.abs().max()) for i, o in totals.values()) > 1e-3


def test_merge_shares_of_each_token_sum_to_one(swinv2):
    cap = vl.capture(swinv2, _images())
    share = cap["stage0"].merge_share.values  # each merged token's four parents share its relevance
    np.testing.assert_allclose(share.reshape(2, 8, 2, 8, 2).sum((2, 4)), 1.0, atol=1e-4)


def test_stage_strides_place_tokens_on_pixels(swinv2):
    ad = adapter_for(swinv2)
    assert [s.stride for s in ad.stages] == [(4, 4), (8, 8)]
    cap = vl.capture(swinv2, _images(1), grads=False)
    np.testing.assert_allclose(cap["stage1"].center_y.values[:8], 4.0)  # first row: centre of rows 0..7
    np.testing.assert_allclose(cap["stage1"].center_x.values[:3], [4.0, 12.0, 20.0])
