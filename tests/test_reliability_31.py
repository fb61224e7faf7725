"""Nothing silent, round two (issue 31): one test per defect of stores, saves, inputs and the CLI.

Test names start with the item of issue 31 they pin down.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import make_vit

import vitlens as vl


@pytest.fixture(scope="module")
def model():
    return make_vit()


# -- 31.6: EXIF orientation ------------------------------------------------------------------


def _oriented_png(path, orientation: int) -> np.ndarray:
    """A 32×32 PNG stored unrotated with an EXIF orientation tag; returns the stored pixels."""
    from PIL import Image

    stored = np.zeros((32, 32, 3), np.uint8)
    stored[:8, :, 0] = 255  # a red band along the top edge, a green one down the left
    stored[:, :4, 1] = 255
    im = Image.fromarray(stored)
    exif = im.getexif()
    exif[0x0112] = orientation
    im.save(path, exif=exif)
    return stored


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_31_6_exif_orientation_is_applied_to_files_and_pil_images(orientation, model, tmp_path):
    from PIL import Image, ImageOps

    path = tmp_path / "phone.png"
    stored = _oriented_png(path, orientation)
    with Image.open(path) as im:
        upright = np.asarray(ImageOps.exif_transpose(im)).astype(np.float32) / 255
    assert not np.array_equal(upright, stored / 255)  # the tag does change the picture
    from_file = vl.capture(model, str(path), grads=False).image.values[0]
    np.testing.assert_allclose(from_file, upright, atol=1e-6)
    with Image.open(path) as im:
        from_pil = vl.capture(model, im, grads=False).image.values[0]
    np.testing.assert_allclose(from_pil, upright, atol=1e-6)


# -- 31.10: inputs mean what they say ----------------------------------------------------------


def test_31_10_mode_i_images_are_scaled_by_the_modes_range_not_their_maximum(model):
    from PIL import Image

    dim, bright = (np.full((32, 32), v, np.int32) for v in (255, 300))
    got = [vl.capture(model, Image.fromarray(a, mode="I"), grads=False).image.values[0, 0, 0, 0] for a in (dim, bright)]
    np.testing.assert_allclose(got, [255 / 65535, 300 / 65535], rtol=1e-5)


def test_31_10_a_decompression_bomb_is_an_image_error_that_says_what_to_do(model, tmp_path, monkeypatch):
    from PIL import Image

    path = tmp_path / "bomb.png"
    Image.new("L", (64, 64)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 64×64 counts as a bomb: more than twice the limit
    with pytest.raises(vl.ImageError, match=r"bomb.png.*4096 pixels.*MAX_IMAGE_PIXELS"):
        vl.capture(model, str(path), grads=False)
