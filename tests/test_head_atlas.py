"""The head atlas, driven from Python: each view equals what is computed here from the statistics and the capture.

Expected values come from ``vl.head_stats`` (itself tested against loops in
test_stats.py) with plain xarray/numpy reductions, and the attention maps straight
from the capture's arrays (ViT: the query's row; Swin: its window row placed on
the grid by ``window_token``), never from the atlas's own helpers.
"""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr
from conftest import make_swin, make_vit, random_images
from test_stats import reduced
from test_widgets import click

import vitlens as vl
from vitlens.errors import CaptureFormatError, OptionError
from vitlens.registry import STAT_INFO

#: The statistics a capture that kept its attention and gradients can give.
FROM_ATTENTION = [n for n, info in STAT_INFO.items() if info.groups() <= {"attention", "attention_grad"}]
from vitlens.widgets import Explorer, HeadAtlas
from vitlens.widgets.base import CaptureView


@pytest.fixture(scope="module")
def vit_model():
    return make_vit(seed=31)


@pytest.fixture(scope="module")
def vit_cap(vit_model):
    return vl.capture(vit_model, random_images(7, 32, seed=11))


@pytest.fixture(scope="module")
def swin_model():
    return make_swin(seed=32)


@pytest.fixture(scope="module")
def swin_cap(swin_model):
    return vl.capture(swin_model, random_images(5, 64, seed=12))


def minmax(a) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    span = a.max() - a.min()
    return np.zeros_like(a) if span <= 0 else (a - a.min()) / span


