"""vl.metrics.evaluate: the per-method table, its items, and `vitlens bench`."""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import xarray as xr
from conftest import make_swin, make_vit

import vitlens as vl
from vitlens.errors import ImageError, OptionError
from vitlens.metrics import deletion, evaluate, evaluate_items, insertion, perturbation, segmentation_counts, summarize

COLUMNS = [
    "pixel_accuracy", "miou", "iou_foreground", "mean_ap", "pointing",
    "positive_auc_predicted", "positive_auc_label", "negative_auc_predicted", "negative_auc_label",
    "deletion_auc", "insertion_auc", "seconds_per_image", "capture_seconds_per_image",
]


@pytest.fixture(scope="module")
def shapes_vit():
    return make_vit(img_size=64, patch_size=16, num_classes=8, seed=4)


@pytest.fixture(scope="module")
def mixed():
    return vl.datasets.shapes(6, seed=11, objects=(1, 2))


@pytest.fixture(scope="module")
def items(shapes_vit, mixed):
    return evaluate_items(shapes_vit, mixed, ["rollout", "transformer_attribution"], batch_size=1, progress=False)


@pytest.mark.slow  # every perturbation pass of a six-image table
def test_every_labelled_object_is_one_item_with_its_own_class(items, mixed):
    labelled = np.argwhere(mixed.label.values >= 0)
    assert items.sizes["item"] == len(labelled)
    np.testing.assert_array_equal(np.c_[items.sample.values, items.object.values], labelled)
    np.testing.assert_array_equal(items.label.values, mixed.label.values[items.sample, items.object])
    assert set(np.unique(items.objects_in_image)) <= {1, 2}


@pytest.mark.slow  # every perturbation pass of a six-image table
def test_evaluate_items_agrees_with_the_public_metrics_on_the_same_maps(items, shapes_vit, mixed):
    # The table shares captures and forward passes between items and runs; recompute each
    # item independently with the public functions and compare.
    pics = mixed.image.values[items.sample.values]
    masks = mixed.mask.values[items.sample.values, items.object.values]
    labels = items.label.values
    cap_label = vl.capture(shapes_vit, pics, target=labels.tolist(), batch_size=1)
    cap_pred = vl.capture(shapes_vit, pics, batch_size=1)
    np.testing.assert_array_equal(items.predicted.values, cap_pred.target.values)
    for method in items.method.values:
        row = items.sel({"method": method})
        maps_label = vl.explain(cap_label, str(method))
        maps_pred = vl.explain(cap_pred, str(method))
        counts = segmentation_counts(maps_label, masks)
        np.testing.assert_array_equal(row.intersection.values, counts.intersection.values)
        np.testing.assert_allclose(row.ap.values, counts.ap.values)
        for mode in ("positive", "negative"):
            for which, cap, maps in (("label", cap_label, maps_label), ("predicted", cap_pred, maps_pred)):
                out = perturbation(shapes_vit, cap, maps, labels, mode, batch_size=1)
                np.testing.assert_array_equal(row[f"correct_{mode}_{which}"].values, out.correct.values)
        np.testing.assert_allclose(row.deletion.values, deletion(shapes_vit, cap_label, maps_label, batch_size=1)
                                   .sample_probability.values, atol=1e-5)
        np.testing.assert_allclose(row.insertion.values, insertion(shapes_vit, cap_label, maps_label, batch_size=1)
                                   .sample_probability.values, atol=1e-5)


@pytest.mark.slow  # every perturbation pass of a six-image table
def test_evaluate_returns_one_row_per_method(shapes_vit, mixed):
    table = evaluate(shapes_vit, mixed, methods="all", progress=False)
    assert list(table.method.values) == list(vl.METHODS)
    assert sorted(table.data_vars) == sorted(COLUMNS)
    frame = table.to_dataframe()
    assert frame.shape == (len(vl.METHODS), len(COLUMNS))
    assert frame.index.name == "method"
    assert np.isfinite(frame.values).all()
    assert table.attrs["items"] == int((mixed.label >= 0).sum())
    assert 0 <= table.attrs["clean_accuracy"] <= 1
    assert ((table.positive_auc_label >= 0) & (table.positive_auc_label <= 90)).all()


