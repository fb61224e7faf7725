"""Static figures (matplotlib, no browser) and their export."""

from __future__ import annotations

import hashlib
import os
import time

import numpy as np
import pytest
import xarray as xr
from conftest import make_swin, random_images

import vitlens as vl
from vitlens import figures


@pytest.fixture(scope="module")
def cap():
    return vl.capture(make_swin(seed=5), random_images(3, 64, seed=6))


def _overlays(ax):
    return [im for im in ax.get_images() if im.get_cmap() is not None and im.get_array().ndim == 2]


def test_render_panels_draws_titles_suptitle_and_one_colour_bar():
    img = np.zeros((16, 16, 3))
    fig = figures.render_panels(
        [{"image": img, "overlay": np.eye(4), "title": "a", "vmin": 0, "vmax": 1},
         {"image": img, "overlay": np.ones((4, 4)), "title": "b"},
         {"image": img, "title": "plain"}],
        suptitle="vit-shapes · sample 0 · star (p=0.97)", ncols=2)
    panels, bar = fig.axes[:4], fig.axes[4:]
    assert [ax.get_title() for ax in panels[:3]] == ["a", "b", "plain"]
    assert not panels[3].axison  # the unused fourth slot is blank
    assert fig._suptitle.get_text() == "vit-shapes · sample 0 · star (p=0.97)"
    assert len(bar) == 1 and bar[0].get_ylabel() == "relevance"
    assert len(figures.render_panels([{"image": img, "overlay": np.eye(4)}], colorbar=False).axes) == 1


def test_render_panels_upsamples_token_blocks_or_bilinearly():
    img = np.zeros((8, 8, 3))
    heat = np.array([[0.0, 1.0], [1.0, 0.0]])
    blocks = figures.render_panels([{"image": img, "overlay": heat}], colorbar=False)
    drawn = np.asarray(_overlays(blocks.axes[0])[0].get_array())
    np.testing.assert_array_equal(drawn, np.kron(heat, np.ones((4, 4))))
    smooth = figures.render_panels([{"image": img, "overlay": heat, "smooth": True}], colorbar=False)
    drawn = np.asarray(_overlays(smooth.axes[0])[0].get_array())
    expected = vl.to_pixels(vl.normalize(__import__("xarray").DataArray(heat[None], dims=("sample", "y", "x"))), 8)
    np.testing.assert_allclose(drawn, expected.values[0], rtol=1e-6)
    assert 0 < drawn[3, 3] < 1  # bilinear, not blocks
    with pytest.raises(vl.OptionError, match="unknown keys"):
        figures.render_panels([{"image": img, "heatmap": heat}])
    with pytest.raises(vl.OptionError, match="2-D"):
        figures.render_panels([{"image": img, "overlay": np.zeros((2, 2, 2))}])


def test_grid_has_one_row_per_sample_and_one_column_per_method(cap):
    fig = figures.grid(cap, methods=["rollout", "tokentm"], samples=[0, 2], smooth=False)
    panels = fig.axes[:6]
    assert len(fig.axes) == 2 * 3 + 1  # + one shared colour bar
    assert [ax.get_title() for ax in panels[:3]] == ["input", "Rollout", "TokenTM"]
    names = cap.attrs["class_names"]
    assert panels[3].get_ylabel() == f"#2: {names[int(cap.target.values[2])]}"
    expected = vl.normalize(vl.explain(cap.isel(sample=[0, 2]), "tokentm")).values[0]
    drawn = np.asarray(_overlays(panels[2])[0].get_array())
    scale = drawn.shape[0] // expected.shape[0]
    np.testing.assert_allclose(drawn[::scale, ::scale], expected, rtol=1e-6)
    assert not _overlays(panels[0])  # the input column has no map


