"""The ImageNet-segmentation loader, on a tiny file written in gtsegs_ijcv.mat's layout."""

from __future__ import annotations

import numpy as np
import pytest

h5py = pytest.importorskip("h5py")

from conftest import make_vit  # noqa: E402

from vitlens.datasets.imagenet_seg import imagenet_seg  # noqa: E402
from vitlens.errors import ImageError, OptionError  # noqa: E402
from vitlens.metrics import evaluate  # noqa: E402


def picture_and_mask(h: int, w: int, seed: int, grey: bool = False):
    """A picture that is pure red exactly where its (off-centre, non-square) mask is."""
    rng = np.random.default_rng(seed)
    mask = np.zeros((h, w), bool)
    mask[h // 4 : h // 2 + 2, w // 5 : w // 2] = True
    if grey:
        pic = np.where(mask, 250, rng.integers(0, 60, (h, w))).astype(np.uint8)
        return pic, mask
    pic = rng.integers(0, 60, (h, w, 3)).astype(np.uint8)
    pic[mask] = (255, 0, 0)
    return pic, mask


def write_mat(path, items):
    """MATLAB v7.3 layout: value/img -> (3, W, H) uint8; value/gt -> cell (1, 1) -> mask (W, H)."""
    with h5py.File(path, "w") as f:
        refs = f.create_group("#refs#")
        img_refs, gt_refs = [], []
        for i, (pic, mask) in enumerate(items):
            stored = pic.T if pic.ndim == 2 else pic.transpose(2, 1, 0)
            img = refs.create_dataset(f"img{i}", data=stored)
            gt = refs.create_dataset(f"gt{i}", data=mask.T.astype(np.uint8))
            cell = refs.create_dataset(f"cell{i}", data=np.array([[gt.ref]], dtype=h5py.ref_dtype))
            img_refs.append(img.ref)
            gt_refs.append(cell.ref)
        value = f.create_group("value")
        value.create_dataset("img", data=np.array(img_refs, dtype=h5py.ref_dtype).reshape(-1, 1))
        value.create_dataset("gt", data=np.array(gt_refs, dtype=h5py.ref_dtype).reshape(-1, 1))


@pytest.fixture(scope="module")
def mat(tmp_path_factory):
    path = tmp_path_factory.mktemp("seg") / "gtsegs_ijcv.mat"
    items = [picture_and_mask(40, 64, 0), picture_and_mask(64, 48, 1), picture_and_mask(50, 50, 2, grey=True)]
    write_mat(path, items)
    return path, items


def test_loader_returns_the_shapes_layout(mat):
    path, _ = mat
    ds = imagenet_seg(path, size=32)
    assert ds.image.dims == ("sample", "y", "x", "channel") and ds.image.shape == (3, 32, 32, 3)
    assert ds.mask.dims == ("sample", "object", "y", "x") and ds.mask.dtype == bool
    assert ds.label.dims == ("sample", "object") and (ds.label == -1).all()
    assert ds.image.dtype == np.float32 and 0 <= float(ds.image.min()) and float(ds.image.max()) <= 1


def test_pictures_and_masks_are_untransposed_and_stay_aligned(mat):
    path, items = mat
    size = 32
    ds = imagenet_seg(path, size=size)
    for i, (pic, mask) in enumerate(items):
        # nearest-neighbour resize of the original mask, computed independently
        rows = (np.arange(size) + 0.5) * mask.shape[0] / size
        cols = (np.arange(size) + 0.5) * mask.shape[1] / size
        expected = mask[rows.astype(int)][:, cols.astype(int)]
        got = ds.mask.values[i, 0]
        assert (got != expected).mean() < 0.02
        red = ds.image.values[i][got]
        if pic.ndim == 3:  # the object is red in the picture exactly where the mask is
            assert red[:, 0].mean() > 0.8 and red[:, 1].mean() < 0.2
        else:  # grey pictures become three equal channels
            np.testing.assert_allclose(ds.image.values[i, ..., 0], ds.image.values[i, ..., 2])


def test_first_n_pictures_and_uint8_storage(mat):
    path, _ = mat
    ds = imagenet_seg(path, n=2, size=16, dtype="uint8")
    assert ds.sizes["sample"] == 2 and ds.image.dtype == np.uint8


def test_the_loaded_set_feeds_evaluate(mat):
    path, _ = mat
    model = make_vit(img_size=32, patch_size=8, num_classes=5)
    table = evaluate(model, imagenet_seg(path, size=32), ["rollout"], target="predicted", progress=False)
    assert table.attrs["items"] == 3 and table.attrs["labelled_items"] == 0


def test_loader_errors_say_what_to_do(mat, tmp_path):
    path, _ = mat
    with pytest.raises(ImageError, match="no such file"):
        imagenet_seg(tmp_path / "missing.mat")
    with pytest.raises(OptionError, match="holds 3 pictures"):
        imagenet_seg(path, n=10)
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f["x"] = np.zeros(3)
    with pytest.raises(ImageError, match="value/img"):
        imagenet_seg(other)
    text = tmp_path / "text.mat"
    text.write_text("not hdf5")
    with pytest.raises(ImageError, match="HDF5"):
        imagenet_seg(text)
