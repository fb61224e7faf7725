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


@pytest.mark.slow  # six streaming captures of a CLIP model
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


# -- shared: a small capture, saved and streamed -------------------------------------------------


@pytest.fixture(scope="module")
def imgs():
    from conftest import random_images

    return random_images(4, 32, seed=3)


@pytest.fixture(scope="module")
def cap(model, imgs):
    return vl.capture(model, imgs)


def _stored(how, model, imgs, cap, path):
    if how == "saved":
        return vl.save(cap, path)
    vl.capture(model, imgs, store=path, batch_size=2, progress=False)
    return path


def _chunks_of(store, var: str):
    return sorted(p for p in (store / var).rglob("*") if p.is_file() and p.name != "zarr.json")


# -- 31.3: a missing array or group is named, never NaN -------------------------------------------


@pytest.mark.parametrize("how", ["saved", "streamed"])
@pytest.mark.parametrize("removed, named", [
    ("stage0/attention", "variable /stage0/attention"),
    ("stage0/attention_grad", "variable /stage0/attention_grad"),
    ("logits", "variable /logits"),
    ("stage0", "group /stage0"),
])
def test_31_3_a_missing_array_or_group_fails_the_open_naming_it(how, removed, named, model, imgs, cap, tmp_path):
    import shutil

    path = _stored(how, model, imgs, cap, tmp_path / "c.zarr")
    shutil.rmtree(path / removed)  # the consolidated metadata still lists it
    for chunks in (None, {}):
        with pytest.raises(vl.CaptureFormatError, match=f"{named} of .* is missing"):
            vl.open(path, chunks=chunks)


# -- 31.4: every committed chunk and every .nc file is checksummed -----------------------------------


def _flip(path, bit: int) -> None:
    data = bytearray(path.read_bytes())
    data[bit // 8] ^= 1 << (bit % 8)
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["saved", "streamed"])
def test_31_4_a_single_bit_flip_in_a_zstd_chunk_raises_naming_the_variable(how, model, imgs, cap, tmp_path):
    path = _stored(how, model, imgs, cap, tmp_path / "c.zarr")
    assert vl.verify(path).chunks > 0
    chunk = _chunks_of(path, "stage0/attention")[0]
    intact = chunk.read_bytes()
    assert len(intact) > 16
    for bit in np.linspace(0, 8 * len(intact) - 1, 7).round().astype(int):  # header, body, checksum
        _flip(chunk, int(bit))
        for chunks in (None, {}):
            with pytest.raises(vl.CaptureFormatError, match="stage0/attention.*damaged"):
                vl.explain(vl.open(path, chunks=chunks), "rollout")
        with pytest.raises(vl.CaptureFormatError, match="stage0/attention"):
            vl.verify(path)
        chunk.write_bytes(intact)
    np.testing.assert_array_equal(vl.open(path)["stage0"].attention.values, cap["stage0"].attention.values)


def test_31_4_a_single_bit_flip_anywhere_in_a_nc_file_raises(cap, tmp_path):
    path = vl.save(cap, tmp_path / "c.nc")
    assert vl.verify(path).checksums.startswith("crc32c")
    size = path.stat().st_size
    intact = path.read_bytes()
    for bit in np.linspace(0, 8 * size - 1, 41).round().astype(int):
        _flip(path, int(bit))
        with pytest.raises(vl.CaptureFormatError, match="c.nc"):
            vl.open(path, chunks={})
        with pytest.raises(vl.CaptureFormatError, match="c.nc"):
            vl.verify(path)
        path.write_bytes(intact)
    vl.verify(path)


def test_31_4_verify_reports_a_whole_store_and_finds_damage_beyond_what_an_open_reads(model, imgs, tmp_path):
    path = tmp_path / "s.zarr"
    vl.capture(model, imgs, store=path, batch_size=2, progress=False)
    report = vl.verify(path)
    assert report.images == 4 and report.checksums == "crc32c per chunk"
    assert report.variables >= 10 and report.chunks >= 2 * report.variables - 20
    lazy = vl.open(path, chunks={})  # opening lazily reads no chunk of the last batch's features ...
    _flip(_chunks_of(path, "stage0/features")[-1], 40)
    assert lazy["sample"].size == 4
    with pytest.raises(vl.CaptureFormatError, match="stage0/features"):
        vl.verify(path)  # ... verify reads every one


def test_31_4_verify_says_what_it_checked_on_a_capture_without_checksums(cap, tmp_path):
    plain = tmp_path / "old.zarr"
    from vitlens.capture.store import _encode, _map_attrs

    _map_attrs(cap, _encode).to_zarr(plain, mode="w-", consolidated=True, write_empty_chunks=True)  # no checksums
    assert vl.verify(plain).checksums == "none (written before vitlens kept checksums)"


# -- 31.8: bounds: nothing inside a store makes an open hang or allocate what is not there -------------


