"""Your own images: a folder captured in memory (#32.2) and the ``source`` coordinate (#32.3).

A capture of files or a folder records where each image came from (``source`` on
``sample``: the name in the folder, or the path as given), through streaming,
resuming, saving, opening, maps, metric tables, figure titles and the widgets.
"""

from __future__ import annotations

import os
from pathlib import Path

import ipywidgets as widgets
import numpy as np
import pytest
import xarray as xr
from conftest import assert_same_capture, make_vit, random_images

import vitlens as vl
from vitlens.capture import stream
from vitlens.capture.images import IMAGE_SUFFIXES
from vitlens.explain_cli import expand_inputs

NAMES = ["b.png", "a.png", "C.png", "d.jpg"]  # sorted as files are: "C.png", "a.png", "b.png", "d.jpg"


def _write(folder: Path, names: list[str], seed: int = 0) -> np.ndarray:
    """32×32 pictures (the model's input size: only normalised, so arrays give the same capture)."""
    from PIL import Image

    folder.mkdir(exist_ok=True)
    pixels = (random_images(len(names), 32, seed=seed) * 255).round().astype(np.uint8)
    for name, a in zip(names, pixels):
        # JPEG would change the pixels; every file is a PNG whatever its name says
        Image.fromarray(a).save(folder / name, format="PNG")
    return pixels


@pytest.fixture(scope="module")
def vit():
    return make_vit(seed=1)


@pytest.fixture
def folder(tmp_path):
    pixels = _write(tmp_path / "my_images", NAMES)
    (tmp_path / "my_images" / "notes.txt").write_text("not an image")
    (tmp_path / "my_images" / "sub").mkdir()
    _write(tmp_path / "my_images" / "sub", ["deeper.png"])
    return tmp_path / "my_images", pixels


# -- #32.2 a folder in memory -------------------------------------------------------------------
def test_a_folder_is_captured_in_memory_in_the_order_of_the_store_and_the_cli(folder, vit, tmp_path, monkeypatch):
    path, pixels = folder
    order = sorted(range(len(NAMES)), key=lambda i: NAMES[i])  # C.png, a.png, b.png, d.jpg
    reference = vl.capture(vit, pixels[order])
    monkeypatch.chdir(tmp_path)
    for given in ("my_images", "my_images/", str(path), path):
        cap = vl.capture(vit, given)
        np.testing.assert_array_equal(cap["image"].values, reference["image"].values, err_msg=str(given))
        np.testing.assert_allclose(cap["logits"].values, reference["logits"].values, rtol=1e-5, atol=1e-6)
        assert cap["source"].values.tolist() == ["C.png", "a.png", "b.png", "d.jpg"], given
    streamed = vl.capture(vit, "my_images", store=tmp_path / "run.zarr", batch_size=3, progress=False)
    assert_same_capture(vl.capture(vit, "my_images"), streamed)
    assert [p.name for p in expand_inputs(["my_images"])] == cap["source"].values.tolist()


def test_an_empty_folder_or_one_without_images_says_which_files_are_read(tmp_path, vit):
    (tmp_path / "empty").mkdir()
    with pytest.raises(vl.ImageError, match=r"'.*empty' is empty.*\.png, \.jpg") as empty:
        vl.capture(vit, tmp_path / "empty")
    assert all(s in str(empty.value) for s in IMAGE_SUFFIXES)
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "notes.txt").write_text("x")
    _write(tmp_path / "docs" / "sub", ["deeper.png"])
    with pytest.raises(vl.ImageError, match=r"holds no image files.*\.png.*not subfolders.*2 other entries"):
        vl.capture(vit, str(tmp_path / "docs") + "/")
    with pytest.raises(vl.ImageError, match="holds no image files"):  # the same message when streaming
        vl.capture(vit, tmp_path / "docs", store=tmp_path / "s.zarr", progress=False)
    assert not (tmp_path / "s.zarr").exists()


def test_a_folder_inside_a_list_is_refused_with_the_way_to_capture_it(folder, vit):
    path, _ = folder
    with pytest.raises(vl.ImageError, match=r"is a folder: pass it on its own"):
        vl.capture(vit, [path / "a.png", path])


