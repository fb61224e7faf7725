"""Nothing lost, nothing silent: one test per data-safety promise of stores, saves and inputs.

Numbers in test names refer to the defects of issue 16 they pin down.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr
from conftest import assert_same_capture, make_vit, random_images

import vitlens as vl
from vitlens.capture import lock, stream

TESTS = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def imgs() -> np.ndarray:
    return random_images(6, 32, seed=11)


@pytest.fixture(scope="module")
def model():
    return make_vit()


@pytest.fixture(scope="module")
def cap(model, imgs) -> xr.DataTree:
    return vl.capture(model, imgs)


class _Stop(Exception):
    pass


def interrupted_store(model, images, path, after_batches=2, **kw) -> Path:
    """A streaming store whose run died after ``after_batches`` committed batches of 2."""
    calls = []

    def hook(module, args):
        calls.append(1)
        if len(calls) > after_batches:
            raise _Stop

    handle = model.register_forward_pre_hook(hook)
    try:
        with pytest.raises(_Stop):
            vl.capture(model, images, store=path, batch_size=2, progress=False, **kw)
    finally:
        handle.remove()
    assert stream.committed(path) == 2 * after_batches
    return Path(path)


# -- 1: a kill between group writes ------------------------------------------------------


def _grow_stage0_only(store: Path, extra: int) -> None:
    """What a kill leaves after /stage0 got the next batch and the root did not."""
    import zarr

    root = zarr.open_group(str(store), mode="r+", use_consolidated=False)
    for _, arr in root["stage0"].arrays():
        if (arr.metadata.dimension_names or [None])[0] == "sample":
            arr.resize((arr.shape[0] + extra, *arr.shape[1:]))


@pytest.mark.slow  # a streamed run stopped and resumed, compared with the in-memory capture
def test_1_resume_after_a_kill_between_group_writes_equals_in_memory(model, imgs, cap, tmp_path):
    store = interrupted_store(model, imgs, tmp_path / "r.zarr")
    _grow_stage0_only(store, 2)
    with pytest.warns(UserWarning, match="resume=True"):
        partial = vl.open(store)  # the committed part, and how to continue
    assert_same_capture(cap.isel(sample=slice(0, 4)), partial)
    resumed = vl.capture(model, imgs, store=store, batch_size=2, resume=True, progress=False)
    assert_same_capture(cap, resumed)
    assert_same_capture(cap, vl.open(store))


# -- 2: resume only touches its own run --------------------------------------------------


def test_2_resume_refuses_a_saved_capture_and_foreign_stores(model, imgs, cap, tmp_path):
    saved = vl.save(cap, tmp_path / "saved.zarr")
    with pytest.raises(vl.ResumeError, match="vl.save"):
        vl.capture(model, imgs, store=saved, resume=True, progress=False)
    assert_same_capture(cap, vl.open(saved))

    foreign = tmp_path / "theirs.zarr"
    xr.Dataset({"a": ("x", np.arange(3))}).to_zarr(foreign)
    (foreign / "notes.txt").write_text("mine")
    before = sorted(p.relative_to(foreign) for p in foreign.rglob("*"))
    with pytest.raises(vl.ResumeError, match="never deletes"):
        vl.capture(model, imgs, store=foreign, resume=True, progress=False)
    assert sorted(p.relative_to(foreign) for p in foreign.rglob("*")) == before

    empty_ish = tmp_path / "e.zarr"
    empty_ish.mkdir()
    (empty_ish / "keep.txt").write_text("x")
    with pytest.raises(vl.ResumeError):
        vl.capture(model, imgs, store=empty_ish, resume=True, progress=False)
    assert (empty_ish / "keep.txt").read_text() == "x"


# -- 3: resume checks it continues the same run ------------------------------------------


_SLOW = pytest.mark.slow  # each: an interrupted stream, a refused resume, then a full resume compared


@pytest.mark.parametrize("change, match", [
    ({"model": "other weights"}, "weights"),
    pytest.param({"images": "other images"}, "input images", marks=_SLOW),
    pytest.param({"images": "reversed order"}, "input images", marks=_SLOW),
    pytest.param({"keep": ["attention"]}, "keep", marks=_SLOW),
    pytest.param({"dtype": "float16"}, "dtype", marks=_SLOW),
    pytest.param({"target": 1}, "targets", marks=_SLOW),
])
def test_3_a_resume_that_differs_from_its_run_is_refused_and_says_what(change, match, model, imgs, cap, tmp_path):
    store = interrupted_store(model, imgs, tmp_path / "r.zarr")
    kw = {k: v for k, v in change.items() if k in ("keep", "dtype", "target")}
    other_model = make_vit(seed=1) if "model" in change else model
    images = imgs
    if change.get("images") == "other images":
        images = random_images(6, 32, seed=12)
    elif change.get("images") == "reversed order":
        images = imgs[::-1].copy()
    with pytest.raises(vl.ResumeError, match=match):
        vl.capture(other_model, images, store=store, batch_size=2, resume=True, progress=False, **kw)
    assert stream.committed(store) == 4  # nothing was touched
    assert_same_capture(cap, vl.capture(model, imgs, store=store, batch_size=2, resume=True, progress=False))


# -- 4 & 5: atomic saves -----------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".zarr", ".nc"])
def test_4_save_never_loses_the_old_capture_and_overwrite_is_explicit(suffix, model, imgs, cap, tmp_path, monkeypatch):
    path = vl.save(cap, tmp_path / f"c{suffix}")
    other = vl.capture(model, imgs[:2])
    with pytest.raises(vl.OptionError, match="overwrite=True"):
        vl.save(other, path)
    assert_same_capture(cap, vl.open(path))

    method = "to_zarr" if suffix == ".zarr" else "to_netcdf"
    real = getattr(xr.DataTree, method)

    def full_disk(self, *a, **k):
        real(self, *a, **k)  # a partial or complete write ...
        raise OSError(28, "No space left on device")  # ... then the disk fills up

    monkeypatch.setattr(xr.DataTree, method, full_disk)
    with pytest.raises(vl.StorageError, match="intact"):
        vl.save(other, path, overwrite=True)
    monkeypatch.undo()
    assert_same_capture(cap, vl.open(path))
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no temporary copy left

    vl.save(other, path, overwrite=True)
    assert_same_capture(other, vl.open(path))


def test_4_save_never_replaces_what_is_not_a_capture(cap, tmp_path):
    theirs = tmp_path / "results.zarr"
    theirs.mkdir()
    (theirs / "thesis.tex").write_text("years of work")
    with pytest.raises(vl.CaptureFormatError, match="not a vitlens capture"):
        vl.save(cap, theirs, overwrite=True)
    assert (theirs / "thesis.tex").read_text() == "years of work"
    (tmp_path / "data.nc").write_bytes(b"someone's file")
    with pytest.raises(vl.CaptureFormatError, match="not a vitlens capture"):
        vl.save(cap, tmp_path / "data.nc", overwrite=True)
    assert (tmp_path / "data.nc").read_bytes() == b"someone's file"


@pytest.mark.parametrize("suffix", [".zarr", ".nc"])
def test_5_saving_a_lazy_capture_onto_its_own_source_keeps_the_data(suffix, cap, tmp_path):
    path = vl.save(cap, tmp_path / f"s{suffix}")
    lazy = vl.open(path, chunks={})
    vl.save(lazy, path, overwrite=True)
    back = vl.open(path)
    assert not np.isnan(back["stage0"].attention.values).any()
    assert_same_capture(cap, back)


# -- 4 & 6: a really full disk (tmpfs) ---------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root; the injected-OSError tests cover the same path")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)], capture_output=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.decode().strip()}); the injected-OSError tests cover it")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=False)


_FULL_DISK = textwrap.dedent(
    """
    import sys, numpy as np
    sys.path.insert(0, {tests!r})
    from conftest import make_vit, random_images
    import vitlens as vl
    model = make_vit()
    path = {path!r}
    vl.save(vl.capture(model, random_images(2, 32)), path)
    big = vl.capture(model, random_images(120, 32, seed=1), grads=True)
    try:
        vl.save(big, path, overwrite=True)
    except vl.StorageError as exc:
        print("StorageError:", exc)
    back = vl.open(path)
    assert back["sample"].size == 2, back["sample"].size
    print("OLD INTACT")
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("suffix", [".nc", ".zarr"])
def test_6_saving_to_a_full_disk_raises_and_keeps_the_old_capture(suffix, small_disk, tmp_path):
    """In a child process: a crash (the old netCDF segfault) would show as a failure, not kill pytest."""
    script = tmp_path / "full.py"
    script.write_text(_FULL_DISK.format(tests=str(TESTS), path=str(small_disk / f"c{suffix}")))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout + done.stderr
    assert "StorageError:" in done.stdout and "OLD INTACT" in done.stdout
    assert sorted(p.name for p in small_disk.iterdir()) == [f"c{suffix}"]


