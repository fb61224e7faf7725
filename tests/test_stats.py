"""Head statistics: each equals a loop written here from its definition, and a tiny case worked by hand.

The loops read the capture the plainest way (numpy, one query at a time); for Swin
they first rebuild every block's dense token × token attention from the model's own
window layout — timm's roll, pad and ``window_partition``
(``test_swin_padded.timm_window_tokens``), transformers' pad, roll and
``window_partition`` — not from vitlens's window helpers, and take distances from the grid position times the
stride ``patch · 2^stage``. Contract tests are generated from the registry, so a new
statistic is tested without editing them.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import xarray as xr
from conftest import make_vit, random_images
from family_checks import randomize_biases
from test_swin_padded import timm_window_tokens

import vitlens as vl
from vitlens.errors import CaptureFormatError, OptionError
from vitlens.registry import STAT_INFO

#: The statistics of the attention that the loops below define (the registry may hold more).
LOOPED = ("attention_distance", "attention_entropy", "prefix_attention", "gradient_weight")
SWIN_SIZE = 56  # grids 14, 7, 4 in windows of 4: timm pads the first two and merges the odd 7×7
SWIN_KW = dict(img_size=SWIN_SIZE, patch_size=4, window_size=4, depths=(2, 2, 2), num_heads=(2, 2, 4), embed_dim=16,
               num_classes=5)


@pytest.fixture(scope="module")
def vit_cap():
    # two registers besides CLS: three prefix tokens
    return vl.capture(make_vit(reg_tokens=2, seed=5), random_images(2, 32, seed=1))


@pytest.fixture(scope="module")
def swin_model():
    torch.manual_seed(3)
    # nonzero biases: a padded key's value (W_v·0 + b_v) and its gradient are then nonzero too
    return randomize_biases(timm.create_model("swin_tiny_patch4_window7_224", **SWIN_KW).eval())


@pytest.fixture(scope="module")
def swin_cap(swin_model):
    return vl.capture(swin_model, random_images(2, SWIN_SIZE, seed=2))


# -- the definitions, as loops ---------------------------------------------------------------
def loop_stats(att: np.ndarray, grad: np.ndarray | None, prefix: int, pos: np.ndarray,
               pairs: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Every statistic of one block from dense ``(sample, head, N, N)`` attention, one query at a time.

    ``pos``: (N, 2) pixel centres (prefix rows unused); ``pairs``: (N, N) bool, which
    (query, key) pairs the head can see (default: all).
    """
    b, h, n, _ = att.shape
    pairs = np.ones((n, n), bool) if pairs is None else pairs
    out = {k: np.zeros((b, h)) for k in ("attention_distance", "attention_entropy", "prefix_attention",
                                         "gradient_weight")}
    for s in range(b):
        for k in range(h):
            dist, ent, pre, gw = [], [], [], 0.0
            for i in range(prefix, n):
                row, keys = att[s, k, i], [int(j) for j in np.flatnonzero(pairs[i])]
                total = sum(row[j] for j in keys)
                on_patches = sum(row[j] for j in keys if j >= prefix)
                dist.append(sum(row[j] * np.hypot(*(pos[j] - pos[i])) for j in keys if j >= prefix) / on_patches)
                ent.append(-sum(row[j] / total * np.log(row[j] / total) for j in keys if row[j] > 0))
                pre.append(sum(row[j] for j in keys if j < prefix) / total)
            out["attention_distance"][s, k] = np.mean(dist)
            out["attention_entropy"][s, k] = np.mean(ent)
            out["prefix_attention"][s, k] = np.mean(pre)
            if grad is not None:
                for i in range(n):
                    for j in np.flatnonzero(pairs[i]):
                        gw += max(float(grad[s, k, i, j]) * float(att[s, k, i, j]), 0.0)
                out["gradient_weight"][s, k] = gw / pairs.sum()
    return out


