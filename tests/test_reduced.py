"""Reduced capture (#27.1): maps and head statistics computed batch by batch, raw tensors dropped.

The reference is always ``vl.explain`` (or the statistic's function) on a full
capture of the same images: a reduced capture must store exactly those answers.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import xarray as xr
from conftest import make_vit, random_images, run_spawned

import vitlens as vl
from vitlens.capture import stream
from vitlens.registry import METHOD_INFO, STAT_INFO


def _full(model, images) -> xr.DataTree:
    """A capture of everything every method and statistic reads (their extra passes too)."""
    extra = set().union(*(info.groups() for info in STAT_INFO.values())) | set(vl.methods.extra_groups())
    return vl.capture(model, images, keep=["all", *sorted(extra - set(vl.KEEP_GROUPS))], progress=False)


def make_hf_vit(seed: int = 0) -> torch.nn.Module:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    cfg = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                                 patch_size=8, num_labels=4, intermediate_size=64)
    model = transformers.ViTForImageClassification(cfg).eval()
    with torch.no_grad():  # spread the near-uniform init, as the transformers tests do
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                p.normal_(0, 0.3)
            elif name.endswith("bias"):
                p.normal_(0, 0.1)
    model.vitlens_image_processor = transformers.ViTImageProcessor(
        size={"height": 32, "width": 32}, image_mean=[0.4, 0.5, 0.6], image_std=[0.2, 0.25, 0.3])
    return model


@pytest.fixture(scope="module")
def hf_vit():
    return make_hf_vit()


# every method and statistic (AttnLRP's, LeGrad's and the ablation passes included) takes seconds a model
MODELS = [pytest.param(which, marks=pytest.mark.slow) for which in ("vit", "swin", "vit_avg", "hf_vit")]


@pytest.fixture(scope="module")
def pair(request):
    """(full capture, reduced capture with every map and statistic) of the same images, per model."""
    cache = {}

    def make(which: str) -> tuple[xr.DataTree, xr.DataTree]:
        if which not in cache:
            model = request.getfixturevalue(which)
            images = random_images(5, 64 if which == "swin" else 32, seed=2)
            small = vl.capture(model, images, maps="all", stats="all", batch_size=2, progress=False)  # three batches
            cache[which] = _full(model, images), small
        return cache[which]

    return make


@pytest.mark.parametrize("which", MODELS)
def test_reduced_maps_equal_explain_on_a_full_capture(pair, which):
    full, small = pair(which)
    assert set(small["maps"].data_vars) == set(METHOD_INFO)
    for method in METHOD_INFO:
        want, got = vl.explain(full, method), vl.explain(small, method)
        assert got.dims == want.dims and got.attrs == want.attrs, method
        np.testing.assert_allclose(got.values, want.values, rtol=1e-5, atol=0, err_msg=method)
        np.testing.assert_array_equal(got["target"].values, want["target"].values)
    every = vl.explain(small, "all")
    for method in METHOD_INFO:
        np.testing.assert_array_equal(every[method].values, vl.explain(small, method).values)


@pytest.mark.parametrize("which", MODELS)
def test_reduced_stats_equal_head_stats_of_a_full_capture(pair, which):
    full, small = pair(which)
    assert list(small["stats"].data_vars) == list(vl.HEAD_STATS)
    assert not any("attention" in small[node] for node in small.children if node.startswith("stage"))
    for name in vl.HEAD_STATS:
        want, got = vl.head_stats(full, name), vl.head_stats(small, name)
        assert got.dims == ("sample", "layer", "head") and got.attrs == want.attrs, name
        np.testing.assert_array_equal(np.isnan(got.values), np.isnan(want.values))  # Swin: heads a stage lacks
        np.testing.assert_allclose(got.values, want.values, rtol=1e-5, atol=0, err_msg=name)
        np.testing.assert_array_equal(got["stage"].values, want["stage"].values)


def test_a_few_reduced_maps_and_stats_equal_those_of_a_full_capture(vit):
    """The fast lane's check: a map and a statistic with and without gradients, over two batches."""
    images = random_images(3, 32, seed=4)
    full = vl.capture(vit, images, progress=False)
    small = vl.capture(vit, images, maps=["rollout", "gradcam"], stats=["attention_distance", "gradient_weight"],
                       batch_size=2, progress=False)
    for method in ("rollout", "gradcam"):
        np.testing.assert_allclose(vl.explain(small, method).values, vl.explain(full, method).values, rtol=1e-5,
                                   atol=0, err_msg=method)
    for name in ("attention_distance", "gradient_weight"):
        np.testing.assert_allclose(vl.head_stats(small, name).values, vl.head_stats(full, name).values, rtol=1e-5,
                                   atol=0, err_msg=name)


