"""``vl.Explorer``: scrub layers, toggle heads and watch four linked maps update live."""

from __future__ import annotations

import html
import json
import os
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import ipywidgets as widgets
import numpy as np
import traitlets
import xarray as xr

from ..errors import OptionError, VitlensError
from ..methods import METHODS
from . import captions
from .controls import HeadToggles, class_label, layer_slider, opacity_slider, probe, sample_dropdown, top_classes
from .figure import as_widget, image_uri, overlay_figure, save_figure
from .layout import (
    Query,
    capture_layout,
    check_view,
    checked_query,
    initial_query,
    parse_heads,
    patch_outline,
    window_edges,
    window_ids,
)
from .panels import (
    STATISTICS,
    PanelMaps,
    fusion_maps,
    layer_dependent,
    method_maps,
    normalized,
    query_attention,
    safe,
    statistic_array,
)

#: The four panels, left to right.
PANELS = ("attention", "statistic", "fusion", "method")
DEFAULT_METHOD = "generic_attention"


class Explorer(widgets.VBox):
    """Look inside a captured ViT or Swin: one layer slider drives four linked maps.

    Panels, each the input image under a heatmap (all min-max scaled to [0, 1],
    one shared colour scale):

    1. **attention** of the query token at the layer, mean over the selected
       heads (default query: CLS for ViT, the centre token for Swin; click a
       patch to make it the query).
    2. **statistic**: the LayerNorm-input statistic (mean, std, var, norm) of
       each token at the layer.
    3. **fusion**: ``lnstat`` (statistic × attention) accumulated up to the
       layer with the selected heads; the "gradient-weighted" toggle switches to
       its gradient-weighted reading (``grad=True``, class-specific).
    4. **method**: any of :data:`vitlens.METHODS`, accumulated up to the layer
       where the method allows it.

    Everything a control does is computed from the capture (the model is never
    run again, except to explain another class, which needs ``model``) and
    sent to the page as one batched figure update. Per-layer maps are cached per
    head selection, statistic, method and class, so a slider move is an index.

    Swin: maps of later stages are drawn on the first-stage grid (each stage
    token repeated over the first-stage tokens it covers); the attention panel
    shows the query's window row, with the windows of that block as a faint grid.

    Parameters
    ----------
    cap
        A capture from :func:`vitlens.capture` or :func:`vitlens.open`.
    model
        The captured model; enables the class selector (choosing a class
        recaptures that sample with ``target=class``).
    layer
        Initial block (default: the last).
    sample
        Initial sample of a batch capture.
    heads
        Initially selected heads: ``None`` (all), heads for every stage, or a
        dict stage → heads.
    query
        Initial query: ``"default"``, ``None`` (CLS), or a patch ``(row, col)``
        on the first-stage grid.
    stat
        LayerNorm statistic: ``"std"``, ``"mean"``, ``"var"`` or ``"norm"``.
    fusion_grad
        Start the fusion panel in lnstat's gradient-weighted reading (default
        False: the gradient-free, class-agnostic fusion).
    method
        Method of the fourth panel, one of :data:`vitlens.METHODS`.
    opacity
        Heatmap opacity over the image.
    width, height
        Figure size in pixels.

    Examples
    --------
    >>> import numpy as np, timm, vitlens as vl
    >>> from vitlens.widgets import Explorer
    >>> model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=3)
    >>> cap = vl.capture(model, np.random.default_rng(0).random((1, 32, 32, 3)))
    >>> ex = Explorer(cap, model)
    >>> ex.layer_slider.value = 3
    >>> ex.panel_maps()["attention"].shape
    (4, 4)
    """

    #: Incremented after every update of the view (linked widgets observe it).
    version = traitlets.Int(0)

    def __init__(
        self,
        cap: xr.DataTree,
        model: Any = None,
        *,
        layer: int | None = None,
        sample: int = 0,
        heads: None | Iterable[int] | Mapping[int, Iterable[int]] = None,
        query: Query | str = "default",
        stat: str = "std",
        fusion_grad: bool = False,
        method: str = DEFAULT_METHOD,
        opacity: float = 0.6,
        width: int = 1040,
        height: int = 320,
    ) -> None:
        super().__init__()
        self.cap = cap
        self.model = model
        self.layout_info = capture_layout(cap)
        info = self.layout_info
        layer = check_view(info, cap, layer, sample)
        if stat not in STATISTICS:
            raise OptionError(f"stat={stat!r}; choose from {list(STATISTICS)}.")
        if method not in METHODS:
            raise OptionError(f"method={method!r}; choose from {list(METHODS)}.")
        self._cache = PanelMaps()
        self.class_names = [str(n) for n in cap["class_name"].values]
        self._recaptures = PanelMaps(size=4)  # (sample, class) → a one-image capture explaining that class
        self._classes = {s: int(t) for s, t in enumerate(np.asarray(cap["target"].values))}
        self._query: Query = initial_query(info, query)
        self._hold = 0
        self._messages: dict[str, str] = {}
        self.timings: list[float] = []  # seconds per view update (server side)

        self.layer_slider = layer_slider(info, layer)
        self.stage_label = widgets.HTML(layout=widgets.Layout(margin="0 12px"))
        self.stage_label.add_class("vitlens-stage")
        self.sample_select = sample_dropdown(self._sample_options(), sample, width="200px")
        self.class_select = widgets.Dropdown(description="Class", layout=widgets.Layout(width="260px"))
        self.class_select.add_class("vitlens-class")
        if model is None:
            self.class_select.disabled = True
            self.class_select.tooltip = ("Explaining another class needs the model: vl.Explorer(cap, model). "
                                         "Class-agnostic panels do not depend on it.")
        else:
            self.class_select.tooltip = "Explain another class (recaptures this sample once with target=class)"
        self.class_status = widgets.HTML(layout=widgets.Layout(margin="0 8px"))
        self._fill_classes(sample)

        self.heads = HeadToggles(info, parse_heads(info, heads), self._changed)
        self.head_toggles = self.heads.toggles
        self.query_button = widgets.Button(description="reset query", tooltip="query: back to "
                                           + captions.query_text(info.default_query()),
                                           layout=widgets.Layout(width="100px", margin="0 0 0 12px"))
        self.query_button.add_class("vitlens-query-reset")
        self.query_button.on_click(lambda _: self.select_query(info.default_query()))
        self.stat_select = widgets.Dropdown(options=list(STATISTICS), value=stat, description="Statistic",
                                            layout=widgets.Layout(width="190px"))
        self.stat_select.add_class("vitlens-stat")
        self.fusion_grad = widgets.ToggleButton(  # off: panels 1-3 stay class-agnostic
            value=bool(fusion_grad), description="gradient-weighted", layout=widgets.Layout(width="150px"),
            tooltip="fusion panel: lnstat's gradient-weighted reading (class-specific) instead of the gradient-free one")
        self.fusion_grad.add_class("vitlens-fusion-grad")
        self.method_select = widgets.Dropdown(options=list(METHODS), value=method, description="Method",
                                              layout=widgets.Layout(width="290px"))
        self.method_select.add_class("vitlens-method")
        self.opacity_slider = opacity_slider(opacity)

        uri = image_uri(cap["image"].isel(sample=sample).values)
        fig = overlay_figure(info, list(PANELS), uri, cols=len(PANELS), width=width, height=height, opacity=opacity)
        self._grid_trace = len(fig.data)
        fig.add_scatter(x=[], y=[], mode="lines", line=dict(color="rgba(255,255,255,0.45)", width=1),
                        hoverinfo="skip", name="windows", row=1, col=1)
        self._marker_trace = len(fig.data)
        fig.add_scatter(x=[], y=[], mode="lines", line=dict(color="#00e5ff", width=2), hoverinfo="skip",
                        name="query", row=1, col=1)
        self.figure = fig  # a plain figure until the first view is drawn into it (see as_widget)

        self.title = widgets.HTML()
        self.captions = widgets.HTML(layout=widgets.Layout(margin="0 0 0 8px"))
        self.captions.add_class("vitlens-captions")
        self.probe = probe("vitlens-probe")
        self.filename = widgets.Text(value="vitlens-explorer.png", description="Save as",
                                     layout=widgets.Layout(width="300px"))
        self.export_button = widgets.Button(description="Export", tooltip="write the current view (.png, .svg, .pdf)",
                                            layout=widgets.Layout(width="80px"))
        self.export_button.add_class("vitlens-export")
        self.export_button.on_click(self._export_clicked)
        self.export_status = widgets.HTML(layout=widgets.Layout(margin="0 8px"))

        for w in (self.layer_slider, self.stat_select, self.method_select, self.fusion_grad):
            w.observe(self._changed, "value")
        self.sample_select.observe(self._sample_changed, "value")
        self.class_select.observe(self._class_changed, "value")
        self.opacity_slider.observe(self._opacity_changed, "value")

        self.refresh()  # draws the first view into the plain figure
        self.figure = as_widget(fig)
        self.figure.add_class("vitlens-figure")
        for i in range(len(PANELS)):
            self.figure.data[self.heatmap_trace(i)].on_click(self._clicked)
        row = widgets.HBox
        self.children = [
            self.title,
            row([self.layer_slider, self.stage_label], layout=widgets.Layout(align_items="center")),
            row([self.sample_select, self.class_select, self.class_status], layout=widgets.Layout(align_items="center")),
            row([self.heads.box, self.query_button], layout=widgets.Layout(align_items="center",
                                                                           flex_flow="row wrap")),
            row([self.stat_select, self.fusion_grad, self.method_select, self.opacity_slider]),
            self.figure,
            self.captions,
            row([self.filename, self.export_button, self.export_status], layout=widgets.Layout(align_items="center")),
            self.probe,
        ]
        self.add_class("vitlens-explorer")

    # -- public state -------------------------------------------------------------------
    @property
    def layer(self) -> int:
        return int(self.layer_slider.value)

    @property
    def sample(self) -> int:
        return int(self.sample_select.value)

    @property
    def stat(self) -> str:
        return str(self.stat_select.value)

    @property
    def method(self) -> str:
        return str(self.method_select.value)

    @property
    def query(self) -> Query:
        """The query patch ``(row, col)`` on the first-stage grid, or ``None`` for CLS."""
        return self._query

    @property
    def selected_heads(self) -> dict[int, list[int]]:
        """Selected heads per stage index."""
        return {s: sorted(h) for s, h in self.heads.choice().items()}

    @property
    def target(self) -> int:
        """The class the class-specific panel explains for the current sample."""
        return self._classes[self.sample]

    def heatmap_trace(self, panel: int) -> int:
        """Index in ``figure.data`` of panel ``panel``'s heatmap (its image is the trace before)."""
        return 2 * panel + 1

    def panel_maps(self) -> dict[str, np.ndarray]:
        """The four maps currently shown, ``{panel: (gh, gw) array in [0, 1]}``."""
        return {name: np.asarray(self.figure.data[self.heatmap_trace(i)].z, dtype=np.float32)
                for i, name in enumerate(PANELS)}

    # -- actions ------------------------------------------------------------------------
    def select_patch(self, row: int, col: int) -> None:
        """Make patch ``(row, col)`` (first-stage grid) the query token, as a click does."""
        self.select_query((row, col))

    def select_query(self, query: Query) -> None:
        """Set the query: ``None`` for CLS (ViT with a CLS token) or a patch ``(row, col)``."""
        self._query = checked_query(self.layout_info, query)
        self.refresh()

    def toggle_head(self, head: int, stage: int | None = None) -> None:
        """Toggle one head of ``stage`` (default: the current layer's stage)."""
        stage = self.layout_info.stage_of(self.layer).index if stage is None else stage
        if stage not in self.heads.toggles or not 0 <= head < len(self.heads.toggles[stage]):
            raise OptionError(f"no head {head} in stage {stage}.")
        self.heads.toggle(stage, head)

    def set_heads(self, heads: Iterable[int], stage: int | None = None) -> None:
        """Select exactly ``heads`` in ``stage`` (default: the current layer's stage)."""
        stage = self.layout_info.stage_of(self.layer).index if stage is None else stage
        parse_heads(self.layout_info, {stage: heads})  # validates
        self.heads.set_stage(stage, heads)

    def save(self, path: str | os.PathLike, *, scale: float = 2.0) -> Path:
        """Write the current view to ``.png``, ``.svg`` or ``.pdf`` (plotly + kaleido).

        Examples
        --------
        >>> ex.save("explorer.png")  # doctest: +SKIP
        PosixPath('explorer.png')
        """
        return save_figure(self.figure, path, scale=scale)

    # -- computing the view ---------------------------------------------------------------
    def _source(self, sample: int) -> tuple[xr.DataTree, int, Any]:
        """The capture explaining the chosen class of ``sample``, its sample index, and a cache key."""
        c = self._classes[sample]
        if c == int(self.cap["target"].values[sample]):
            return self.cap, sample, "capture"
        key = (sample, c)
        return self._recaptures.get(key, lambda: self._recapture(sample, c)), 0, key

    def _recapture(self, sample: int, c: int) -> xr.DataTree:
        from ..capture import capture

        names = self.class_names
        self.class_status.value = f"capturing sample {sample} again to explain {names[c]!r}…"
        try:
            options = json.loads(self.cap.attrs.get("options", "{}"))
            image = np.asarray(self.cap["image"].isel(sample=[sample]).values, dtype=np.float32)
            return capture(self.model, image, target=c, keep=options.get("keep", "all"),
                           grads=options.get("grads", True), progress=False)
        finally:
            self.class_status.value = ""

    def compute(self) -> dict[str, Any]:
        """The four maps (normalised), captions and titles for the current state."""
        info = self.layout_info
        layer, sample, stat, method = self.layer, self.sample, self.stat, self.method
        stage = info.stage_of(layer)
        li = info.layers.index(layer)
        choice = self.heads.choice()
        key = tuple(tuple(sorted(choice[s.index])) for s in info.stages)
        shape = (int(self.cap["sample"].size), len(info.layers), *info.grid)
        messages = {}

        attention = query_attention(self.cap, info, sample, layer, sorted(choice[stage.index]), self._query)
        stats = self._cache.get(("statistic", stat), lambda: statistic_array(self.cap, stat))
        src, si, src_key = self._source(sample)
        src_shape = (int(src["sample"].size), *shape[1:])
        grad = bool(self.fusion_grad.value)
        # the gradient-weighted fusion explains a class: it reads the capture of the chosen class
        fcap, fi, fkey = (src, si, src_key) if grad else (self.cap, sample, "capture")
        fusion, messages["fusion"] = self._cache.get(
            ("fusion", key, stat, grad, fkey),
            lambda: safe(lambda: fusion_maps(fcap, info, choice, stat, grad), (int(fcap["sample"].size), *shape[1:])))
        (per_layer, first), messages["method"] = self._method(src, src_key, method, choice, key, src_shape)
        maps = [attention, stats[sample, li], fusion[fi, li], per_layer[si, li]]
        names = self.class_names
        on_features = not layer_dependent(info, method)
        text = [
            captions.attention_caption(info, layer, choice, self._query),
            captions.statistic_caption(info, layer, stat),
            messages["fusion"] or captions.fusion_caption(info, layer, choice, stat, grad, names[self._classes[sample]]),
            messages["method"] or captions.method_caption(info, method, layer, first, names[self._classes[sample]],
                                                          on_features),
        ]
        if not choice[stage.index]:
            text[0] = f"No head selected in stage {stage.index}: select at least one head."
        heads_short = captions.heads_text(info, choice, layer)
        titles = [
            captions.panel_title("attention", layer, "CLS" if self._query is None else f"({self._query[0]}, {self._query[1]})"),
            captions.panel_title(f"{stat} statistic", layer),
            captions.panel_title("lnstat fusion" + (" (grad)" if grad else ""), layer, heads_short if len(key) == 1 else ""),
            captions.panel_title(captions.method_title(method), layer),
        ]
        return {"maps": [normalized(m) for m in maps], "captions": text, "titles": titles}

    def _method(self, src, src_key, method, choice, key, shape):
        def compute():
            try:
                return method_maps(src, self.layout_info, method, choice), ""
            except VitlensError as exc:
                return (np.zeros(shape, dtype=np.float32), self.layout_info.layers[0]), str(exc)

        return self._cache.get(("method", method, key, src_key), compute)

    def refresh(self) -> None:
        """Recompute the view from the capture and push it as one batched figure update."""
        if self._hold:
            return
        start = time.perf_counter()
        info = self.layout_info
        layer = self.layer
        stage = info.stage_of(layer)
        self.heads.show(stage.index)
        view = self.compute()
        gx, gy = self._cache.get(("windows", layer), lambda: self._window_lines(layer))
        mx, my = patch_outline(info, layer, self._query)
        fig = self.figure
        with fig.batch_update():
            for i, z in enumerate(view["maps"]):
                fig.data[self.heatmap_trace(i)].z = z
            fig.data[self._grid_trace].update(x=gx, y=gy)
            fig.data[self._marker_trace].update(x=mx, y=my)
            for ann, text in zip(fig.layout.annotations, view["titles"], strict=True):
                ann.text = text
        self.stage_label.value = captions.stage_text(info, layer) if len(info.stages) > 1 or info.windowed else ""
        self.captions.value = "".join(
            f"<div><b>{i + 1}.</b> {html.escape(t, quote=False)}</div>" for i, t in enumerate(view["captions"])
        )
        self.title.value = self._cache.get(("title", self.sample), self._title_html)
        self.version += 1
        heads = ",".join(map(str, sorted(self.heads.choice()[stage.index])))
        query = "cls" if self._query is None else f"{self._query[0]},{self._query[1]}"
        self.probe.value = (f"v={self.version} layer={layer} sample={self.sample} heads={heads} query={query} "
                            f"stat={self.stat} method={self.method} class={self.target}")
        self.timings.append(time.perf_counter() - start)

    def _window_lines(self, layer: int) -> tuple[list, list]:
        """Swin: the borders of ``layer``'s windows (pixel coordinates); ViT: none."""
        info = self.layout_info
        if not info.windowed:
            return [], []
        wt = np.asarray(self.cap[info.stage_of(layer).name]["window_token"].sel(layer=layer).values)
        return window_edges(window_ids(info, layer, wt), info.stride)

    def _title_html(self) -> str:
        info = self.layout_info
        s = self.sample
        top = top_classes(self.cap, s, 1)[0]
        heads = "/".join(str(st.num_heads) for st in info.stages)
        return (f"<b>vitlens Explorer</b> · {html.escape(str(self.cap.attrs.get('model', '')))} · "
                f"{len(info.layers)} blocks × {heads} heads · sample {s}: predicted "
                f"<b>{html.escape(top[1])}</b> ({100 * top[2]:.1f} %)")

    # -- widget callbacks -------------------------------------------------------------------
    def _changed(self, change: Any = None) -> None:
        self.refresh()

    def _sample_options(self) -> list[tuple[str, int]]:
        names = self.class_names
        pred = np.asarray(self.cap["logits"].values).argmax(-1)
        return [(f"{i}: {names[int(p)]}", i) for i, p in enumerate(pred)]

    def _fill_classes(self, sample: int) -> None:
        options = [(class_label(n, p), c) for c, n, p in top_classes(self.cap, sample, 5)]
        current = self._classes[sample]
        if current not in [c for _, c in options]:  # an explicit target outside the top 5
            names = self.class_names
            options.append((f"{names[current]} (target)", current))
        self._hold += 1
        try:
            self.class_select.options = options
            self.class_select.value = current
        finally:
            self._hold -= 1

    def _sample_changed(self, change: Any) -> None:
        sample = int(change["new"])
        self._fill_classes(sample)
        uri = image_uri(self.cap["image"].isel(sample=sample).values)
        with self.figure.batch_update():
            for i in range(len(PANELS)):
                self.figure.data[self.heatmap_trace(i) - 1].source = uri
        self.refresh()

    def _class_changed(self, change: Any) -> None:
        if self._hold or change["new"] is None:
            return
        if self.model is None:
            return
        self._classes[self.sample] = int(change["new"])
        self.export_status.value = ""
        self.refresh()

    def _opacity_changed(self, change: Any) -> None:
        with self.figure.batch_update():
            for i in range(len(PANELS)):
                self.figure.data[self.heatmap_trace(i)].opacity = float(change["new"])

    def _clicked(self, trace: Any, points: Any, state: Any) -> None:
        if not points.xs:
            return
        sy, sx = self.layout_info.stride
        gh, gw = self.layout_info.grid
        col = int(round((points.xs[0] - (sx - 1) / 2) / sx))
        row = int(round((points.ys[0] - (sy - 1) / 2) / sy))
        self.select_patch(min(max(row, 0), gh - 1), min(max(col, 0), gw - 1))

    def _export_clicked(self, _: Any) -> None:
        try:
            path = self.save(self.filename.value)
        except VitlensError as exc:
            self.export_status.value = f"<span style='color:#b00'>{html.escape(str(exc))}</span>"
        else:
            self.export_status.value = f"saved {html.escape(str(path))}"
