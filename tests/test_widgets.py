"""Live widgets, driven from Python: every control changes the figure to what vitlens computes.

Expected maps are computed here independently of the widgets' caches: attention
straight from the capture with xarray, the rest with ``vl.explain`` and
``statistic_maps`` (cumulative maps as ``layers=range(0, l + 1)``).
"""

from __future__ import annotations

import tomllib
from pathlib import Path

import numpy as np
import pytest
import traitlets
import xarray as xr
from conftest import make_swin, make_vit, random_images

import vitlens as vl
from vitlens.errors import CaptureFormatError, ExportError, OptionError
from vitlens.methods import METHOD_INFO, statistic_maps
from vitlens.widgets import Compare, Explorer, HeadGrid, ModelView, TokenCurves, export_target
from vitlens.widgets import model_view as model_view_module
from vitlens.widgets import panels as panels_module
from vitlens.widgets.base import CaptureView
from vitlens.widgets.text import escape


# -- fixtures and independent expectations -----------------------------------------------
@pytest.fixture(scope="module")
def vit_model():
    return make_vit(seed=21)


@pytest.fixture(scope="module")
def vit_cap(vit_model):  # every group: the widgets show every registered method, AttnLRP and LeGrad too
    return vl.capture(vit_model, random_images(2, 32, seed=7), keep=("all", *vl.methods.extra_groups()))


@pytest.fixture(scope="module")
def swin_cap():
    return vl.capture(make_swin(seed=22), random_images(2, 64, seed=8))


def minmax(a) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    span = a.max() - a.min()
    return np.zeros_like(a) if span <= 0 else (a - a.min()) / span


def close(got, want) -> None:
    np.testing.assert_allclose(np.asarray(got, dtype=np.float64), minmax(want), atol=2e-5)


def vit_attention(cap, sample, layer, heads, token) -> np.ndarray:
    st = cap["stage0"]
    row = st.attention.sel(layer=layer, head=heads).mean("head").isel(sample=sample, query=token)
    patches = row.isel(key=np.flatnonzero(st["kind"].values == "patch"))
    return patches.values.reshape(st.attrs["grid"])


def cumulative(cap, method, layer, sample=0, **options) -> np.ndarray:
    return vl.explain(cap, method, layers=range(0, layer + 1), **options).isel(sample=sample).values


def statistic(cap, stat, layer, sample=0) -> np.ndarray:
    return statistic_maps(cap, stat=stat).isel(sample=sample).sel(layer=layer).values


def click(fig, trace: int, x: float, y: float) -> None:
    """What the page sends when a point of ``trace`` is clicked."""
    fig._js2py_pointsCallback = {
        "event_type": "plotly_click",
        "points": {"trace_indexes": [trace], "point_indexes": [0], "xs": [x], "ys": [y]},
        "device_state": None,
        "selector": None,
    }


def patch_centre(cap, row, col) -> tuple[float, float]:
    sy, sx = cap["stage0"].attrs["stride"]
    return col * sx + (sx - 1) / 2, row * sy + (sy - 1) / 2


# -- Explorer, ViT -----------------------------------------------------------------------
def test_explorer_opens_on_last_layer_with_all_heads_and_cls_query(vit_cap, vit_model):
    ex = Explorer(vit_cap, vit_model)
    maps = ex.panel_maps()
    assert ex.layer == 2 and ex.query is None and ex.selected_heads == {0: [0, 1, 2]}
    close(maps["attention"], vit_attention(vit_cap, 0, 2, [0, 1, 2], 0))
    close(maps["statistic"], statistic(vit_cap, "std", 2))
    close(maps["fusion"], cumulative(vit_cap, "lnstat", 2, grad=False))
    close(maps["method"], cumulative(vit_cap, "generic_attention", 2))
    assert "CLS" in ex.figure.layout.annotations[0].text


@pytest.mark.parametrize("layer", [0, 1, 2])
def test_layer_slider_updates_every_panel(vit_cap, layer):
    ex = Explorer(vit_cap)
    ex.layer_slider.value = layer
    maps = ex.panel_maps()
    close(maps["attention"], vit_attention(vit_cap, 0, layer, [0, 1, 2], 0))
    close(maps["statistic"], statistic(vit_cap, "std", layer))
    close(maps["fusion"], cumulative(vit_cap, "lnstat", layer, grad=False))
    close(maps["method"], cumulative(vit_cap, "generic_attention", layer))
    assert f"block {layer}" in ex.captions.value and all(f"block {layer}" in a.text for a in ex.figure.layout.annotations)


def test_layer_slider_move_is_one_batched_update_without_recomputing(vit_cap, monkeypatch):
    ex = Explorer(vit_cap)
    calls = {"explain": 0, "update": 0, "other": 0}
    real_explain = panels_module.explain

    def counting_explain(*args, **kwargs):
        calls["explain"] += 1
        return real_explain(*args, **kwargs)

    monkeypatch.setattr(panels_module, "explain", counting_explain)
    monkeypatch.setattr(ex.figure, "_send_update_msg", lambda *a, **k: calls.__setitem__("update", calls["update"] + 1))
    for name in ("_send_restyle_msg", "_send_relayout_msg"):
        monkeypatch.setattr(ex.figure, name, lambda *a, **k: calls.__setitem__("other", calls["other"] + 1))
    for layer in (0, 1, 2, 1):
        ex.layer_slider.value = layer
    assert calls == {"explain": 0, "update": 4, "other": 0}


