"""Dataset-scale captures: streaming to zarr, resuming after a kill, lazy and distributed analysis."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import xarray as xr
from conftest import assert_same_capture, kill_when, make_vit, random_images

import vitlens as vl
from vitlens.capture.stream import committed

TESTS = Path(__file__).resolve().parent


def test_streaming_capture_equals_in_memory_and_is_lazy(tmp_path, vit):
    imgs = random_images(7, 32, seed=1)
    lazy = vl.capture(vit, imgs, store=tmp_path / "run.zarr", batch_size=3, progress=False)
    att = lazy["stage0"].attention
    assert att.chunks is not None and att.chunksizes["sample"] == (3, 3, 1)
    assert lazy["sample"].values.tolist() == list(range(7))
    assert_same_capture(vl.capture(vit, imgs), lazy)
    xr.testing.assert_allclose(vl.explain(lazy, "all"), vl.explain(vl.capture(vit, imgs), "all"), rtol=1e-4)


def test_lazy_explain_with_many_classes(tmp_path):
    """1000 class names are stored in two chunks, the logits in one: still one task per sample chunk."""
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=1000, depth=2).eval()
    imgs = random_images(5, 32, seed=1)
    vl.capture(model, imgs, store=tmp_path / "r.zarr", batch_size=2, progress=False)
    lazy = vl.open(tmp_path / "r.zarr", chunks={})
    assert lazy["class_name"].chunks != lazy.logits.chunks[1:]
    xr.testing.assert_allclose(vl.explain(lazy, "rollout"), vl.explain(vl.capture(model, imgs), "rollout"), rtol=1e-4)


def _without_source(tree: xr.DataTree) -> xr.DataTree:
    out = tree.copy()
    out.dataset = tree.to_dataset(inherit=False).drop_vars("source")
    return out


@pytest.mark.slow  # three streams
def test_streaming_from_a_folder_a_dataset_and_a_dataloader(tmp_path, vit):
    from PIL import Image

    imgs = (random_images(5, 32, seed=2) * 255).round().astype(np.uint8)
    folder = tmp_path / "images"
    folder.mkdir()
    for i, a in enumerate(imgs):
        Image.fromarray(a).save(folder / f"{i:02d}.png")
    from_folder = vl.capture(vit, str(folder), store=tmp_path / "f.zarr", batch_size=2, progress=False)
    reference = vl.capture(vit, imgs)
    assert from_folder["source"].values.tolist() == [f"{i:02d}.png" for i in range(5)]  # where each image came from
    assert_same_capture(vl.capture(vit, folder), from_folder)  # the same folder in memory: the same capture
    assert_same_capture(reference, _without_source(from_folder))

    ds = xr.Dataset({"image": (("sample", "y", "x", "channel"), imgs.astype(np.float32) / 255)})
    assert_same_capture(reference, vl.capture(vit, ds, store=tmp_path / "d.zarr", batch_size=4, progress=False))

    tensors = (torch.from_numpy(imgs.astype(np.float32) / 255).permute(0, 3, 1, 2) - 0.5) / 0.5
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(tensors, torch.zeros(5)), batch_size=2)
    assert_same_capture(reference, vl.capture(vit, loader, store=tmp_path / "l.zarr", progress=False))


def test_streaming_keeps_targets_and_options(tmp_path, vit):
    imgs = random_images(5, 32, seed=3)
    lazy = vl.capture(vit, imgs, target=[0, 1, 2, 3, 4], store=tmp_path / "t.zarr", batch_size=2,
                      keep=["attention", "ln"], dtype="float16", progress=False)
    assert lazy.target.values.tolist() == [0, 1, 2, 3, 4]
    assert set(lazy["stage0"].data_vars) == {"attention", "ln_mean", "ln_std"}
    assert lazy["stage0"].attention.dtype == np.float16


def test_existing_store_needs_resume_and_resume_needs_a_store(tmp_path, vit):
    imgs = random_images(2, 32)
    vl.capture(vit, imgs, store=tmp_path / "x.zarr", progress=False)
    with pytest.raises(vl.OptionError, match="resume=True"):
        vl.capture(vit, imgs, store=tmp_path / "x.zarr", progress=False)
    with pytest.raises(vl.OptionError, match="store="):
        vl.capture(vit, imgs, resume=True)
    with pytest.raises(vl.OptionError, match=".zarr"):
        vl.capture(vit, imgs, store=tmp_path / "x.nc")


_RUNNER = textwrap.dedent(
    """
    import sys, time
    sys.path.insert(0, {tests!r})
    from conftest import make_vit, random_images
    import vitlens as vl

    def slow_batches():
        imgs = random_images(12, 32, seed=7)
        for i in range(0, 12, 2):
            time.sleep(0.4)
            yield imgs[i:i + 2]

    vl.capture(make_vit(), slow_batches(), store={store!r}, progress=False)
    """
)


@pytest.mark.slow
def test_a_killed_run_loses_nothing_and_resumes_where_it_stopped(tmp_path):
    store = tmp_path / "killed.zarr"
    script = tmp_path / "run.py"
    script.write_text(_RUNNER.format(tests=str(TESTS), store=str(store)))

    def four_committed() -> bool:
        try:
            return store.exists() and committed(store) >= 4
        except vl.CaptureFormatError:
            return False  # store mid-creation

    kill_when(script, four_committed, timeout=120, poll=0.05, never="the streaming run never committed 4 images")
    done = committed(store)
    assert 4 <= done < 12  # killed mid-way, with what was written kept
    with pytest.warns(UserWarning, match="resume=True"):  # opens the committed part, says how to continue
        partial = vl.open(store, chunks={})
    assert partial["sample"].size == done

    imgs = random_images(12, 32, seed=7)
    resumed = vl.capture(make_vit(), imgs, store=store, resume=True, batch_size=2, progress=False)
    assert resumed["sample"].values.tolist() == list(range(12))
    assert_same_capture(vl.capture(make_vit(), imgs), resumed)


def _explain_with_cluster(path: str):
    from dask.distributed import Client, LocalCluster, get_task_stream

    lazy = vl.open(path, chunks={})
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        with Client(cluster) as client:
            with get_task_stream(client) as stream:
                maps = vl.explain(lazy, "all")
            workers = {t["worker"] for t in stream.data}
            names = {str(t["key"]) for t in stream.data}
    return maps, workers, names


@pytest.mark.slow
def test_lazy_explain_runs_on_a_local_cluster_and_equals_in_memory(tmp_path, vit):
    imgs = random_images(6, 32, seed=4)
    vl.capture(vit, imgs, store=tmp_path / "c.zarr", batch_size=2, progress=False)
    maps, workers, names = _explain_with_cluster(str(tmp_path / "c.zarr"))
    assert workers and any("_explain_block" in n for n in names)
    xr.testing.assert_allclose(maps, vl.explain(vl.capture(vit, imgs), "all"), rtol=1e-4)