def vit_by_hand(cap: xr.DataTree) -> dict[str, np.ndarray]:
    st = cap["stage0"]
    kind = st["kind"].values
    prefix = int((kind != "patch").sum())
    sy, sx = st.attrs["stride"]
    pos = np.stack([(st["row"].values + 0.5) * sy, (st["col"].values + 0.5) * sx], -1).astype(float)
    per_layer = []
    for l in range(st.sizes["layer"]):
        att = st.attention.isel(layer=l).values.astype(np.float64)
        grad = st.attention_grad.isel(layer=l).values.astype(np.float64)
        per_layer.append(loop_stats(att, grad, prefix, pos))
    return {name: np.stack([p[name] for p in per_layer], 1) for name in per_layer[0]}


def swin_by_hand(cap: xr.DataTree, window_tokens) -> dict[str, np.ndarray]:
    """Dense per-block attention from the model's own window layout, then the loops; heads padded with NaN.

    ``window_tokens(stage, block, grid)``: the grid token at each window position (-1: padding),
    as the model itself lays the windows out.
    """
    heads = max(cap[c].attrs["num_heads"] for c in cap.children)
    results = []
    for s in range(len(cap.children)):
        node = cap[f"stage{s}"]
        gh, gw = node.attrs["grid"]
        stride = 4 * 2 ** s
        rows, cols = np.divmod(np.arange(gh * gw), gw)
        pos = np.stack([(rows + 0.5) * stride, (cols + 0.5) * stride], -1)
        for i in range(node.sizes["layer"]):
            tokens = window_tokens(s, i, (gh, gw))
            dense = {}
            for var in ("attention", "attention_grad"):
                a = node[var].values[:, i].astype(np.float64)  # (B, H, nW, M², M²)
                g = np.zeros((a.shape[0], a.shape[1], gh * gw, gh * gw))
                for w, tok in enumerate(tokens):
                    real = np.flatnonzero(tok >= 0)
                    g[:, :, tok[real][:, None], tok[real][None, :]] = a[:, :, w][:, :, real][:, :, :, real]
                dense[var] = g
            pairs = np.zeros((gh * gw, gh * gw), bool)
            for tok in tokens:
                real = tok[tok >= 0]
                pairs[real[:, None], real[None, :]] = True
            got = loop_stats(dense["attention"], dense["attention_grad"], 0, pos, pairs)
            results.append({k: np.pad(v, ((0, 0), (0, heads - v.shape[1])), constant_values=np.nan)
                            for k, v in got.items()})
    return {name: np.stack([r[name] for r in results], 1) for name in results[0]}


# -- every statistic equals its loop ---------------------------------------------------------------
@pytest.mark.parametrize("name", LOOPED)
def test_each_statistic_equals_the_loop_on_a_vit_with_registers(vit_cap, name):
    want = vit_by_hand(vit_cap)[name]
    got = vl.head_stats(vit_cap, name)
    assert got.dims == ("sample", "layer", "head") and got.shape == want.shape
    np.testing.assert_allclose(got.values, want, rtol=1e-9, atol=1e-12)


@pytest.fixture(scope="module")
def swin_expected(swin_cap, swin_model):
    return swin_by_hand(swin_cap, lambda s, i, grid: timm_window_tokens(grid, swin_model.layers[s].blocks[i]))


@pytest.mark.parametrize("name", LOOPED)
def test_each_statistic_equals_the_loop_on_a_padded_shifted_swin(swin_cap, swin_expected, name):
    got = vl.head_stats(swin_cap, name)
    want = swin_expected[name]
    assert got.shape == want.shape == (2, 6, 4)
    np.testing.assert_array_equal(np.isnan(got.values), np.isnan(want))  # stages 0 and 1 have two heads
    np.testing.assert_allclose(got.values, want, rtol=1e-9, atol=1e-12)