def test_head_toggle_updates_head_dependent_panels(vit_cap):
    ex = Explorer(vit_cap)
    ex.layer_slider.value = 1
    ex.head_toggles[0][1].value = False
    assert ex.selected_heads == {0: [0, 2]}
    maps = ex.panel_maps()
    close(maps["attention"], vit_attention(vit_cap, 0, 1, [0, 2], 0))
    close(maps["statistic"], statistic(vit_cap, "std", 1))  # heads do not enter the statistic
    close(maps["fusion"], cumulative(vit_cap, "lnstat", 1, heads=[0, 2], grad=False))
    close(maps["method"], cumulative(vit_cap, "generic_attention", 1, heads=[0, 2]))
    assert "heads 0, 2 of 3" in ex.captions.value


def test_none_and_all_buttons_clear_and_restore_heads(vit_cap):
    ex = Explorer(vit_cap)
    before = ex.panel_maps()
    ex.head_controls.none_button.click()
    assert ex.selected_heads == {0: []}
    assert not ex.panel_maps()["attention"].any() and "No head selected" in ex.captions.value
    ex.head_controls.all_button.click()
    for name, values in ex.panel_maps().items():
        np.testing.assert_array_equal(values, before[name])


def test_clicking_a_patch_makes_it_the_query_and_marks_it(vit_cap):
    ex = Explorer(vit_cap)
    x, y = patch_centre(vit_cap, 1, 2)
    click(ex.figure, ex.heatmap_trace(2), x, y)  # any panel's heatmap works
    assert ex.query == (1, 2)
    token = int(np.flatnonzero((vit_cap["stage0"]["row"].values == 1) & (vit_cap["stage0"]["col"].values == 2))[0])
    close(ex.panel_maps()["attention"], vit_attention(vit_cap, 0, 2, [0, 1, 2], token))
    marker = ex.figure.data[ex._marker_trace]
    assert min(marker.x) < x < max(marker.x) and min(marker.y) < y < max(marker.y)
    ex.query_button.click()
    assert ex.query is None and len(ex.figure.data[ex._marker_trace].x) == 0


@pytest.mark.parametrize("stat", ["mean", "var", "norm", "std"])
def test_statistic_dropdown_switches_statistic_and_fusion(vit_cap, stat):
    ex = Explorer(vit_cap, layer=1)
    ex.stat_select.value = stat
    maps = ex.panel_maps()
    close(maps["statistic"], statistic(vit_cap, stat, 1))
    close(maps["fusion"], cumulative(vit_cap, "lnstat", 1, stat=stat, grad=False))
    assert "first LayerNorm" in ex.captions.value


@pytest.mark.parametrize("method", vl.METHODS)
def test_method_dropdown_shows_each_method_up_to_the_layer(vit_cap, method):
    ex = Explorer(vit_cap)
    ex.method_select.value = method
    for layer in (0, 2):
        ex.layer_slider.value = layer
        got = ex.panel_maps()["method"]
        if method == "gradcam":
            want = vl.explain(vit_cap, "gradcam", layers=layer).isel(sample=0).values
        elif method in ("attention", "attnlrp"):  # one block; AttnLRP: the relevance entering the block
            want = vl.explain(vit_cap, method, layers=layer).isel(sample=0).values
        elif method == "transformer_attribution" and layer == 0:
            want = np.zeros_like(got)  # starts at block 1
            assert "starts at block 1" in ex.captions.value
        else:
            want = cumulative(vit_cap, method, layer)
        close(got, want)


def test_sample_selector_switches_image_and_maps(vit_cap):
    ex = Explorer(vit_cap)
    image0 = ex.figure.data[0].source
    ex.sample_select.value = 1
    assert ex.figure.data[0].source != image0
    maps = ex.panel_maps()
    close(maps["attention"], vit_attention(vit_cap, 1, 2, [0, 1, 2], 0))
    close(maps["method"], cumulative(vit_cap, "generic_attention", 2, sample=1))
    assert "sample 1" in ex.title.value


def test_sample_selector_is_hidden_for_a_single_image(vit_model):
    cap = vl.capture(vit_model, random_images(1, 32, seed=3))
    assert Explorer(cap).sample_select.layout.display == "none"


def test_opacity_slider_sets_every_heatmap(vit_cap):
    ex = Explorer(vit_cap)
    ex.opacity_slider.value = 0.25
    assert [ex.figure.data[ex.heatmap_trace(i)].opacity for i in range(4)] == [0.25] * 4


def test_panels_share_one_colour_scale_with_a_colour_bar(vit_cap):
    ex = Explorer(vit_cap)
    heatmaps = [ex.figure.data[ex.heatmap_trace(i)] for i in range(4)]
    assert {h.coloraxis for h in heatmaps} == {"coloraxis"}
    axis = ex.figure.layout.coloraxis
    assert (axis.cmin, axis.cmax, axis.showscale) == (0, 1, True)


def test_class_selector_lists_top5_and_recaptures_for_another_class(vit_cap, vit_model):
    ex = Explorer(vit_cap, vit_model)
    options = ex.class_select.options
    probs = np.exp(vit_cap.logits.values[0]) / np.exp(vit_cap.logits.values[0]).sum()
    assert [c for _, c in options] == list(np.argsort(-probs, kind="stable")[:5])
    assert ex.class_select.value == int(vit_cap.target.values[0]) and not ex.class_select.disabled
    other = [c for _, c in options if c != ex.target][0]
    ex.class_select.value = other
    assert ex.target == other
    recap = vl.capture(vit_model, vit_cap.image.isel(sample=[0]).values, target=other)
    close(ex.panel_maps()["method"], cumulative(recap, "generic_attention", 2))
    assert escape(repr(str(vit_cap.class_name.values[other]))) in ex.captions.value  # the caption names it (escaped)
    # class-agnostic panels do not change with the class
    close(ex.panel_maps()["fusion"], cumulative(vit_cap, "lnstat", 2, grad=False))


