"""``vl.Compare``: every explanation method side by side, one shared layer slider."""

from __future__ import annotations

import os
from typing import Any

import ipywidgets as widgets
import numpy as np
import xarray as xr

from ..errors import VitlensError
from . import captions
from .base import CaptureView, ClassChoice
from .controls import probe, probe_text
from .figure import live_title, overlay_figure
from .panels import PanelMaps, layer_dependent, method_maps, method_names, normalized
from .text import html_text, join, markup


class Compare(CaptureView):
    """Every method of :data:`vitlens.METHODS` for one sample, at one layer.

    Each panel is the method's map accumulated up to the slider's layer (where
    the method allows it; ``attention`` and attention Grad-CAM show that block
    alone, feature Grad-CAM the final feature map), over the input image, all
    scaled to [0, 1] on one colour scale. Maps of every layer are computed once
    per class, so the slider only indexes them. With ``model``, a class
    selector explains another class (that sample is captured again once).

    Parameters
    ----------
    cap
        A capture from :func:`vitlens.capture` or :func:`vitlens.open`.
    model
        The captured model; enables the class selector.
    sample
        Sample of a batch capture (a dropdown switches samples).
    layer
        Initial block (default: the last).
    opacity, smooth
        Heatmap opacity; bilinear overlays instead of token blocks.
    cols
        Panels per row (default: 4, fewer where the output is too narrow for them;
        a number given here is kept at any width).
    height
        Figure height in pixels (default: 500 for two rows, less for the rows of a
        narrow output); the width follows the output area.
    export_dir
        The only directory the "Save as" box writes into (default: the working directory).

    Examples
    --------
    >>> import numpy as np, timm, vitlens as vl
    >>> from vitlens.widgets import Compare
    >>> model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=3)
    >>> cap = vl.capture(model, np.random.default_rng(0).random((1, 32, 32, 3)))
    >>> cmp = Compare(cap)
    >>> sorted(cmp.panel_maps()) == sorted(vl.methods.explainable_methods(cap))  # AttnLRP, LeGrad: with their passes
    True
    """

    export_name = "vitlens-compare.png"
    max_cols = 4

    def __init__(
        self,
        cap: xr.DataTree,
        model: Any = None,
        *,
        sample: int = 0,
        layer: int | None = None,
        opacity: float = 0.6,
        smooth: bool = False,
        cols: int | None = None,
        height: int | None = None,
        export_dir: str | os.PathLike | None = None,
    ) -> None:
        super().__init__()
        layer = self._init_capture(cap, layer, sample)
        info = self.layout_info
        self.model = model
        self.methods = method_names(cap)
        self.num_panels = len(self.methods)
        self.sample, self.layer, self.opacity, self.smooth = sample, layer, opacity, smooth
        self.classes = ClassChoice(cap, model)
        self.class_select, self.class_status = self.classes.dropdown, self.classes.status
        self._maps = PanelMaps(size=16)  # (method, source) → (per-layer maps, first layer, error)
        for method in self.methods:  # every sample of the capture at once
            self._method(cap, "capture", method)

        self._view_controls()
        self._fill_classes()
        rows, cols = self._init_grid(cols, height, default_cols=self.max_cols)
        self.figure = overlay_figure(info, list(self.methods), "", cols=cols, height=height or 60 + 220 * rows,
                                     opacity=opacity, smooth=smooth)
        self._show_image([self.figure])
        self.captions = html_text(css="vitlens-captions")
        self.probe = probe("vitlens-probe")
        exporter = self._export_controls(export_dir)
        self._draw_first_view(self.figure)
        self._follow_page_width()
        self.observe(lambda _: self.refresh(), "layer")
        self.observe(self._on_sample, "sample")
        self.observe(lambda _: self._style_heatmaps([self.figure]), ["opacity", "smooth"])
        self.class_select.observe(self._on_class, "value")
        wrap = widgets.Layout(align_items="center", flex_flow="row wrap")
        self.children = [
            widgets.HBox([self.layer_slider, self.sample_select, self.class_select, self.class_status], layout=wrap),
            widgets.HBox([self.opacity_slider, self.smooth_toggle], layout=wrap),
            self.figure, self.captions, exporter.box, self.probe,
        ]
        self.add_class("vitlens-compare")

    @property
    def target(self) -> int:
        """The class the class-specific methods explain for the current sample."""
        return self.classes.targets[self.sample]

    def panel_maps(self) -> dict[str, np.ndarray]:
        """The maps shown, ``{method: (gh, gw) array in [0, 1]}``."""
        return {m: np.asarray(self.figure.data[self.heatmap_trace(i)].z, dtype=np.float32)
                for i, m in enumerate(self.methods)}

    def context(self) -> str:
        c = self.target
        return (f"{self.cap.attrs.get('model', 'model')} · sample {self.sample} · class {self.class_names[c]!r} "
                f"(p = {self.classes.probability(self.sample, c):.2f}) · block {self.layer}")

    def export_panels(self) -> list[dict]:
        maps = self.panel_maps()
        return [self._overlay_panel(maps[m], captions.panel_title(captions.method_title(m), self.layer))
                for m in self.methods]

    def _method(self, src: xr.DataTree, key: Any, method: str) -> tuple[np.ndarray, int, str]:
        info = self.layout_info

        def compute():
            try:
                return (*method_maps(src, info, method, info.all_heads()), "")
            except VitlensError as exc:
                shape = (int(src["sample"].size), len(info.layers), *info.grid)
                return np.zeros(shape, dtype=np.float32), info.layers[0], str(exc)

        return self._maps.get((method, key), compute)

    def refresh(self) -> None:
        """Index every method's cached maps at the layer; one batched update."""
        if not self._ready:
            return
        info = self.layout_info
        layer, sample = self.layer, self.sample
        li = info.layers.index(layer)
        c = self.target
        try:
            src, si, key = self.classes.source(sample, c)
        except VitlensError:
            src, si, key = self.cap, sample, "capture"
        lines = []
        self._titles = [captions.panel_title(captions.method_title(m), layer) for m in self.methods]
        with self.figure.batch_update():
            for i, method in enumerate(self.methods):
                maps, first, error = self._method(src, key, method)
                self.figure.data[self.heatmap_trace(i)].z = normalized(maps[si, li])
                self.figure.layout.annotations[i].text = live_title(self._titles[i], self._title_chars)
                text = error or captions.method_caption(info, method, layer, first, self.class_names[c],
                                                        not layer_dependent(info, method))
                text += captions.precision_note(src, si, method, info)
                lines.append(markup("<div><b>{}</b>: {}</div>", captions.method_title(method), text))
        self.captions.value = join(lines)
        self.class_status.value = self.classes.describe(sample, c)
        self.version += 1
        self.probe.value = probe_text(layer=layer, sample=sample, **{"class": c})

    def _fill_classes(self) -> None:
        self._hold = True
        try:
            current = self.target
            self.class_select.options = self.classes.options(self.sample, current)
            self.class_select.value = current
        finally:
            self._hold = False

    def _on_sample(self, change: Any) -> None:
        self._fill_classes()
        self._show_image([self.figure])
        self.refresh()
