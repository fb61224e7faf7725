"""timm Swin v1 and v2 at an input size whose grids need padding, as timm pads them.

56 px, patch 4, window 4, three stages of two blocks (the second shifted by 2):
stage grids 14×14 (windows padded to 16×16), 7×7 (padded to 8×8, and merged from
an even grid) and 4×4 (merged from the odd 7×7: timm pads it to 8×8 first).
Everything here is checked against timm's own forward or against code written
here from timm's definitions (roll, zero-pad, partition), not against vitlens's
window helpers. Random init; v2's res-post-norm weights are switched on (timm
starts them at 0, which would switch every branch off).
"""

from __future__ import annotations

import copy
import sys

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from family_checks import (
    assert_all_maps_finite,
    assert_attention_grads_equal_autograd,
    assert_geometry,
    assert_padding_gets_nothing,
    assert_parts_describe_the_attention,
    assert_state_restored,
    normalised,
    randomize_biases,
    relevance_totals,
    stacked,
    zero_biases,
)
from family_models import switch_on_res_post_norms
from timm.models.swin_transformer import window_partition

import vitlens as vl
from vitlens.widgets import Explorer
from vitlens.widgets.layout import capture_layout, window_ids
from vitlens.widgets.panels import query_attention

SIZE = 56
KW = dict(img_size=SIZE, window_size=4, depths=(2, 2, 2), num_heads=(2, 2, 4), embed_dim=16, num_classes=5)
NAMES = {"v1": "swin_tiny_patch4_window7_224", "v2": "swinv2_tiny_window8_256"}