def test_class_selector_is_disabled_without_a_model(vit_cap):
    ex = Explorer(vit_cap)
    assert ex.class_select.disabled and "model" in ex.class_select.tooltip


def test_capture_without_gradients_explains_why_in_the_caption(vit_model):
    cap = vl.capture(vit_model, random_images(1, 32), grads=False)
    ex = Explorer(cap)
    assert not ex.panel_maps()["method"].any()
    assert "capture again" in ex.captions.value
    close(ex.panel_maps()["fusion"], cumulative(cap, "lnstat", 2, grad=False))  # gradient-free panels still work


def test_explorer_opens_a_saved_capture(vit_cap, tmp_path):
    path = vl.save(vit_cap, tmp_path / "cap.nc")
    ex = Explorer(vl.open(path), layer=1)
    close(ex.panel_maps()["fusion"], cumulative(vit_cap, "lnstat", 1, grad=False))


def test_explorer_rejects_bad_options_with_what_to_do(vit_cap):
    with pytest.raises(OptionError, match="layers 0..2"):
        Explorer(vit_cap, layer=7)
    with pytest.raises(OptionError, match="choose from"):
        Explorer(vit_cap, stat="median")
    with pytest.raises(OptionError, match="choose from"):
        Explorer(vit_cap, method="lime")
    with pytest.raises(OptionError, match="out of range"):
        Explorer(vit_cap, heads=[5])
    with pytest.raises(CaptureFormatError, match="vl.capture"):
        Explorer(xr.DataTree())
    with pytest.raises(OptionError, match="'default', None"):
        Explorer(vit_cap, query="cls")
    ex = Explorer(vit_cap)
    with pytest.raises(OptionError, match="outside"):
        ex.select_patch(9, 0)
    assert ex.query is None  # a rejected query leaves the view as it was
    with pytest.raises(OptionError, match=r"\.png"):
        ex.save("view.gif")
    with pytest.raises(OptionError, match="layers 0..2"):
        ex.layer = 9
    with pytest.raises(OptionError, match="samples 0..1"):
        ex.sample = 2
    with pytest.raises(OptionError, match="compare_class"):
        Explorer(vit_cap, compare_class=True)  # a second class needs the model


def test_avg_pooled_vit_starts_at_the_centre_patch():
    model = make_vit(global_pool="avg", class_token=False, seed=3)
    cap = vl.capture(model, random_images(1, 32))
    ex = Explorer(cap)
    assert ex.query == (2, 2)
    close(ex.panel_maps()["attention"], vit_attention(cap, 0, 2, [0, 1, 2], 2 * 4 + 2))
    with pytest.raises(OptionError, match="no CLS"):
        ex.select_query(None)


