"""Publication figures and the explain command."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from conftest import make_swin, random_images

import vitlens as vl
from vitlens import figures


@pytest.fixture(scope="module")
def cap():
    return vl.capture(make_swin(seed=5), random_images(3, 64, seed=6))


def test_grid_has_one_row_per_sample_and_one_column_per_method(cap):
    fig = figures.grid(cap, methods=["rollout", "tokentm"], samples=[0, 2])
    kinds = [t.type for t in fig.data]
    assert kinds.count("image") == 2 * 3 and kinds.count("heatmap") == 2 * 2
    heat = [t for t in fig.data if t.type == "heatmap"]
    expected = vl.normalize(vl.to_pixels(vl.explain(cap.isel(sample=[0, 2]), "tokentm")))
    np.testing.assert_allclose(np.asarray(heat[1].z), expected.values[0], rtol=1e-6)
    assert sum(bool(t.showscale) for t in heat) == 1  # one shared colour bar
    assert [a.text for a in fig.layout.annotations][:3] == ["input", "Rollout", "TokenTM"]


def test_layers_figure_shows_every_block(cap):
    fig = figures.layers(cap, "rollout", sample=1)
    assert sum(t.type == "heatmap" for t in fig.data) == 4
    with pytest.raises(vl.OptionError):
        figures.layers(cap, "gradcam")
    with pytest.raises(vl.OptionError):
        figures.grid(cap, methods=["nope"])
    with pytest.raises(vl.OptionError):
        figures.grid(cap, samples=[9])


def test_overlay_blends_with_the_colour_scale():
    img = np.zeros((2, 2, 3))
    heat = np.array([[0.0, 1.0], [0.5, 1.0]])
    out = figures.overlay(img, heat, alpha=1.0, colorscale="Greys")
    assert out.dtype == np.uint8 and out[0, 0].tolist() == [255, 255, 255] and out[0, 1].tolist() == [0, 0, 0]
    with pytest.raises(vl.OptionError):
        figures.overlay(img, np.zeros((3, 3)))


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["png", "svg", "pdf"])
def test_export_is_deterministic(cap, tmp_path, fmt):
    digests = []
    for k in range(2):
        path = figures.save(figures.grid(cap, methods=["lnstat", "rollout"]), tmp_path / f"f{k}.{fmt}", dpi=100)
        data = path.read_bytes()
        assert len(data) > 1000
        digests.append(hashlib.sha256(data).hexdigest())
    assert digests[0] == digests[1]
    magic = {"png": b"\x89PNG", "svg": b"<svg", "pdf": b"%PDF"}[fmt]
    assert magic in data[:200]


def test_failed_image_export_raises_export_error(cap, tmp_path, monkeypatch):
    fig = figures.grid(cap, methods=["rollout"])

    def broken(*args, **kwargs):
        raise RuntimeError("no browser")

    monkeypatch.setattr(fig, "to_image", broken)
    with pytest.raises(vl.ExportError, match="BROWSER_PATH.*html"):
        figures.save(fig, tmp_path / "f.png")
    assert not (tmp_path / "f.png").exists()
    assert issubclass(vl.ExportError, vl.VitlensError)
    assert vl.widgets.ExportError is vl.ExportError


def test_html_export_is_self_contained(cap, tmp_path):
    path = figures.save(figures.grid(cap, methods=["rollout"]), tmp_path / "f.html")
    text = path.read_text()
    assert "vitlens-figure" in text and "https://cdn" not in text.split("<body>")[0]


def test_explain_command_writes_overlays_and_capture(tmp_path, capsys):
    from PIL import Image

    from vitlens.cli import main

    paths = []
    for i in range(2):
        p = tmp_path / f"img{i}.png"
        Image.fromarray((random_images(1, 40, seed=i)[0] * 255).astype(np.uint8)).save(p)
        paths.append(str(p))
    out = tmp_path / "out"
    code = main(["explain", *paths, "--model", "vit_tiny_patch16_224", "--method", "rollout",
                 "--out", str(out), "--target", "1"])
    assert code == 0
    assert (out / "img0_rollout.png").exists() and (out / "img1_input.png").exists()
    back = vl.open(out / "capture.nc")
    assert back.target.values.tolist() == [1, 1]
    assert "explaining class 1" in capsys.readouterr().out


def test_cli_reports_vitlens_errors_without_a_traceback(tmp_path, capsys):
    from vitlens.cli import main

    code = main(["explain", str(tmp_path / "missing.png"), "--model", "vit_tiny_patch16_224"])
    assert code == 2
    assert "no such image" in capsys.readouterr().err
