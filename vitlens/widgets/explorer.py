"""``vl.Explorer``: scrub layers, toggle heads and watch linked maps update live."""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import ipywidgets as widgets
import numpy as np
import plotly.graph_objects as go
import traitlets
import xarray as xr

from ..errors import OptionError, VitlensError
from ..methods import extra_groups
from ..methods.options import check
from ..registry import method_info
from . import captions
from .base import AttentionView, ClassChoice
from .controls import (HeadToggles, layer_slider, opacity_slider, probe, probe_text, sample_dropdown, sample_options,
                       top_classes)
from .figure import as_widget, grid_height, live_title, overlay_figure
from .layout import Query, initial_query, parse_heads, patch_at, patch_outline, window_edges, window_ids
from .panels import (
    STATISTICS,
    PanelMaps,
    fusion_maps,
    layer_dependent,
    method_maps,
    method_names,
    normalized,
    query_attention,
    safe,
    statistic_array,
)
from .text import escape, html_text, join, markup

#: The four panels, left to right (a fifth, ``contrast``, explains a second class).
PANELS = ("attention", "statistic", "fusion", "method")
DEFAULT_METHOD = "generic_attention"


class PanelView(NamedTuple):
    """What one panel shows: its map (token grid, not yet normalised), caption and title."""

    map: np.ndarray
    caption: str
    title: str


@dataclass(frozen=True)
class ViewState:
    """The selection every panel of one update reads: layer (and its index and stage), sample, heads, and
    the capture the class-agnostic panels read (:meth:`Explorer._shown`)."""

    layer: int
    sample: int
    li: int
    stage: Any
    choice: dict[int, frozenset[int]]
    key: tuple[tuple[int, ...], ...]  # the head choice as a cache key
    shape: tuple[int, ...]  # (sample, layer, gh, gw) of a per-layer map stack
    cap: xr.DataTree  # the Explorer's capture, or in the ablate mode the shown image's ablated recapture
    index: int  # the shown sample's index in ``cap``
    cap_key: Any  # ``cap`` as a cache key