def test_summary_aucs_are_trapezoids_of_the_mean_item_curves(items):
    table = summarize(items)
    x = np.arange(10) / 10
    for i in range(items.sizes["method"]):
        curve = items.correct_negative_label.values[i].mean(0)
        expected = 100 * sum((x[k + 1] - x[k]) * (curve[k] + curve[k + 1]) / 2 for k in range(9))
        assert float(table.negative_auc_label[i]) == pytest.approx(expected)
        deleted = items.deletion.values[i].mean(0)
        assert float(table.deletion_auc[i]) == pytest.approx(np.trapezoid(deleted, np.arange(11) / 10))
    assert (table.seconds_per_image > 0).all() and (table.capture_seconds_per_image > 0).all()


def test_summarize_scores_a_subset_of_items(items):
    one = summarize(items.isel(item=items.objects_in_image.values == 1))
    both = summarize(items)
    assert one.attrs["items"] < both.attrs["items"]
    assert list(one.method.values) == list(both.method.values)


def test_target_predicted_scores_the_predicted_class_maps(shapes_vit, mixed):
    pred = evaluate_items(shapes_vit, mixed, "gradcam", target="predicted", progress=False)
    label = evaluate_items(shapes_vit, mixed, "gradcam", target="label", progress=False)
    same = pred.predicted.values == pred.label.values
    np.testing.assert_array_equal(pred.intersection.values[:, same], label.intersection.values[:, same])
    pics = mixed.image.values[pred.sample.values]
    masks = mixed.mask.values[pred.sample.values, pred.object.values]
    maps = vl.explain(vl.capture(shapes_vit, pics), "gradcam")
    np.testing.assert_array_equal(pred.intersection.values[0], segmentation_counts(maps, masks).intersection.values)


def test_swin_models_are_evaluated_too():
    model = make_swin(num_classes=8)
    table = evaluate(model, vl.datasets.shapes(3, seed=2), methods=["rollout", "tokentm"], progress=False)
    assert np.isfinite(table.to_dataframe().values).all()


def test_pictures_of_another_size_are_resized_with_their_masks(shapes_vit):
    small = vl.datasets.shapes(3, seed=5, size=32, objects=1)
    items = evaluate_items(shapes_vit, small, "rollout", progress=False)
    assert items.attrs["resized"] == 1
    assert int(items.pixels[0]) == 64 * 64


def test_unlabelled_items_are_scored_against_the_prediction(shapes_vit, mixed):
    unlabelled = mixed.assign(label=xr.full_like(mixed.label, -1))
    table = evaluate(shapes_vit, unlabelled, "rollout", progress=False)
    assert table.attrs["clean_accuracy"] == 1.0
    assert "prediction" in table.attrs["accuracy_reference"]
    assert table.attrs["labelled_items"] == 0


def test_evaluate_accepts_a_shipped_model_name_or_explains_what_to_do(mixed):
    from vitlens.errors import ModelLoadError

    try:
        table = evaluate("vit-shapes", mixed, "rollout", n=2, progress=False)
    except ModelLoadError as exc:  # weights not shipped in this checkout
        assert "vit-shapes" in str(exc)
    else:
        assert table.attrs["model"] == "vit-shapes"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"methods": "roll-out"}, "unknown method"),
        ({"methods": []}, "empty"),
        ({"target": "truth"}, "target"),
        ({"n": 100}, "holds 6 images"),
        ({"n": 0}, "positive"),
        ({"steps": 1}, "steps"),
        ({"options": {"lnstat": {"stat": "mean"}}, "methods": "rollout"}, "not evaluated"),
    ],
)
def test_evaluate_rejects_bad_options(shapes_vit, mixed, kwargs, match):
    with pytest.raises(OptionError, match=match):
        evaluate(shapes_vit, mixed, **kwargs)


def test_evaluate_rejects_datasets_without_masks_or_images(shapes_vit, mixed):
    with pytest.raises(OptionError, match="mask"):
        evaluate(shapes_vit, mixed.drop_vars("mask"))
    with pytest.raises(OptionError, match="no images"):
        evaluate(shapes_vit, mixed.isel(sample=slice(0, 0)))
    with pytest.raises(ImageError, match="non-empty mask"):
        evaluate(shapes_vit, mixed.assign(mask=xr.zeros_like(mixed.mask)))


