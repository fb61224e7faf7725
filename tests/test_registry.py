"""The method registry: one registration per method, read by explain, widgets and figures."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr
from conftest import make_swin, make_vit, random_images

import vitlens as vl
from vitlens import figures
from vitlens.methods import METHOD_INFO
from vitlens.registry import register_method
from vitlens.widgets import captions, panels
from vitlens.widgets.layout import capture_layout


@pytest.fixture(scope="module")
def avg_cap():
    # every group, the extra passes too: the registry's tests cover every registered method
    return vl.capture(make_vit(global_pool="avg", class_token=False, seed=3, depth=2), random_images(2, 32),
                      keep=("all", *vl.methods.extra_groups()))


@pytest.fixture(scope="module")
def cls_cap():
    return vl.capture(make_vit(depth=2, seed=4), random_images(2, 32), keep=("all", *vl.methods.extra_groups()))


def test_methods_tuple_is_the_registry_in_order():
    assert vl.METHODS == tuple(METHOD_INFO)
    assert vl.METHODS[:3] == ("attention", "rollout", "gradcam")
    for name, info in METHOD_INFO.items():
        assert info.name == name and callable(info.function) and info.title and info.caption
        assert getattr(vl.methods, name) is info.function
        assert ("per_layer" in info.options()) == info.per_layer


def test_class_specific_flags_match_the_maps(cls_cap):
    # a class-specific method gives different maps for two targets on the same images
    pics = cls_cap["image"].values
    model = make_vit(depth=2, seed=4)
    a, b = (vl.capture(model, pics, target=t, keep=("all", *vl.methods.extra_groups())) for t in (0, 1))
    for name, info in METHOD_INFO.items():
        differ = not np.allclose(vl.explain(a, name).values, vl.explain(b, name).values, rtol=1e-6, atol=1e-9)
        assert differ == info.class_specific, name


def test_defaults_follow_family_and_readout(avg_cap, cls_cap):
    gc = METHOD_INFO["gradcam"]
    assert gc.defaults_for(cls_cap) == {"on": "attention"}
    assert gc.defaults_for(avg_cap) == {"on": "features"}
    assert gc.defaults_for(avg_cap.attrs) == {"on": "features"}
    assert gc.defaults_for(capture_layout(avg_cap)) == {"on": "features"}
    # a family's entry is the most specific: Swin v1 takes heads as channels (docs/METHODS.md §3)
    assert gc.defaults_for({"family": "swin", "readout": "avg"}) == {"on": "attention"}
    assert gc.defaults_for({"family": "hf_swin", "readout": "avg"}) == {"on": "attention"}
    assert gc.defaults_for({"family": "swinv2", "readout": "avg"}) == {"on": "features"}
    # other read-outs that read every token out (attention pool, mean with prefix) follow "avg"
    assert gc.defaults_for({"family": "vit", "readout": "map"}) == {"on": "features"}
    assert METHOD_INFO["transformer_attribution"].defaults_for({"readout": "avg_with_prefix"}) == {"identity_path": "drop"}
    assert METHOD_INFO["transformer_attribution"].defaults_for({"readout": "cls"}) == {}
    assert vl.explain(avg_cap, "gradcam").attrs["on"] == "features"
    assert vl.explain(cls_cap, "gradcam").attrs["on"] == "attention"


def test_explain_all_works_under_an_average_readout(avg_cap):
    maps = vl.explain(avg_cap, "all", heads=[0, 1], layers=[0, 1])
    assert sorted(maps.data_vars) == sorted(vl.METHODS)
    assert maps["gradcam"].attrs["on"] == "features"
    np.testing.assert_allclose(maps["gradcam"].values, vl.explain(avg_cap, "gradcam", on="features").values)
    assert all(np.isfinite(maps[m].values).all() for m in vl.METHODS)


def test_widgets_and_figures_read_titles_and_captions(avg_cap, cls_cap):
    for name, info in METHOD_INFO.items():
        assert figures.TITLES[name] == info.title
        assert captions.method_title(name) == info.title
    layout = capture_layout(cls_cap)
    text = captions.method_caption(layout, "generic_attention", 1, 0, "cat", False)
    assert text.startswith("Chefer et al. 2021 (generic)") and "'cat'" in text and "blocks 0–1" in text
    avg = capture_layout(avg_cap)
    assert panels.method_options(avg, "gradcam") == {"on": "features"}
    assert not panels.layer_dependent(avg, "gradcam") and panels.layer_dependent(layout, "gradcam")
    assert "final feature map" in captions.method_caption(avg, "gradcam", 1, 0, "cat", True)


def test_a_registered_method_shows_up_everywhere(cls_cap):
    @register_method("uniform_demo", title="Uniform", caption="a flat map over {blocks}", class_specific=False,
                     per_layer=False)
    def uniform_demo(cap, *, layers=None, heads=None, scale: float = 1.0):
        base = vl.explain(cap, "attention", layers=layers, heads=heads)
        return (base * 0 + scale).assign_attrs(method="uniform_demo", scale=scale)

    try:
        assert "uniform_demo" in vl.methods.METHOD_INFO
        out = vl.explain(cls_cap, "uniform_demo", scale=2.0)
        assert float(out.max()) == 2.0
        assert vl.methods.options_of("uniform_demo") == ["layers", "heads", "scale"]
        assert "uniform_demo" in vl.explain(cls_cap, "all").data_vars
        layout = capture_layout(cls_cap)
        stack, _ = panels.method_maps(cls_cap, layout, "uniform_demo", {0: {0, 1, 2}})
        assert stack.shape[1] == len(layout.layers) and np.allclose(stack, 1.0)
        assert captions.method_caption(layout, "uniform_demo", 1, 0, "x", False) == "A flat map over blocks 0–1."
    finally:
        METHOD_INFO.pop("uniform_demo")


def test_registration_refuses_clashes_and_bad_defaults():
    with pytest.raises(vl.OptionError, match="already registered"):
        register_method("rollout", title="x", caption="x", class_specific=False, per_layer=False)(lambda cap: cap)
    with pytest.raises(vl.OptionError, match="defaults must map"):
        register_method("x", title="x", caption="x", class_specific=False, per_layer=False,
                        defaults={"avg": "features"})
    with pytest.raises(vl.OptionError, match="rollout"):
        vl.explain(xr.DataTree(), "rolout")


def test_swin_gradcam_default_from_registry():
    cap = vl.capture(make_swin(seed=1), random_images(1, 64))
    assert METHOD_INFO["gradcam"].defaults_for(cap) == {"on": "attention"}
    assert vl.explain(cap, "gradcam").attrs["on"] == "attention"


def test_every_name_check_is_the_registrys_one_message():
    """One message for a name that is not registered, with a did-you-mean hint, wherever a name is given;
    'all' is offered only where it is accepted (a list of methods, not one method)."""
    from vitlens.registry import method_info, resolve_methods, resolve_stats, stat_info

    with pytest.raises(vl.OptionError, match=r"unknown method 'rolout'; choose from \[.*\] or 'all'\. Did you mean"):
        resolve_methods(["rolout"])
    with pytest.raises(vl.OptionError, match=r"unknown method 'rolout'; choose from \[.*'legrad'\]\. Did you mean") as err:
        method_info("rolout")
    assert "'all'" not in str(err.value)
    with pytest.raises(vl.OptionError, match=r"unknown head statistic 'attention_entropi'; choose from \[[^]]*\]\. Did"):
        stat_info("attention_entropi")
    with pytest.raises(vl.OptionError, match=r"or 'all'\. Did you mean 'attention_entropy'"):
        resolve_stats("attention_entropi")
    for call in (lambda: vl.explain(None, "rolout"), lambda: vl.figures.layers(None, "rolout")):
        with pytest.raises(vl.OptionError, match="Did you mean 'rollout'"):
            call()


@pytest.mark.parametrize("method", list(METHOD_INFO))
def test_every_choice_option_is_checked_against_the_one_options_table(cls_cap, method):
    """Generated from the registry: each option a method annotates with a ``Literal`` is the options
    table's entry, and a value outside it is refused with the table's one message."""
    import typing

    from vitlens.methods.options import CHOICES

    hints = typing.get_type_hints(METHOD_INFO[method].function)
    for name, hint in hints.items():
        literal = [a for a in typing.get_args(hint) if typing.get_origin(a) is typing.Literal]
        if typing.get_origin(hint) is typing.Literal:
            literal = [hint]
        if not literal:
            continue
        assert name in CHOICES and CHOICES[name] == typing.get_args(literal[0]), (method, name)
        with pytest.raises(vl.OptionError, match=rf"^(?:{method} )?{name}='nope'; choose from \[.*\]\.$"):
            vl.explain(cls_cap, method, **{name: "nope"})
