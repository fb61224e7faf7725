"""Metrics on hand-made inputs: segmentation scores, perturbation curves, AUCs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import xarray as xr
from torch import nn

import vitlens as vl
from vitlens.errors import ImageError, OptionError
from vitlens.metrics import (
    average_precision,
    deletion,
    insertion,
    perturbation,
    segmentation,
    segmentation_counts,
)


def as_maps(values) -> xr.DataArray:
    return xr.DataArray(np.asarray(values, dtype=np.float32), dims=("sample", "y", "x"))


@pytest.fixture
def square_masks():
    masks = np.zeros((3, 16, 16), bool)
    masks[0, 2:8, 3:10] = True
    masks[1, 8:16, 0:8] = True
    masks[2, 5:6, 5:12] = True
    return masks


# ------------------------------------------------------------------ segmentation
def test_perfect_map_scores_iou_one_and_pointing_one(square_masks):
    scores = segmentation(as_maps(square_masks), square_masks)
    assert float(scores.miou) == 1.0
    assert float(scores.iou_foreground) == 1.0
    assert float(scores.pixel_accuracy) == 1.0
    assert float(scores.pointing) == 1.0
    assert float(scores.mean_ap) == pytest.approx(1.0)


def test_inverted_map_scores_pointing_zero_and_iou_zero(square_masks):
    scores = segmentation(as_maps(~square_masks), square_masks)
    assert float(scores.pointing) == 0.0
    assert float(scores.miou) == 0.0
    assert float(scores.pixel_accuracy) == 0.0


def test_token_grid_maps_are_upsampled_to_the_masks():
    masks = np.zeros((1, 32, 32), bool)
    masks[0, :16] = True  # top half = top two rows of a 4x4 token grid
    grid = np.zeros((1, 4, 4), np.float32)
    grid[0, :2] = 1.0
    scores = segmentation(as_maps(grid), masks)
    assert float(scores.pointing) == 1.0
    assert float(scores.miou) == 1.0  # bilinear blur is symmetric about the edge: the mean threshold cuts there


def test_miou_uses_dataset_level_counts_not_the_mean_of_image_ious():
    masks = np.zeros((2, 4, 4), bool)
    masks[0, :2] = True  # 8 pixels, found exactly
    masks[1, 0, 0] = True  # 1 pixel; the map claims the top 8
    maps = np.zeros((2, 4, 4), np.float32)
    maps[:, :2] = 1.0
    scores = segmentation(as_maps(maps), masks)
    dataset_level = (9 / 16 + 16 / 23) / 2  # fg: 1+8 / 8+8; bg: 8+8 / 8+15
    per_image = ((1 + 1) / 2 + (1 / 8 + 8 / 15) / 2) / 2
    assert float(scores.miou) == pytest.approx(dataset_level)
    assert float(scores.miou_per_image) == pytest.approx(per_image)
    assert abs(dataset_level - per_image) > 0.03
    assert float(scores.pixel_accuracy) == pytest.approx((16 + 9) / 32)


def test_average_precision_matches_a_hand_computed_value_with_ties():
    scores = np.array([0.9, 0.8, 0.8, 0.3, 0.1])
    truth = np.array([1, 0, 1, 0, 1], bool)
    # thresholds 0.9 (P=1, R=1/3), 0.8 (P=2/3, R=2/3), 0.3 (P=2/4), 0.1 (P=3/5, R=1)
    expected = (1 / 3) * 1 + (1 / 3) * (2 / 3) + 0 + (1 / 3) * (3 / 5)
    assert float(average_precision(scores, truth)[0]) == pytest.approx(expected)


def test_average_precision_agrees_with_scikit_learn():
    from sklearn import metrics as sklearn_metrics  # a [dev] dependency: never skipped
    rng = np.random.default_rng(0)
    scores = np.round(rng.random((5, 200)), 2)  # rounded: many ties
    truth = rng.random((5, 200)) < 0.3
    ours = average_precision(scores, truth)
    theirs = [sklearn_metrics.average_precision_score(t, s) for s, t in zip(scores, truth)]
    np.testing.assert_allclose(ours, theirs, atol=1e-12)


def test_map_is_the_mean_of_per_image_two_channel_average_precision(square_masks):
    rng = np.random.default_rng(1)
    maps = rng.random((3, 16, 16)).astype(np.float32)
    counts = segmentation_counts(as_maps(maps), square_masks)
    for i in range(3):
        m = (maps[i] - maps[i].min()) / (maps[i].max() - maps[i].min())
        two = np.concatenate([1 - m.ravel(), m.ravel()])
        hot = np.concatenate([~square_masks[i].ravel(), square_masks[i].ravel()])
        assert float(counts.ap[i]) == pytest.approx(float(average_precision(two, hot)[0]), abs=1e-6)
    assert float(segmentation(as_maps(maps), square_masks).mean_ap) == pytest.approx(float(counts.ap.mean()))


def test_pointing_splits_ties_evenly_so_a_constant_map_scores_the_mask_fraction(square_masks):
    scores = segmentation_counts(as_maps(np.ones((3, 16, 16))), square_masks)
    np.testing.assert_allclose(scores.pointing.values, square_masks.mean((1, 2)))


def test_a_dataset_of_maps_gives_one_score_per_method(square_masks):
    maps = xr.Dataset({"good": as_maps(square_masks), "bad": as_maps(~square_masks)})
    scores = segmentation(maps, square_masks)
    assert list(scores["method"].values) == ["good", "bad"]
    assert scores.pointing.values.tolist() == [1.0, 0.0]


def test_segmentation_rejects_mismatched_sample_counts(square_masks):
    with pytest.raises(OptionError, match="3 maps but 2 masks"):
        segmentation(as_maps(square_masks), square_masks[:2])


def test_segmentation_rejects_masks_with_an_object_dimension(square_masks):
    masks = xr.DataArray(square_masks[:, None], dims=("sample", "object", "y", "x"))
    with pytest.raises(OptionError, match="object"):
        segmentation(as_maps(square_masks), masks)


def test_segmentation_rejects_per_layer_maps(square_masks):
    maps = xr.DataArray(np.zeros((3, 2, 4, 4)), dims=("sample", "layer", "y", "x"))
    with pytest.raises(OptionError, match="layer"):
        segmentation(maps, square_masks)


# ------------------------------------------------------------------ perturbation
class LeftHalfBrightness(nn.Module):
    """Class 0 scores the mean brightness of the left half (unnormalised); class 1 is a constant 0.5.

    Removing left-half pixels flips the decision once fewer than 5/9 of them
    remain (0.9 · kept < 0.5), so every curve can be computed by hand.
    """

    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))

    def forward(self, x):
        pic = x * self.std + self.mean
        w = pic.shape[-1]
        left = pic[..., : w // 2].mean((1, 2, 3))
        return torch.stack([left, torch.full_like(left, 0.5)], 1)


SIDE = 16


@pytest.fixture
def known():
    from timm.data import resolve_data_config

    model = LeftHalfBrightness((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    cfg = resolve_data_config({}, model=model)  # what perturbation() normalises with
    model = LeftHalfBrightness(cfg["mean"], cfg["std"])
    rng = np.random.default_rng(0)
    pics = rng.random((6, SIDE, SIDE, 3)).astype(np.float32)
    pics[:, :, : SIDE // 2] = 0.9
    perfect = np.zeros((6, SIDE, SIDE), np.float32)
    perfect[:, :, : SIDE // 2] = 1.0
    return model, pics, perfect, np.zeros(6, np.int64)


def test_positive_perturbation_auc_equals_the_hand_computed_trapezoid(known):
    model, pics, perfect, labels = known
    out = perturbation(model, pics, as_maps(perfect), labels, "positive")
    # 256 pixels: removing 25, 51 of the 128 left ones keeps class 0; 76 and more flip it
    expected = np.array([1, 1, 1, 0, 0, 0, 0, 0, 0, 0], float)
    np.testing.assert_array_equal(out.accuracy.values, expected)
    trapezoid = sum(0.1 * (a + b) / 2 for a, b in zip(expected[:-1], expected[1:])) * 100
    assert float(out.auc) == pytest.approx(trapezoid) == pytest.approx(25.0)
    assert out.removed.values.tolist() == pytest.approx([i / 10 for i in range(10)])


def test_negative_perturbation_removes_the_least_relevant_pixels_first(known):
    model, pics, perfect, labels = known
    out = perturbation(model, pics, as_maps(perfect), labels, "negative")
    # the right half goes first; the left half loses 25, 51 pixels at 60 %, 70 % (still class 0), 76 at 80 %
    np.testing.assert_array_equal(out.accuracy.values, [1, 1, 1, 1, 1, 1, 1, 1, 0, 0])
    assert float(out.auc) == pytest.approx(75.0)


def test_a_random_map_lands_between_positive_and_negative(known):
    model, pics, perfect, labels = known
    rand = as_maps(np.random.default_rng(3).random((6, SIDE, SIDE)))
    pos = float(perturbation(model, pics, as_maps(perfect), labels, "positive").auc)
    neg = float(perturbation(model, pics, as_maps(perfect), labels, "negative").auc)
    random_pos = float(perturbation(model, pics, rand, labels, "positive").auc)
    random_neg = float(perturbation(model, pics, rand, labels, "negative").auc)
    assert pos < random_pos < neg
    assert pos < random_neg < neg


def test_unknown_labels_are_scored_against_the_clean_prediction(known):
    model, pics, perfect, labels = known
    out = perturbation(model, pics, as_maps(perfect), np.full(6, -1), "positive")
    assert float(out.auc) == pytest.approx(25.0)
    assert out.attrs["labelled"] == 0


def test_token_grid_maps_rank_the_upsampled_pixels(known):
    model, pics, _, labels = known
    grid = np.zeros((6, 2, 2), np.float32)
    grid[:, :, 0] = 1.0  # left column of tokens
    out = perturbation(model, pics, as_maps(grid), labels, "positive")
    assert float(out.accuracy[3]) == 0.0  # 30 %: a third of the pixels, mostly left ones, are gone


def test_deletion_and_insertion_follow_the_explained_class_probability(known):
    model, pics, perfect, labels = known
    out = deletion(model, pics, as_maps(perfect), labels)
    removed_left = np.minimum(256 * np.arange(11) // 10, 128)
    p0 = 1 / (1 + np.exp(-(0.9 * (128 - removed_left) / 128 - 0.5)))
    np.testing.assert_allclose(out.probability.values, p0, atol=1e-5)
    assert float(out.auc) == pytest.approx(np.trapezoid(p0, np.arange(11) / 10), abs=1e-5)
    ins = insertion(model, pics, as_maps(perfect), labels)
    kept = 256 - 256 * (10 - np.arange(11)) // 10  # top-ranked pixels present
    q0 = 1 / (1 + np.exp(-(0.9 * np.minimum(kept, 128) / 128 - 0.5)))
    np.testing.assert_allclose(ins.probability.values, q0, atol=1e-5)
    assert float(ins.auc) > float(out.auc)


def test_perturbation_of_a_dataset_of_maps_gives_a_method_dimension(known):
    model, pics, perfect, labels = known
    maps = xr.Dataset({"perfect": as_maps(perfect), "inverted": as_maps(1 - perfect)})
    out = perturbation(model, pics, maps, labels)
    assert out.auc.dims == ("method",)
    assert float(out.auc.isel(method=0)) < float(out.auc.isel(method=1))


def test_perturbation_rejects_bad_inputs(known):
    model, pics, perfect, labels = known
    with pytest.raises(OptionError, match="mode"):
        perturbation(model, pics, as_maps(perfect), labels, "sideways")
    with pytest.raises(OptionError, match="5 maps for 6 pictures"):
        perturbation(model, pics, as_maps(perfect[:5]), labels)
    with pytest.raises(OptionError, match="labels"):
        perturbation(model, pics, as_maps(perfect), labels[:4])
    with pytest.raises(ImageError, match=r"\[0, 1\]"):
        perturbation(model, pics * 255, as_maps(perfect), labels)


def test_perturbation_reads_pictures_and_normalisation_from_a_capture(vit, images32):
    cap = vl.capture(vit, images32)
    maps = vl.explain(cap, "rollout")
    out = perturbation(vit, cap, maps, cap.target.values)
    assert float(out.accuracy[0]) == 1.0  # the capture's targets are the clean predictions
    same = perturbation(vit, images32, maps, cap.target.values)
    np.testing.assert_array_equal(out.correct.values, same.correct.values)


@pytest.mark.slow  # a streamed capture, then every metric on it chunk by chunk
def test_metrics_on_a_lazy_capture_load_one_chunk_at_a_time(vit, tmp_path, monkeypatch):
    from conftest import random_images

    import importlib

    from vitlens.metrics.inputs import pictures_for

    module = importlib.import_module("vitlens.metrics.perturbation")  # the package re-exports a function of that name

    imgs = random_images(5, 32, seed=12)
    vl.capture(vit, imgs, store=tmp_path / "r.zarr", batch_size=2, progress=False)
    lazy = vl.open(tmp_path / "r.zarr", chunks={})
    eager = vl.capture(vit, imgs)
    pics = pictures_for(vit, lazy)
    assert pics.lazy and pics.blocks == [(0, 2), (2, 4), (4, 5)] and not isinstance(pics.pictures, np.ndarray)
    seen = []
    original = module.removal_probabilities

    def spy(model, pictures, *args, **kwargs):
        seen.append(len(pictures))
        return original(model, pictures, *args, **kwargs)

    monkeypatch.setattr(module, "removal_probabilities", spy)
    maps = vl.explain(lazy, "all")
    labels = eager.target.values
    got = perturbation(vit, lazy, maps, labels, mode="negative")
    assert seen == [2, 2, 1] * len(maps.data_vars)  # chunk by chunk, never all five at once
    monkeypatch.setattr(module, "removal_probabilities", original)
    want = perturbation(vit, eager, vl.explain(eager, "all"), labels, mode="negative")
    xr.testing.assert_allclose(got, want)
    xr.testing.assert_allclose(deletion(vit, lazy, maps.rollout), deletion(vit, eager, maps.rollout), rtol=1e-5)
    # the same maps, lazy and loaded (AP ranks values: maps from captures batched differently
    # differ by float rounding, ~1e-7 relative, which can reorder near-ties)
    xr.testing.assert_allclose(segmentation(maps, np.ones((5, 32, 32), bool)),
                               segmentation(maps.compute(), np.ones((5, 32, 32), bool)), rtol=1e-5)


@pytest.mark.slow
def test_metrics_on_a_lazy_capture_run_on_a_local_cluster(vit, tmp_path):
    from conftest import random_images
    from dask.distributed import Client, LocalCluster, get_task_stream

    imgs = random_images(4, 32, seed=13)
    vl.capture(vit, imgs, store=tmp_path / "r.zarr", batch_size=2, progress=False)
    lazy = vl.open(tmp_path / "r.zarr", chunks={})
    maps = vl.explain(lazy, "rollout")
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        with Client(cluster) as client:
            with get_task_stream(client) as stream:
                got = insertion(vit, lazy, maps)
            names = {str(t["key"]) for t in stream.data}
    assert any("_block_probabilities" in n for n in names)
    xr.testing.assert_allclose(got, insertion(vit, vl.capture(vit, imgs), maps), rtol=1e-5)