# -------------------------------------------------------------------- vitlens bench
def test_bench_prints_and_saves_the_table(monkeypatch, tmp_path, capsys):
    from vitlens import cli
    from vitlens.metrics import bench

    monkeypatch.setattr(bench, "_load", lambda args: (make_vit(img_size=64, patch_size=16, num_classes=8), "cpu"))
    status = cli.main(["bench", "--n", "3", "--methods", "rollout,gradcam", "--out", str(tmp_path), "--no-progress"])
    assert status == 0
    printed = capsys.readouterr().out
    assert "rollout" in printed and "gradcam" in printed and "mIoU" in printed
    csv = next(tmp_path.glob("*.csv"))
    assert csv.read_text().splitlines()[0].startswith("method,pixel_accuracy")
    saved = xr.open_dataset(next(tmp_path.glob("*.nc")))
    assert list(saved.method.values) == ["rollout", "gradcam"]
    assert saved.attrs["n"] == 3
    saved.close()


def test_bench_explains_a_missing_imagenet_seg_path(monkeypatch, capsys):
    from vitlens import cli
    from vitlens.metrics import bench

    monkeypatch.setattr(bench, "_load", lambda args: (make_vit(img_size=64, patch_size=16, num_classes=8), "cpu"))
    assert cli.main(["bench", "--dataset", "imagenet-seg"]) == 2
    assert "--path" in capsys.readouterr().err


def test_bench_refuses_shapes_for_a_model_with_fewer_classes(monkeypatch, capsys):
    from vitlens import cli
    from vitlens.metrics import bench

    monkeypatch.setattr(bench, "_load", lambda args: (make_vit(img_size=64, patch_size=16, num_classes=3), "cpu"))
    assert cli.main(["bench", "--n", "2"]) == 2
    assert "shapes-trained" in capsys.readouterr().err


# -------------------------------------------------------------------- maps from a capture of the dataset (#27)
def _scores(table: xr.Dataset) -> xr.Dataset:
    return table.drop_vars(["seconds_per_image", "capture_seconds_per_image"])


@pytest.mark.slow  # two evaluations and a store of six images: about 10 s of CPU
def test_scores_from_a_reduced_store_equal_the_scores_computed_with_the_model(tmp_path, shapes_vit, mixed):
    """The store's maps, read in batches other than the store's, give the table evaluate computes; only the
    label-class maps of class-specific methods (the store explains the prediction) are computed."""
    methods = ["attention", "rollout", "gradcam"]  # as "all" lists what the store holds: in the registry's order
    vl.capture(shapes_vit, mixed, store=tmp_path / "val.zarr", maps=methods, stats=["attention_entropy"],
               batch_size=4, progress=False)
    for target in ("label",):
        want = evaluate_items(shapes_vit, mixed, methods, target=target, batch_size=4, progress=False)
        got = evaluate_items(shapes_vit, mixed, "all", target=target, maps=tmp_path / "val.zarr", batch_size=3,
                             progress=False)
        assert got.method.values.tolist() == methods and got.attrs["maps"].startswith("read from the store")
        for name in ("sample", "object", "label", "predicted", "reference"):
            np.testing.assert_array_equal(got[name].values, want[name].values)
        for name in got.data_vars:  # float64 maps are stored as float32 above their minimum: 1e-7 of a range
            if "seconds" not in name:
                np.testing.assert_allclose(got[name].values, want[name].values, rtol=1e-6, atol=0, err_msg=name)
        xr.testing.assert_allclose(_scores(summarize(got)), _scores(summarize(want)), rtol=1e-6, atol=0)
        # every map the store holds is read: only gradcam's label maps of misclassified items are computed
        misclassified = int((want.label.values != want.predicted.values).sum())
        assert misclassified > 0
        assert want.attrs["maps_computed"] == len(methods) * (mixed.sizes["sample"] + misclassified)
        assert got.attrs["maps_computed"] == misclassified