def hf_window_tokens(v2: bool, grid, window: int, shift: int) -> np.ndarray:
    """transformers' own layout: pad the grid to whole windows first, then roll, then window_partition."""
    import transformers

    mod = transformers.models.swinv2.modeling_swinv2 if v2 else transformers.models.swin.modeling_swin
    gh, gw = grid
    ids = torch.arange(1.0, gh * gw + 1).reshape(1, gh, gw, 1)  # 0 is left for the padding
    ph, pw = -(-gh // window) * window, -(-gw // window) * window
    ids = torch.roll(torch.nn.functional.pad(ids, (0, 0, 0, pw - gw, 0, ph - gh)), (-shift, -shift), (1, 2))
    return (mod.window_partition(ids, window).reshape(-1, window * window).long() - 1).numpy()


@pytest.mark.slow
@pytest.mark.parametrize("v2", [False, True])
def test_each_statistic_equals_the_loop_on_a_padded_transformers_swin(v2):
    # transformers pads before the cyclic shift (timm after): the loops lay the windows out its way
    from test_hf_swin import padded_hf

    model = padded_hf(v2, depths=(2, 2))
    cap = vl.capture(model, torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(6)))
    shifts = {s: cap[f"stage{s}"].attrs["shift_size"] for s in range(2)}
    want = swin_by_hand(cap, lambda s, i, grid: hf_window_tokens(v2, grid, 4, shifts[s][i][0]))
    for name in LOOPED:
        np.testing.assert_allclose(vl.head_stats(cap, name).values, want[name], rtol=1e-9, atol=1e-12, err_msg=name)


# -- tiny cases worked by hand ------------------------------------------------------------------------
def with_values(cap: xr.DataTree, stage: str, **arrays: np.ndarray) -> xr.DataTree:
    """The capture with some of one stage's variables replaced (same shapes)."""
    out = cap.copy(deep=True)
    ds = out[stage].to_dataset(inherit=False)
    for name, values in arrays.items():
        ds[name] = ds[name].copy(data=values.astype(ds[name].dtype))
    out[stage].dataset = ds
    return out


def test_vit_statistics_of_a_hand_made_attention_matrix():
    # 16 px, patches of 8: CLS + 2×2 patches with centres (4,4) (4,12) (12,4) (12,12)
    cap = vl.capture(make_vit(img_size=16, depth=1, num_heads=1, seed=0), random_images(1, 16))
    a = np.array([[1.0, 0, 0, 0, 0],        # CLS (not a patch query)
                  [0.5, 0.5, 0, 0, 0],      # p0: half on CLS, half on itself
                  [0, 0.25, 0.25, 0.25, 0.25],  # p1: uniform over the patches
                  [0, 0, 0, 0, 1.0],        # p2: all on p3, 8 px away
                  [0.2, 0, 0, 0.4, 0.4]])   # p3: 0.2 CLS, 0.4 on p2 (8 px), 0.4 on itself
    g = np.full((5, 5), 2.0)
    g[4, 0] = -1.0  # p3's gradient on CLS is negative: (−1·0.2)⁺ = 0
    cap = with_values(cap, "stage0", attention=a[None, None, None], attention_grad=g[None, None, None])
    value = {name: float(vl.head_stats(cap, name).item()) for name in LOOPED}
    # distances: p0 0; p1 (8 + 0 + 8√2 + 8)/4; p2 8; p3 (8 + 0)/2
    assert value["attention_distance"] == pytest.approx((0 + (4 + 2 * np.sqrt(2)) + 8 + 4) / 4, rel=1e-6)
    h3 = -(0.2 * np.log(0.2) + 2 * 0.4 * np.log(0.4))
    assert value["attention_entropy"] == pytest.approx((np.log(2) + np.log(4) + 0 + h3) / 4, rel=1e-6)
    assert value["prefix_attention"] == pytest.approx((0.5 + 0 + 0 + 0.2) / 4, rel=1e-6)
    # (g·A)⁺ summed: CLS 2, p0 2, p1 2, p2 2, p3 0 + 1.6; over 25 pairs
    assert value["gradient_weight"] == pytest.approx(9.6 / 25, rel=1e-6)