def test_a_reduced_capture_keeps_no_raw_groups_unless_asked(vit, images32):
    small = vl.capture(vit, images32, maps=["rollout"], progress=False)
    assert set(small["stage0"].data_vars) == set() and "image" not in small
    assert set(small.to_dataset(inherit=False).data_vars) == {"logits", "target"}
    some = vl.capture(vit, images32, maps=["rollout"], keep=["ln", "norms", "image"], progress=False)
    assert {"ln_mean", "token_norm", "mlp_cos"} <= set(some["stage0"].data_vars)
    assert "attention" not in some["stage0"] and "image" in some
    both = vl.capture(vit, images32, maps=["rollout"], keep="all", progress=False)
    assert "attention_relevance" in both["stage0"] and "image" in both


def test_answers_are_stored_in_float32_and_a_near_uniform_map_keeps_the_digits_of_its_range(vit, images32):
    """#27: float64 maps doubled a Swin-T image's store. An untrained model's rollout varies by 1e-2 of its
    value: plain float32 would keep only 4 digits of its range, which min-max (the metrics) magnifies."""
    full = vl.capture(vit, images32, progress=False)
    small = vl.capture(vit, images32, maps=["rollout", "gradcam"], stats=["attention_entropy"], progress=False)
    stored = [*small["maps"].to_dataset().data_vars.values(), *small["stats"].to_dataset().data_vars.values()]
    assert [str(da.dtype) for da in stored] == ["float32"] * 3
    want, got = vl.explain(full, "rollout"), vl.explain(small, "rollout")
    spread = (want.max(("y", "x")) - want.min(("y", "x"))).values
    assert (spread < 2e-2 * abs(want).max(("y", "x")).values).all()  # near-uniform: the case float32 alone fails
    error = abs(got - want).max(("y", "x")).values
    assert (error <= 2.0**-23 * spread).all(), error / spread
    assert got.dtype == want.dtype and vl.explain(small, "gradcam").dtype == vl.explain(full, "gradcam").dtype


def test_map_options_are_stored_and_another_variant_is_refused_with_the_call_that_makes_it(vit, images32):
    full = vl.capture(vit, images32, progress=False)
    small = vl.capture(vit, images32, maps={"rollout": {"start_layer": 1, "per_layer": True}, "gradcam": {}},
                       progress=False)
    assert small["maps"]["rollout"].dims == ("sample", "layer", "map_y", "map_x")
    got = vl.explain(small, "rollout", start_layer=1, per_layer=True)
    np.testing.assert_allclose(got.values, vl.explain(full, "rollout", start_layer=1, per_layer=True).values,
                               rtol=1e-5)
    # the same options, spelled as the defaults resolve them
    same = vl.explain(small, "rollout", start_layer=1, per_layer=True, layers=None, merge="uniform")
    np.testing.assert_array_equal(same.values, got.values)
    with pytest.raises(vl.CaptureFormatError) as err:
        vl.explain(small, "rollout")
    message = str(err.value)
    assert '"start_layer": 1' in message and "vl.capture(model, images, maps=['rollout'])" in message
    with pytest.raises(vl.CaptureFormatError, match="transformer_attribution"):
        vl.explain(small, "transformer_attribution")
    with pytest.raises(vl.OptionError, match="takes no option"):
        vl.explain(small, "rollout", colour="red")
    # kept raw groups compute the variants that were not stored (this capture runs no pass after its
    # forward, so its attention is the explicit path's: the full capture's to rounding)
    kept = vl.capture(vit, images32, maps={"rollout": {"start_layer": 1}}, keep=["attention"], progress=False)
    np.testing.assert_allclose(vl.explain(kept, "rollout").values, vl.explain(full, "rollout").values, rtol=1e-5)


def test_a_reduced_capture_without_the_map_or_its_groups_says_which_capture_call_makes_it(vit, images32):
    stats_only = vl.capture(vit, images32, stats=["attention_entropy"], progress=False)
    with pytest.raises(vl.CaptureFormatError, match=r"stores no maps.*vl.capture\(model, images, maps=\['rollout'\]\)"):
        vl.explain(stats_only, "rollout")
    # a stored map named "attention" is not the raw attention rollout is computed from
    attention_map = vl.capture(vit, images32, maps=["attention"], progress=False)
    with pytest.raises(vl.CaptureFormatError, match="kept no raw attention"):
        vl.explain(attention_map, "rollout")
    assert vl.methods.explainable_methods(attention_map) == ("attention",)
    assert set(vl.explain(attention_map, "all").data_vars) == {"attention"}


