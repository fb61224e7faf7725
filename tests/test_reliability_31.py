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


# -- 31.2: a resume checks the CLIP prompts ----------------------------------------------------


class _Stop(Exception):
    pass


def interrupted(capture_call, path, after_batches: int = 1):
    """Run ``capture_call(store=path)`` and stop it (as a kill would) after ``after_batches`` commits."""
    from vitlens.capture import stream

    real, done = stream.write_batch, []

    def write_then_stop(*args, **kwargs):
        if len(done) == after_batches:
            raise _Stop
        real(*args, **kwargs)
        done.append(1)

    stream.write_batch = write_then_stop
    try:
        with pytest.raises(_Stop):
            capture_call(store=path)
    finally:
        stream.write_batch = real
    return path


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    pytest.importorskip("transformers")
    from vitlens.models.families.hf_clip import save_random_clip

    return vl.load_model("hf:" + save_random_clip(tmp_path_factory.mktemp("clip"), seed=0), device="cpu")


PROMPTS = ["a photo of a dog", "a photo of a cat", "a drawing of a star"]


def test_31_2_resuming_an_image_text_stream_with_other_prompts_is_refused(clip, tmp_path):
    import torch

    from vitlens.capture import stream

    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    run = dict(batch_size=1, progress=False)
    store = interrupted(lambda **kw: vl.capture(clip, x, text=PROMPTS, **run, **kw), tmp_path / "clip.zarr")
    ids = clip.vitlens_text_processor(text=PROMPTS, padding=True, return_tensors="pt")["input_ids"]
    for other in (
        ["a photo of a dog", "a photo of a cow", "a drawing of a star"],  # same count, one prompt changed
        PROMPTS[::-1],  # same prompts in another order: other class indices
        PROMPTS[:2],  # another count (was a raw ValueError from zarr)
        torch.cat([ids[:, :1], ids[:, 2:]], 1),  # token ids with one token dropped
    ):
        with pytest.raises(vl.ResumeError, match="text prompts"):
            vl.capture(clip, x, text=other, store=store, resume=True, **run)
        assert stream.committed(store) == 1  # nothing touched
    resumed = vl.capture(clip, x, text=ids, store=store, resume=True, **run)  # the same prompts as ids: same run
    expected = vl.capture(clip, x, text=PROMPTS)
    np.testing.assert_allclose(resumed.logits.values, expected.logits.values, rtol=1e-5, atol=1e-6)
    assert resumed.attrs["class_names"] == PROMPTS


def test_31_10_prompts_beyond_the_text_encoders_limits_are_option_errors(clip):
    import torch

    x = torch.zeros(1, 3, 32, 32)
    for text, words in (
        (["a photo of a " + "very " * 20 + "big dog", "a cat"], r"prompt 0 \('a photo of a very.*is \d+ tokens long.*at most 64"),
        (torch.zeros((1, 65), dtype=torch.long), r"prompt 0 is 65 tokens long.*at most 64"),
        (torch.tensor([[0, 10**6, 1]]), r"token id 1000000, outside the text encoder's vocabulary"),
        (torch.tensor([[0, -3, 1]]), r"token id -3, outside"),
    ):
        with pytest.raises(vl.OptionError, match=words):
            vl.capture(clip, x, text=text, grads=False)