# -- 7: missing and corrupt chunks -------------------------------------------------------


def _a_chunk(store: Path, var: str) -> Path:
    return sorted(p for p in (store / var / "c").rglob("*") if p.is_file())[0]


@pytest.mark.parametrize("how", ["saved", pytest.param("streamed", marks=pytest.mark.slow)])
def test_7_a_missing_chunk_is_an_error_naming_the_variable_never_nan(how, model, imgs, cap, tmp_path):
    path = tmp_path / "c.zarr"
    if how == "saved":
        vl.save(cap, path)
    else:
        vl.capture(model, imgs, store=path, batch_size=2, progress=False)
    _a_chunk(path, "stage0/attention").unlink()
    for chunks in (None, {}):
        with pytest.raises(vl.CaptureFormatError, match="stage0/attention.*missing"):
            vl.open(path, chunks=chunks)


def test_7_a_corrupt_chunk_is_an_error_naming_the_variable(cap, tmp_path):
    path = vl.save(cap, tmp_path / "c.zarr")
    lazy = vl.open(path, chunks={})
    _a_chunk(path, "stage0/attention").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(vl.CaptureFormatError, match="stage0/attention"):
        vl.open(path)
    with pytest.raises(vl.CaptureFormatError, match="stage0/attention"):
        vl.explain(lazy, "rollout")  # damage found while computing lazily, too