class Explorer(AttentionView):
    """Look inside a captured vision transformer: one layer slider drives four linked maps.

    Panels, each the input image under a heatmap (all min-max scaled to [0, 1],
    one shared colour scale, shown by the colour bar):

    1. **attention** of the query token at the layer, mean over the selected
       heads (default query: CLS for ViT, the centre token for Swin; click a
       patch to make it the query).
    2. **statistic**: the LayerNorm-input statistic (mean, std, var, norm) of
       each token at the layer.
    3. **fusion**: ``lnstat`` (statistic × attention) accumulated up to the
       layer with the selected heads; the "gradient-weighted" toggle switches to
       its gradient-weighted reading (``grad=True``, class-specific).
    4. **method**: any method of :data:`vitlens.METHODS`, accumulated up to the
       layer where the method allows it.
    5. with ``compare_class=True``: the same method for a second class ("vs"),
       side by side with the first.

    The state is held in traits (``layer``, ``sample``, ``query``, ``heads``,
    ``stat``, ``method``, ``opacity``, ``smooth``), so other widgets follow it
    with ``traitlets.link`` (:func:`vitlens.widgets.link`, or
    ``HeadGrid(cap, explorer=ex)``). Everything a control does is computed from
    the capture (the model is only run again to explain another class) and
    sent to the page as one batched figure update. Per-layer maps are cached
    per head selection, statistic, method and class, so a slider move is an index.

    Swin: maps of later stages are drawn on the first-stage grid (each stage
    token repeated over the first-stage tokens it covers); the attention panel
    shows the query's window row, with the windows of that block as a faint grid.

    Parameters
    ----------
    cap
        A capture from :func:`vitlens.capture` or :func:`vitlens.open`.
    model
        The captured model; enables the class selectors (choosing a class
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
    smooth
        Bilinear overlays instead of one block per token.
    compare_class
        Add a fifth panel: the method for a second class (needs ``model``).
    height
        Figure height in pixels (default: 300 for one row, 250 a row when wrapped); the width follows
        the output area.
    cols
        Panels per row (default: all in one row; ``cols=2`` suits a narrow screen or a projector).
    export_dir
        The only directory the "Save as" box writes into (default: the working
        directory); :meth:`save` from Python writes anywhere.
    ablate
        Start in ablate mode (needs ``model``; :mod:`vitlens.widgets.ablate`): a row of
        head switches turns heads of the shown block off *in the model*, and every panel
        and a top-5 probability bar (before/after) follow, one forward + backward of the
        shown image per change. ``ablate=False`` keeps the mode's switch, off, whenever
        ``model`` is given.
    ablation, reference
        How a switched-off head is replaced: ``"zero"``, or ``"mean"`` over the
        ``reference`` images (see :func:`vitlens.capture`).

    Examples
    --------
    >>> import numpy as np, timm, vitlens as vl
    >>> from vitlens.widgets import Explorer
    >>> model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=3)
    >>> cap = vl.capture(model, np.random.default_rng(0).random((1, 32, 32, 3)))
    >>> ex = Explorer(cap, model)
    >>> ex.layer = 3
    >>> ex.panel_maps()["attention"].shape
    (4, 4)
    """

    stat = traitlets.Unicode("std")
    method = traitlets.Unicode(DEFAULT_METHOD)
    export_name = "vitlens-explorer.png"

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
        smooth: bool = False,
        compare_class: bool = False,
        cols: int | None = None,
        height: int | None = None,
        export_dir: str | os.PathLike | None = None,
        ablate: bool = False,
        ablation: str = "zero",
        reference: Any = None,
    ) -> None:
        super().__init__()
        self._hold = 1  # no view is drawn until every piece is there
        layer = self._init_capture(cap, layer, sample)
        self._check_options(model, stat, method, compare_class, ablate)
        self._init_state(model, compare_class, layer=layer, sample=sample, heads=heads, query=query, stat=stat,
                         method=method, opacity=opacity, smooth=smooth)
        self._build_controls(fusion_grad)
        fig = self._build_figure(cols, height)
        self._build_text(export_dir)
        self._connect()
        self._build_ablate(ablate, ablation, reference)
        self._hold = 0
        self.refresh()  # draws the first view into the plain figure
        self._go_live(fig)
        self.children = self._arrange()
        self.add_class("vitlens-explorer")

    # -- construction, step by step ---------------------------------------------------------
    def _check_options(self, model: Any, stat: str, method: str, compare_class: bool, ablate: bool) -> None:
        check("", stat=stat)  # the options table's statistics
        method_info(method)  # an unknown name: the registry's message, with its did-you-mean hint
        if method not in method_names(self.cap):
            raise OptionError(f"method={method!r} reads a pass this capture was made without: capture with "
                              f"keep=('all', {', '.join(map(repr, extra_groups([method])))}), or choose from "
                              f"{list(method_names(self.cap))}.")
        if ablate and model is None:
            raise OptionError("ablate=True switches heads off in the model: pass it, vl.Explorer(cap, model, "
                              "ablate=True).")
        if compare_class and model is None:
            raise OptionError("compare_class=True explains a second class, which needs the model: "
                              "vl.Explorer(cap, model, compare_class=True).")

    def _init_state(self, model: Any, compare_class: bool, *, layer: int, sample: int, heads: Any, query: Any,
                    stat: str, method: str, opacity: float, smooth: bool) -> None:
        """The panels, the class choices, the caches and the traits (before any control exists)."""
        info = self.layout_info
        self.model = model
        self.panels = PANELS + (("contrast",) if compare_class else ())
        self.num_panels = len(self.panels)
        self._cache = PanelMaps()
        self.classes = ClassChoice(self.cap, model)
        self.class_select, self.class_status = self.classes.dropdown, self.classes.status
        self._contrast: dict[int, int] = {}
        self.contrast_select = None
        if compare_class:
            self.contrast = ClassChoice(self.cap, model, description="vs", css="vitlens-contrast")
            self.contrast.recaptures = self.classes.recaptures  # one cache of recaptures
            self.contrast_select = self.contrast.dropdown
            self.contrast_select.tooltip = "the second class, explained by the fifth panel"
        self.timings: list[float] = []  # seconds per view update (server side)
        self.sample, self.layer, self.opacity, self.smooth = sample, layer, opacity, smooth
        self.stat, self.method = stat, method
        self.query = initial_query(info, query)
        self.heads = {s: tuple(sorted(h)) for s, h in parse_heads(info, heads).items()}

    def _build_controls(self, fusion_grad: bool) -> None:
        """Sliders, selectors and toggles, each linked to its trait."""
        info = self.layout_info
        self.layer_slider = layer_slider(info, self.layer)
        self.stage_label = html_text(css="vitlens-stage", margin="0 12px")
        self.sample_select = sample_dropdown(self._sample_options(), self.sample, width="200px")
        self._fill_classes(self.sample)
        self.head_controls = HeadToggles(info, self.head_choice(), self._heads_clicked)
        self.head_toggles = self.head_controls.toggles
        self.query_button = widgets.Button(description="reset query", tooltip="query: back to "
                                           + captions.query_text(info.default_query()),
                                           layout=widgets.Layout(width="auto", margin="0 0 0 12px"))
        self.query_button.add_class("vitlens-query-reset")
        self.query_button.on_click(lambda _: self.select_query(info.default_query()))
        self.stat_select = widgets.Dropdown(options=list(STATISTICS), value=self.stat, description="Statistic",
                                            layout=widgets.Layout(width="180px"))
        self.stat_select.add_class("vitlens-stat")
        self.fusion_grad = widgets.ToggleButton(  # off: panels 1-3 stay class-agnostic
            value=bool(fusion_grad), description="gradient-weighted", layout=widgets.Layout(width="auto"),
            tooltip="fusion panel: lnstat's gradient-weighted reading (class-specific) instead of the gradient-free one")
        self.fusion_grad.add_class("vitlens-fusion-grad")
        self.method_select = widgets.Dropdown(options=[(captions.method_title(m), m) for m in method_names(self.cap)],
                                              value=self.method, description="Method",
                                              layout=widgets.Layout(width="300px"))
        self.method_select.add_class("vitlens-method")
        self.opacity_slider = opacity_slider(self.opacity)
        for control, trait in ((self.layer_slider, "layer"), (self.sample_select, "sample"),
                               (self.stat_select, "stat"), (self.method_select, "method"),
                               (self.opacity_slider, "opacity")):
            self._link_control(control, trait)
        self.smooth_toggle = self._smooth_toggle()

    def _build_figure(self, cols: int | None, height: int | None) -> go.Figure:
        """The panels' figure (a plain plotly figure until :meth:`_go_live`), with the image in every panel.

        ``cols=None``: all panels in one row until the page says how wide the figure
        is drawn; then as many a row as stay readable (:meth:`follow_width`).
        """
        info = self.layout_info
        rows, cols = self._init_grid(cols, height, default_cols=self.num_panels)
        fig = overlay_figure(info, list(self.panels), "", cols=cols,
                             height=grid_height(rows, cols) if height is None else height,
                             opacity=self.opacity, smooth=self.smooth)
        self._grid_trace = len(fig.data)
        fig.add_scatter(x=[], y=[], mode="lines", line=dict(color="rgba(255,255,255,0.45)", width=1),
                        hoverinfo="skip", name="windows", row=1, col=1)
        self._marker_trace = len(fig.data)
        fig.add_scatter(x=[], y=[], mode="lines", line=dict(color="#00e5ff", width=2), hoverinfo="skip",
                        name="query", row=1, col=1)
        self.figure = fig  # a plain figure until the first view is drawn into it (see as_widget)
        self._show_image([fig])
        return fig

    def _build_text(self, export_dir: str | os.PathLike | None) -> None:
        """Title, captions, the hidden probe and the export box."""
        self.title = html_text(css="vitlens-title")
        self.captions = html_text(css="vitlens-captions", margin="0 0 0 8px")
        self.probe = probe("vitlens-probe")
        self._export_controls(export_dir)

    def _connect(self) -> None:
        """Every trait and control to what it changes."""
        self.observe(self._changed, ["layer", "stat", "method", "query"])
        self.observe(self._on_heads, "heads")
        self.observe(self._on_sample, "sample")
        self.observe(lambda _: self._style_heatmaps([self.figure]), ["opacity", "smooth"])
        self.fusion_grad.observe(self._changed, "value")
        self.class_select.observe(self._on_class, "value")
        if self.contrast_select is not None:
            self.contrast_select.observe(self._on_contrast, "value")

    def _build_ablate(self, ablate: bool, ablation: str, reference: Any) -> None:
        """The ablate mode (:mod:`vitlens.widgets.ablate`): a switch, off unless ``ablate``, whenever the model is given."""
        from .ablate import AblateControls

        self.ablation = None if self.model is None else AblateControls(self, ablation=ablation, reference=reference,
                                                                       active=ablate)

    def _go_live(self, fig: go.Figure) -> None:
        """The drawn figure becomes the live widget: clicks choose the query, the page's width the grid."""
        self.figure = as_widget(fig)
        self.figure.add_class("vitlens-figure")
        for i in range(self.num_panels):
            self.figure.data[self.heatmap_trace(i)].on_click(self._clicked)
        self._follow_page_width()

    def control_rows(self) -> list[list[widgets.Widget]]:
        """The rows of controls above the figure (a mode that adds controls adds a row here)."""
        classes = [self.sample_select, self.class_select, self.class_status]
        if self.contrast_select is not None:
            classes[2:2] = [self.contrast_select, self.contrast.status]
        return [
            [self.layer_slider, self.stage_label],
            classes,
            [self.head_controls.box, self.query_button],
            [self.stat_select, self.fusion_grad, self.method_select, self.opacity_slider, self.smooth_toggle],
        ]

    def _arrange(self) -> list[widgets.Widget]:
        wrap = dict(align_items="center", flex_flow="row wrap")
        rows = [widgets.HBox(r, layout=widgets.Layout(**wrap)) for r in self.control_rows()]
        below = [self.ablation.box] if self.ablation is not None else []  # below the maps: plots keep their order
        return [self.title, *rows, self.figure, *below, self.captions, self.exporter.box, self.probe]

    # -- public state -------------------------------------------------------------------
    @property
    def target(self) -> int:
        """The class the class-specific panel explains for the current sample."""
        return self.classes.targets[self.sample]

    @property
    def contrast_target(self) -> int | None:
        """The second class (fifth panel), or ``None`` without ``compare_class``."""
        if self.contrast_select is None:
            return None
        return self._contrast.setdefault(self.sample, self._default_contrast(self.sample))

    def panel_maps(self) -> dict[str, np.ndarray]:
        """The maps currently shown, ``{panel: (gh, gw) array in [0, 1]}``."""
        return {name: np.asarray(self.figure.data[self.heatmap_trace(i)].z, dtype=np.float32)
                for i, name in enumerate(self.panels)}

    # -- actions ------------------------------------------------------------------------
    def select_patch(self, row: int, col: int) -> None:
        """Make patch ``(row, col)`` (first-stage grid) the query token, as a click does."""
        self.select_query((row, col))

    def select_query(self, query: Query) -> None:
        """Set the query: ``None`` for CLS (ViT with a CLS token) or a patch ``(row, col)``."""
        self.query = query

    def toggle_head(self, head: int, stage: int | None = None) -> None:
        """Toggle one head of ``stage`` (default: the current layer's stage)."""
        stage = self.layout_info.stage_of(self.layer).index if stage is None else stage
        if stage not in self.head_toggles or not 0 <= head < len(self.head_toggles[stage]):
            raise OptionError(f"no head {head} in stage {stage}.")
        self.head_controls.toggle(stage, head)

    def set_heads(self, heads: Iterable[int], stage: int | None = None) -> None:
        """Select exactly ``heads`` in ``stage`` (default: the current layer's stage)."""
        stage = self.layout_info.stage_of(self.layer).index if stage is None else stage
        parse_heads(self.layout_info, {stage: heads})  # validates
        self.heads = {**self.heads, stage: tuple(sorted(int(h) for h in heads))}

    # -- export ---------------------------------------------------------------------------
    def context(self) -> str:
        c = self.target
        text = (f"{self.cap.attrs.get('model', 'model')} · sample {self.sample} · class {self.class_names[c]!r} "
                f"(p = {self.classes.probability(self.sample, c):.2f})")
        if self.contrast_target is not None:
            b = self.contrast_target
            text += f" vs {self.class_names[b]!r} (p = {self.classes.probability(self.sample, b):.2f})"
        return text

    def export_panels(self) -> list[dict]:
        maps = self.panel_maps()
        return [self._overlay_panel(maps[name], title) for name, title in zip(self.panels, self._titles, strict=True)]

    # -- computing the view ---------------------------------------------------------------
    def compute(self) -> dict[str, Any]:
        """The maps (normalised), captions and titles for the current state, one :class:`PanelView` a panel."""
        now = self._now()
        views = [self._attention_view(now), self._statistic_view(now), self._fusion_view(now),
                 *self._method_views(now)]
        return {"maps": [normalized(v.map) for v in views], "captions": [v.caption for v in views],
                "titles": [v.title for v in views]}

    def _now(self) -> ViewState:
        info = self.layout_info
        choice = self.head_choice()
        shown, index, shown_key = self._shown(self.sample)
        return ViewState(layer=self.layer, sample=self.sample, li=info.layers.index(self.layer),
                         stage=info.stage_of(self.layer), choice=choice,
                         key=tuple(tuple(sorted(choice[s.index])) for s in info.stages),
                         shape=(self.num_samples, len(info.layers), *info.grid),
                         cap=shown, index=index, cap_key=shown_key)

    def _attention_view(self, now: ViewState) -> PanelView:
        info, query = self.layout_info, self.query
        heads = sorted(now.choice[now.stage.index])
        caption = (captions.attention_caption(info, now.layer, now.choice, query) if heads else
                   f"No head selected in stage {now.stage.index}: select at least one head.")
        where = "CLS" if query is None else f"({query[0]}, {query[1]})"
        return PanelView(query_attention(now.cap, info, now.index, now.layer, heads, query), caption,
                         captions.panel_title("attention", now.layer, where))

    def _statistic_view(self, now: ViewState) -> PanelView:
        stats = self._cache.get(("statistic", self.stat, now.cap_key), lambda: statistic_array(now.cap, self.stat))
        return PanelView(stats[now.index, now.li], captions.statistic_caption(self.layout_info, now.layer, self.stat),
                         captions.panel_title(f"{self.stat} statistic", now.layer))

    def _fusion_view(self, now: ViewState) -> PanelView:
        info, stat = self.layout_info, self.stat
        grad = bool(self.fusion_grad.value)
        fcap, fi, fkey = now.cap, now.index, now.cap_key
        if grad:  # the gradient-weighted fusion explains a class: it reads the capture of the chosen class
            try:
                fcap, fi, fkey = self.classes.source(now.sample, self.target)
            except VitlensError:
                pass
        fusion, message = self._cache.get(
            ("fusion", now.key, stat, grad, fkey),
            lambda: safe(lambda: fusion_maps(fcap, info, now.choice, stat, grad),
                         (int(fcap["sample"].size), *now.shape[1:])))
        caption = message or captions.fusion_caption(info, now.layer, now.choice, stat, grad,
                                                     self.class_names[self.target])
        detail = captions.heads_text(info, now.choice, now.layer) if len(now.key) == 1 else ""
        return PanelView(fusion[fi, now.li], caption,
                         captions.panel_title("lnstat fusion" + (" (grad)" if grad else ""), now.layer, detail))

    def _method_views(self, now: ViewState) -> list[PanelView]:
        """The method panel, and with ``compare_class`` the same method for the second class."""
        info, method = self.layout_info, self.method
        classes = [self.target] + ([self.contrast_target] if self.contrast_select is not None else [])
        on_features = not layer_dependent(info, method)
        views = []
        for c in classes:
            title = captions.panel_title(captions.method_title(method), now.layer,
                                         self._class_detail(c) if len(classes) > 1 else "")
            try:
                src, si, src_key = self.classes.source(now.sample, c)
            except VitlensError as exc:
                views.append(PanelView(np.zeros(info.grid, dtype=np.float32), str(exc), title))
                continue
            src_shape = (int(src["sample"].size), *now.shape[1:])
            (per_layer, first), message = self._method(src, src_key, method, now.choice, now.key, src_shape)
            caption = message or captions.method_caption(info, method, now.layer, first, self.class_names[c],
                                                         on_features)
            caption += captions.precision_note(src, si, method, info)
            views.append(PanelView(per_layer[si, now.li], caption, title))
        return views

    def _shown(self, sample: int) -> tuple[xr.DataTree, int, Any]:
        """The capture the class-agnostic panels read: the Explorer's, or (heads switched off in the
        ablate mode) the shown image's ablated recapture."""
        if self.classes.intervention is None:
            return self.cap, sample, "capture"
        return self.classes.source(sample, self.target)

    def _class_detail(self, c: int) -> str:
        name = self.class_names[c]
        return "class " + (name if len(name) <= 12 else name[:11] + "…")

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
        self.head_controls.show(stage.index)
        view = self.compute()
        gx, gy = self._cache.get(("windows", layer), lambda: self._window_lines(layer))
        mx, my = patch_outline(info, layer, self.query)
        fig = self.figure
        with fig.batch_update():
            for i, z in enumerate(view["maps"]):
                fig.data[self.heatmap_trace(i)].z = z
            fig.data[self._grid_trace].update(x=gx, y=gy)
            fig.data[self._marker_trace].update(x=mx, y=my)
            for ann, text in zip(fig.layout.annotations, view["titles"], strict=True):
                ann.text = live_title(text, self._title_chars)
        self._titles = list(view["titles"])  # plain text, for the static export
        self.stage_label.value = escape(captions.stage_text(info, layer) if len(info.stages) > 1 or info.windowed else "")
        self.captions.value = join(markup("<div><b>{}.</b> {}</div>", i + 1, t) for i, t in enumerate(view["captions"]))
        self.title.value = self._cache.get(("title", self.sample), self._title_html)
        self.class_status.value = self.classes.describe(self.sample, self.target)
        self.version += 1
        heads = ",".join(map(str, self.heads[stage.index]))
        query = "cls" if self.query is None else f"{self.query[0]},{self.query[1]}"
        vs = {} if self.contrast_select is None else {"vs": self.contrast_target}
        self.probe.value = probe_text(v=self.version, layer=layer, sample=self.sample, heads=heads, query=query,
                                      stat=self.stat, method=self.method, **{"class": self.target}, **vs,
                                      **(self.ablation.probe() if self.ablation is not None else {}))
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
        return markup("<b>vitlens Explorer</b> · {} · {} blocks × {} heads · sample {}: predicted <b>{}</b> ({:.1f} %)",
                      self.cap.attrs.get("model", ""), len(info.layers), heads, s, top[1], 100 * top[2])

    # -- widget callbacks -------------------------------------------------------------------
    def _changed(self, change: Any = None) -> None:
        self.refresh()

    def _heads_clicked(self, choice: dict[int, frozenset[int]]) -> None:
        self.heads = {s: tuple(sorted(h)) for s, h in choice.items()}

    def _on_heads(self, change: Any) -> None:
        self.head_controls.set_choice(self.head_choice())
        self.refresh()

    def _sample_options(self) -> list[tuple[str, int]]:
        names = self.class_names
        pred = np.asarray(self.cap["logits"].values).argmax(-1)
        return sample_options(self.cap, [str(names[int(p)]) for p in pred])

    def _default_contrast(self, sample: int) -> int:
        """The most probable class other than the explained one."""
        return next(c for c, _, _ in top_classes(self.cap, sample, 2) if c != self.classes.targets[sample])

    def _fill_classes(self, sample: int) -> None:
        self._hold += 1
        try:
            current = self.classes.targets[sample]
            self.class_select.options = self.classes.options(sample, current)
            self.class_select.value = current
            if self.contrast_select is not None:
                other = self.contrast_target
                self.contrast_select.options = self.contrast.options(sample, other)
                self.contrast_select.value = other
        finally:
            self._hold -= 1

    def _on_sample(self, change: Any) -> None:
        self._fill_classes(self.sample)
        self._show_image([self.figure])
        self.refresh()

    def _on_contrast(self, change: Any) -> None:
        if self._hold or change["new"] is None:
            return
        self._contrast[self.sample] = int(change["new"])
        self.refresh()

    def _clicked(self, trace: Any, points: Any, state: Any) -> None:
        if not points.xs:
            return
        self.select_patch(*patch_at(self.layout_info, points.xs[0], points.ys[0]))
