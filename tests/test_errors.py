"""Bad input gets a clear VitlensError subclass, never a traceback from deep inside torch."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
import xarray as xr
from conftest import random_images
from torch import nn

import vitlens as vl


def test_unsupported_architectures_are_refused(images32):
    resnet = timm.create_model("resnet18", num_classes=3)
    with pytest.raises(vl.UnsupportedModelError, match="vit, swin, eva, beit, swinv2"):
        vl.capture(resnet, images32)
    with pytest.raises(vl.UnsupportedModelError):
        vl.capture(nn.Linear(3, 3), images32)
    with pytest.raises(vl.UnsupportedModelError):
        vl.load_model(resnet)
    # attention-pool heads ('map') are explained since issue 14; max pooling is refused, by name
    with pytest.raises(vl.UnsupportedModelError, match="max"):
        vl.capture(timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, global_pool="max",
                                     class_token=False), images32)


def test_wrong_size_tensor_is_refused(vit):
    with pytest.raises(vl.ImageError, match="32×32"):
        vl.capture(vit, torch.zeros(1, 3, 48, 48))
    with pytest.raises(vl.ImageError):
        vl.capture(vit, torch.zeros(1, 1, 32, 32))


def test_nan_inf_and_out_of_range_pixels_are_refused(vit):
    img = random_images(1, 32)
    img[0, 3, 3, 1] = np.nan
    with pytest.raises(vl.ImageError, match="NaN"):
        vl.capture(vit, img)
    img[0, 3, 3, 1] = np.inf
    with pytest.raises(vl.ImageError, match="NaN or infinite"):
        vl.capture(vit, img)
    with pytest.raises(vl.ImageError, match=r"\[0, 1\]"):
        vl.capture(vit, random_images(1, 32) * 255)
    with pytest.raises(vl.ImageError, match="NaN"):
        vl.capture(vit, torch.full((1, 3, 32, 32), float("nan")))
    with pytest.raises(vl.ImageError, match="shape"):
        vl.capture(vit, np.zeros((32, 32, 5)))


def test_empty_batch_is_refused(vit):
    with pytest.raises(vl.ImageError, match="empty"):
        vl.capture(vit, np.zeros((0, 32, 32, 3)))
    with pytest.raises(vl.ImageError, match="empty"):
        vl.capture(vit, [])


def test_bad_targets_are_refused(vit, images32):
    with pytest.raises(vl.TargetError, match="3 images"):
        vl.capture(vit, images32, target=[0, 1])
    with pytest.raises(vl.TargetError, match="out of range"):
        vl.capture(vit, images32, target=5)
    with pytest.raises(vl.TargetError, match="out of range"):
        vl.capture(vit, images32, target=-1)
    with pytest.raises(vl.TargetError, match="unknown class"):
        vl.capture(vit, images32, target="zebra")
    with pytest.raises(vl.TargetError):
        vl.capture(vit, images32, target=1.5)


def test_unreadable_files_are_refused(vit, tmp_path):
    with pytest.raises(vl.ImageError, match="no such image"):
        vl.capture(vit, str(tmp_path / "missing.png"))
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not an image at all")
    with pytest.raises(vl.ImageError, match="not a readable image"):
        vl.capture(vit, [str(junk)])


def test_bad_options_are_refused(vit, images32):
    with pytest.raises(vl.OptionError, match="keep"):
        vl.capture(vit, images32, keep=["attention", "everything"])
    with pytest.raises(vl.OptionError, match="dtype"):
        vl.capture(vit, images32, dtype="int8")
    with pytest.raises(vl.OptionError, match="batch_size"):
        vl.capture(vit, images32, batch_size=0)


def test_opening_something_that_is_not_a_capture_is_refused(tmp_path):
    xr.Dataset({"a": ("x", np.arange(3))}).to_zarr(tmp_path / "other.zarr")
    with pytest.raises(vl.CaptureFormatError, match="not a vitlens capture"):
        vl.open(tmp_path / "other.zarr")
    with pytest.raises(vl.CaptureFormatError, match="does not exist"):
        vl.open(tmp_path / "nothing.nc")
    (tmp_path / "bad.nc").write_bytes(b"garbage")
    with pytest.raises(vl.CaptureFormatError):
        vl.open(tmp_path / "bad.nc")
    with pytest.raises(vl.OptionError, match=".zarr"):
        vl.open(tmp_path / "x.csv")
    with pytest.raises(vl.CaptureFormatError):
        vl.save(xr.Dataset(), tmp_path / "x.nc")


def test_every_error_is_a_vitlens_error():
    for cls in (vl.UnsupportedModelError, vl.ImageError, vl.TargetError, vl.CaptureFormatError,
                vl.ModelLoadError, vl.OptionError):
        assert issubclass(cls, vl.VitlensError)