def test_a_stored_map_is_for_the_captured_class_only(vit, images32):
    small = vl.capture(vit, images32, target=2, maps=["gradcam", "rollout"], progress=False)
    assert vl.explain(small, "gradcam", target=2).equals(vl.explain(small, "gradcam"))
    with pytest.raises(vl.TargetError, match="target="):
        vl.explain(small, "gradcam", target=1)
    assert vl.explain(small, "rollout", target=1)["target"].values.tolist() == [1, 1, 1]


@pytest.mark.parametrize("kwargs, match", [
    (dict(maps={"rollout": {"by_stage": True}}), "by_stage"),
    (dict(maps={"rollout": {"colour": 1}}), "takes no option"),
    (dict(maps={"rollout": {"target": 1}}), "target="),
    (dict(maps=["rollot"]), "Did you mean 'rollout'"),
    (dict(maps=["gradcam"], grads=False), "gradcam need the gradients"),
    (dict(maps=["rollout"], keep=["attention", "everything"]), "everything"),
])
def test_bad_reduced_requests_say_what_to_do(vit, images32, kwargs, match):
    with pytest.raises(vl.OptionError, match=match):
        vl.capture(vit, images32, progress=False, **kwargs)


@pytest.mark.slow  # every map and statistic, twice
def test_a_reduced_store_streams_opens_lazily_and_equals_the_in_memory_one(tmp_path, vit):
    images = random_images(7, 32, seed=3)
    small = vl.capture(vit, images, maps="all", stats="all", batch_size=3, progress=False)
    lazy = vl.capture(vit, images, maps="all", stats="all", store=tmp_path / "r.zarr", batch_size=3,
                      progress=False)
    assert lazy["maps"]["rollout"].chunks is not None
    for method in METHOD_INFO:
        got = vl.explain(lazy, method)
        np.testing.assert_array_equal(np.asarray(got.values), vl.explain(small, method).values)
        assert got.attrs == vl.explain(small, method).attrs
    for name in vl.HEAD_STATS:
        np.testing.assert_array_equal(vl.head_stats(lazy, name).values, small["stats"][name].values)
    again = vl.open(tmp_path / "r.zarr")
    assert again.attrs == small.attrs


def test_a_resume_with_other_maps_or_stats_is_refused(tmp_path, vit):
    images = random_images(4, 32, seed=3)
    vl.capture(vit, images, maps=["rollout"], store=tmp_path / "r.zarr", batch_size=2, progress=False)
    with pytest.raises(vl.ResumeError, match="maps"):
        vl.capture(vit, images, maps={"rollout": {"start_layer": 1}}, store=tmp_path / "r.zarr", resume=True,
                   batch_size=2, progress=False)
    with pytest.raises(vl.ResumeError, match="stats"):
        vl.capture(vit, images, maps=["rollout"], stats="all", store=tmp_path / "r.zarr", resume=True,
                   batch_size=2, progress=False)


N_IMAGES, BATCH = 10, 3


def _run_reduced(store: str, fault: int | None, log: str | None = None) -> None:
    import os

    for key, value in ((stream.FAULT_ENV, fault), (stream.FAULT_LOG_ENV, log)):
        if value is not None:
            os.environ[key] = str(value)
    vl.capture(make_vit(), random_images(N_IMAGES, 32, seed=5), store=store, batch_size=BATCH, maps="all",
               stats="all", progress=False)
    os._exit(0)


def _child(store, fault=None, log=None) -> int:
    return run_spawned(_run_reduced, str(store), fault, log)


@pytest.fixture(scope="module")
def reduced_trace(tmp_path_factory) -> list[str]:
    """Every write step of one uninterrupted reduced run, in order (step i+1 is trace[i])."""
    d = tmp_path_factory.mktemp("trace")
    assert _child(d / "run.zarr", log=str(d / "steps.txt")) == 0
    return [line.split("\t", 1)[1] for line in (d / "steps.txt").read_text().splitlines()]