@pytest.mark.slow  # streams and reopens a capture
def test_7_fill_values_are_not_mistaken_for_missing_data(model, imgs, tmp_path):
    """All-zero arrays (target 0 everywhere) are written, so a missing file always means damage."""
    cap0 = vl.capture(model, imgs, target=0)
    back = vl.open(vl.save(cap0, tmp_path / "z.zarr"))
    assert back.target.values.tolist() == [0] * 6
    streamed = vl.capture(model, imgs, target=0, store=tmp_path / "s.zarr", batch_size=2, progress=False)
    assert streamed.target.values.tolist() == [0] * 6


# -- 8: one writer per store ---------------------------------------------------------------


def _hold_lock(store: str, ready, release) -> None:
    handle = lock.acquire(Path(store))
    ready.set()
    release.wait(60)
    lock.release(handle)


@pytest.mark.slow  # a second writer process
def test_8_a_second_writer_gets_a_clear_error_and_a_dead_writers_lock_is_released(model, imgs, cap, tmp_path):
    store = interrupted_store(model, imgs, tmp_path / "r.zarr")
    ctx = multiprocessing.get_context("spawn")  # a fork of a threaded pytest process can hang
    ready, release = ctx.Event(), ctx.Event()
    writer = ctx.Process(target=_hold_lock, args=(str(store), ready, release))
    writer.start()
    try:
        assert ready.wait(60)
        with pytest.raises(vl.StoreLockedError, match=f"{writer.pid} pid"):
            vl.capture(model, imgs, store=store, batch_size=2, resume=True, progress=False)
        with pytest.raises(vl.StoreLockedError):
            vl.save(cap, store, overwrite=True)
    finally:
        os.kill(writer.pid, signal.SIGKILL)  # dies holding the lock
        writer.join()
    assert (store / lock.LOCK).read_text().startswith(str(writer.pid))  # its stale lock file is still there
    assert_same_capture(cap, vl.capture(model, imgs, store=store, batch_size=2, resume=True, progress=False))


# -- 11: silent wrong inputs -------------------------------------------------------------


def test_11_16_bit_and_float_pil_images_keep_their_values(model, tmp_path):
    from PIL import Image

    ramp = np.linspace(0, 1, 32 * 32, dtype=np.float32).reshape(32, 32)
    Image.fromarray(np.round(ramp * 65535).astype(np.uint16)).save(tmp_path / "deep.png")
    with Image.open(tmp_path / "deep.png") as im:
        assert im.mode.startswith("I")  # Pillow reads it as a 16-bit mode
    got = vl.capture(model, str(tmp_path / "deep.png"), grads=False).image.values[0, ..., 0]
    np.testing.assert_allclose(got, ramp, atol=1e-4)
    got = vl.capture(model, Image.fromarray(ramp, mode="F"), grads=False).image.values[0, ..., 1]
    np.testing.assert_allclose(got, ramp, atol=1e-6)
    with pytest.raises(vl.ImageError, match=r"\[0, 1\]"):
        vl.capture(model, Image.fromarray(ramp * 255, mode="F"), grads=False)