def test_swin_statistics_of_a_hand_made_padded_window(swin_cap):
    # block 0: a 14×14 grid at stride 4 in 4×4 windows, padded to 16×16. Every token attends
    # to itself, except the four real tokens of the bottom-right window (rows/cols 12–13),
    # which spread evenly over all 16 positions: 12 of them padding, left out and renormalised.
    node = swin_cap["stage0"]
    wt = node["window_token"].values[0]
    a = node["attention"].values.copy()
    a[:, 0] = 0.0
    for w, tok in enumerate(wt):
        for p in range(len(tok)):
            a[:, 0, :, w, p, p] = 1.0
    corner = int(np.flatnonzero((wt >= 0).sum(1) == 4)[0])
    a[:, 0, :, corner] = 1.0 / 16
    cap = with_values(swin_cap, "stage0", attention=a)
    d = vl.head_stats(cap, "attention_distance").isel(layer=0, head=0).values
    e = vl.head_stats(cap, "attention_entropy").isel(layer=0, head=0).values
    # a corner token: to itself 0, to its two neighbours 4 px, diagonally 4√2 px; 192 others at 0
    np.testing.assert_allclose(d, 4 * (0 + 4 + 4 + 4 * np.sqrt(2)) / 4 / 196, rtol=1e-6)
    np.testing.assert_allclose(e, 4 * np.log(4) / 196, rtol=1e-6)
    assert (vl.head_stats(cap, "prefix_attention") == 0).sum() == 2 * 6 * 4 - 2 * 4 * 2  # 0 but for missing heads


# -- the registry's contract, for every statistic -----------------------------------------------------------
@pytest.fixture(scope="module")
def every_group_cap():
    """vit_cap's model and images, with every group a registered statistic reads."""
    groups = sorted(set().union(*(info.groups() for info in STAT_INFO.values())))
    return vl.capture(make_vit(reg_tokens=2, seed=5), random_images(2, 32, seed=1), keep=groups)


@pytest.mark.parametrize("name", list(STAT_INFO))
def test_every_statistic_is_registered_documented_and_labeled(every_group_cap, name):
    info = STAT_INFO[name]
    assert info.title and info.unit and info.caption and info.reference
    assert name in vl.HEAD_STATS
    methods = Path(__file__).resolve().parents[1].joinpath("docs", "METHODS.md").read_text()
    section = methods.split("## Head statistics", 1)[1].split("\n## ", 1)[0]
    assert f"`{name}`" in section, f"docs/METHODS.md, Head statistics: document {name}"
    author = re.search(r"([A-Z][a-z]+) et al\.", info.reference).group(1)
    assert author in section
    vit_cap = every_group_cap
    da = vl.head_stats(vit_cap, name)
    assert da.name == name and da.attrs["stat"] == name and da.attrs["unit"] == info.unit
    assert da["layer"].values.tolist() == [0, 1, 2] and da["head"].values.tolist() == [0, 1, 2]
    np.testing.assert_array_equal(da["sample"].values, vit_cap["sample"].values)
    assert np.isfinite(da.values).all()


def test_statistics_are_bounded_as_their_definitions_say(vit_cap, swin_cap):
    for cap in (vit_cap, swin_cap):
        n_keys = {c: cap[c].sizes["key"] for c in cap.children}
        e = vl.head_stats(cap, "attention_entropy")
        assert (e.fillna(0) >= 0).all() and (e.fillna(0) <= np.log(max(n_keys.values())) + 1e-9).all()
        p = vl.head_stats(cap, "prefix_attention").fillna(0)
        assert ((p >= 0) & (p <= 1)).all()
    # Swin: a query never looks further than the far corner of its window (3 tokens each way at the stride)
    d = vl.head_stats(swin_cap, "attention_distance")
    bound = xr.DataArray([3 * np.sqrt(2) * 4 * 2 ** s for s in d["stage"].values], dims="layer")
    assert (d.fillna(0) <= bound).all() and (d.fillna(1) > 0).all()
    assert (vl.head_stats(swin_cap, "prefix_attention").fillna(0) == 0).all()