def _build(version: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = randomize_biases(timm.create_model(NAMES[version], **KW).eval())
    return switch_on_res_post_norms(model) if version == "v2" else model


@pytest.fixture(scope="module", params=["v1", pytest.param("v2", marks=pytest.mark.slow)])  # v2: in make test
def model(request):
    return _build(request.param)


@pytest.fixture(scope="module")
def cap(model):
    return vl.capture(model, _images())


def _images(n=2, seed=0):
    return np.random.default_rng(seed).random((n, SIZE, SIZE, 3)).astype(np.float32)


def _blocks(model):
    return [b for stage in model.layers for b in stage.blocks]


def timm_window_tokens(grid, block) -> np.ndarray:
    """Which grid token sits at each window position of ``block``: timm's own roll, zero
    pad and ``window_partition`` applied to a grid of token ids (-1 marks padding)."""
    gh, gw = grid
    ids = torch.arange(gh * gw, dtype=torch.float64).reshape(1, gh, gw, 1) + 1  # 0 is left for padding
    sh, sw = block.shift_size
    ids = torch.roll(ids, (-sh, -sw), (1, 2))
    mh, mw = block.window_size
    ids = F.pad(ids, (0, 0, 0, (mw - gw % mw) % mw, 0, (mh - gh % mh) % mh))
    return (window_partition(ids, block.window_size).reshape(-1, mh * mw).long() - 1).numpy()


def timm_attention(model, x) -> list[torch.Tensor]:
    """Each block's probabilities as timm's explicit (non-fused) attention computes them,
    taken at its ``attn_drop``: (B·nW, heads, M², M²)."""
    m = copy.deepcopy(model)
    seen = []
    for blk in _blocks(m):
        blk.attn.fused_attn = False
        blk.attn.attn_drop.register_forward_hook(lambda mod, inp, out: seen.append(out.detach()))
    with torch.no_grad():
        m(x)
    return seen


def global_matrices(cap, model) -> list[np.ndarray]:
    """Per block, sample and head: the (N, N) attention among the grid's tokens, built
    from the captured windows and timm's window layout; padded rows and columns dropped."""
    out = []
    for stage, name in zip(model.layers, ["stage0", "stage1", "stage2"], strict=True):
        gh, gw = cap[name].attrs["grid"]
        for i, blk in enumerate(stage.blocks):
            a = cap[name].attention.values[:, i]  # (B, H, nW, M², M²)
            tokens = timm_window_tokens((gh, gw), blk)
            g = np.zeros((a.shape[0], a.shape[1], gh * gw, gh * gw))
            for w, tok in enumerate(tokens):
                real = np.flatnonzero(tok >= 0)
                g[:, :, tok[real][:, None], tok[real][None, :]] = a[:, :, w][:, :, real][:, :, :, real]
            out.append(g)
    return out


def rollout_by_hand(cap, model) -> np.ndarray:
    """``r·Â_L···Â_0`` with ``Â = (I + mean_h A)/2``: the mean row of the last stage, down
    every block and every merging (1/4 to each parent that is a real token)."""
    mats = global_matrices(cap, model)
    grids = [tuple(cap[f"stage{s}"].attrs["grid"]) for s in range(3)]
    layers = [[0, 1], [2, 3], [4, 5]]
    r = np.full((2, grids[2][0] * grids[2][1]), 1.0 / (grids[2][0] * grids[2][1]))
    for s in (2, 1, 0):
        for layer in reversed(layers[s]):
            a = mats[layer].mean(1)
            r = 0.5 * r + 0.5 * np.einsum("bi,bij->bj", r, a)
        if s > 0:
            ch, cw = grids[s]
            ph, pw = grids[s - 1]
            parent = np.zeros((2, ph, pw))
            child = r.reshape(2, ch, cw)
            for y in range(ph):
                for x in range(pw):
                    parent[:, y, x] = child[:, y // 2, x // 2] / 4
            r = parent.reshape(2, -1)
    return r.reshape(2, *grids[0])


# -- layout -------------------------------------------------------------------------------
def test_timm_pads_these_grids(model):
    """Guards the setting: without padding these tests would prove nothing new."""
    grids = [tuple(st.blocks[0].input_resolution) for st in model.layers]
    assert grids == [(14, 14), (7, 7), (4, 4)]
    assert [tuple(st.blocks[1].shift_size) for st in model.layers] == [(2, 2), (2, 2), (0, 0)]


def test_window_tokens_follow_timms_roll_pad_and_partition(model, cap):
    for stage, name in zip(model.layers, ["stage0", "stage1", "stage2"], strict=True):
        wt = cap[name].window_token.values
        grid = tuple(cap[name].attrs["grid"])
        for i, blk in enumerate(stage.blocks):
            np.testing.assert_array_equal(wt[i], timm_window_tokens(grid, blk))
            real = wt[i][wt[i] >= 0]
            assert sorted(real.tolist()) == list(range(grid[0] * grid[1]))  # every token exactly once
    assert (cap["stage0"].window_token.values < 0).sum() == 2 * (16 * 16 - 14 * 14)
    assert cap["stage0"].attention.shape == (2, 2, 2, 16, 16, 16)


def test_stage_strides_and_centres_of_a_merged_odd_grid(model, cap):
    assert [cap[f"stage{s}"].attrs["stride"] for s in range(3)] == [[4, 4], [8, 8], [16, 16]]
    np.testing.assert_allclose(cap["stage2"].center_x.values[:4], [8.0, 24.0, 40.0, 56.0])  # the last hangs over
    np.testing.assert_allclose(cap["stage1"].center_y.values[::7], 4.0 + 8.0 * np.arange(7))


# -- the numbers captured -------------------------------------------------------------------
def test_attention_equals_timms_explicit_attention_padding_included(model, cap):
    want = timm_attention(model, normalised(_images(), model))
    got = stacked(cap, "attention")  # (B, H, nW, M², M²) per block
    for layer, (g, e) in enumerate(zip(got, want, strict=True)):
        e = e.view(2, -1, *e.shape[1:]).transpose(1, 2).numpy()
        np.testing.assert_allclose(g, e, atol=1e-5, err_msg=f"block {layer}")
        np.testing.assert_allclose(g.sum(-1), 1.0, atol=1e-5)  # every row a distribution, padded ones too


def test_adapter_parts_reproduce_the_attention(model):
    assert_parts_describe_the_attention(model, normalised(_images(), model))


def test_attention_grad_equals_autograd(model):
    cap = assert_attention_grads_equal_autograd(model, normalised(_images(), model), [3, 3])
    assert_padding_gets_nothing(cap)


def test_lrp_conserved_block_by_block_and_through_both_mergings(model):
    """Bias-free copy: conserved in every block, through the read-out and through the
    odd 7×7 → 4×4 merging (v1 normalises before its Linear, so the padding's
    normalised values are not 0: the rule keeps them out, like a bias).

    Block 0's step into the embeddings (which no map needs) is held to 5e-3: the
    αβ rule drops the relevance of a q/k/v channel with no positive contribution,
    which happens on some inputs with or without padding (seen at 64 px too)."""
    x = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(4))
    totals, head_total = relevance_totals(zero_biases(model), x)
    assert sorted(totals) == list(range(6))
    torch.testing.assert_close(head_total, torch.ones_like(head_total), rtol=1e-4, atol=1e-6)
    for layer, (r_in, r_out) in totals.items():
        tol = 5e-3 if layer == 0 else 1e-4
        torch.testing.assert_close(r_in, r_out, rtol=tol, atol=1e-6, msg=f"block {layer}")
    for last, first in [(1, 2), (3, 4)]:  # out of stage s's last block = into stage s+1's first
        torch.testing.assert_close(totals[last][1], totals[first][0], rtol=1e-4, atol=1e-6)


def test_merge_shares_of_the_odd_merging_stay_on_real_parents(cap):
    share = cap["stage1"].merge_share.values  # parents: the 7×7 grid, merged into 4×4
    assert share.shape == (2, 49)
    total = np.zeros((2, 4, 4))
    for y in range(7):
        for x in range(7):
            total[:, y // 2, x // 2] += share[:, 7 * y + x]
    np.testing.assert_allclose(total, 1.0, atol=1e-4)


# -- the maps ---------------------------------------------------------------------------------
def test_all_seven_maps_finite_on_the_first_grid(cap):
    maps = assert_all_maps_finite(cap)
    for m in maps.data_vars:
        assert maps[m].shape == (2, 14, 14), m
        if m != "gradcam":  # its ReLU can zero a random model's map: checked on five targets below
            assert float(maps[m].std()) > 0, m


def test_rollout_equals_a_dense_product_built_from_timms_windows(model, cap):
    np.testing.assert_allclose(vl.explain(cap, "rollout").values, rollout_by_hand(cap, model), rtol=1e-5, atol=1e-9)


def test_every_method_agrees_with_the_dense_operators(cap, monkeypatch):
    fast = {m: vl.explain(cap, m) for m in vl.methods.explainable_methods(cap)}
    lrp_merge = vl.explain(cap, "generic_attention", merge="lrp")
    from vitlens.methods import maps, operators

    monkeypatch.setattr(maps, "propagate", operators.propagate_dense)
    monkeypatch.setattr(sys.modules["vitlens.methods.attention"], "propagate", operators.propagate_dense)
    for m in fast:
        dense = vl.explain(cap, m)
        np.testing.assert_allclose(fast[m].values, dense.values, rtol=1e-5, atol=1e-6 * float(abs(dense).max()), err_msg=m)
    dense = vl.explain(cap, "generic_attention", merge="lrp")
    np.testing.assert_allclose(lrp_merge.values, dense.values, rtol=1e-5, atol=1e-6 * float(abs(dense).max()))


def test_gradcam_features_map_is_the_last_grid_upsampled_and_cropped(model):
    img = _images(1)
    cap = vl.capture(model, np.repeat(img, 5, 0), target=[0, 1, 2, 3, 4])
    st = cap["stage2"]
    f, g = st.features.values, st.features_grad.values  # (B, 16, C)
    cam = np.maximum((g.mean(1, keepdims=True) * f).sum(-1), 0).reshape(5, 1, 4, 4)
    assert cam.max() > 0
    up = F.interpolate(torch.from_numpy(cam), size=(16, 16), mode="bilinear", align_corners=False)[:, 0, :14, :14]
    np.testing.assert_allclose(vl.explain(cap, "gradcam", on="features").values, up.numpy(), rtol=1e-5, atol=1e-8)


def test_bright_square_lands_on_its_token_and_pixels(model):
    assert_geometry(model, (SIZE, SIZE))


def test_state_restored(model):
    assert_state_restored(model, _images(1))


# -- widgets ----------------------------------------------------------------------------------
@pytest.mark.parametrize("layer", [0, 1, 3, 5])
def test_query_attention_at_the_padded_edge_matches_the_dense_row(model, cap, layer):
    """The bottom-right patch sits in a padded window: its row over real keys, repeated
    onto the 14×14 grid (the 4×4 stage covers 16×16 and is cropped)."""
    row = global_matrices(cap, model)[layer][0, :, -1].mean(0)  # query: last token of its stage
    gh = int(np.sqrt(row.size))
    f = {14: 1, 7: 2, 4: 4}[gh]  # first-stage tokens per stage token
    want = np.kron(row.reshape(gh, gh), np.ones((f, f)))[:14, :14]
    heads = list(range(cap[f"stage{layer // 2}"].attrs["num_heads"]))
    got = query_attention(cap, capture_layout(cap), 0, layer, heads, (13, 13))
    np.testing.assert_allclose(got, want, atol=1e-6)
    if layer == 0:  # unshifted: the query's window hangs over the edge, and its mass on the
        assert row.sum() < 0.9  # padded keys (no shift mask there) is left out


def test_explorer_draws_windows_on_every_layer(cap):
    layout = capture_layout(cap)
    assert [s.factor for s in layout.stages] == [1, 2, 4]
    ex = Explorer(cap)
    for layer in range(6):
        ex.layer_slider.value = layer
        maps = ex.panel_maps()
        assert all(v.shape == (14, 14) and np.isfinite(v).all() for v in maps.values())
        ids = window_ids(layout, layer, cap[f"stage{layer // 2}"].window_token.sel(layer=layer).values)
        assert ids.shape == (14, 14) and ids.min() >= 0
    ex.select_patch(13, 13)
    assert ex.panel_maps()["attention"].shape == (14, 14)


def test_entropy_head_weights_average_real_queries_only(model, cap):
    """lnstat ``head_fusion="entropy"``: each head weighted by 1 − its mean normalised row
    entropy over the query rows of real tokens (padded queries' rows left out)."""
    from vitlens.methods.lnstat import fuse_heads
    from vitlens.methods.operators import view

    stage = view(cap).stages[0]
    a = cap["stage0"].attention.values[:, 0].astype(np.float64)  # (B, H, nW, M², M²), block 0
    real = timm_window_tokens((14, 14), model.layers[0].blocks[0]) >= 0  # (nW, M²)
    ent = -(a * np.log(np.clip(a, 1e-12, None))).sum(-1) / np.log(a.shape[-1])  # (B, H, nW, M²)
    w = np.clip(1 - ent[:, :, real].mean(-1), 0, None)
    w = w / w.sum(1, keepdims=True)
    want = (a * w[:, :, None, None, None]).sum(1)
    got = fuse_heads(stage, 0, None, "entropy").numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


@pytest.mark.slow  # four-stage Swin-T layouts at 256 and 200 px
@pytest.mark.parametrize("size", [256, 200])
def test_swin_t_layout_at_256_and_200_px(size):
    """Swin-T's own windows (7) and patch (4), narrowed: at 256 px every stage pads
    (64, 32, 16, 8 tokens; the last shifted by 3 and padded to 14), at 200 px the
    grids 50, 25, 13, 7 merge from odd sides. Capture, seven maps, conservation."""
    torch.manual_seed(0)
    model = timm.create_model(NAMES["v1"], img_size=size, depths=(2, 2, 2, 2), embed_dim=16,
                              num_heads=(1, 2, 2, 2), num_classes=5).eval()
    cap = vl.capture(model, np.random.default_rng(1).random((1, size, size, 3)).astype(np.float32))
    want = [64, 32, 16, 8] if size == 256 else [50, 25, 13, 7]
    assert [cap[f"stage{s}"].attrs["grid"][0] for s in range(4)] == want
    assert [cap[f"stage{s}"].attrs["stride"][0] for s in range(4)] == [4, 8, 16, 32]
    assert_all_maps_finite(cap)
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(2))
    totals, head_total = relevance_totals(zero_biases(model), x)
    torch.testing.assert_close(head_total, torch.ones_like(head_total), rtol=1e-4, atol=1e-6)
    for layer in range(1, 8):
        torch.testing.assert_close(totals[layer][0], totals[layer][1], rtol=1e-4, atol=1e-6, msg=f"block {layer}")
    for last in (1, 3, 5):
        torch.testing.assert_close(totals[last][1], totals[last + 1][0], rtol=1e-4, atol=1e-6, msg=f"merge after {last}")