# -- #32.3 the source coordinate ----------------------------------------------------------------
def test_files_keep_their_path_as_given_and_arrays_have_no_source(folder, vit):
    path, pixels = folder
    files = [str(path / "b.png"), path / "a.png"]
    assert vl.capture(vit, files)["source"].values.tolist() == [str(path / "b.png"), str(path / "a.png")]
    assert vl.capture(vit, str(path / "d.jpg"))["source"].values.tolist() == [str(path / "d.jpg")]
    mixed = vl.capture(vit, [pixels[0], str(path / "a.png")])
    assert mixed["source"].values.tolist() == ["", str(path / "a.png")]  # "" : not read from a file
    assert "source" not in vl.capture(vit, pixels).coords
    from PIL import Image

    assert "source" not in vl.capture(vit, [Image.fromarray(pixels[0])]).coords


@pytest.mark.parametrize("suffix", ["nc", "zarr"])
def test_save_and_open_keep_the_source_of_hostile_file_names(tmp_path, vit, suffix):
    hostile = ["<img src=x onerror=alert(1)>.png", "$x$ & y\n.png", "caf\u00e9.png"]
    _write(tmp_path / "pics", hostile)
    with open(os.fsencode(tmp_path / "pics") + b"/not-utf8-\xff.png", "wb") as f:  # a Linux name in no encoding
        f.write((tmp_path / "pics" / hostile[0]).read_bytes())
    cap = vl.capture(vit, tmp_path / "pics")
    expected = sorted(hostile) + ["not-utf8-\\xff.png"]  # the undecodable byte written as text
    assert sorted(cap["source"].values.tolist()) == sorted(expected)
    back = vl.open(vl.save(cap, tmp_path / f"cap.{suffix}"))
    assert back["source"].values.tolist() == cap["source"].values.tolist()
    assert back["source"].dims == ("sample",)


