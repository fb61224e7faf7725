"""``vl.HeadAtlas``: every head of a model over a dataset, by one head statistic, and the images behind a head."""

from __future__ import annotations

import os
from typing import Any

import ipywidgets as widgets
import numpy as np
import plotly.graph_objects as go
import traitlets
import xarray as xr
from plotly.subplots import make_subplots

from ..errors import CaptureFormatError, OptionError
from ..registry import STAT_INFO, stat_info
from ..stats import head_stats, holds_groups, stored_stats
from ..stats.atlas import Extremes, examples, extremes, holds_attention, summary
from . import captions
from .base import AttentionView
from .controls import probe_text
from .figure import as_widget, image_uri, overlay_figure, zsmooth
from .layout import Query, capture_layout, initial_query, patch_at, patch_outline
from .panels import PanelMaps, normalized
from .text import escape, html_text, markup

#: Colour scale of the heat map (the statistic, not a relevance: not the overlays' inferno).
ATLAS_COLORSCALE = "Viridis"
#: Colour of the selected head's outline and dot.
PICKED = "#e4002b"


class HeadAtlas(AttentionView):
    """Every block × head of a model over a dataset, by any head statistic; click a head to see its images.

    Left, a heat map: the dataset mean of the statistic per block (rows) and head
    (columns); hovering shows its spread (standard deviation, range, images).
    Right, the ViT paper's view (Dosovitskiy et al. 2021, Fig. 7): the statistic
    against depth, one dot per head. A drop-down picks the statistic
    (:data:`vitlens.HEAD_STATS`, those the store holds or can compute). Clicking a
    head (a cell or a dot) shows the ``k`` images where its statistic is highest
    and the ``k`` where it is lowest, each under that head's attention of the
    query token (click a patch to choose another query). A store without raw
    attention (a reduced store) captures just those images again: that needs
    ``model`` (and ``images``, the source, if the store kept no images).

    The state is in traits: ``stat``, ``layer`` and ``head`` (the selected head),
    ``query``, and ``heads`` (the selected head per stage, all heads elsewhere), so
    :func:`vitlens.widgets.link` (or ``explorer=``) links ``layer``, ``query`` and
    ``heads`` to an :class:`Explorer` of any capture of the same model: clicking a
    head shows that block and head alone in the Explorer.

    Parameters
    ----------
    cap
        A capture, or a store from :func:`vitlens.open` (full or reduced).
    model
        The model, to capture the shown images again when the store kept no attention.
    stat
        The statistic shown first (default: the first of :data:`vitlens.HEAD_STATS` available).
    head
        ``(layer, head)`` selected first (default: the head with the highest mean).
    k
        Images per row (highest, lowest).
    query
        ``"default"`` (CLS, or the centre patch without one), ``None`` or a patch ``(row, col)``.
    images
        The images the store was captured from, if it kept none (an array or
        DataArray with a ``sample`` axis, or a list of paths, in store order).
    explorer
        An :class:`Explorer` (of this store or any capture of the same model) to link to.
    panel_size
        Height of one image panel in pixels (widths follow the output area).
    export_dir
        The only directory the "Save as" box writes into (default: the working directory).

    Examples
    --------
    >>> import numpy as np, timm, vitlens as vl
    >>> model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=3, depth=2)
    >>> cap = vl.capture(model, np.random.default_rng(0).random((6, 32, 32, 3)))
    >>> atlas = vl.HeadAtlas(cap, stat="attention_entropy", k=2)
    >>> atlas.mean().shape  # blocks x heads
    (2, 3)
    >>> atlas.select(1, 2)
    >>> len(atlas.shown_samples())  # the two highest, the two lowest
    4
    """

    stat = traitlets.Unicode()
    #: The selected head (its block is ``layer``).
    head = traitlets.Int(0)
    k = traitlets.Int(4)
    export_name = "vitlens-head-atlas.png"
    #: What :func:`vitlens.widgets.link` ties to another widget (no ``sample``: the atlas shows a dataset).
    linkable = ("layer", "query", "heads")
    links_across_captures = True

    def __init__(
        self,
        cap: xr.DataTree,
        model: Any = None,
        *,
        stat: str | None = None,
        head: tuple[int, int] | None = None,
        k: int = 4,
        query: Query | str = "default",
        images: Any = None,
        explorer: Any = None,
        panel_size: int = 150,
        export_dir: str | os.PathLike | None = None,
    ) -> None:
        super().__init__()
        self.cap, self.model, self.source_images = cap, model, images
        self.layout_info = capture_layout(cap)  # a reduced store without attention is fine
        self.num_samples = int(cap["sample"].size)
        self.class_names = [str(n) for n in cap["class_name"].values] if "class_name" in cap.coords else []
        self.available = self._available()
        if not self.available:
            raise CaptureFormatError("this store holds no head statistics and no attention to compute them from; "
                                     "capture with stats='all' (or keep='all').")
        if k < 1:
            raise OptionError(f"k={k}: show at least one image per row.")
        self.k = min(int(k), self.num_samples)
        self.panel_size = panel_size
        self._tables: dict[str, tuple[xr.DataArray, xr.Dataset]] = {}
        self._sources = PanelMaps(size=4)  # captures of the shown images, by sample positions
        self.stat = self._checked_stat(stat or self.available[0])
        self.query = initial_query(self.layout_info, query)
        self.heads = self.layout_info.all_heads()
        layer, h = head if head is not None else self._strongest()
        self._set_head(int(layer), int(h))

        self.stat_select = widgets.Dropdown(options=[(STAT_INFO[n].title, n) for n in self.available],
                                            value=self.stat, description="Statistic",
                                            layout=widgets.Layout(width="320px"))
        self.stat_select.add_class("vitlens-stat")
        self._link_control(self.stat_select, "stat")
        self.status = html_text(margin="0 8px")
        exporter = self._text_controls(export_dir)

        self.overview = as_widget(self._overview_figure())
        self.overview.add_class("vitlens-figure")
        self.overview.data[0].on_click(self._cell_clicked)
        self.overview.data[1].on_click(self._dot_clicked)
        self.examples = as_widget(self._examples_figure())
        self.examples.add_class("vitlens-figure")
        for i in range(2 * self.k):
            self.examples.data[self.heatmap_trace(i)].on_click(self._patch_clicked)
        self.children = [widgets.HBox([self.stat_select, self.status],
                                      layout=widgets.Layout(align_items="center", flex_flow="row wrap")),
                         self._box(self.overview, "vitlens-atlas-overview"),
                         self._box(self.examples, "vitlens-atlas-examples"), self.caption, exporter.box, self.probe]
        self.add_class("vitlens-head-atlas")
        if explorer is not None:
            self.link(explorer)
        self.observe(lambda _: self.refresh(), ["stat"])
        self.observe(self._on_heads, "heads")
        self.observe(self._on_layer, "layer")
        self.observe(lambda _: self.refresh(), ["head", "query"])
        self._ready = True
        self.refresh()

    @property
    def figure(self) -> go.FigureWidget:
        """The overview (heat map and the statistic by depth); :attr:`examples` holds the images."""
        return self.overview

    @staticmethod
    def _box(figure: go.FigureWidget, css: str) -> widgets.VBox:
        """A figure in a column of its own (it takes the full width), named for the page."""
        box = widgets.VBox([figure])
        box.add_class(css)
        return box

    # -- what the atlas can show ------------------------------------------------------------------------
    def _available(self) -> list[str]:
        """Statistics the store holds, then those it can compute, in the registry's order."""
        held = set(stored_stats(self.cap))
        return [n for n in STAT_INFO if n in held or holds_groups(self.cap, STAT_INFO[n].groups())]

    def _checked_stat(self, name: str) -> str:
        stat_info(name)  # an unknown name: OptionError with a did-you-mean
        if name not in self.available:
            raise OptionError(f"this store can give {self.available}, not {name!r}: capture with stats=[{name!r}] "
                              "(or keep='all', grads=True).")
        return name

    @traitlets.validate("stat")
    def _valid_stat(self, proposal: Any) -> str:
        return self._checked_stat(str(proposal["value"]))

    def values(self, stat: str | None = None) -> xr.DataArray:
        """The statistic of every image, block and head (in memory; computed once per statistic)."""
        return self._table(stat or self.stat)[0]

    def table(self, stat: str | None = None) -> xr.Dataset:
        """The dataset view: ``mean``, ``std``, ``min``, ``max``, ``count`` per block and head."""
        return self._table(stat or self.stat)[1]

    def _table(self, stat: str) -> tuple[xr.DataArray, xr.Dataset]:
        if stat not in self._tables:
            values = head_stats(self.cap, stat)
            values = values.compute() if values.chunks is not None else values
            self._tables[stat] = (values, summary(values))
        return self._tables[stat]

    def mean(self) -> np.ndarray:
        """The heat map shown: the dataset mean ``(layer, head)`` (NaN where a block lacks the head)."""
        return np.asarray(self.table()["mean"].values, dtype=np.float64)

    def _strongest(self) -> tuple[int, int]:
        mean = self.table()["mean"]
        li, h = np.unravel_index(int(np.nanargmax(mean.values)), mean.shape)
        return int(mean["layer"].values[li]), int(h)

    # -- selecting a head ----------------------------------------------------------------------------------
    def select(self, layer: int, head: int) -> None:
        """Select ``head`` of block ``layer`` (what a click does); a linked Explorer shows that head alone."""
        self._set_head(int(layer), int(head))

    def _set_head(self, layer: int, head: int) -> None:
        stage = self.layout_info.stage_of(layer)
        if not 0 <= head < stage.num_heads:
            raise OptionError(f"block {layer} has heads 0..{stage.num_heads - 1}; got head {head}.")
        ready, self._ready = self._ready, False  # one redraw for the three traits
        try:
            self.layer, self.head = layer, head
            self.heads = {**self.layout_info.all_heads(), stage.index: (head,)}
        finally:
            self._ready = ready
        self.refresh()

    def _on_layer(self, change: Any) -> None:
        """A linked widget moved the layer: keep the head if that block has it, else its stage's first."""
        if self.head >= self.layout_info.stage_of(self.layer).num_heads:
            ready, self._ready = self._ready, False
            try:
                self.head = 0
            finally:
                self._ready = ready
        self.refresh()

    def _on_heads(self, change: Any) -> None:
        """A linked widget chose heads: follow when its stage has exactly one selected."""
        picked = self.heads.get(self.layout_info.stage_of(self.layer).index, ())
        if len(picked) == 1 and picked[0] != self.head:
            self.head = int(picked[0])

    def extremes(self) -> Extremes:
        """The selected head's highest and lowest images."""
        return extremes(self.values(), self.layer, self.head, self.k)

    def shown_samples(self) -> list[int]:
        """Sample labels of the images shown: the ``k`` highest, then the ``k`` lowest."""
        e = self.extremes()
        return [int(s) for s in self.cap["sample"].values[e.highest + e.lowest]]

    def example_maps(self) -> tuple[np.ndarray, np.ndarray]:
        """``(images, maps)`` of the shown panels: the head's attention of the query over each (unscaled)."""
        e = self.extremes()
        positions = e.highest + e.lowest
        key = tuple(positions)
        if not holds_attention(self.cap):
            self.status.value = escape(f"capturing {len(positions)} images again to show their attention…")
        try:
            _, _, source = self._sources.get(key, lambda: examples(self.cap, positions, self.layer, self.head,
                                                                   self.query, model=self.model,
                                                                   images=self.source_images))
        finally:
            self.status.value = ""
        from ..stats.atlas import query_maps

        return np.asarray(source["image"].values, dtype=np.float32), query_maps(source, self.layer, self.head,
                                                                                 self.query)

    # -- drawing ---------------------------------------------------------------------------------------------
    def _overview_figure(self) -> go.Figure:
        info = self.layout_info
        layers = info.layers
        heads = max(s.num_heads for s in info.stages)
        fig = make_subplots(rows=1, cols=2, column_widths=[0.5, 0.5], horizontal_spacing=0.12,
                            subplot_titles=["dataset mean", "by depth"])  # short: a narrow screen has ~190 px each
        fig.add_trace(go.Heatmap(z=np.zeros((len(layers), heads)), x=list(range(heads)), y=list(range(len(layers))),
                                 coloraxis="coloraxis", hoverongaps=False, name="mean",
                                 hovertemplate="%{customdata}<extra></extra>"), row=1, col=1)
        fig.add_trace(go.Scatter(x=[], y=[], mode="markers", marker=dict(size=8, color="#3b6ea8", opacity=0.8),
                                 hovertemplate="%{text}<extra></extra>", name="heads"), row=1, col=2)
        fig.add_trace(go.Scatter(x=[], y=[], mode="lines", line=dict(color=PICKED, width=3), hoverinfo="skip",
                                 name="picked cell"), row=1, col=1)
        fig.add_trace(go.Scatter(x=[], y=[], mode="markers", hoverinfo="skip", name="picked dot",
                                 marker=dict(size=14, color="rgba(0,0,0,0)", line=dict(color=PICKED, width=2))),
                      row=1, col=2)
        fig.add_trace(go.Scatter(x=[], y=[], mode="lines", line=dict(color="#999999", width=1), hoverinfo="skip",
                                 name="mean of heads"), row=1, col=2)
        for i in range(1, len(layers)):  # Swin: where each stage begins
            if info.stage_of(layers[i]) is not info.stage_of(layers[i - 1]):
                fig.add_hline(y=i - 0.5, line=dict(color="white", width=2), row=1, col=1)
                fig.add_vline(x=i - 0.5, line=dict(color="#bbbbbb", width=1, dash="dash"), row=1, col=2)
        ticks = dict(tickvals=list(range(len(layers))), ticktext=[f"block {l}" for l in layers])
        fig.update_layout(
            height=max(260, 26 * len(layers) + 110), autosize=True, margin=dict(l=60, r=10, t=46, b=40),
            coloraxis=dict(colorscale=ATLAS_COLORSCALE, colorbar=dict(thickness=10, len=0.9, x=0.45, xpad=4,
                                                                       tickfont=dict(size=10))),
            xaxis=dict(title=dict(text="head", font=dict(size=11)), tickvals=list(range(heads)), showgrid=False),
            yaxis=dict(autorange="reversed", showgrid=False, **ticks),
            xaxis2=dict(title=dict(text="block", font=dict(size=11)), tickvals=list(range(len(layers))),
                        ticktext=[str(l) for l in layers]),
            showlegend=False, dragmode=False, hovermode="closest", font=dict(size=11),
            paper_bgcolor="white", plot_bgcolor="white",
        )
        self._draw_overview(fig)
        return fig

    def _draw_overview(self, fig: go.Figure) -> None:
        info = stat_info(self.stat)
        table = self.table()
        mean = np.asarray(table["mean"].values, dtype=np.float64)
        layers = self.layout_info.layers
        heads = mean.shape[1]
        unit = info.unit
        text = [[(f"block {l}, head {h}<br>mean {mean[i, h]:.4g} {unit}<br>std {float(table['std'][i, h]):.3g}, "
                  f"range {float(table['min'][i, h]):.4g}–{float(table['max'][i, h]):.4g}<br>"
                  f"{int(table['count'][i, h])} images") if np.isfinite(mean[i, h]) else ""
                 for h in range(heads)] for i, l in enumerate(layers)]
        offsets = (np.arange(heads) - (heads - 1) / 2) * (0.5 / heads)
        li, hi = np.nonzero(np.isfinite(mean))
        li_sel = layers.index(self.layer)
        with np.errstate(invalid="ignore"):
            per_layer = np.nanmean(mean, axis=1)
        with fig.batch_update():
            fig.data[0].z = np.where(np.isfinite(mean), mean, None).tolist()
            fig.data[0].customdata = text
            fig.data[1].update(x=(li + offsets[hi]).tolist(), y=mean[li, hi].tolist(),
                               text=[text[i][h] for i, h in zip(li, hi, strict=True)],
                               customdata=np.stack([li, hi], -1).tolist())
            x0, y0 = self.head - 0.5, li_sel - 0.5
            fig.data[2].update(x=[x0, x0 + 1, x0 + 1, x0, x0], y=[y0, y0, y0 + 1, y0 + 1, y0])
            fig.data[3].update(x=[li_sel + offsets[self.head]], y=[mean[li_sel, self.head]])
            fig.data[4].update(x=list(range(len(layers))), y=per_layer.tolist())
            fig.layout.coloraxis.colorbar.title = dict(text=unit, side="right")
            fig.layout.yaxis2.title = dict(text=f"{info.title} ({unit})", font=dict(size=11))

    def _examples_figure(self) -> go.Figure:
        titles = [f"panel {i}" for i in range(2 * self.k)]
        fig = overlay_figure(self.layout_info, titles, "", cols=self.k, height=2 * self.panel_size + 90)
        for i in range(2 * self.k):  # the query marker of each panel
            r, c = divmod(i, self.k)
            fig.add_scatter(x=[], y=[], mode="lines", line=dict(color="#00e5ff", width=1.5), hoverinfo="skip",
                            row=r + 1, col=c + 1)
        self._draw_examples(fig)
        return fig

    def _draw_examples(self, fig: go.Figure) -> None:
        e = self.extremes()
        positions = e.highest + e.lowest
        pictures, maps = self.example_maps()
        samples = self.cap["sample"].values[positions]
        unit = stat_info(self.stat).unit
        mx, my = patch_outline(self.layout_info, self.layer, self.query)
        n = 2 * self.k
        with fig.batch_update():
            for i in range(n):
                there = i < len(positions)
                fig.data[2 * i].source = image_uri(pictures[i]) if there else ""
                trace = fig.data[self.heatmap_trace(i)]
                trace.z = normalized(maps[i]) if there else np.zeros(self.layout_info.grid, np.float32)
                trace.opacity = self.opacity if there else 0.0
                trace.zsmooth = zsmooth(self.smooth)
                fig.data[2 * n + i].update(x=mx if there else [], y=my if there else [])
                row = "highest" if i < self.k else "lowest"
                fig.layout.annotations[i].text = (markup("{} #{}<br>{:.4g} {}", row, int(samples[i]),
                                                         e.value(positions[i]), unit) if there else "")

    def refresh(self) -> None:
        """Redraw both figures for the statistic, the selected head and the query (batched updates)."""
        if not self._ready:
            return
        self._draw_overview(self.overview)
        self._draw_examples(self.examples)
        info = stat_info(self.stat)
        self.caption.value = escape(
            f"{info.title} ({info.unit}): {info.caption}. Left: its mean over the {self.num_samples} images per "
            f"block and head (hover for the spread); right: against depth. Block {self.layer}, head {self.head} "
            f"(outlined): the {self.k} images where it is highest (top row) and lowest (bottom row), each under that "
            f"head's attention of {captions.query_text(self.query)} (scaled to [0, 1] per image; click a patch to "
            f"choose another query). Click a cell or a dot to choose another head.")
        self.version += 1
        query = "cls" if self.query is None else f"{self.query[0]},{self.query[1]}"
        self.probe.value = probe_text(v=self.version, stat=self.stat, layer=self.layer, head=self.head, query=query,
                                      samples=",".join(map(str, self.shown_samples())))

    # -- clicks ------------------------------------------------------------------------------------------------
    def _cell_clicked(self, trace: Any, points: Any, state: Any) -> None:
        if not points.xs:
            return
        li, h = int(round(points.ys[0])), int(round(points.xs[0]))
        layers = self.layout_info.layers
        if 0 <= li < len(layers) and 0 <= h < self.layout_info.stage_of(layers[li]).num_heads:
            self.select(layers[li], h)

    def _dot_clicked(self, trace: Any, points: Any, state: Any) -> None:
        if not points.point_inds:
            return
        li, h = trace.customdata[points.point_inds[0]]
        self.select(self.layout_info.layers[int(li)], int(h))

    def _patch_clicked(self, trace: Any, points: Any, state: Any) -> None:
        if not points.xs:
            return
        self.query = patch_at(self.layout_info, points.xs[0], points.ys[0])

    # -- export ---------------------------------------------------------------------------------------------------
    def _panels_in(self, fig: Any) -> int:
        return 2 * self.k

    def context(self) -> str:
        """Model, statistic, head and query of the view (the export's title)."""
        model = str(self.cap.attrs.get("model", "model"))
        return (f"{model} · {self.num_samples} images · {stat_info(self.stat).title} · block {self.layer}, "
                f"head {self.head} · {captions.query_text(self.query)}")

    def export_figure(self, **options: Any) -> Any:
        """The current view as a static matplotlib figure (:func:`vitlens.figures.draw_head_atlas`)."""
        from ..figures import draw_head_atlas

        e = self.extremes()
        positions = e.highest + e.lowest
        pictures, maps = self.example_maps()
        samples = self.cap["sample"].values[positions]
        panels = [(pictures[i], maps[i], f"#{int(samples[i])} · {e.value(p):.3g}") for i, p in enumerate(positions)]
        rows = [("highest", panels[: len(e.highest)]), ("lowest", panels[len(e.highest):])]
        return draw_head_atlas(self.table(), self.stat, selected=(self.layer, self.head, rows),
                               suptitle=self.context(), **options)