def test_an_in_memory_reduced_capture_is_scored_without_capturing_again(monkeypatch, shapes_vit):
    ds = vl.datasets.shapes(2, seed=3)
    small = vl.capture(shapes_vit, ds, maps=["rollout"], progress=False)
    want = evaluate(shapes_vit, ds, ["rollout"], target="predicted", progress=False)

    def no_capture(*args, **kwargs):
        raise AssertionError("evaluate captured the images although maps= holds their maps")

    monkeypatch.setattr(importlib.import_module("vitlens.capture"), "capture", no_capture)  # evaluate's capture
    got = evaluate(shapes_vit, ds, target="predicted", maps=small, progress=False)
    assert got.attrs["maps_computed"] == 0 and got.method.values.tolist() == ["rollout"]
    xr.testing.assert_allclose(_scores(got), _scores(want), rtol=1e-6, atol=0)


def test_a_capture_of_other_images_or_options_or_weights_is_refused(tmp_path, shapes_vit):
    ds = vl.datasets.shapes(3, seed=3)
    other = vl.datasets.shapes(3, seed=4)
    fewer = vl.capture(shapes_vit, ds.isel(sample=slice(0, 2)), maps=["rollout"], progress=False)
    with pytest.raises(ImageError, match="holds 2 images but the dataset 3"):
        evaluate(shapes_vit, ds, maps=fewer, progress=False)
    wrong = vl.capture(shapes_vit, other, maps=["rollout"], progress=False)
    with pytest.raises(ImageError, match="image [0-9]: the model's class probabilities differ"):
        evaluate(shapes_vit, ds, maps=wrong, progress=False)
    vl.capture(shapes_vit, other, maps=["rollout"], store=tmp_path / "other.zarr", progress=False)
    with pytest.raises(ImageError, match="captured from other images than this dataset's"):
        evaluate(shapes_vit, ds, maps=tmp_path / "other.zarr", progress=False)
    vl.capture(shapes_vit, ds, maps={"rollout": {"start_layer": 1}}, store=tmp_path / "layer1.zarr", progress=False)
    with pytest.raises(vl.errors.CaptureFormatError, match="start_layer.*options=\\{'rollout'"):
        evaluate(shapes_vit, ds, ["rollout"], maps=tmp_path / "layer1.zarr", progress=False)
    retrained = make_vit(img_size=64, patch_size=16, num_classes=8, seed=5)
    with pytest.raises(OptionError, match="other weights"):
        evaluate(retrained, ds, maps=tmp_path / "layer1.zarr", options={"rollout": {"start_layer": 1}}, progress=False)
    with pytest.raises(OptionError, match="maps= takes a capture"):
        evaluate(shapes_vit, ds, maps=np.zeros((3, 4, 4)), progress=False)


@pytest.mark.slow  # a store and two bench runs: about 2 s of CPU
def test_bench_scores_the_maps_of_a_store(monkeypatch, tmp_path, capsys):
    from vitlens import cli
    from vitlens.metrics import bench
    from vitlens.zoo.train import EVAL_SEED

    model = make_vit(img_size=64, patch_size=16, num_classes=8)
    monkeypatch.setattr(bench, "_load", lambda args: (model, "cpu"))
    ds = vl.datasets.shapes(2, seed=EVAL_SEED, size=64, objects=(1, 2))  # what bench --n 2 scores
    vl.capture(model, ds, maps=["rollout", "attention"], store=tmp_path / "val.zarr", progress=False)
    assert cli.main(["bench", "--n", "2", "--store", str(tmp_path / "val.zarr"), "--out", str(tmp_path),
                     "--no-progress", "--target", "predicted"]) == 0
    printed = capsys.readouterr().out
    assert f"maps read from {tmp_path / 'val.zarr'} (0 maps" in printed
    saved = xr.open_dataset(next(tmp_path.glob("*.nc")))
    assert list(saved.method.values) == ["attention", "rollout"] and saved.attrs["maps_computed"] == 0
    saved.close()
    assert cli.main(["bench", "--n", "3", "--store", str(tmp_path / "val.zarr"), "--out", str(tmp_path)]) == 2
    assert "holds 2 images but the dataset 3" in capsys.readouterr().err