def test_layers_figure_shows_every_block_with_titles_clear_of_the_row_above(cap):
    fig = figures.layers(cap, "rollout", sample=1, columns=2)  # 4 blocks: 2 rows
    panels = fig.axes[:4]
    assert [ax.get_title() for ax in panels] == [f"after block {k}" for k in range(4)]
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    top_row_bottom = min(ax.get_window_extent(renderer).y0 for ax in panels[:2])
    second_titles_top = max(ax.title.get_window_extent(renderer).y1 for ax in panels[2:])
    assert second_titles_top < top_row_bottom  # display y grows upwards
    with pytest.raises(vl.OptionError):
        figures.layers(cap, "gradcam")
    with pytest.raises(vl.OptionError):
        figures.grid(cap, methods=["nope"])
    with pytest.raises(vl.OptionError):
        figures.grid(cap, samples=[9])


def test_overlay_blends_with_the_colour_map():
    img = np.zeros((2, 2, 3))
    heat = np.array([[0.0, 1.0], [0.5, 1.0]])
    out = figures.overlay(img, heat, alpha=1.0, cmap="Greys")
    assert out.dtype == np.uint8 and out[0, 0].tolist() == [255, 255, 255] and out[0, 1].tolist() == [0, 0, 0]
    with pytest.raises(vl.OptionError):
        figures.overlay(img, np.zeros((3, 3)))
    with pytest.raises(vl.OptionError, match="colour map"):
        figures.colormap("no-such-map")