def test_a_sample_is_the_same_alone_and_in_a_batch(vit_cap):
    both = vl.head_stats(vit_cap, "attention_distance")
    one = vl.head_stats(vit_cap.isel(sample=[1]), "attention_distance")
    np.testing.assert_array_equal(one.values[0], both.values[1])
    selected = vl.head_stats(vit_cap.sel(sample=1), "attention_distance")  # a plain xarray selection
    assert selected.dims == ("sample", "layer", "head")
    np.testing.assert_array_equal(selected.values[0], both.values[1])


# -- stores: lazy, stored, and what is missing ---------------------------------------------------------------
@pytest.mark.slow
def test_head_stats_of_a_lazy_store_are_dask_and_equal_the_capture(tmp_path):
    model = make_vit(seed=8)
    images = random_images(5, 32, seed=4)
    cap = vl.capture(model, images)
    store = vl.capture(model, images, store=tmp_path / "run.zarr", batch_size=2)
    for name in LOOPED:
        lazy = vl.head_stats(store, name)
        assert lazy.chunks is not None  # nothing computed yet
        np.testing.assert_allclose(lazy.mean("sample").values, vl.head_stats(cap, name).mean("sample").values,
                                   rtol=1e-12)
    np.testing.assert_allclose(vl.head_stats(tmp_path / "run.zarr", "attention_entropy").values,
                               vl.head_stats(cap, "attention_entropy").values, rtol=1e-12)


def reduced(cap: xr.DataTree, stats: dict[str, xr.DataArray]) -> xr.DataTree:
    """What a reduced store holds: no attention, the statistics under /stats."""
    nodes = {"/": cap.to_dataset(inherit=False)}
    for name in cap.children:
        ds = cap[name].to_dataset(inherit=False)
        nodes[f"/{name}"] = ds.drop_vars([v for v in ("attention", "attention_grad", "attention_relevance")
                                          if v in ds])
    nodes["/stats"] = xr.Dataset({k: v.drop_attrs() for k, v in stats.items()})
    return xr.DataTree.from_dict(nodes)


def test_a_reduced_store_gives_the_statistics_it_holds_and_says_what_it_lacks(vit_cap):
    held = vl.head_stats(vit_cap, "attention_distance") * 1.0
    red = reduced(vit_cap, {"attention_distance": held + 1})  # +1: proof it was read, not recomputed
    got = vl.head_stats(red, "attention_distance")
    np.testing.assert_array_equal(got.values, held.values + 1)
    assert got.attrs["unit"] == "px"
    assert vl.stats.stored_stats(red) == ["attention_distance"]
    with pytest.raises(CaptureFormatError, match=r"stats=\['attention_entropy'\]"):
        vl.head_stats(red, "attention_entropy")
    with pytest.raises(CaptureFormatError, match="ablation_effect"):
        vl.head_stats(vit_cap, "ablation_effect")  # recorded by capture, one forward per head


def test_gradient_weight_without_gradients_names_the_capture_call(vit_cap):
    cap = vl.capture(make_vit(seed=5, reg_tokens=2), random_images(1, 32), grads=False)
    assert np.isfinite(vl.head_stats(cap, "attention_distance").values).all()
    with pytest.raises(CaptureFormatError, match="grads=True"):
        vl.head_stats(cap, "gradient_weight")


def test_unknown_names_and_non_captures_are_refused_with_what_to_do(vit_cap):
    with pytest.raises(OptionError, match="Did you mean 'attention_entropy'"):
        vl.head_stats(vit_cap, "attention_entrpy")
    with pytest.raises(CaptureFormatError, match="vl.capture"):
        vl.head_stats(vit_cap["stage0"].to_dataset(), "attention_distance")
    assert vl.registry.resolve_stats("all") == list(vl.HEAD_STATS)