@pytest.mark.slow  # a spawned child per kill, every map and statistic
@pytest.mark.parametrize("where", ["mid /maps", "mid root", "marker written, not renamed"])
def test_a_killed_reduced_capture_loses_nothing_and_resumes(tmp_path, reduced_trace, where):
    """A child dies at a write step of the second batch (``VITLENS_FAULT_POINT``, as test_faults does);
    the committed images open as they were, and the resumed store equals an in-memory reduced capture."""
    second = {"mid /maps": ("group /maps begins", 2), "mid root": ("group / begins", 3),
              "marker written, not renamed": ("commit marker written, not yet renamed", 0)}[where]
    steps = [i for i, s in enumerate(reduced_trace) if s == second[0]]
    fault = steps[1 if where != "marker written, not renamed" else 2] + 1 + second[1]
    store = tmp_path / "run.zarr"
    assert _child(store, fault=fault) == stream.FAULT_EXIT
    done = stream.committed(store)
    assert done == BATCH  # the first batch, and nothing of the second
    images = random_images(N_IMAGES, 32, seed=5)
    reference = vl.capture(make_vit(), images, maps="all", stats="all", batch_size=BATCH, progress=False)
    with pytest.warns(UserWarning, match="resume=True"):
        partial = vl.open(store, chunks={})
    assert partial["sample"].size == done
    np.testing.assert_array_equal(partial["maps"]["tokentm"].values, reference["maps"]["tokentm"].values[:done])
    resumed = vl.capture(make_vit(), images, store=store, resume=True, batch_size=BATCH, maps="all", stats="all",
                         progress=False)
    assert resumed["sample"].values.tolist() == list(range(N_IMAGES))
    for method in METHOD_INFO:
        np.testing.assert_array_equal(np.asarray(vl.explain(resumed, method).values),
                                      vl.explain(reference, method).values, err_msg=method)
    for name in vl.HEAD_STATS:
        np.testing.assert_array_equal(resumed["stats"][name].values, reference["stats"][name].values, err_msg=name)


@pytest.mark.slow  # a full capture, a store and two deletion curves: about 2 s of CPU
def test_metrics_run_on_a_reduced_store(tmp_path, vit):
    from vitlens.metrics import deletion, segmentation

    images = random_images(4, 32, seed=6)
    masks = np.zeros((4, 32, 32), bool)
    masks[:, 8:24, 8:24] = True
    full = vl.capture(vit, images, progress=False)
    lazy = vl.capture(vit, images, maps=["rollout", "gradcam"], store=tmp_path / "m.zarr", progress=False)
    for method in ("rollout", "gradcam"):
        xr.testing.assert_allclose(segmentation(vl.explain(lazy, method), masks),
                                   segmentation(vl.explain(full, method), masks), rtol=1e-5)
    # a reduced store keeps no pictures: the faithfulness metrics take them from the source
    got = deletion(vit, images, vl.explain(lazy, "rollout"), steps=4)
    want = deletion(vit, full, vl.explain(full, "rollout"), steps=4)
    xr.testing.assert_allclose(got, want, rtol=1e-5)
    with pytest.raises(vl.VitlensError, match="keep=\\['image'\\]"):
        deletion(vit, lazy, vl.explain(lazy, "rollout"), steps=4)


@pytest.mark.parametrize("in_store", [False, True])
def test_a_reduced_capture_names_the_runs_unreliable_samples_once(tmp_path, monkeypatch, in_store):
    """Transformer Attribution's PrecisionWarning names the samples whose float32 map depends on
    rounding. A reduced capture computes its maps batch by batch; it says so once for the run, and the
    stored map's ``lrp_unreliable`` names the run's samples (in the caller's labels), not one batch's
    (here every second image is called unreliable; batches of two)."""
    from vitlens.capture import precision

    monkeypatch.setattr(precision, "unreliable", lambda condition, dtype: np.arange(len(condition)) % 2 == 1)
    store = {"store": tmp_path / "run.zarr", "progress": False} if in_store else {}
    images = xr.DataArray(random_images(6, 32), dims=("sample", "y", "x", "channel"),
                          coords={"sample": np.arange(10, 16)})
    with pytest.warns(vl.PrecisionWarning) as caught:
        cap = vl.capture(make_vit(), images, maps=["transformer_attribution"], keep="none", batch_size=2, **store)
    named = [str(w.message).split("sample(s) ")[1].split("]")[0] + "]" for w in caught
             if w.category is vl.PrecisionWarning]
    want = [11, 13, 15] if not in_store else [1, 3, 5]  # a store numbers its samples from 0
    assert named == [str(want)]
    assert cap["maps/transformer_attribution"].attrs["lrp_unreliable"] == want
    if in_store:
        assert vl.open(tmp_path / "run.zarr")["maps/transformer_attribution"].attrs["lrp_unreliable"] == want