@pytest.mark.parametrize("fmt", ["png", "svg", "pdf"])
def test_export_is_deterministic_and_needs_no_browser(cap, tmp_path, fmt, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no chromium reachable
    monkeypatch.setenv("BROWSER_PATH", str(tmp_path / "no-browser"))
    digests = []
    start = time.perf_counter()
    for k in range(2):
        path = figures.save(figures.grid(cap, methods=["lnstat", "rollout"]), tmp_path / f"f{k}.{fmt}", dpi=100)
        data = path.read_bytes()
        assert len(data) > 1000
        digests.append(hashlib.sha256(data).hexdigest())
    assert time.perf_counter() - start < 60  # no hang (a browser wait would take minutes)
    assert digests[0] == digests[1]
    fig = figures.grid(cap, methods=["lnstat", "rollout"])
    for other in ("png", "svg", "pdf"):  # drawing a figure again leaves it as it was
        figures.save(fig, tmp_path / f"other.{other}", dpi=100)
    figures.save(fig, tmp_path / f"again.{fmt}", dpi=100)
    assert hashlib.sha256((tmp_path / f"again.{fmt}").read_bytes()).hexdigest() == digests[0]
    magic = {"png": b"\x89PNG", "svg": b"<svg", "pdf": b"%PDF"}[fmt]
    assert magic in data[:400]
    assert not list(tmp_path.glob(".*part"))  # no temporary file left behind
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # like any file the user writes


def test_save_to_a_missing_folder_raises_export_error_naming_it(cap, tmp_path):
    fig = figures.grid(cap, methods=["rollout"])
    with pytest.raises(vl.ExportError, match="nowhere.*does not exist"):
        figures.save(fig, tmp_path / "nowhere" / "f.png")
    (tmp_path / "file").write_text("x")
    with pytest.raises(vl.ExportError, match="is not a folder"):
        figures.save(fig, tmp_path / "file" / "f.png")
    with pytest.raises(vl.OptionError, match="png"):
        figures.save(fig, tmp_path / "f.gif")
    assert issubclass(vl.ExportError, vl.VitlensError)
    assert vl.widgets.ExportError is vl.ExportError


def test_failed_export_keeps_the_previous_file(cap, tmp_path, monkeypatch):
    fig = figures.grid(cap, methods=["rollout"])
    target = figures.save(fig, tmp_path / "f.png")
    before = target.read_bytes()

    def broken(handle, **kwargs):
        handle.write(b"half a file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(fig, "savefig", broken)
    with pytest.raises(vl.ExportError, match="No space left.*unchanged"):
        figures.save(fig, target)
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.png"]


def test_plotly_figures_save_as_html_only(tmp_path):
    import plotly.graph_objects as go

    fig = go.Figure(go.Heatmap(z=[[0, 1], [1, 0]]))
    text = figures.save(fig, tmp_path / "f.html").read_text()
    assert "vitlens-figure" in text and "https://cdn" not in text.split("<body>")[0]
    start = time.perf_counter()
    with pytest.raises(vl.ExportError, match="render_panels"):
        figures.save(fig, tmp_path / "f.png")
    assert time.perf_counter() - start < 5  # refused at once, never waits for a browser
    with pytest.raises(vl.ExportError, match="png, .svg or .pdf"):
        figures.save(figures.render_panels([{"image": np.zeros((4, 4, 3))}]), tmp_path / "g.html")


def test_static_figures_show_in_jupyter_as_png():
    fig = figures.render_panels([{"image": np.zeros((4, 4, 3)), "title": "x"}])
    assert fig._repr_png_()[:4] == b"\x89PNG"


def _top_half_is_red(fig):
    fig.canvas.draw()
    rgba = np.asarray(fig.canvas.buffer_rgba())[..., :3].astype(int)
    red = (rgba[..., 0] > 200) & (rgba[..., 1] < 60) & (rgba[..., 2] < 60)
    rows = np.nonzero(red.any(1))[0]
    return rows.mean() < rgba.shape[0] / 2


def test_vl_plot_draws_images_and_maps_the_right_way_up():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import xarray as xr

    pic = np.zeros((1, 8, 8, 3))
    pic[0, :2, :, 0] = 1.0  # a red band along the top rows (y = 0, 1)
    image = xr.DataArray(pic, dims=("sample", "y", "x", "channel"),
                         coords={"y": np.arange(8), "x": np.arange(8), "channel": list("rgb")})
    art = vl.plot(image)
    assert art.axes.yaxis_inverted() and _top_half_is_red(art.axes.figure)
    heat = xr.DataArray(np.zeros((1, 8, 8)), dims=("sample", "y", "x"))
    heat[0, :2] = 1.0
    plt.close("all")
    art = vl.plot(heat, cmap="Reds", add_colorbar=False, vmin=0, vmax=1)
    assert art.axes.yaxis_inverted()
    # the plain xarray call is what draws it upside down (the reason vl.plot exists)
    assert not image.isel(sample=0).plot.imshow().axes.yaxis_inverted()
    plt.close("all")
    over = vl.plot(heat.isel(y=slice(0, 8, 2), x=slice(0, 8, 2)), image=image)
    assert over.axes.yaxis_inverted() and len(over.axes.get_images()) == 2
    with pytest.raises(vl.OptionError, match="one facet"):
        vl.plot(xr.DataArray(np.zeros((2, 2, 4, 4)), dims=("sample", "layer", "y", "x")))
    plt.close("all")


def test_vl_plot_facets_a_batch_of_maps(cap):
    maps = vl.explain(cap, "rollout")
    grid = vl.plot(maps)
    assert len(grid.axs.flat) >= 3 and all(ax.yaxis_inverted() for ax in grid.axs.flat if ax.has_data())
    import matplotlib.pyplot as plt

    plt.close("all")


# -- PNG, SVG and PDF show the same colours ---------------------------------------------------
def _pdf_pixels(path, dpi):
    import pypdfium2 as pdfium  # a test-only dependency ([dev]): renders PDF pages without a browser

    page = pdfium.PdfDocument(str(path))[0]
    return np.asarray(page.render(scale=dpi / 72).to_pil().convert("RGB")).astype(int)


def _svg_centre_colour(path):
    """The colour at the centre of the (one) panel: its embedded images composited in order, over white."""
    import base64
    import io
    import re

    from PIL import Image

    colour = np.array([255.0, 255.0, 255.0])
    for href in re.findall(r'<image[^>]*xlink:href="data:image/png;base64,([^"]+)"', path.read_text()):
        rgba = np.asarray(Image.open(io.BytesIO(base64.b64decode(href))).convert("RGBA"), dtype=float)
        r, g, b, a = rgba[rgba.shape[0] // 2, rgba.shape[1] // 2]
        colour = (a / 255) * np.array([r, g, b]) + (1 - a / 255) * colour
    return colour


def _panel_centre(fig, ax, pixels):
    box = ax.get_window_extent()
    h, w = pixels.shape[:2]
    sx, sy = w / fig.bbox.width, h / fig.bbox.height  # the rendered size may differ by a pixel
    return pixels[int(h - (box.y0 + box.y1) / 2 * sy), int((box.x0 + box.x1) / 2 * sx)]


def test_pdf_and_svg_overlays_have_the_colours_of_the_png(tmp_path):
    from PIL import Image

    img = np.zeros((16, 16, 3))
    img[:] = (0.2, 0.4, 0.6)
    fig = figures.render_panels([{"image": img, "overlay": np.full((4, 4), 0.3), "vmin": 0, "vmax": 1,
                                  "alpha": 0.6}], colorbar=False)
    png = np.asarray(Image.open(figures.save(fig, tmp_path / "x.png", dpi=100)).convert("RGB")).astype(int)
    pdf = _pdf_pixels(figures.save(fig, tmp_path / "x.pdf"), 100)
    want = _panel_centre(fig, fig.axes[0], png)
    # the blend itself: 60 % inferno(0.3) over the image
    import matplotlib

    blend = 255 * (0.6 * np.array(matplotlib.colormaps["inferno"](0.3)[:3]) + 0.4 * img[0, 0])
    assert np.abs(want - blend).max() <= 1.5, (want, blend)
    assert np.abs(_panel_centre(fig, fig.axes[0], pdf) - want).max() <= 2, (_panel_centre(fig, fig.axes[0], pdf), want)
    svg = _svg_centre_colour(figures.save(fig, tmp_path / "x.svg"))
    assert np.abs(svg - want).max() <= 2, (svg, want)


def test_a_method_grid_looks_the_same_in_pdf_and_png(cap, tmp_path):
    from PIL import Image

    fig = figures.grid(cap, methods=["rollout"], samples=[0], smooth=False, colorbar=False, titles=False)
    png = np.asarray(Image.open(figures.save(fig, tmp_path / "g.png", dpi=100)).convert("RGB")).astype(int)
    pdf = _pdf_pixels(figures.save(fig, tmp_path / "g.pdf"), 100)
    box = fig.axes[1].get_window_extent()  # the overlay panel
    n = cap["image"].sizes["y"]  # image pixels across the panel: compare at their centres
    centres = (np.arange(n) + 0.5) / n
    rows = (png.shape[0] - (box.y1 - centres * box.height)).astype(int)
    cols = (box.x0 + centres * box.width).astype(int)
    # the PDF renderer places pixel edges up to a pixel apart: the nearest match within one pixel
    diff = np.min([np.abs(png[np.ix_(rows, cols)] - pdf[np.ix_(rows + dy, cols + dx)]).max(-1)
                   for dy in (-1, 0, 1) for dx in (-1, 0, 1)], axis=0)
    assert diff.mean() < 1.5 and np.percentile(diff, 99) <= 4, (diff.mean(), np.percentile(diff, 99))


def test_vl_plot_normalises_each_facet_unless_told_not_to():
    import matplotlib.pyplot as plt

    rng = np.random.default_rng(0)
    maps = xr.DataArray(rng.random((3, 4, 4)) * np.array([1.0, 1e-3, 50.0])[:, None, None], dims=("sample", "y", "x"))
    grid = vl.plot(maps)
    drawn = [np.asarray(ax.get_images()[0].get_array()) for ax in grid.axs.flat if ax.get_images()]
    assert len(drawn) == 3
    for d, m in zip(drawn, maps.values, strict=True):  # each facet spans [0, 1] on its own
        np.testing.assert_allclose(d, (m - m.min()) / (m.max() - m.min()), atol=1e-12)
    assert all(ax.get_images()[0].get_clim() == (0.0, 1.0) for ax in grid.axs.flat if ax.get_images())
    plt.close("all")
    raw = vl.plot(maps, normalize=False)  # one shared scale: the small map is dark
    assert {ax.get_images()[0].get_clim() for ax in raw.axs.flat if ax.get_images()} == {(float(maps.min()), float(maps.max()))}
    plt.close("all")


# -- real class names ----------------------------------------------------------------------
IMAGENET_LIKE = ["sidewinder, horned rattlesnake, Crotalus cerastes", "ring", "Granny Smith",
                 "African hunting dog, hyena dog, Cape hunting dog, Lycaon pictus",
                 "a class name of sixty characters without a single comma in it"]


@pytest.fixture(scope="module")
def named_cap():
    from conftest import make_vit

    model = make_vit(seed=3, num_classes=len(IMAGENET_LIKE))
    model.vitlens_class_names = list(IMAGENET_LIKE)
    return vl.capture(model, random_images(10, 32, seed=4), target=[0, 3, 4, 1, 2, 0, 3, 4, 1, 2])


def _texts(fig) -> str:
    return "\n".join([t.get_text() for t in fig.texts] + [fig._supxlabel.get_text() if fig._supxlabel else ""]
                     + [fig._suptitle.get_text() if fig._suptitle else ""])


def test_grid_row_labels_fit_their_rows_and_the_full_names_are_given(named_cap):
    fig = figures.grid(named_cap, methods=["rollout"], samples=[0, 1, 2, 3])
    renderer = fig.canvas.get_renderer()
    rows = fig.axes[0:8:2]  # the input column
    figure_box = fig.bbox
    boxes = []
    for ax in rows:
        label = ax.yaxis.label.get_window_extent(renderer)
        panel = ax.get_window_extent(renderer)
        assert label.height <= panel.height + 1, (ax.get_ylabel(), label.height, panel.height)  # fits beside its row
        assert figure_box.x0 <= label.x0 and label.y0 >= figure_box.y0 - 1 and label.y1 <= figure_box.y1 + 1
        boxes.append(label)
    for a, b in zip(boxes, boxes[1:]):
        assert not a.overlaps(b), "row labels overlap"
    assert rows[0].get_ylabel() == "#0: sidewinder"
    text = _texts(fig)
    for s, c in enumerate([0, 3, 4]):  # shortened names are given in full under the panels
        assert f"#{s}: {IMAGENET_LIKE[c]}" in text.replace("\n", " ")
    caption = fig._supxlabel.get_window_extent(renderer)
    assert caption.x0 >= figure_box.x0 - 1 and caption.x1 <= figure_box.x1 + 1 and caption.y0 >= figure_box.y0 - 1


def test_grid_says_which_samples_it_leaves_out(named_cap):
    fig = figures.grid(named_cap, methods=["rollout"])  # 10 samples: 8 rows
    assert len(fig.axes) == 8 * 2 + 1
    assert "0–7 of 10" in _texts(fig)
    picked = figures.grid(named_cap, methods=["rollout"], samples=[9, 2])
    assert "2 of 10 samples" in _texts(picked)
    whole = figures.grid(named_cap.isel(sample=[0, 1]), methods=["rollout"])
    assert "of 2" not in _texts(whole)


def test_layers_titles_name_the_sample_and_class(named_cap):
    fig = figures.layers(named_cap, "rollout", sample=1)
    title = fig._suptitle.get_text().replace("\n", " ")
    assert "sample 1" in title and IMAGENET_LIKE[3] in title and "Rollout" in title


def test_figures_of_random_weights_say_untrained(cap):
    trained_looking = figures.grid(cap, methods=["rollout"], samples=[0])
    assert "UNTRAINED" not in _texts(trained_looking)  # a module given to capture: vitlens cannot know
    model = vl.load_model("vit_tiny_patch16_224", pretrained=False, num_classes=3, img_size=32, patch_size=8,
                          depth=2)
    random = vl.capture(model, random_images(1, 32))
    assert random.attrs["weights"] == "random"
    for fig in (figures.grid(random, methods=["rollout"]), figures.layers(random, "rollout")):
        assert fig._suptitle.get_text().startswith("UNTRAINED (random weights)")
    shipped = vl.capture(vl.load_model("vit-shapes"), vl.datasets.shapes(1, seed=0).image)
    assert "weights" not in shipped.attrs and "UNTRAINED" not in _texts(figures.layers(shipped, "rollout"))


def test_widget_exports_of_random_weights_say_untrained():
    model = vl.load_model("vit_tiny_patch16_224", pretrained=False, num_classes=3, img_size=32, patch_size=8,
                          depth=2)
    random = vl.capture(model, random_images(1, 32))
    for widget in (vl.Explorer(random), vl.TokenCurves(random)):
        assert widget.export_figure()._suptitle.get_text().startswith("UNTRAINED (random weights)")
