"""Live widgets, driven from Python: every control changes the figure to what vitlens computes.

Expected maps are computed here independently of the widgets' caches: attention
straight from the capture with xarray, the rest with ``vl.explain`` and
``statistic_maps`` (cumulative maps as ``layers=range(0, l + 1)``).
"""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import xarray as xr
from conftest import make_swin, make_vit, random_images

import vitlens as vl
from vitlens.errors import CaptureFormatError, OptionError
from vitlens.methods import statistic_maps
from vitlens.widgets import Compare, Explorer, HeadGrid
from vitlens.widgets import panels as panels_module


# -- fixtures and independent expectations -----------------------------------------------
@pytest.fixture(scope="module")
def vit_model():
    return make_vit(seed=21)


@pytest.fixture(scope="module")
def vit_cap(vit_model):
    return vl.capture(vit_model, random_images(2, 32, seed=7))


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
    ex.heads.none_button.click()
    assert ex.selected_heads == {0: []}
    assert not ex.panel_maps()["attention"].any() and "No head selected" in ex.captions.value
    ex.heads.all_button.click()
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
        elif method == "attention":
            want = vl.explain(vit_cap, "attention", layers=layer).isel(sample=0).values
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
    assert repr(str(vit_cap.class_name.values[other])) in ex.captions.value
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
    assert len(ex.heads.box.children) == 1 + (2 if stage == 0 else 4) + 2  # label, heads, all, none
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


def test_swin_gradcam_panel_is_the_feature_map_at_every_layer(swin_cap):
    ex = Explorer(swin_cap, method="gradcam")
    want = vl.explain(swin_cap, "gradcam").isel(sample=0).values
    for layer in (0, 3):
        ex.layer_slider.value = layer
        close(ex.panel_maps()["method"], want)
    assert "same at every layer" in ex.captions.value


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
    click(grid.figure, 1, *patch_centre(vit_cap, 0, 0))
    assert ex.selected_heads == {0: [0, 2]}
    assert grid.figure.data[1].opacity < 1 and "✓" not in grid.figure.layout.annotations[1].text
    ex.layer_slider.value = 0  # the grid follows the Explorer's layer and query
    ex.select_patch(3, 3)
    assert grid.layer == 0 and grid.layer_slider.value == 0
    close(grid.head_maps()[0], vit_attention(vit_cap, 0, 0, [0], 1 + 3 * 4 + 3))
    grid.layer_slider.value = 2  # and drives it
    assert ex.layer == 2


def test_head_grid_on_its_own_dims_clicked_heads_and_unlinks(vit_cap):
    grid = HeadGrid(vit_cap, layer=2)
    click(grid.figure, 0, *patch_centre(vit_cap, 1, 1))
    assert grid.figure.data[0].opacity < 1 and grid.selected()[0] == frozenset({1, 2})
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


# -- export ----------------------------------------------------------------------------------
def _have_browser() -> bool:
    return bool(shutil.which("chromium") or os.environ.get("BROWSER_PATH"))


@pytest.fixture
def kaleido_server():
    """One browser for all exports of a test (each write_image would otherwise start its own)."""
    import kaleido

    kaleido.start_sync_server(silence_warnings=True)
    yield
    kaleido.stop_sync_server(silence_warnings=True)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:The kopts argument is ignored")  # plotly passes kaleido options a server ignores
@pytest.mark.skipif(not _have_browser() and not os.environ.get("CI"), reason="kaleido needs a Chromium (apt-get install chromium)")
def test_save_writes_the_current_view_as_png_svg_and_pdf(vit_cap, tmp_path, kaleido_server):
    ex = Explorer(vit_cap)
    ex.layer_slider.value = 1
    png = ex.save(tmp_path / "view.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert b"<svg" in ex.save(tmp_path / "view.svg").read_bytes()[:400]
    assert ex.save(tmp_path / "view.pdf").read_bytes()[:5] == b"%PDF-"
    ex.filename.value = str(tmp_path / "button.png")
    ex.export_button.click()
    assert (tmp_path / "button.png").exists() and "saved" in ex.export_status.value