def test_11_non_finite_logits_and_non_real_tensors_are_refused(model):
    with pytest.raises(vl.CaptureError, match="logits.*normalised"):
        vl.capture(model, torch.full((1, 3, 32, 32), 1e30))
    for dtype in (torch.complex64, torch.bool, torch.uint8):
        with pytest.raises(vl.ImageError, match="float"):
            vl.capture(model, torch.zeros((1, 3, 32, 32), dtype=dtype))


# -- 12: errors that say what is wrong -------------------------------------------------------


def test_12_damaged_attributes_and_commit_marker_are_capture_format_errors(model, imgs, cap, tmp_path):
    path = vl.save(cap, tmp_path / "c.zarr")
    meta = json.loads((path / "zarr.json").read_text())
    meta["attributes"]["input_size"] = "[32, 3"  # listed as JSON, no longer JSON
    for node in meta.get("consolidated_metadata", {}).get("metadata", {}).values():
        node.get("attributes", {}).pop("input_size", None)
    meta.pop("consolidated_metadata", None)
    (path / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(vl.CaptureFormatError, match="damaged attributes"):
        vl.open(path)

    store = interrupted_store(model, imgs, tmp_path / "r.zarr")
    (store / stream.COMMIT_FILE).write_text('{"images": ')
    for call in (lambda: vl.open(store), lambda: vl.capture(model, imgs, store=store, resume=True, progress=False)):
        with pytest.raises(vl.CaptureFormatError, match="commit marker.*damaged"):
            call()


def test_12_model_and_device_problems_are_named(model, imgs):
    if not torch.cuda.is_available():
        with pytest.raises(vl.DeviceError, match="no CUDA GPU"):
            vl.capture(model, imgs[:1], device="cuda")
    with pytest.raises(vl.DeviceError, match="never moves"):
        vl.capture(model, imgs[:1], device="meta")
    with torch.device("meta"):
        ghost = make_vit()
    with pytest.raises(vl.ModelLoadError, match="meta"):
        vl.capture(ghost, imgs[:1])
    with torch.inference_mode():
        frozen = make_vit()
    with pytest.raises(vl.ModelLoadError, match="inference_mode.*grads=False"):
        vl.capture(frozen, imgs[:1])
    assert vl.capture(frozen, imgs[:1], grads=False)["stage0"].attention.shape[0] == 1


def test_12_a_fractional_target_is_named_as_such(model, imgs):
    with pytest.raises(vl.TargetError, match=r"target=1\.5.*class index"):
        vl.capture(model, imgs[:3], target=1.5)
    with pytest.raises(vl.TargetError, match="class index"):
        vl.capture(model, imgs[:3], target=True)


# -- 13: memory is handed back after every batch -----------------------------------------------


@pytest.mark.slow  # streams batch by batch, measuring memory
def test_13_a_stream_returns_freed_memory_after_every_batch(model, imgs, tmp_path, monkeypatch):
    calls = []
    real = stream.release_memory
    monkeypatch.setattr(stream, "release_memory", lambda: (calls.append(1), real()))
    vl.capture(model, imgs, store=tmp_path / "m.zarr", batch_size=2, progress=False)
    assert len(calls) == 3


# -- issue 17: a saved capture is plain xarray data -------------------------------------------


@pytest.mark.parametrize("suffix, engine", [(".zarr", "zarr"), (".nc", "h5netcdf")])
def test_a_saved_capture_opened_with_plain_xarray_explains(suffix, engine, cap, tmp_path):
    path = vl.save(cap, tmp_path / f"c{suffix}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = xr.open_datatree(path, engine=engine)
    for method in ("rollout", "transformer_attribution"):
        xr.testing.assert_allclose(vl.explain(plain, method), vl.explain(cap, method))


# -- no unpickling ------------------------------------------------------------------------------


class _Payload:
    """Unpickling this runs code: it creates the file named ``path``."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def test_a_malicious_pickle_checkpoint_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    bad = tmp_path / "evil.pth"
    torch.save({"state_dict": _Payload(str(marker))}, bad)
    with pytest.raises(vl.ModelLoadError):
        vl.load_model("vit_tiny_patch16_224", checkpoint=bad, img_size=32, patch_size=8, depth=2)
    assert not marker.exists()