def _interrupted_after_one_batch(monkeypatch, model, images, store: Path) -> None:
    """A streaming run of 2-image batches stopped (KeyboardInterrupt) after its first batch was committed."""
    write, calls = stream.write_batch, []

    def stop_at_second(tree, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return write(tree, *args, **kwargs)

    monkeypatch.setattr(stream, "write_batch", stop_at_second)
    with pytest.raises(KeyboardInterrupt):
        vl.capture(model, images, store=store, batch_size=2, progress=False)
    monkeypatch.setattr(stream, "write_batch", write)


def test_streaming_and_resume_keep_the_source(folder, vit, tmp_path, monkeypatch):
    path, _ = folder
    store = tmp_path / "run.zarr"
    _interrupted_after_one_batch(monkeypatch, vit, path, store)
    with pytest.warns(UserWarning, match="resume=True"):
        assert vl.open(store)["source"].values.tolist() == ["C.png", "a.png"]
    resumed = vl.capture(vit, path, store=store, batch_size=2, progress=False, resume=True)
    assert resumed["source"].values.tolist() == ["C.png", "a.png", "b.png", "d.jpg"]
    assert resumed["source"].chunks is not None  # lazy, like every stored variable
    assert_same_capture(vl.capture(vit, path), resumed)
    # another folder with the same names is another input: the fingerprint holds the paths
    other = tmp_path / "other"
    other.mkdir()
    for name in NAMES:
        (other / name).write_bytes((path / name).read_bytes())
    with pytest.raises(vl.ResumeError, match="input images"):
        vl.capture(vit, other, store=tmp_path / "run.zarr", batch_size=2, progress=False, resume=True)


def test_resuming_a_store_written_without_sources_stays_whole(folder, vit, tmp_path, monkeypatch):
    """A store begun by a vitlens that recorded no source is continued without one (never half a column)."""
    from vitlens.capture import api

    path, _ = folder
    store = tmp_path / "old.zarr"
    monkeypatch.setattr(api, "image_sources", lambda images: None)  # the old capture
    _interrupted_after_one_batch(monkeypatch, vit, path, store)
    monkeypatch.undo()
    resumed = vl.capture(vit, path, store=store, batch_size=2, progress=False, resume=True)
    assert "source" not in resumed.coords and resumed["sample"].size == 4
    vl.verify(store)


def test_maps_and_metric_tables_carry_the_source(folder, vit):
    path, _ = folder
    cap = vl.capture(vit, path)
    names = ["C.png", "a.png", "b.png", "d.jpg"]
    maps = vl.explain(cap, "rollout")
    assert maps["source"].values.tolist() == names
    assert vl.to_pixels(maps)["source"].values.tolist() == names
    assert vl.explain(cap.sel(sample=2), "gradcam")["source"].values.tolist() == ["b.png"]
    assert vl.explain(cap, "all")["source"].values.tolist() == names
    from vitlens.metrics import deletion, perturbation, segmentation_counts

    masks = np.zeros((4, 32, 32), bool)
    masks[:, 8:24, 8:24] = True
    assert segmentation_counts(maps, masks)["source"].values.tolist() == names
    assert perturbation(vit, cap, maps, cap.target.values, steps=2)["source"].values.tolist() == names
    assert deletion(vit, cap, maps, steps=2)["source"].values.tolist() == names
    # vl.evaluate's per-item table: a dataset of pictures with masks and their files
    ds = xr.Dataset({"image": (("sample", "y", "x", "channel"), cap["image"].values),
                     "mask": (("sample", "object", "y", "x"), masks[:, None] & [[[True]], [[False]]]),
                     "label": (("sample", "object"), np.array([[0, -1], [1, -1], [2, -1], [3, -1]]))},
                    coords={"source": ("sample", names)})
    from vitlens.metrics import evaluate_items

    items = evaluate_items(vit, ds, "rollout", steps=2)
    assert items["source"].values.tolist() == names and items["sample"].values.tolist() == [0, 1, 2, 3]
    assert "source" not in evaluate_items(vit, ds.drop_vars("source"), "rollout", n=1, steps=2).coords


def test_figure_titles_show_the_file_name(folder, vit, tmp_path):
    path, pixels = folder
    cap = vl.capture(vit, path)
    fig = vl.figures.grid(cap, ["rollout"])
    labels = [ax.get_ylabel() for ax in fig.axes if ax.get_ylabel().startswith(("C.png", "a.png", "b.png", "d.jpg"))]
    assert [label.split("\n")[0] for label in labels] == ["C.png", "a.png", "b.png", "d.jpg"]
    assert labels[1].split("\n")[1].startswith("#1: ")
    assert "(b.png)" in vl.figures.layers(cap, "rollout", 2)._suptitle.get_text()
    # a path given: the file name beside the row, the whole path under the panels; "$" shown literally
    _write(tmp_path / "cash", ["$5 $off.png"])
    long = vl.capture(vit, [str(tmp_path / "cash" / "$5 $off.png")])
    fig = vl.figures.grid(long, ["rollout"])
    assert fig.axes[0].get_ylabel().split("\n")[0] == r"\$5 \$off.png"
    # wrapped (at a space or after a hyphen of the temporary folder's name): compare without white space
    assert "".join(str(tmp_path / "cash" / r"\$5 \$off.png").split()) in "".join(fig._supxlabel.get_text().split())
    vl.figures.save(fig, tmp_path / "cash.png")  # draws: no mathtext from the name
    plain = vl.figures.grid(vl.capture(vit, pixels[:2]), ["rollout"])  # no file: the old labels
    assert [ax.get_ylabel()[:4] for ax in plain.axes[:4:2]] == ["#0: ", "#1: "]


def test_widget_sample_selectors_show_file_names_as_text_and_html_escaped(tmp_path, vit):
    hostile = ["<img src=x onerror=alert(1)>.png", "<svg onload=alert(2)>.png"]
    _write(tmp_path / "pics", hostile)
    cap = vl.capture(vit, tmp_path / "pics")
    ex = vl.Explorer(cap, vit)
    views = [ex, vl.HeadGrid(cap), vl.ModelView(cap), vl.TokenCurves(cap), vl.Compare(cap, vit)]
    for w in views:
        labels = [label for label, _ in w.sample_select.options]
        # a dropdown shows its labels as text (the page sets textContent): the name as written
        assert [label.split(": ")[1].split(" · ")[0] for label in labels] == sorted(hostile), type(w).__name__
    shown = []
    for w in views:
        stack = [w]
        while stack:
            d = stack.pop()
            stack += list(getattr(d, "children", ()))
            if isinstance(d, widgets.HTML):
                shown.append(str(d.value))
        for fig in getattr(w, "_figures", {}).values() or [w.figure]:
            shown += [str(a.text) for a in fig.layout.annotations] + [str(fig.layout.title.text or "")]
    page = "\n".join(shown)
    assert "<img" not in page and "<svg" not in page
