"""``vl.Compare``: the seven explanation methods side by side, one shared layer slider."""

from __future__ import annotations

import html
from typing import Any

import ipywidgets as widgets
import numpy as np
import xarray as xr

from ..errors import VitlensError
from ..methods import METHODS
from . import captions
from .controls import layer_slider, opacity_slider, probe, sample_dropdown
from .figure import as_widget, image_uri, overlay_figure, save_figure
from .layout import capture_layout, check_view
from .panels import layer_dependent, method_maps, normalized


class Compare(widgets.VBox):
    """Every method of :data:`vitlens.METHODS` for one sample, at one layer.

    Each panel is the method's map accumulated up to the slider's layer (where
    the method allows it; ``attention`` and attention Grad-CAM show that block
    alone, feature Grad-CAM the final feature map), over the input image, all
    scaled to [0, 1] on one colour scale. Maps of every layer are computed once,
    when the widget is made, so the slider only indexes them.

    Parameters
    ----------
    cap
        A capture from :func:`vitlens.capture` or :func:`vitlens.open`.
    sample
        Sample of a batch capture (a dropdown switches samples).
    layer
        Initial block (default: the last).
    opacity
        Heatmap opacity over the image.
    width, height
        Figure size in pixels.

    Examples
    --------
    >>> import numpy as np, timm, vitlens as vl
    >>> from vitlens.widgets import Compare
    >>> model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=3)
    >>> cap = vl.capture(model, np.random.default_rng(0).random((1, 32, 32, 3)))
    >>> cmp = Compare(cap)
    >>> sorted(cmp.panel_maps()) == sorted(vl.METHODS)
    True
    """

    def __init__(
        self,
        cap: xr.DataTree,
        *,
        sample: int = 0,
        layer: int | None = None,
        opacity: float = 0.6,
        width: int = 1000,
        height: int = 540,
    ) -> None:
        super().__init__()
        self.cap = cap
        self.layout_info = info = capture_layout(cap)
        layer = check_view(info, cap, layer, sample)
        n = int(cap["sample"].size)
        choice = info.all_heads()
        shape = (n, len(info.layers), *info.grid)
        self._maps: dict[str, np.ndarray] = {}
        self._first: dict[str, int] = {}
        self._errors: dict[str, str] = {}
        for method in METHODS:
            try:
                self._maps[method], self._first[method] = method_maps(cap, info, method, choice)
                self._errors[method] = ""
            except VitlensError as exc:
                self._maps[method], self._first[method] = np.zeros(shape, dtype=np.float32), info.layers[0]
                self._errors[method] = str(exc)

        self.layer_slider = layer_slider(info, layer)
        self.sample_select = sample_dropdown(list(range(n)), sample)
        self.opacity_slider = opacity_slider(opacity)
        self.figure = overlay_figure(info, list(METHODS), image_uri(cap["image"].isel(sample=sample).values), cols=4,
                                     width=width, height=height, opacity=opacity)
        self.captions = widgets.HTML()
        self.captions.add_class("vitlens-captions")
        self.probe = probe("vitlens-probe")
        self.refresh()  # the first view goes into the plain figure, then it becomes a widget
        self.figure = as_widget(self.figure)
        self.figure.add_class("vitlens-figure")
        self.layer_slider.observe(lambda _: self.refresh(), "value")
        self.sample_select.observe(self._sample_changed, "value")
        self.opacity_slider.observe(self._opacity_changed, "value")
        self.children = [widgets.HBox([self.layer_slider, self.sample_select, self.opacity_slider]), self.figure,
                         self.captions, self.probe]
        self.add_class("vitlens-compare")

    @property
    def layer(self) -> int:
        return int(self.layer_slider.value)

    @property
    def sample(self) -> int:
        return int(self.sample_select.value)

    def panel_maps(self) -> dict[str, np.ndarray]:
        """The maps shown, ``{method: (gh, gw) array in [0, 1]}``."""
        return {m: np.asarray(self.figure.data[2 * i + 1].z, dtype=np.float32) for i, m in enumerate(METHODS)}

    def save(self, path: str, *, scale: float = 2.0):
        """Write the current view to ``.png``, ``.svg`` or ``.pdf`` (plotly + kaleido)."""
        return save_figure(self.figure, path, scale=scale)

    def refresh(self) -> None:
        """Index every method's cached maps at the layer; one batched update."""
        info = self.layout_info
        layer, sample = self.layer, self.sample
        li = info.layers.index(layer)
        target = str(self.cap["class_name"].values[int(self.cap["target"].values[sample])])
        lines = []
        with self.figure.batch_update():
            for i, method in enumerate(METHODS):
                self.figure.data[2 * i + 1].z = normalized(self._maps[method][sample, li])
                self.figure.layout.annotations[i].text = captions.panel_title(captions.method_title(method), layer)
                text = self._errors[method] or captions.method_caption(
                    info, method, layer, self._first[method], target, not layer_dependent(info, method))
                lines.append(f"<div><b>{html.escape(method)}</b>: {html.escape(text, quote=False)}</div>")
        self.captions.value = "".join(lines)
        self.probe.value = f"layer={layer} sample={sample}"

    def _sample_changed(self, change: Any) -> None:
        uri = image_uri(self.cap["image"].isel(sample=int(change["new"])).values)
        with self.figure.batch_update():
            for i in range(len(METHODS)):
                self.figure.data[2 * i].source = uri
        self.refresh()

    def _opacity_changed(self, change: Any) -> None:
        with self.figure.batch_update():
            for i in range(len(METHODS)):
                self.figure.data[2 * i + 1].opacity = float(change["new"])