def _returns_within(call, fifo, seconds: float = 30.0):
    """``call()``'s exception (or None), failing if it waits on ``fifo`` for ``seconds`` (a hang).

    On a hang the FIFO is opened for writing and closed, so the blocked reader sees its end
    and the test process can exit.
    """
    import os
    import threading

    box = {}

    def run():
        try:
            call()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            box["exc"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    hung = thread.is_alive()
    for _ in range(200):  # let the blocked reader go
        if not thread.is_alive():
            break
        try:
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:  # no reader waiting at this instant
            pass
        thread.join(0.1)
    assert not hung, "hangs"
    return box.get("exc")


@pytest.mark.parametrize("where", ["stage0/attention/c/0/0/0/0/0", "zarr.json", "stage0/extra"])
def test_31_8_a_fifo_inside_a_store_is_refused_not_waited_on(where, cap, tmp_path):
    import os

    path = vl.save(cap, tmp_path / "c.zarr")
    fifo = path / where
    if fifo.exists():
        fifo.unlink()
    os.mkfifo(fifo)
    for call in (lambda: vl.open(path), lambda: vl.verify(path), lambda: vl.save(cap, path, overwrite=True)):
        exc = _returns_within(call, fifo)
        assert isinstance(exc, vl.CaptureFormatError), exc
        assert "not a regular file" in str(exc) and where in str(exc)


def test_31_8_a_fifo_given_as_a_nc_capture_is_refused(cap, tmp_path):
    import os

    os.mkfifo(tmp_path / "c.nc")
    exc = _returns_within(lambda: vl.open(tmp_path / "c.nc"), tmp_path / "c.nc")
    assert isinstance(exc, vl.CaptureFormatError) and "not a regular file" in str(exc)


def test_31_8_a_claimed_huge_sample_count_is_refused_before_anything_is_allocated(cap, tmp_path):
    """Every array's metadata claims 10^5 images (issue 31: 10^9, 7 GiB allocated before the refusal)."""
    import json
    import tracemalloc

    path = vl.save(cap, tmp_path / "c.zarr")

    def grow(node):
        if node.get("node_type") == "array" and (node.get("dimension_names") or [None])[0] == "sample":
            node["shape"][0] = 10**5

    for doc in path.rglob("zarr.json"):
        meta = json.loads(doc.read_text())
        grow(meta)
        for node in meta.get("consolidated_metadata", {}).get("metadata", {}).values():
            grow(node)
        doc.write_text(json.dumps(meta))
    tracemalloc.start()
    try:
        with pytest.raises(vl.CaptureFormatError, match="sample"):
            vl.open(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 * 2**20, f"{peak / 2**20:.0f} MiB allocated before refusing"  # main: 110 MiB, 2 minutes


# -- 31.9: what a killed vl.save left is cleaned up by the next save or open, and only that -------------


def _save_and_die(path: str, how: str) -> None:
    """In a child: ``vl.save(..., overwrite=True)`` killed (``os._exit``) at the point ``how`` names."""
    import os

    from conftest import random_images
    from zarr.storage import LocalStore

    from vitlens.capture import store

    cap2 = vl.capture(make_vit(), random_images(2, 32, seed=9))
    if how == "mid-write":
        real, calls = LocalStore.set, []

        async def set_then_die(self, key, value):
            calls.append(key)
            if len(calls) == 12:
                os._exit(9)
            await real(self, key, value)

        LocalStore.set = set_then_die
    elif how == "before the swap":
        store.swap_in = lambda tmp, target: os._exit(9)
    elif how == "between the renames":  # where the kernel cannot exchange folders atomically
        store._exchange = lambda a, b: False
        real_rename = os.rename

        def rename(src, dst):
            if store._TMP_TAG in os.fspath(src):
                os._exit(9)
            real_rename(src, dst)

        os.rename = rename
    vl.save(cap2, path, overwrite=True)
    os._exit(0)


def _entries(folder):
    return sorted(p.name for p in folder.iterdir())


@pytest.mark.slow  # three child processes, each importing torch
@pytest.mark.parametrize("suffix, how, then", [
    (".zarr", "mid-write", "save"),
    (".nc", "before the swap", "open"),
    (".zarr", "between the renames", "open"),
])
def test_31_9_a_killed_saves_leftovers_are_removed_by_the_next_save_or_open_and_nothing_else(
        suffix, how, then, cap, model, imgs, tmp_path):
    import multiprocessing
    import warnings

    from vitlens.capture import store

    path = vl.save(cap, tmp_path / f"c{suffix}")
    child = multiprocessing.get_context("spawn").Process(target=_save_and_die, args=(str(path), how))
    child.start()
    child.join(300)
    assert child.exitcode == 9
    left = [name for name in _entries(tmp_path) if name.startswith(f".c{suffix}.vitlens-")]
    assert left, "the kill left nothing to clean up"
    # what vitlens did not write, or wrote for another path, or is being written right now
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / f".c{suffix}.vitlens-tmp-notours").write_text("mine")
    theirs = tmp_path / f".c{suffix}.vitlens-tmp-0123abcd{suffix}"  # named like a save's copy, holds a thesis
    theirs.mkdir()
    (theirs / "thesis.tex").write_text("years of work")
    other_path = tmp_path / f".d{suffix}.vitlens-tmp-89abcdef{suffix}"
    other_path.write_bytes(b"")
    live = tmp_path / f".c{suffix}.vitlens-tmp-fedcba98{suffix}"
    live.write_bytes(b"")
    survivors = {"notes.txt", theirs.name, other_path.name, live.name, f".c{suffix}.vitlens-tmp-notours"}
    with store._held(live):  # a save in progress (another process, here: this one) holds its copy
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "put back in place" (between the renames)
            if then == "save":
                other = vl.capture(model, imgs[:2])
                vl.save(other, path, overwrite=True)
                expected = other
            else:
                expected = cap
            back = vl.open(path)
    assert set(_entries(tmp_path)) == survivors | {path.name}
    assert (theirs / "thesis.tex").read_text() == "years of work"
    np.testing.assert_array_equal(back["stage0"].attention.values, expected["stage0"].attention.values)


# -- 31.10: a full disk while streaming -------------------------------------------------------------


def test_31_10_a_full_disk_while_streaming_is_a_storage_error_and_the_store_resumes(model, imgs, cap, tmp_path,
                                                                                     monkeypatch):
    from zarr.storage import LocalStore

    from vitlens.capture import stream

    real, calls = LocalStore.set, []

    async def fills_up(self, key, value):
        calls.append(key)
        if stream.committed(tmp_path / "s.zarr") == 2:  # the second batch finds the disk full
            raise OSError(28, "No space left on device")
        await real(self, key, value)

    monkeypatch.setattr(LocalStore, "set", fills_up)
    with pytest.raises(vl.StorageError, match=r"No space left.*2 images committed before are intact.*resume=True"):
        vl.capture(model, imgs, store=tmp_path / "s.zarr", batch_size=2, progress=False)
    monkeypatch.undo()
    assert stream.committed(tmp_path / "s.zarr") == 2
    resumed = vl.capture(model, imgs, store=tmp_path / "s.zarr", batch_size=2, resume=True, progress=False)
    np.testing.assert_allclose(resumed["stage0"].attention.values, cap["stage0"].attention.values, rtol=1e-5, atol=1e-7)


# -- 31.10: hostile attributes are named at open, not raw errors deep inside a method -------------------


@pytest.mark.parametrize("group, key, value, words", [
    ("/", "class_names", "5", "a list of class names"),
    ("/", "class_names", '["a", "b"]', "one name per class"),
    ("/", "input_size", '"abc"', r"\[channels, height, width\]"),
    ("/", "options", "nope", "JSON text"),
    ("stage0", "grid", "[0, 0]", r"\[rows, columns\], positive"),
    ("stage0", "grid", "[100, 100]", "at most the 17 tokens"),
    ("stage0", "stride", '"x"', r"\[rows, columns\]"),
    ("stage0", "num_prefix_tokens", "[1]", "a count"),
    ("stage0", "num_heads", "7", "the number of heads stored"),
    ("/", "class_names", "[" * 100000 + "]" * 100000, "RecursionError"),
])
def test_31_10_hostile_store_attributes_are_capture_format_errors_naming_them(group, key, value, words, cap, tmp_path):
    import json

    path = vl.save(cap, tmp_path / "c.zarr")
    for doc in path.rglob("zarr.json"):
        meta = json.loads(doc.read_text())
        meta.pop("consolidated_metadata", None)
        if doc.parent == (path / group.strip("/") if group != "/" else path):
            meta["attributes"][key] = value
            listed = set(json.loads(meta["attributes"].get("_vitlens_json_attrs", "[]")))
            if key != "options":  # capture stores options as plain JSON text
                meta["attributes"]["_vitlens_json_attrs"] = json.dumps(sorted(listed | {key}))
        doc.write_text(json.dumps(meta))
    with pytest.raises(vl.CaptureFormatError, match=f"{key if words != 'RecursionError' else 'damaged attributes'}.*{words}"):
        vl.open(path)


def test_31_10_captures_of_every_layout_pass_the_attribute_checks(tmp_path):
    from conftest import make_swin, random_images

    for name, model, size in (("vit", make_vit(reg_tokens=2), 32), ("swin", make_swin(), 64)):
        cap = vl.capture(model, random_images(1, size), grads=False)
        for suffix in (".zarr", ".nc"):
            vl.open(vl.save(cap, tmp_path / f"{name}{suffix}"))
