"""The Explorer's ablate mode: head switches turn heads off in the model; probabilities and maps follow."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import make_swin, make_vit, random_images

import vitlens as vl
from vitlens.errors import OptionError
from vitlens.methods import statistic_maps
from vitlens.widgets.base import softmax
from vitlens.widgets.panels import normalized


@pytest.fixture(scope="module")
def setup():
    model = make_vit()
    images = random_images(2, 32)
    return model, images, vl.capture(model, images)


def test_switching_a_head_off_changes_the_bars_and_the_maps_as_an_ablated_capture_would(setup):
    model, images, cap = setup
    ex = vl.Explorer(cap, model, ablate=True, sample=1, method="transformer_attribution")
    before = ex.panel_maps()
    ex.layer = 1
    ex.ablation.toggle(2, 0)  # block 0, head 2 (the shown block is 1)
    assert "ablated=0:2" in ex.probe.value
    ablated = vl.capture(model, images[1:], target=int(cap["target"][1]), ablate={0: [2]})
    want = vl.explain(ablated, "transformer_attribution", per_layer=True).isel(sample=0).sel(layer=1).values
    np.testing.assert_allclose(ex.panel_maps()["method"], normalized(want), rtol=1e-5, atol=1e-6)
    want_attention = ablated["stage0"].attention.isel(sample=0).sel(layer=1).mean("head").isel(query=0).values[1:]
    np.testing.assert_allclose(ex.panel_maps()["attention"], normalized(want_attention.reshape(4, 4)),
                               rtol=1e-5, atol=1e-6)
    bars = ex.ablation.bars.data
    after = softmax(ablated["logits"].values[0])
    assert bars[1].visible
    np.testing.assert_allclose(sorted(bars[1].x, reverse=True)[:1], [after.max()], rtol=1e-5)
    assert not np.allclose(bars[0].x, bars[1].x)
    ex.layer = 2
    assert ex.panel_maps()["attention"].shape == (4, 4)
    ex.ablation.reset()
    ex.layer = 1
    assert "ablated=-" in ex.probe.value and not ex.ablation.bars.data[1].visible
    ex.layer = 2
    for name, m in before.items():
        np.testing.assert_array_equal(ex.panel_maps()[name], m, err_msg=name)


def test_the_switches_show_the_shown_block_and_ablated_heads_look_distinct(setup):
    model, _, cap = setup
    ex = vl.Explorer(cap, model, ablate=True)
    ex.layer = 2
    ex.ablation.toggles[1].value = True  # a click on head 1's switch
    assert ex.ablation.ablated == {2: frozenset({1})}
    assert ex.ablation.toggles[1].button_style == "danger" and ex.ablation.toggles[0].button_style == ""
    assert all(t.button_style in ("", "primary") for t in ex.head_toggles[0])  # selection: blue/grey, never red
    ex.layer = 1
    assert not any(t.value for t in ex.ablation.toggles)  # block 1: nothing off
    ex.ablation.mode.value = False  # the mode off: the model as it is
    assert "ablated=-" in ex.probe.value
    np.testing.assert_array_equal(ex.panel_maps()["method"], vl.Explorer(cap, model, layer=1).panel_maps()["method"])
    assert all(t.disabled for t in ex.ablation.toggles)


def test_the_statistic_and_fusion_panels_read_the_ablated_capture(setup):
    """Every class-agnostic panel view reads the shown image's ablated recapture (``Explorer._shown``)."""
    model, images, cap = setup
    ex = vl.Explorer(cap, model, ablate=True, sample=1, layer=2, stat="norm")
    clean = ex.panel_maps()
    ex.ablation.toggle(1, 0)  # block 0, head 1: every later LayerNorm input changes
    ablated = vl.capture(model, images[1:], target=int(cap["target"][1]), ablate={0: [1]})
    stat = statistic_maps(ablated, stat="norm").isel(sample=0).sel(layer=2).values
    fusion = vl.explain(ablated, "lnstat", stat="norm", layers=range(0, 3), grad=False).isel(sample=0).values
    maps = ex.panel_maps()
    np.testing.assert_allclose(maps["statistic"], normalized(stat), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(maps["fusion"], normalized(fusion), rtol=1e-5, atol=1e-6)
    assert not np.allclose(maps["statistic"], clean["statistic"], atol=1e-4)  # the ablation shows
    ex.ablation.reset()
    np.testing.assert_array_equal(ex.panel_maps()["statistic"], clean["statistic"])


def test_a_linked_head_grid_ablates_on_click_in_ablate_mode(setup):
    model, _, cap = setup
    ex = vl.Explorer(cap, model, ablate=True)
    grid = vl.HeadGrid(cap, explorer=ex)
    grid.click_head(0)
    assert ex.ablation.ablated == {ex.layer: frozenset({0})}
    assert "switched off" in grid.figure.layout.annotations[0].text
    assert grid.heads[0] == (0, 1, 2)  # the selection is untouched
    ex.ablation.toggle(2)  # switched off in the Explorer: the grid marks it too
    assert "switched off" in grid.figure.layout.annotations[2].text
    ex.ablation.mode.value = False
    assert "switched off" not in grid.figure.layout.annotations[2].text
    grid.click_head(0)  # the mode off: a click selects, as before
    assert grid.heads[0] == (1, 2) and ex.heads[0] == (1, 2)


def test_mean_ablation_in_the_explorer_uses_the_reference():
    model = make_swin()
    images, reference = random_images(1, 64), random_images(3, 64, seed=2)
    cap = vl.capture(model, images)
    ex = vl.Explorer(cap, model, ablate=True, ablation="mean", reference=reference, method="tokentm")
    ex.ablation.toggle(3, 2)
    ablated = vl.capture(model, images, target=int(cap["target"][0]), ablate={2: [3]}, ablation="mean",
                         reference=reference)
    want = vl.explain(ablated, "tokentm", per_layer=True).isel(sample=0).sel(layer=ex.layer).values
    np.testing.assert_allclose(ex.panel_maps()["method"], normalized(want), rtol=1e-5, atol=1e-6)


def test_the_mode_switch_alone_until_it_is_switched_on(setup):
    model, _, cap = setup
    ex = vl.Explorer(cap, model)  # with the model: the mode's switch, off, and no bar chart on the page
    assert ex.ablation is not None and not ex.ablation.mode.value and ex.ablation.bars is None
    ex.ablation.mode.value = True
    assert ex.ablation.bars is not None and ex.ablation.panel.children == (ex.ablation.bars,)
    ex.ablation.toggle(1, 2)
    assert ex.ablation.bars.data[1].visible and "ablated=2:1" in ex.probe.value


def test_the_ablate_mode_needs_the_model(setup):
    _, _, cap = setup
    with pytest.raises(OptionError, match="needs|pass it"):
        vl.Explorer(cap, ablate=True)
    assert vl.Explorer(cap).ablation is None


def test_the_ablated_recapture_follows_the_method_and_the_fusion_reading(setup):
    """The recapture stores only what is shown; another method or reading is recaptured with what it reads."""
    model, images, cap = setup
    ex = vl.Explorer(cap, model, ablate=True, method="rollout", layer=2)
    ex.ablation.toggle(0, 1)
    assert "attention_grad" not in ex.classes.source(0, ex.target)[0]["stage0"]  # rollout: no backward pass
    ablated = vl.capture(model, images[:1], target=int(cap["target"][0]), ablate={1: [0]})
    for method in ("tokentm", "transformer_attribution"):
        ex.method = method
        want = vl.explain(ablated, method, per_layer=True).isel(sample=0).sel(layer=2).values
        np.testing.assert_allclose(ex.panel_maps()["method"], normalized(want), rtol=1e-5, atol=1e-6, err_msg=method)
    ex.fusion_grad.value = True
    want = vl.explain(ablated, "lnstat", grad=True, per_layer=True).isel(sample=0).sel(layer=2).values
    np.testing.assert_allclose(ex.panel_maps()["fusion"], normalized(want), rtol=1e-5, atol=1e-6)
