"""Reduced capture (#27.1): maps and head statistics computed batch by batch, raw tensors dropped.

The reference is always ``vl.explain`` (or the statistic's function) on a full
capture of the same images: a reduced capture must store exactly those answers.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import xarray as xr
from conftest import make_vit, random_images

import vitlens as vl
from vitlens.capture import stream
from vitlens.registry import METHOD_INFO, STAT_INFO, register_stat


def _first_key_share(cap: xr.DataTree) -> xr.DataArray:
    """A head statistic for the tests (the real ones live in vitlens/stats): the mean attention
    every query pays the first key, per image, block and head, over every stage."""
    parts = [node.to_dataset(inherit=False)["attention"].isel(key=0).mean("query") for node in
             (cap[name] for name in cap.children if name.startswith("stage"))]
    parts = [p.mean("window") if "window" in p.dims else p for p in parts]
    heads = max(p.sizes["head"] for p in parts)
    padded = [p.reindex(head=np.arange(heads)) for p in parts]  # Swin stages differ in heads: NaN where none
    return xr.concat(padded, "layer").transpose("sample", "layer", "head")


def _register_test_stat() -> None:
    register_stat("first_key_share", title="First-key share", unit="share",
                  caption="attention paid to the first key")(_first_key_share)


@pytest.fixture(scope="module", autouse=True)
def test_stat():
    _register_test_stat()
    yield "first_key_share"
    STAT_INFO.pop("first_key_share")


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


@pytest.mark.parametrize("which", ["vit", "swin", "vit_avg", "hf_vit"])
def test_reduced_maps_and_stats_equal_those_of_a_full_capture(request, which):
    model = request.getfixturevalue(which)
    images = random_images(5, 64 if which == "swin" else 32, seed=2)
    extra = set().union(*(info.groups() for info in STAT_INFO.values())) - set(vl.KEEP_GROUPS)
    full = vl.capture(model, images, keep=["all", *sorted(extra)], progress=False)  # e.g. ablation_effect
    small = vl.capture(model, images, maps="all", stats="all", batch_size=2, progress=False)  # three batches
    assert set(small["maps"].data_vars) == set(METHOD_INFO) and set(small["stats"].data_vars) == set(STAT_INFO)
    for method in METHOD_INFO:
        want, got = vl.explain(full, method), vl.explain(small, method)
        assert got.dims == want.dims and got.attrs == want.attrs
        np.testing.assert_allclose(got.values, want.values, rtol=1e-5, atol=0, err_msg=method)
        np.testing.assert_array_equal(got["target"].values, want["target"].values)
    for name in STAT_INFO:
        want = STAT_INFO[name].function(full)
        got = small["stats"][name]
        assert got.dims == ("sample", "layer", "head")
        np.testing.assert_allclose(got.values, want.values, rtol=1e-5, err_msg=name)
    every = vl.explain(small, "all")
    for method in METHOD_INFO:
        np.testing.assert_array_equal(every[method].values, vl.explain(small, method).values)


def test_a_reduced_capture_keeps_no_raw_groups_unless_asked(vit, images32):
    small = vl.capture(vit, images32, maps=["rollout"], progress=False)
    assert set(small["stage0"].data_vars) == set() and "image" not in small
    assert set(small.to_dataset(inherit=False).data_vars) == {"logits", "target"}
    some = vl.capture(vit, images32, maps=["rollout"], keep=["ln", "norms", "image"], progress=False)
    assert {"ln_mean", "token_norm", "mlp_cos"} <= set(some["stage0"].data_vars)
    assert "attention" not in some["stage0"] and "image" in some
    both = vl.capture(vit, images32, maps=["rollout"], keep="all", progress=False)
    assert "attention_relevance" in both["stage0"] and "image" in both


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
    # kept raw groups compute the variants that were not stored
    kept = vl.capture(vit, images32, maps={"rollout": {"start_layer": 1}}, keep=["attention"], progress=False)
    np.testing.assert_array_equal(vl.explain(kept, "rollout").values, vl.explain(full, "rollout").values)


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
    np.testing.assert_array_equal(lazy["stats"]["first_key_share"].values, small["stats"]["first_key_share"].values)
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
    _register_test_stat()  # a fresh process: stats="all" must mean what it means in the test
    vl.capture(make_vit(), random_images(N_IMAGES, 32, seed=5), store=store, batch_size=BATCH, maps="all",
               stats="all", progress=False)
    os._exit(0)


def _child(store, fault=None, log=None) -> int:
    import multiprocessing

    child = multiprocessing.get_context("spawn").Process(target=_run_reduced, args=(str(store), fault, log))
    child.start()
    child.join(120)
    assert not child.is_alive(), "the capture child hung"
    return child.exitcode


@pytest.fixture(scope="module")
def reduced_trace(tmp_path_factory) -> list[str]:
    """Every write step of one uninterrupted reduced run, in order (step i+1 is trace[i])."""
    d = tmp_path_factory.mktemp("trace")
    assert _child(d / "run.zarr", log=str(d / "steps.txt")) == 0
    return [line.split("\t", 1)[1] for line in (d / "steps.txt").read_text().splitlines()]


@pytest.mark.parametrize("where", ["mid /maps", pytest.param("mid root", marks=pytest.mark.slow),
                                   pytest.param("marker written, not renamed", marks=pytest.mark.slow)])
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
    np.testing.assert_array_equal(resumed["stats"]["first_key_share"].values,
                                  reference["stats"]["first_key_share"].values)


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
