"""vl.explain on what users naturally pass: class names as targets, samples selected with xarray."""

from __future__ import annotations

import numpy as np
import pytest

import vitlens as vl


@pytest.fixture(scope="module")
def model():
    return vl.load_model("vit-shapes")


@pytest.fixture(scope="module")
def cap(model):
    return vl.capture(model, vl.datasets.shapes(3, seed=4).image, target="star")


def test_capture_takes_class_names_alone_or_one_per_image(model, cap):
    names = cap.attrs["class_names"]
    assert cap.target.values.tolist() == [names.index("star")] * 3
    mixed = vl.capture(model, vl.datasets.shapes(2, seed=4).image, target=["ring", 2])
    assert mixed.target.values.tolist() == [names.index("ring"), 2]
    with pytest.raises(vl.TargetError, match="unknown class name 'stars'"):
        vl.capture(model, vl.datasets.shapes(1, seed=4).image, target="stars")


def test_explain_takes_the_captured_class_by_name_or_index(cap):
    star = cap.attrs["class_names"].index("star")
    plain = vl.explain(cap, "tokentm")
    np.testing.assert_array_equal(vl.explain(cap, "tokentm", target="star").values, plain.values)
    np.testing.assert_array_equal(vl.explain(cap, "tokentm", target=[star] * 3).values, plain.values)
    assert set(vl.explain(cap, "all", target="star").data_vars) == set(vl.methods.explainable_methods(cap))


def test_class_agnostic_methods_explain_any_class(cap):
    ring = vl.explain(cap, "rollout", target="ring")
    np.testing.assert_array_equal(ring.values, vl.explain(cap, "rollout").values)
    assert ring.target.values.tolist() == [cap.attrs["class_names"].index("ring")] * 3


def test_class_specific_methods_on_another_class_say_exactly_what_to_call(model, cap):
    with pytest.raises(vl.TargetError, match=r"tokentm is class-specific.*vl\.capture\(model, cap\['image'\], "
                                             r"target='ring'\)"):
        vl.explain(cap, "tokentm", target="ring")
    with pytest.raises(vl.TargetError, match="gradcam, transformer_attribution, generic_attention, lnstat, tokentm"):
        vl.explain(cap, "all", target="ring")
    with pytest.raises(vl.TargetError, match="unknown class name"):
        vl.explain(cap, "rollout", target="rings")
    # the call the message names gives the map asked for: re-capturing the star reproduces the star maps
    again = vl.capture(model, cap["image"], target="star")
    np.testing.assert_allclose(vl.explain(again, "tokentm").values, vl.explain(cap, "tokentm").values,
                               rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("select", ["sel", "isel", "isel-list"])
def test_a_sample_selected_with_xarray_stays_explainable(cap, select):
    one = {"sel": lambda: cap.sel(sample=1), "isel": lambda: cap.isel(sample=1),
           "isel-list": lambda: cap.isel(sample=[1])}[select]()
    for method in ("rollout", "tokentm", "lnstat"):
        got = vl.explain(one, method)
        assert got.dims == ("sample", "y", "x") and got["sample"].values.tolist() == [1]
        np.testing.assert_allclose(got.values[0], vl.explain(cap, method).values[1], rtol=1e-6)


def test_swin_window_tables_survive_a_scalar_selection():
    from vitlens.methods.selection import SAMPLE_FREE

    cap = vl.capture(vl.load_model("swin-shapes"), vl.datasets.shapes(2, seed=1).image)
    free = {f"{node.path}:{v}" for node in cap.subtree for v in node.to_dataset(inherit=False).data_vars
            if "sample" not in node[v].dims}
    assert {f.split(":")[1] for f in free} == set(SAMPLE_FREE)  # the one list of model-only variables
    got = vl.explain(cap.sel(sample=0), "transformer_attribution")
    np.testing.assert_allclose(got.values[0], vl.explain(cap, "transformer_attribution").values[0], rtol=1e-6)


# -- a capture without gradients, and lists of methods (#32.6) --------------------------------------
@pytest.fixture(scope="module")
def no_grads(model):
    return vl.capture(model, vl.datasets.shapes(2, seed=4).image, grads=False)


def test_a_gradient_method_without_gradients_names_grads_true(no_grads):
    for method in ("generic_attention", "transformer_attribution", "gradcam"):
        with pytest.raises(vl.CaptureFormatError, match=r"grads=False.*grads=True") as err:
            vl.explain(no_grads, method)
        assert "keep=" not in str(err.value), str(err.value)  # keep was 'all' already: not the fix


def test_all_on_a_capture_without_gradients_gives_the_class_agnostic_methods(no_grads):
    with pytest.warns(UserWarning, match=r"left out .*tokentm.*grads=True"):
        maps = vl.explain(no_grads, "all")
    agnostic = [m for m in vl.METHODS if not vl.methods.METHOD_INFO[m].class_specific]
    assert list(maps.data_vars) == agnostic == ["attention", "rollout"]
    # the methods whose pass is made only when named in keep= (AttnLRP, LeGrad) are not asked for by 'all'
    assert maps.attrs["left_out"] == [m for m in vl.METHODS if m not in agnostic and not vl.methods.groups_of(m)]
    for m in agnostic:
        np.testing.assert_array_equal(maps[m].values, vl.explain(no_grads, m).values)


def test_a_list_of_methods_gives_a_dataset_like_all(cap):
    maps = vl.explain(cap, ["rollout", "tokentm"], heads=[0, 1])
    assert list(maps.data_vars) == ["rollout", "tokentm"] and "left_out" not in maps.attrs
    for m in ("rollout", "tokentm"):
        np.testing.assert_array_equal(maps[m].values, vl.explain(cap, m, heads=[0, 1]).values)
    every, two = vl.explain(cap, "all"), vl.explain(cap, ["tokentm", "rollout"])
    for m in ("rollout", "tokentm"):
        np.testing.assert_array_equal(two[m].values, every[m].values)
    with pytest.raises(vl.OptionError, match="Did you mean 'rollout'"):
        vl.explain(cap, ["rolout", "tokentm"])