def query_row(cap, sample: int, layer: int, head: int, query) -> np.ndarray:
    """The head's attention of ``query`` over the patches, on the first-stage grid, from the raw arrays."""
    node = next(cap[c] for c in cap.children if layer in cap[c]["layer"].values)
    att = node.attention.sel(layer=layer, head=head).isel(sample=sample)
    if "window" not in att.dims:
        token = 0 if query is None else int(np.flatnonzero((node["row"].values == query[0])
                                                           & (node["col"].values == query[1]))[0])
        return att.isel(query=token, key=np.flatnonzero(node["kind"].values == "patch")).values.reshape(
            node.attrs["grid"])
    gh, gw = node.attrs["grid"]
    first = cap["stage0"].attrs["grid"]
    f = node.attrs["stride"][0] // cap["stage0"].attrs["stride"][0]
    token = (query[0] // f) * gw + query[1] // f
    wt = node.window_token.sel(layer=layer).values
    w, p = (int(i[0]) for i in np.nonzero(wt == token))
    real = wt[w] >= 0
    flat = np.zeros(gh * gw)
    flat[wt[w][real]] = att.isel(window=w, query=p).values[real]
    return np.kron(flat.reshape(gh, gw), np.ones((f, f)))[: first[0], : first[1]]


def shown_maps(atlas) -> list[np.ndarray]:
    return [np.asarray(atlas.examples.data[atlas.heatmap_trace(i)].z, dtype=np.float64) for i in range(2 * atlas.k)]


def extremes_by_hand(values: xr.DataArray, layer: int, head: int, k: int) -> tuple[list[int], list[int]]:
    column = values.sel(layer=layer, head=head).values
    order = sorted(range(len(column)), key=lambda s: (column[s], s))
    top = sorted(range(len(column)), key=lambda s: (-column[s], s))
    return top[:k], order[:k]


# -- the overview ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", FROM_ATTENTION)
def test_heat_map_and_dots_are_the_dataset_mean_of_each_statistic(vit_cap, name):
    atlas = HeadAtlas(vit_cap, stat=name, k=2)
    want = vl.head_stats(vit_cap, name).mean("sample").values
    np.testing.assert_allclose(np.asarray(atlas.overview.data[0].z, dtype=float), want, rtol=1e-12)
    dots = atlas.overview.data[1]
    layer_of_dot = np.round(np.asarray(dots.x)).astype(int)
    heads_of_dot = [h for _, h in dots.customdata]
    np.testing.assert_allclose(dots.y, want[layer_of_dot, heads_of_dot], rtol=1e-12)
    assert sorted(zip(layer_of_dot.tolist(), heads_of_dot)) == [(l, h) for l in range(3) for h in range(3)]
    assert atlas.overview.layout.yaxis2.title.text == f"{STAT_INFO[name].title} ({STAT_INFO[name].unit})"


def test_hovering_a_head_shows_its_spread_over_the_images(vit_cap):
    atlas = HeadAtlas(vit_cap, stat="attention_entropy")
    values = vl.head_stats(vit_cap, "attention_entropy").values
    text = atlas.overview.data[0].customdata[1][2]
    assert "block 1, head 2" in text and f"std {values[:, 1, 2].std():.3g}" in text
    assert f"{values[:, 1, 2].min():.4g}–{values[:, 1, 2].max():.4g}" in text and "7 images" in text


def test_the_statistic_selector_switches_every_view(vit_cap):
    atlas = HeadAtlas(vit_cap, k=2)
    assert atlas.stat == vl.HEAD_STATS[0] and [v for _, v in atlas.stat_select.options] == FROM_ATTENTION
    atlas.stat_select.value = "prefix_attention"
    assert atlas.stat == "prefix_attention"
    np.testing.assert_allclose(np.asarray(atlas.overview.data[0].z, dtype=float),
                               vl.head_stats(vit_cap, "prefix_attention").mean("sample").values, rtol=1e-12)
    assert "Attention to prefix tokens" in atlas.caption.value
    top, low = extremes_by_hand(vl.head_stats(vit_cap, "prefix_attention"), atlas.layer, atlas.head, 2)
    assert atlas.shown_samples() == top + low


def test_a_capture_that_recorded_ablation_effects_offers_them(vit_model):
    cap = vl.capture(vit_model, random_images(3, 32, seed=2), keep=["attention", "ablation_effect"], grads=False)
    atlas = HeadAtlas(cap, k=1)
    offered = [v for _, v in atlas.stat_select.options]
    assert "ablation_effect" in offered and "gradient_weight" not in offered  # no gradients kept
    atlas.stat = "ablation_effect"
    np.testing.assert_allclose(atlas.mean(), vl.head_stats(cap, "ablation_effect").mean("sample").values)


def test_it_opens_on_the_head_with_the_highest_mean(vit_cap):
    atlas = HeadAtlas(vit_cap, stat="attention_distance")
    mean = vl.head_stats(vit_cap, "attention_distance").mean("sample").values
    assert (atlas.layer, atlas.head) == np.unravel_index(mean.argmax(), mean.shape)


# -- a head's images ----------------------------------------------------------------------------------------
def test_clicking_a_cell_shows_the_heads_highest_and_lowest_images_under_its_attention(vit_cap):
    atlas = HeadAtlas(vit_cap, stat="attention_distance", k=3)
    click(atlas.overview, 0, 2, 1)  # x = head 2, y = block 1
    assert (atlas.layer, atlas.head) == (1, 2)
    top, low = extremes_by_hand(vl.head_stats(vit_cap, "attention_distance"), 1, 2, 3)
    assert atlas.shown_samples() == top + low
    for got, s in zip(shown_maps(atlas), top + low, strict=True):
        np.testing.assert_allclose(got, minmax(query_row(vit_cap, s, 1, 2, None)), atol=2e-6)
    titles = [a.text for a in atlas.examples.layout.annotations]
    assert titles[0].startswith(f"highest #{top[0]}") and titles[3].startswith(f"lowest #{low[0]}")
    cell = atlas.overview.data[2]
    assert (min(cell.x), max(cell.x), min(cell.y), max(cell.y)) == (1.5, 2.5, 0.5, 1.5)  # the outline


def test_clicking_a_dot_selects_its_head(vit_cap):
    atlas = HeadAtlas(vit_cap, k=2)
    dots = atlas.overview.data[1]
    i = [tuple(c) for c in dots.customdata].index((2, 0))
    atlas.overview._js2py_pointsCallback = {
        "event_type": "plotly_click", "points": {"trace_indexes": [1], "point_indexes": [i], "xs": [dots.x[i]],
                                                 "ys": [dots.y[i]]}, "device_state": None, "selector": None}
    assert (atlas.layer, atlas.head) == (2, 0)


def test_clicking_a_patch_makes_it_the_query_of_every_image(vit_cap):
    atlas = HeadAtlas(vit_cap, head=(2, 1), k=2)
    click(atlas.examples, atlas.heatmap_trace(1), 3 * 8 + 3.5, 1 * 8 + 3.5)  # patch (1, 3) of panel 1
    assert atlas.query == (1, 3)
    for got, s in zip(shown_maps(atlas), atlas.shown_samples(), strict=True):
        np.testing.assert_allclose(got, minmax(query_row(vit_cap, s, 2, 1, (1, 3))), atol=2e-6)
    assert "query=1,3" in atlas.probe.value


def test_swin_shows_missing_heads_as_gaps_and_window_rows(swin_cap):
    atlas = HeadAtlas(swin_cap, stat="attention_distance", k=2)
    z = atlas.overview.data[0].z
    assert z[0][2] is None and z[0][3] is None and z[2][3] is not None  # stage 0 has two heads of four
    shapes = atlas.overview.layout.shapes  # the stage boundary, between blocks 1 and 2, in both views
    assert [sh.y0 for sh in shapes if sh.yref == "y"] == [1.5] and [sh.x0 for sh in shapes if sh.xref == "x2"] == [1.5]
    with pytest.raises(OptionError, match="heads 0..1"):
        atlas.select(1, 3)
    atlas.select(3, 3)
    atlas.query = (5, 9)
    for got, s in zip(shown_maps(atlas), atlas.shown_samples(), strict=True):
        np.testing.assert_allclose(got, minmax(query_row(swin_cap, s, 3, 3, (5, 9))), atol=2e-6)


# -- stores ----------------------------------------------------------------------------------------------
def test_a_reduced_store_recaptures_the_shown_images_with_the_model(vit_cap, vit_model):
    stats = {n: vl.head_stats(vit_cap, n) for n in FROM_ATTENTION}
    red = reduced(vit_cap, stats)
    with pytest.raises(CaptureFormatError, match="pass the model"):
        HeadAtlas(red, stat="attention_entropy", head=(1, 1), k=2)
    atlas = HeadAtlas(red, vit_model, stat="attention_entropy", head=(1, 1), k=2)
    full = HeadAtlas(vit_cap, stat="attention_entropy", head=(1, 1), k=2)
    assert atlas.shown_samples() == full.shown_samples()
    for a, b in zip(shown_maps(atlas), shown_maps(full), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)
    # a store that kept no images needs the source they came from
    no_images = reduced(vit_cap, stats)
    no_images.dataset = no_images.to_dataset(inherit=False).drop_vars("image")
    with pytest.raises(CaptureFormatError, match="images="):
        HeadAtlas(no_images, vit_model, head=(1, 1), k=2)
    source = HeadAtlas(no_images, vit_model, stat="attention_entropy", head=(1, 1), k=2,
                       images=vit_cap["image"])
    for a, b in zip(shown_maps(source), shown_maps(full), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_a_reduced_store_offers_only_the_statistics_it_holds(vit_cap):
    red = reduced(vit_cap, {"attention_entropy": vl.head_stats(vit_cap, "attention_entropy")})
    with pytest.raises(OptionError, match=r"stats=\['attention_distance'\]"):
        HeadAtlas(red, stat="attention_distance")
    with pytest.raises(OptionError, match="Did you mean"):
        HeadAtlas(vit_cap, stat="attention_distanse")


@pytest.mark.slow
def test_the_atlas_of_a_lazy_store_equals_the_capture(tmp_path, vit_model, vit_cap):
    store = vl.capture(vit_model, vit_cap["image"].values, store=tmp_path / "run.zarr", batch_size=3)
    lazy, full = HeadAtlas(store, head=(2, 2), k=2), HeadAtlas(vit_cap, head=(2, 2), k=2)
    np.testing.assert_allclose(lazy.mean(), full.mean(), rtol=1e-12)
    assert lazy.shown_samples() == full.shown_samples()
    for a, b in zip(shown_maps(lazy), shown_maps(full), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)


# -- linking, layout, export ----------------------------------------------------------------------------
def test_clicking_a_head_shows_it_alone_in_a_linked_explorer_of_another_capture(vit_cap, vit_model):
    one = vl.capture(vit_model, random_images(1, 32, seed=3))
    ex = Explorer(one, vit_model)
    atlas = HeadAtlas(vit_cap, explorer=ex, k=2)
    assert atlas.layer == ex.layer  # takes the Explorer's layer
    atlas.select(1, 2)
    assert ex.layer == 1 and ex.selected_heads == {0: [2]}
    ex.query = (2, 1)
    assert atlas.query == (2, 1)
    ex.heads = {0: (0,)}
    assert atlas.head == 0
    other = vl.capture(make_vit(seed=1, depth=2), random_images(1, 32))
    with pytest.raises(OptionError, match="same capture"):
        vl.widgets.link(Explorer(other), atlas)


def test_the_atlas_is_a_vitlens_widget_that_fits_its_output_area(vit_cap):
    atlas = HeadAtlas(vit_cap, k=2)
    assert isinstance(atlas, CaptureView)
    for fig in (atlas.overview, atlas.examples):
        assert fig.layout.width is None and fig.layout.autosize is True
        assert fig._config["displayModeBar"] is False and fig._config["responsive"] is True


def test_export_draws_the_current_view_without_a_browser(vit_cap, tmp_path):
    atlas = HeadAtlas(vit_cap, stat="attention_entropy", head=(1, 0), k=2)
    fig = atlas.export_figure()
    assert fig._suptitle.get_text().startswith(vit_cap.attrs["model"]) and "block 1, head 0" in fig._suptitle.get_text()
    heat = fig.axes[0].images[0].get_array()
    np.testing.assert_allclose(heat.filled(np.nan), atlas.mean(), rtol=1e-12)
    titles = [ax.get_title() for ax in fig.axes if ax.get_title().startswith("#")]
    assert len(titles) == 4 and titles[0].startswith(f"#{atlas.shown_samples()[0]} ")
    a, b = atlas.save(tmp_path / "a.png"), atlas.save(tmp_path / "b.png")
    assert a.read_bytes()[:4] == b"\x89PNG" and a.read_bytes() == b.read_bytes()


def test_figures_head_atlas_is_the_same_view_for_papers(swin_cap, swin_model):
    fig = vl.figures.head_atlas(swin_cap, "attention_distance", head=(3, 1), k=2, query=(3, 3))
    mean = vl.head_stats(swin_cap, "attention_distance").mean("sample").values
    np.testing.assert_allclose(fig.axes[0].images[0].get_array().filled(np.nan), mean, rtol=1e-12)
    dots = np.concatenate([c.get_offsets()[:, 1] for c in fig.axes[1].collections[:4]])
    np.testing.assert_allclose(np.sort(dots[np.isfinite(dots)]), np.sort(mean[np.isfinite(mean)]), rtol=1e-12)
    shown = [ax for ax in fig.axes if ax.get_title().startswith("#")]
    assert len(shown) == 4
    overview = vl.figures.head_atlas(swin_cap, "attention_entropy")
    assert [ax.get_title() for ax in overview.axes[:1]] == ["Attention entropy: dataset mean"]
