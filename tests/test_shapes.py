"""Tests of the procedural shapes dataset (vitlens.datasets.shapes)."""

from __future__ import annotations

import time

import numpy as np
import pytest

from vitlens.datasets import shapes
from vitlens.errors import OptionError, VitlensError

CLASSES = ["disk", "ring", "square", "triangle", "plus", "star", "hexagon", "crescent"]


@pytest.fixture(scope="module")
def mixed():
    return shapes(200, seed=3, objects=(1, 2))


def _dilate(mask: np.ndarray, width: int) -> np.ndarray:
    """Independent square dilation (pad + max over a (2w+1)^2 window)."""
    h, w = mask.shape
    padded = np.pad(mask, width)
    out = np.zeros_like(mask)
    for dy in range(2 * width + 1):
        for dx in range(2 * width + 1):
            out |= padded[dy : dy + h, dx : dx + w]
    return out


def test_layout_dtypes_and_ranges(mixed):
    ds = mixed
    assert ds.image.dims == ("sample", "y", "x", "channel")
    assert ds.label.dims == ("sample", "object")
    assert ds.mask.dims == ("sample", "object", "y", "x")
    assert ds.image.dtype == np.float32 and ds.label.dtype == np.int64 and ds.mask.dtype == bool
    assert ds.image.shape == (200, 64, 64, 3) and ds.mask.shape == (200, 2, 64, 64)
    img = ds.image.values
    assert img.min() >= 0.0 and img.max() <= 1.0 and np.isfinite(img).all()
    assert list(ds.channel.values) == ["r", "g", "b"]
    np.testing.assert_array_equal(ds.sample.values, np.arange(200))
    np.testing.assert_array_equal(ds.object.values, np.arange(2))
    np.testing.assert_array_equal(ds.y.values, np.arange(64))
    assert ds.attrs["class_names"] == CLASSES
    assert ds.attrs["seed"] == 3 and ds.attrs["size"] == 64
    lab = ds.label.values
    assert ((lab >= -1) & (lab < 8)).all()
    assert (lab[:, 0] >= 0).all()  # every image has at least one object


def test_deterministic_and_seed_dependent():
    a, b = shapes(6, seed=11), shapes(6, seed=11)
    for var in ("image", "label", "mask"):
        np.testing.assert_array_equal(a[var].values, b[var].values)
    c = shapes(6, seed=12)
    assert not np.array_equal(a.image.values, c.image.values)
    assert not np.array_equal(a.mask.values, c.mask.values)


def test_image_i_independent_of_n():
    small, large = shapes(5, seed=4), shapes(10, seed=4)
    for var in ("image", "label", "mask"):
        np.testing.assert_array_equal(small[var].values, large[var].values[:5])


def test_label_mask_consistency(mixed):
    present = mixed.mask.values.any(axis=(2, 3))
    np.testing.assert_array_equal(present, mixed.label.values >= 0)
    # objects are reasonably big (>= ~7 px across even for the thinnest shapes)
    sizes = mixed.mask.values.sum(axis=(2, 3))[present]
    assert sizes.min() >= 30


def test_masks_are_exactly_the_object_pixels(mixed):
    """Inside a mask one flat colour; that exact colour appears nowhere else."""
    img, masks, labels = mixed.image.values, mixed.mask.values, mixed.label.values
    for i in range(img.shape[0]):
        for k in np.flatnonzero(labels[i] >= 0):
            inside = img[i][masks[i, k]]
            colour = inside[0]
            assert (inside == colour).all(), f"sample {i} object {k} is not one flat colour"
            same = (img[i] == colour).all(axis=-1)
            np.testing.assert_array_equal(same, masks[i, k])


def test_two_objects_distinct_classes_and_gap():
    ds = shapes(150, seed=5, objects=2)
    lab, masks = ds.label.values, ds.mask.values
    assert (lab >= 0).all()
    assert (lab[:, 0] != lab[:, 1]).all()
    for i in range(len(lab)):
        # not overlapping, not even touching (8-neighbourhood): keep a 1 px gap at least
        assert not (_dilate(masks[i, 0], 1) & masks[i, 1]).any()


def test_object_counts_option():
    one = shapes(20, seed=1, objects=1)
    assert one.label.shape == (20, 1) and (one.label.values >= 0).all()
    same = shapes(20, seed=1, objects=(1,))
    np.testing.assert_array_equal(one.image.values, same.image.values)
    two = shapes(20, seed=1, objects=(2,))
    assert (two.label.values >= 0).all()
    mixed = shapes(200, seed=1, objects=(1, 2))
    n_two = int((mixed.label.values[:, 1] >= 0).sum())
    assert 60 < n_two < 140  # counts drawn uniformly from the allowed ones
    three = shapes(10, seed=1, objects=3)
    assert (three.label.values >= 0).all()
    assert all(len(set(row)) == 3 for row in three.label.values.tolist())


def test_class_balance():
    lab = shapes(2000, seed=9, objects=(1, 2)).label.values
    counts = np.bincount(lab[lab >= 0], minlength=8)
    expected = counts.sum() / 8
    assert (np.abs(counts - expected) <= 0.3 * expected).all(), counts


def test_contrast_floor(mixed):
    """Object colour vs mean of a 3 px ring around it (outside all objects) >= 0.4."""
    img, masks, labels = mixed.image.values.astype(np.float64), mixed.mask.values, mixed.label.values
    worst = np.inf
    for i in range(img.shape[0]):
        union = masks[i].any(axis=0)
        for k in np.flatnonzero(labels[i] >= 0):
            ring = _dilate(masks[i, k], 3) & ~union
            assert ring.any()
            colour = img[i][masks[i, k]][0]
            contrast = np.sqrt(((colour - img[i][ring].mean(axis=0)) ** 2).sum())
            worst = min(worst, contrast)
    # float32 storage of the image can move the value by ~1e-7
    assert worst >= 0.4 - 1e-5


def test_size_scaling_and_options():
    ds = shapes(4, seed=2, size=96)
    assert ds.image.shape == (4, 96, 96, 3) and ds.attrs["size"] == 96
    assert ds.mask.values.sum(axis=(2, 3)).max() > 200
    plain = shapes(4, seed=2, clutter=False)
    assert plain.image.shape == (4, 64, 64, 3)
    small = shapes(3, seed=2, size=32)
    assert (small.mask.values.any(axis=(2, 3))[:, 0]).all()


def test_speed_1000_images():
    t0 = time.perf_counter()
    shapes(1000, seed=0)
    assert time.perf_counter() - t0 < 15.0


@pytest.mark.parametrize(
    "kwargs",
    [
        {"n": 0},
        {"n": -3},
        {"n": 2.5},
        {"n": 4, "size": 16},
        {"n": 4, "size": 31},
        {"n": 4, "objects": 0},
        {"n": 4, "objects": (1, 4)},
        {"n": 4, "objects": ()},
        {"n": 4, "objects": "two"},
        {"n": 4, "objects": 1.5},
        {"n": 4, "seed": -1},
        {"n": 4, "min_contrast": 2.0},
    ],
)
def test_bad_options_raise_option_error(kwargs):
    with pytest.raises(OptionError) as info:
        shapes(**kwargs)
    assert isinstance(info.value, VitlensError)
    assert "e.g." in str(info.value) or "use" in str(info.value)