# -- Explorer, Swin ------------------------------------------------------------------------
def swin_attention(cap, sample, layer, heads, row, col) -> np.ndarray:
    """The query's window row, scattered onto the stage grid, repeated onto the first grid."""
    stage = next(n for n in cap.children.values() if layer in n["layer"].values)
    gh, gw = stage.attrs["grid"]
    f = cap["stage0"].attrs["grid"][0] // gh
    token = (row // f) * gw + col // f
    wt = stage.window_token.sel(layer=layer).values
    w, p = (int(i[0]) for i in np.nonzero(wt == token))
    keys = stage.attention.sel(layer=layer, head=heads).mean("head").isel(sample=sample, window=w, query=p).values
    flat = np.zeros(gh * gw)
    flat[wt[w]] = keys
    return np.kron(flat.reshape(gh, gw), np.ones((f, f)))


def test_swin_starts_at_the_centre_token_with_windows_drawn(swin_cap):
    ex = Explorer(swin_cap)
    assert ex.query == (8, 8)
    close(ex.panel_maps()["attention"], swin_attention(swin_cap, 0, 3, [0, 1, 2, 3], 8, 8))
    assert len(ex.figure.data[ex._grid_trace].x) > 0
    assert "stage1" in ex.stage_label.value and "shifted" in ex.stage_label.value


@pytest.mark.parametrize("layer", [0, 1, 2, 3])
def test_swin_layer_slider_moves_stage_indicator_windows_and_maps(swin_cap, layer):
    ex = Explorer(swin_cap)
    ex.select_patch(3, 13)
    ex.layer_slider.value = layer
    stage = 0 if layer < 2 else 1
    assert f"stage{stage}" in ex.stage_label.value
    assert len(ex.head_controls.box.children) == 1 + (2 if stage == 0 else 4) + 2  # label, heads, all, none
    heads = [0, 1] if stage == 0 else [0, 1, 2, 3]
    maps = ex.panel_maps()
    close(maps["attention"], swin_attention(swin_cap, 0, layer, heads, 3, 13))
    close(maps["statistic"], statistic(swin_cap, "std", layer))
    close(maps["fusion"], cumulative(swin_cap, "lnstat", layer, grad=False))
    close(maps["method"], cumulative(swin_cap, "generic_attention", layer))
    edges = ex.figure.data[ex._grid_trace]
    assert len(edges.x) > 0
    if layer == 1:  # shifted windows: a boundary 2 tokens in (stride 4 px → x = 7.5)
        assert 7.5 in [v for v in edges.x if v is not None]


def test_swin_head_toggles_are_per_stage(swin_cap):
    ex = Explorer(swin_cap, layer=3)
    ex.toggle_head(3)
    assert ex.selected_heads == {0: [0, 1], 1: [0, 1, 2]}
    heads = {l: ([0, 1] if l < 2 else [0, 1, 2]) for l in range(4)}
    close(ex.panel_maps()["fusion"], cumulative(swin_cap, "lnstat", 3, heads=heads, grad=False))
    ex.layer_slider.value = 0
    close(ex.panel_maps()["fusion"], cumulative(swin_cap, "lnstat", 0, grad=False))


def test_swin_gradcam_panel_is_the_block_at_the_slider(swin_cap):
    # gradcam's default on Swin v1 is heads as channels (docs/METHODS.md §3): one block at a time
    ex = Explorer(swin_cap, method="gradcam")
    for layer in (0, 3):
        ex.layer_slider.value = layer
        close(ex.panel_maps()["method"], vl.explain(swin_cap, "gradcam", layers=layer).isel(sample=0).values)
        assert f"block {layer}" in ex.captions.value


# -- HeadGrid --------------------------------------------------------------------------------
def test_head_grid_shows_every_head_of_the_layer(vit_cap):
    grid = HeadGrid(vit_cap, layer=1)
    maps = grid.head_maps()
    assert maps.shape == (3, 4, 4)
    for h in range(3):
        close(maps[h], vit_attention(vit_cap, 0, 1, [h], 0))
    grid.layer_slider.value = 0
    close(grid.head_maps()[2], vit_attention(vit_cap, 0, 0, [2], 0))


def test_clicking_a_head_toggles_it_in_the_linked_explorer(vit_cap):
    ex = Explorer(vit_cap)
    grid = HeadGrid(vit_cap, explorer=ex)
    click(grid.figure, grid.heatmap_trace(1), *patch_centre(vit_cap, 0, 0))
    assert ex.selected_heads == {0: [0, 2]}
    assert grid.figure.data[grid.heatmap_trace(1)].opacity < grid.opacity
    assert "(off)" in grid.figure.layout.annotations[1].text and "(off)" not in grid.figure.layout.annotations[0].text
    ex.layer_slider.value = 0  # the grid follows the Explorer's layer and query
    ex.select_patch(3, 3)
    assert grid.layer == 0 and grid.layer_slider.value == 0
    close(grid.head_maps()[0], vit_attention(vit_cap, 0, 0, [0], 1 + 3 * 4 + 3))
    grid.layer_slider.value = 2  # and drives it
    assert ex.layer == 2


def test_head_grid_on_its_own_dims_clicked_heads_and_unlinks(vit_cap):
    grid = HeadGrid(vit_cap, layer=2)
    click(grid.figure, grid.heatmap_trace(0), *patch_centre(vit_cap, 1, 1))
    assert grid.figure.data[grid.heatmap_trace(0)].opacity < grid.opacity and grid.selected()[0] == frozenset({1, 2})
    ex = Explorer(vit_cap)
    linked = HeadGrid(vit_cap, explorer=ex)
    linked.unlink()
    ex.layer_slider.value = 0
    assert linked.layer == 2  # no longer follows the Explorer


def test_head_grid_switches_to_the_swin_stage_with_more_heads(swin_cap):
    grid = HeadGrid(swin_cap, layer=0)
    assert grid.head_maps().shape[0] == 2
    grid.layer_slider.value = 2
    assert grid.head_maps().shape[0] == 4
    close(grid.head_maps()[3], swin_attention(swin_cap, 0, 2, [3], 8, 8))


# -- Compare -----------------------------------------------------------------------------------
def test_compare_shows_the_seven_methods_at_the_slider_layer(vit_cap):
    cmp = Compare(vit_cap)
    cmp.layer_slider.value = 1
    maps = cmp.panel_maps()
    assert list(maps) == list(vl.METHODS)
    close(maps["rollout"], cumulative(vit_cap, "rollout", 1))
    close(maps["tokentm"], cumulative(vit_cap, "tokentm", 1))
    close(maps["gradcam"], vl.explain(vit_cap, "gradcam", layers=1).isel(sample=0).values)
    cmp.sample_select.value = 1
    close(cmp.panel_maps()["lnstat"], cumulative(vit_cap, "lnstat", 1, sample=1))


def test_compare_works_for_swin(swin_cap):
    cmp = Compare(swin_cap, layer=2)
    close(cmp.panel_maps()["rollout"], cumulative(swin_cap, "rollout", 2))


# -- fitting the page: responsive figures, colour bars, no modebar over the titles -----------------
def all_widgets(cap, model):
    ex = Explorer(cap, model)
    return [ex, HeadGrid(cap, explorer=ex), Compare(cap, model), ModelView(cap, explorer=ex),
            TokenCurves(cap, explorer=ex)]


def test_every_figure_follows_the_output_width_without_a_modebar(vit_cap, vit_model):
    for w in all_widgets(vit_cap, vit_model):
        fig = w.figure
        assert fig.layout.width is None and fig.layout.autosize is True, type(w).__name__
        assert fig._config["displayModeBar"] is False and fig._config["responsive"] is True, type(w).__name__


def test_explorer_and_compare_show_one_colour_bar_inside_the_figure(vit_cap):
    for w in (Explorer(vit_cap), Compare(vit_cap)):
        axis = w.figure.layout.coloraxis
        assert axis.showscale is True and (axis.cmin, axis.cmax) == (0, 1)
        assert axis.colorbar.x is None or axis.colorbar.x <= 1.0  # placed by plotly, which makes room for it
        assert w.figure.layout.margin.autoexpand is not False


def test_plotly_loader_javascript_is_a_package_file(vit_cap):
    from vitlens.widgets import figure as figure_module

    js = Path(figure_module.__file__).with_name("plotly_widget.js")
    assert "globalThis[KEY]" in js.read_text() and "_SHARED_BUNDLE = \"\"\"" not in Path(figure_module.__file__).read_text()
    esm = Explorer(vit_cap).figure._esm
    assert "Symbol.for(\"vitlens.plotly-widget." in esm and "__SOURCE__" not in esm
    data = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert "*.js" in data["vitlens.widgets"]


# -- head toggles: the selection is obvious, nothing truncated --------------------------------------
def test_head_toggles_show_the_selection_by_colour_and_count(vit_cap):
    ex = Explorer(vit_cap)
    toggles = ex.head_toggles[0]
    assert [t.button_style for t in toggles] == ["primary"] * 3
    assert "<b>3</b>/3" in ex.head_controls.label.value
    ex.toggle_head(1)
    assert [t.button_style for t in toggles] == ["primary", "", "primary"]
    assert "<b>2</b>/3" in ex.head_controls.label.value
    ex.head_controls.none_button.click()
    assert [t.button_style for t in toggles] == ["", "", ""] and "<b>0</b>/3" in ex.head_controls.label.value
    for button in (ex.head_controls.all_button, ex.head_controls.none_button):
        assert button.layout.width == "auto"  # sized to its label: "none", not "no…"


# -- linking with traitlets -------------------------------------------------------------------------
def test_widgets_share_one_base(vit_cap):
    for cls in (Explorer, HeadGrid, Compare, ModelView, TokenCurves):
        assert issubclass(cls, CaptureView)
    assert Explorer.heatmap_trace is HeadGrid.heatmap_trace is Compare.heatmap_trace


def test_link_ties_explorer_and_head_grid_with_traitlets_links(vit_cap):
    ex, grid = Explorer(vit_cap), HeadGrid(vit_cap, layer=0)
    links = vl.widgets.link(ex, grid)
    assert len(links) == 4 and all(isinstance(l, traitlets.link) for l in links)
    assert grid.layer == 2  # takes the Explorer's values
    ex.layer, ex.query = 1, (2, 3)
    assert (grid.layer, grid.query) == (1, (2, 3))
    token = 1 + 2 * 4 + 3
    close(grid.head_maps()[1], vit_attention(vit_cap, 0, 1, [1], token))
    grid.toggle_head(0)  # the grid's click reaches the Explorer through the heads trait
    assert ex.selected_heads == {0: [1, 2]}
    close(ex.panel_maps()["fusion"], cumulative(vit_cap, "lnstat", 1, heads=[1, 2], grad=False))
    ex.sample = 1
    assert grid.sample == 1
    close(grid.head_maps()[2], vit_attention(vit_cap, 1, 1, [2], token))
    for l in links:
        l.unlink()
    ex.layer = 0
    assert grid.layer == 1


def test_link_refuses_widgets_of_different_captures(vit_cap, vit_model):
    other = vl.capture(vit_model, random_images(1, 32, seed=5))
    with pytest.raises(OptionError, match="same capture"):
        vl.widgets.link(Explorer(vit_cap), HeadGrid(other))
    with pytest.raises(OptionError, match="same capture"):
        HeadGrid(other, explorer=Explorer(vit_cap))


def test_head_grid_draws_each_head_over_the_image(vit_cap):
    grid = HeadGrid(vit_cap, layer=1)
    images = [grid.figure.data[2 * h] for h in range(3)]
    assert all(t.type == "image" and t.source.startswith("data:image/") for t in images)
    assert all(grid.figure.data[grid.heatmap_trace(h)].opacity == grid.opacity < 1 for h in range(3))
    before = images[0].source
    grid.sample = 1
    assert grid.figure.data[0].source != before
    close(grid.head_maps()[0], vit_attention(vit_cap, 1, 1, [0], 0))


# -- new views ---------------------------------------------------------------------------------------
def test_model_view_shows_every_layer_and_head_for_the_query(vit_cap):
    mv = ModelView(vit_cap)
    tiles = mv.tile_maps()
    assert tiles.shape == (3, 3, 4, 4)
    for l in range(3):
        for h in range(3):
            close(tiles[l, h], vit_attention(vit_cap, 0, l, [h], 0))
    assert mv.figure.data[0].type == "image" and mv.figure.data[0].source.startswith("data:image/")


def test_model_view_click_picks_query_and_layer_and_follows_the_explorer(vit_cap):
    ex = Explorer(vit_cap)
    mv = ModelView(vit_cap, explorer=ex)
    p, (py, px) = mv.tile_px, mv._pitch
    # block 1 (second row of tiles), head 2 (third column), patch (3, 1)
    x, y = (2 * px + 1) * p + p / 2, (1 * py + 3) * p + p / 2
    click(mv.figure, 1, x, y)
    assert (mv.layer, mv.query) == (1, (3, 1)) and (ex.layer, ex.query) == (1, (3, 1))
    token = 1 + 3 * 4 + 1
    close(mv.tile_maps()[2, 0], vit_attention(vit_cap, 0, 2, [0], token))
    outline = mv.figure.data[2]
    assert min(outline.y) < y < max(outline.y)  # the layer's row is outlined
    ex.select_query(None)
    close(mv.tile_maps()[0, 1], vit_attention(vit_cap, 0, 0, [1], 0))


def test_model_view_for_swin_leaves_missing_heads_empty_and_pools_fine_grids(swin_cap, monkeypatch):
    mv = ModelView(swin_cap)
    tiles = mv.tile_maps()
    assert tiles.shape == (4, 4, 16, 16)
    assert np.isnan(tiles[0, 2:]).all() and np.isfinite(tiles[2]).all()  # stage 0 has 2 heads, stage 1 has 4
    close(tiles[2, 3], swin_attention(swin_cap, 0, 2, [3], 8, 8))
    monkeypatch.setattr(model_view_module, "MAX_CELLS", 8)
    small = ModelView(swin_cap).tile_maps()
    assert small.shape == (4, 4, 8, 8)
    want = swin_attention(swin_cap, 0, 2, [3], 8, 8).reshape(8, 2, 8, 2).mean((1, 3))
    close(small[2, 3], want)


def test_token_curves_follow_the_explorers_query(vit_cap):
    ex = Explorer(vit_cap)
    tc = TokenCurves(vit_cap, explorer=ex)
    st = vit_cap["stage0"]
    curves = tc.curves()
    np.testing.assert_allclose(curves["token norm ‖x‖"]["token"], st.token_norm.isel(sample=0, token=0).values,
                               rtol=1e-6)
    ex.select_patch(1, 2)
    token = 1 + 1 * 4 + 2
    curves = tc.curves()
    np.testing.assert_allclose(curves["LayerNorm std (norm1)"]["token"],
                               st.ln_std.sel(norm="norm1").isel(sample=0, token=token).values, rtol=1e-6)
    patches = st.ln_mean.sel(norm="norm1").isel(sample=0, token=slice(1, None)).mean("token").values
    np.testing.assert_allclose(curves["LayerNorm mean (norm1)"]["patches"], patches, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(tc.figure.data[0].y, st.token_norm.isel(sample=0, token=token).values, rtol=1e-6)
    ex.layer = 1
    assert list(tc.figure.data[2].x) == [1, 1]  # the layer marker
    click(tc.figure, 0, 0, 0.0)
    assert ex.layer == 0
    tc.unlink()
    ex.layer = 2
    assert tc.layer == 0


def test_token_curves_for_swin_and_without_norms(swin_cap, vit_model):
    tc = TokenCurves(swin_cap, query=(3, 13))
    want = [swin_cap[f"stage{s}"].token_norm.isel(sample=0, token=t).values for s, t in ((0, 3 * 16 + 13), (1, 1 * 8 + 6))]
    np.testing.assert_allclose(tc.curves()["token norm ‖x‖"]["token"], np.concatenate(want), rtol=1e-6)
    bare = vl.capture(vit_model, random_images(1, 32), keep=["attention"])
    tc = TokenCurves(bare)
    assert tc.curves() == {} and "capture again" in tc.caption.value


def test_explorer_shows_two_classes_side_by_side(vit_cap, vit_model):
    ex = Explorer(vit_cap, vit_model, compare_class=True)
    assert ex.panels[-1] == "contrast" and len(ex.figure.layout.annotations) == 5
    probs = np.exp(vit_cap.logits.values[0]) / np.exp(vit_cap.logits.values[0]).sum()
    second = int(np.argsort(-probs, kind="stable")[1])
    assert ex.contrast_target == second and ex.contrast_select.value == second
    recap = vl.capture(vit_model, vit_cap.image.isel(sample=[0]).values, target=second)
    maps = ex.panel_maps()
    close(maps["contrast"], cumulative(recap, "generic_attention", 2))
    close(maps["method"], cumulative(vit_cap, "generic_attention", 2))
    third = int(np.argsort(-probs, kind="stable")[2])
    ex.contrast_select.value = third
    recap = vl.capture(vit_model, vit_cap.image.isel(sample=[0]).values, target=third)
    close(ex.panel_maps()["contrast"], cumulative(recap, "generic_attention", 2))
    name = str(vit_cap.class_name.values[third])
    assert f"class {name}" in ex.figure.layout.annotations[4].text and f"vs {name!r}" in ex.context()


def test_smooth_overlays_are_an_option_next_to_token_blocks(vit_cap):
    ex, grid, cmp = Explorer(vit_cap), HeadGrid(vit_cap), Compare(vit_cap)
    for w in (ex, grid, cmp):
        assert {t.zsmooth for t in w.heatmaps()} == {False}
        w.smooth_toggle.value = True
        assert w.smooth is True and {t.zsmooth for t in w.heatmaps()} == {"best"}
        assert all(p["smooth"] is True for p in w.export_panels())
    assert Explorer(vit_cap, smooth=True).heatmaps()[0].zsmooth == "best"


def test_method_names_and_titles_come_from_the_registry(vit_cap):
    ex, cmp = Explorer(vit_cap), Compare(vit_cap)
    assert [v for _, v in ex.method_select.options] == list(METHOD_INFO)
    assert [label for label, _ in ex.method_select.options] == [i.title for i in METHOD_INFO.values()]
    assert cmp.methods == tuple(METHOD_INFO)
    for ann, info in zip(cmp.figure.layout.annotations, METHOD_INFO.values(), strict=True):
        assert ann.text.startswith(info.title)


def test_compare_class_selector_explains_another_class(vit_cap, vit_model):
    cmp = Compare(vit_cap, vit_model)
    assert not cmp.class_select.disabled and cmp.class_select.value == int(vit_cap.target.values[0])
    other = [c for _, c in cmp.class_select.options if c != cmp.target][0]
    cmp.class_select.value = other
    recap = vl.capture(vit_model, vit_cap.image.isel(sample=[0]).values, target=other)
    close(cmp.panel_maps()["generic_attention"], cumulative(recap, "generic_attention", 2))
    close(cmp.panel_maps()["rollout"], cumulative(vit_cap, "rollout", 2))  # class-agnostic
    assert Compare(vit_cap).class_select.disabled


# -- export: context in the figure, matplotlib (no browser), a confined "Save as" box ---------------
def suptitle(fig) -> str:
    return fig._suptitle.get_text() if fig._suptitle is not None else ""


def test_exports_carry_model_sample_class_and_probability(vit_cap, vit_model):
    ex = Explorer(vit_cap, vit_model)
    ex.sample = 1
    c = int(vit_cap.target.values[1])
    logits = vit_cap.logits.values[1]
    p = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    name = str(vit_cap.class_name.values[c])
    for w in (ex, Compare(vit_cap, vit_model, sample=1)):
        fig = w.export_figure()
        title = suptitle(fig)
        assert vit_cap.attrs["model"] in title and "sample 1" in title and repr(name) in title
        assert f"p = {p[c]:.2f}" in title
        panels = w.export_panels()
        assert len(panels) == w.num_panels and all(q["image"].shape == (32, 32, 3) for q in panels)
        np.testing.assert_array_equal(panels[0]["overlay"], np.asarray(w.heatmaps()[0].z, dtype=np.float32))
    pred = int(p.argmax())
    for w in (HeadGrid(vit_cap, sample=1), ModelView(vit_cap, sample=1), TokenCurves(vit_cap, sample=1)):
        title = suptitle(w.export_figure())
        assert vit_cap.attrs["model"] in title and "sample 1" in title, type(w).__name__
        assert f"predicted {str(vit_cap.class_name.values[pred])!r} (p = {p[pred]:.2f})" in title


def test_save_writes_png_svg_and_pdf_without_a_browser(vit_cap, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "nowhere"))
    monkeypatch.setenv("BROWSER_PATH", str(tmp_path / "nowhere"))
    ex = Explorer(vit_cap)
    ex.layer = 1
    assert ex.save(tmp_path / "view.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert b"<svg" in ex.save(tmp_path / "view.svg").read_bytes()[:600]
    assert ex.save(tmp_path / "view.pdf").read_bytes()[:5] == b"%PDF-"
    for w in (HeadGrid(vit_cap), Compare(vit_cap), ModelView(vit_cap), TokenCurves(vit_cap)):
        assert w.save(tmp_path / f"{type(w).__name__}.png").stat().st_size > 1000


def test_save_from_python_writes_anywhere(vit_cap, tmp_path):
    ex = Explorer(vit_cap, export_dir=tmp_path / "exports")
    elsewhere = tmp_path / "deep" / "er"
    elsewhere.mkdir(parents=True)
    assert ex.save(elsewhere / "../view.png").exists()  # code may use any path


@pytest.mark.parametrize("name", ["../x.png", "/tmp/x.png", "sub/x.png", "..", ".", "a\\b.png", ".hidden.png",
                                  "x.gif", "", "   ", "C:x.png", "x.png/"])
def test_save_as_box_refuses_paths_and_bad_names(vit_cap, tmp_path, name):
    folder = tmp_path / "exports"
    folder.mkdir()
    ex = Explorer(vit_cap, export_dir=folder)
    ex.filename.value = name
    ex.export_button.click()
    assert "color:#b00" in ex.export_status.value
    assert list(folder.iterdir()) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["exports"]
    with pytest.raises(ExportError):
        export_target(name, folder)


def test_save_as_box_writes_into_the_export_directory_and_never_overwrites_silently(vit_cap, tmp_path):
    folder = tmp_path / "exports"  # created on first export
    for w in (Explorer(vit_cap, export_dir=folder), Compare(vit_cap, export_dir=folder)):
        w.filename.value = f"{type(w).__name__}.png"
        w.export_button.click()
        path = folder / f"{type(w).__name__}.png"
        assert path.read_bytes()[:4] == b"\x89PNG" and "saved" in w.export_status.value
        path.write_bytes(b"mine")
        w.export_button.click()
        assert path.read_bytes() == b"mine" and "already exists" in w.export_status.value
        w.exporter.overwrite.value = True
        w.export_button.click()
        assert path.read_bytes()[:4] == b"\x89PNG" and "saved" in w.export_status.value
    (folder / "link.png").symlink_to(tmp_path / "outside.png")
    with pytest.raises(ExportError, match="link"):
        export_target("link.png", folder, overwrite=True)
    assert not (tmp_path / "outside.png").exists()


def test_only_the_first_figure_of_a_kernel_carries_the_plotly_bundle(vit_cap, monkeypatch):
    from vitlens.widgets import figure as figure_module

    monkeypatch.setitem(figure_module._CARRIED, "done", False)
    first, second = Explorer(vit_cap).figure, HeadGrid(vit_cap).figure
    assert len(first._esm) > 1_000_000 and len(second._esm) < 10_000  # the others: a few KB, not 5 MB each
    assert "const SOURCE = null;" in second._esm and "const SOURCE = null;" not in first._esm
    sent = []
    monkeypatch.setattr(second, "send", lambda content, buffers=None: sent.append((content, buffers)))
    second._handle_custom_msg({"vitlens": "bundle"}, [])  # a page without the carrier asks once
    assert sent and sent[0][0] == {"vitlens": "bundle"}
    assert sent[0][1][0].decode("utf-8") == figure_module._widget_class()._bundle_source


def test_link_names_traits_it_cannot_link(vit_cap):
    with pytest.raises(OptionError, match="not a trait of both"):
        vl.widgets.link(Explorer(vit_cap), TokenCurves(vit_cap), ["heads"])
    grid = HeadGrid(vit_cap, explorer=Explorer(vit_cap))
    assert len(grid._links) == 4 and all(isinstance(l, traitlets.link) for l in grid._links)


def test_explorer_panels_can_wrap_into_rows_for_narrow_screens(vit_cap):
    ex = Explorer(vit_cap, cols=2)
    ys = sorted({round(a.y, 3) for a in ex.figure.layout.annotations})
    assert len(ys) == 2 and ex.figure.layout.height == 60 + 2 * 250  # two rows of two panels
    close(ex.panel_maps()["fusion"], cumulative(vit_cap, "lnstat", 2, grad=False))
    x, y = patch_centre(vit_cap, 3, 0)
    click(ex.figure, ex.heatmap_trace(3), x, y)  # a panel of the second row
    assert ex.query == (3, 0)
    close(ex.panel_maps()["attention"], vit_attention(vit_cap, 0, 2, [0, 1, 2], 1 + 3 * 4))


# -- what travels to the page is JSON: no NaN -----------------------------------------------
@pytest.fixture
def page_messages(monkeypatch):
    """Every widget state and update sent to the (absent) page, as the kernel would serialise it."""
    import ipywidgets.widgets.widget as widget_module

    sent = []
    create = widget_module.comm.create_comm
    send = widget_module.Widget._send

    def opened(**kw):
        sent.append(kw.get("data"))
        return create(**kw)

    def sending(self, msg, buffers=None):
        sent.append(msg)
        return send(self, msg, buffers)

    monkeypatch.setattr(widget_module.comm, "create_comm", opened)
    monkeypatch.setattr(widget_module.Widget, "_send", sending)
    return sent


def test_no_widget_sends_nan_to_the_page(swin_cap, page_messages):
    import json

    ex = Explorer(swin_cap)  # Swin: stages with 2 and 4 heads, so the ModelView has empty tiles
    widgets_ = [ex, ModelView(swin_cap, explorer=ex), HeadGrid(swin_cap, explorer=ex), TokenCurves(swin_cap, explorer=ex)]
    ex.sample, ex.query, ex.layer = 1, (2, 3), 1
    assert np.isnan(widgets_[1].tile_maps()).any()  # the empty tiles are still gaps
    bad = []
    for msg in page_messages:
        try:  # what jupyter_client does with every message (allow_nan=False), buffers aside
            json.dumps(msg, allow_nan=False, default=lambda o: None)
        except ValueError:
            bad.append(str(msg)[:200])
    assert len(page_messages) > 20 and not bad, bad


# -- a narrow output: the Explorer wraps its panels by itself -------------------------------------
def _title_lines(fig) -> list[str]:
    import re

    return [line for a in fig.layout.annotations for line in re.split("<br>", str(a.text))]


def test_explorer_wraps_to_two_columns_in_a_narrow_output_and_back(vit_cap):
    from vitlens.widgets.figure import COLORBAR_PX, TITLE_CHAR_PX

    ex = Explorer(vit_cap)
    assert ex.grid == (1, 4) and len({round(a.y, 3) for a in ex.figure.layout.annotations}) == 1
    ex.figure._bundle_requested(ex.figure, {"vitlens": "width", "width": 388}, [])  # what the page sends
    assert ex.grid == (2, 2)
    assert len({round(a.y, 3) for a in ex.figure.layout.annotations}) == 2
    assert len({round(a.x, 3) for a in ex.figure.layout.annotations}) == 2
    assert ex.figure.layout.height < 60 + 2 * 250  # panels of a narrow output are smaller: so are their rows
    panel_px = (388 - COLORBAR_PX) / 2
    assert all(len(line) * TITLE_CHAR_PX <= panel_px for line in _title_lines(ex.figure))  # titles never overlap
    close(ex.panel_maps()["fusion"], cumulative(vit_cap, "lnstat", 2, grad=False))
    x, y = patch_centre(vit_cap, 1, 2)
    click(ex.figure, ex.heatmap_trace(3), x, y)  # a panel of the second row still picks the query
    assert ex.query == (1, 2)
    ex.layer = 1  # later updates keep the short titles
    assert all(len(line) * TITLE_CHAR_PX <= panel_px for line in _title_lines(ex.figure))
    ex.figure.page_width_changed(1300)
    assert ex.grid == (1, 4) and len({round(a.y, 3) for a in ex.figure.layout.annotations}) == 1
    assert ex.figure.layout.height == 300


def test_explorer_cols_stays_an_override_at_any_width(vit_cap):
    ex = Explorer(vit_cap, cols=4, compare_class=False)
    ex.figure.page_width_changed(388)
    assert ex.grid == (1, 4) and len({round(a.y, 3) for a in ex.figure.layout.annotations}) == 1
    assert max(len(line) for line in _title_lines(ex.figure)) <= 12  # shortened to fit their 80-px panels
    ex2 = Explorer(vit_cap, cols=1)
    ex2.figure.page_width_changed(1400)
    assert ex2.grid == (4, 1)


def test_compare_wraps_its_panels_to_the_output_width(vit_cap):
    cmp = Compare(vit_cap)
    n = cmp.num_panels  # every method the capture holds passes for (nine: the fixture keeps every group)
    assert n == len(vl.METHODS) == 9
    assert cmp.grid == (3, 4) and cmp.figure.layout.height == 60 + 220 * 3  # at most 4 a row
    cmp.figure.page_width_changed(388)
    assert cmp.grid == (5, 2) and len({round(a.x, 3) for a in cmp.figure.layout.annotations}) == 2
    cmp.layer = 1
    assert all(len(line) <= 24 for line in _title_lines(cmp.figure))
    cmp.figure.page_width_changed(1300)
    assert cmp.grid == (3, 4)
    fixed = Compare(vit_cap, cols=7)
    fixed.figure.page_width_changed(388)
    assert fixed.grid == (2, 7)
