"""``vl.HeadGrid``: every head of one layer as small multiples (bertviz's model view, for images)."""

from __future__ import annotations

import html

import ipywidgets as widgets
import numpy as np
import plotly.graph_objects as go
import xarray as xr

from ..errors import OptionError
from . import captions
from .controls import layer_slider, probe, sample_dropdown
from .explorer import Explorer
from .figure import as_widget, overlay_figure
from .layout import Query, capture_layout, check_view, initial_query, patch_outline
from .panels import head_attention, normalized

_DIMMED = 0.25


class HeadGrid(widgets.VBox):
    """All heads of one layer side by side: where the query token looks, head by head.

    Each small panel is one head's attention row of the query token (CLS for
    ViT, the centre token for Swin, or the Explorer's query), scaled to [0, 1].
    Linked to an :class:`Explorer`, the grid follows its layer, sample and query;
    clicking a head toggles it there (deselected heads are dimmed).

    Parameters
    ----------
    cap
        A capture from :func:`vitlens.capture` or :func:`vitlens.open`.
    layer
        Block to show (default: the last, or the Explorer's layer).
    sample
        Sample of a batch capture.
    query
        ``"default"``, ``None`` (CLS) or a patch ``(row, col)`` on the first-stage grid.
    explorer
        An :class:`Explorer` of the same capture to link to.
    cols
        Panels per row.
    panel_size
        Size of one panel in pixels.

    Examples
    --------
    >>> import numpy as np, timm, vitlens as vl
    >>> from vitlens.widgets import HeadGrid
    >>> model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=3)
    >>> cap = vl.capture(model, np.random.default_rng(0).random((1, 32, 32, 3)))
    >>> grid = HeadGrid(cap, layer=2)
    >>> grid.head_maps().shape
    (3, 4, 4)
    """

    def __init__(
        self,
        cap: xr.DataTree,
        layer: int | None = None,
        *,
        sample: int = 0,
        query: Query | str = "default",
        explorer: Explorer | None = None,
        cols: int = 6,
        panel_size: int = 130,
    ) -> None:
        super().__init__()
        self.cap = cap
        self.layout_info = info = capture_layout(cap)
        if explorer is not None and explorer.cap is not cap:
            raise OptionError("HeadGrid(cap, explorer=ex) needs the same capture as the Explorer: pass ex.cap.")
        self.explorer = explorer
        if explorer is not None:
            layer, sample = explorer.layer, explorer.sample
        layer = check_view(info, cap, layer, sample)
        n = int(cap["sample"].size)
        self._query: Query = initial_query(info, query)
        self._selected = info.all_heads()
        self.cols = cols
        self.panel_size = panel_size
        # One live figure per stage (Swin stages differ in head count), built once and
        # shown one at a time: a plotly view re-created later would show its first state.
        self._figures: dict[int, go.FigureWidget] = {}
        self._boxes: dict[int, widgets.Box] = {}
        self._stage: int | None = None

        self.layer_slider = layer_slider(info, layer)
        self.sample_select = sample_dropdown(list(range(n)), sample)
        self.caption = widgets.HTML()
        self.caption.add_class("vitlens-captions")
        self.probe = probe("vitlens-probe")
        self._figure_box = widgets.VBox()
        if explorer is not None:
            # The Explorer owns the state: our controls mirror its own, and every
            # Explorer update (its ``version``) redraws the grid exactly once.
            self._links = [widgets.link((explorer.layer_slider, "value"), (self.layer_slider, "value")),
                           widgets.link((explorer.sample_select, "value"), (self.sample_select, "value"))]
            explorer.observe(self._explorer_changed, "version")
        else:
            self.layer_slider.observe(lambda _: self.refresh(), "value")
            self.sample_select.observe(lambda _: self.refresh(), "value")
        self.children = [widgets.HBox([self.layer_slider, self.sample_select]), self._figure_box, self.caption,
                         self.probe]
        self.add_class("vitlens-head-grid")
        for stage in info.stages:  # filled with the view at each stage's current (or first) layer
            self._add_figure(stage.index, layer if stage.index == info.stage_of(layer).index else stage.layers[0])
        self._figure_box.children = [self._boxes[s.index] for s in info.stages]
        self.refresh()

    @property
    def layer(self) -> int:
        return self.explorer.layer if self.explorer is not None else int(self.layer_slider.value)

    @property
    def sample(self) -> int:
        return self.explorer.sample if self.explorer is not None else int(self.sample_select.value)

    @property
    def query(self) -> Query:
        return self.explorer.query if self.explorer is not None else self._query

    def unlink(self) -> None:
        """Stop following the Explorer (the grid keeps its last view)."""
        if self.explorer is None:
            return
        self.explorer.unobserve(self._explorer_changed, "version")
        for link in self._links:
            link.unlink()
        self._selected = self.explorer.heads.choice()
        self.explorer = None
        self.layer_slider.observe(lambda _: self.refresh(), "value")
        self.sample_select.observe(lambda _: self.refresh(), "value")

    def _explorer_changed(self, change) -> None:
        self.refresh()

    def selected(self) -> dict[int, frozenset[int]]:
        """Heads shown as selected, per stage (the Explorer's when linked)."""
        if self.explorer is not None:
            return self.explorer.heads.choice()
        return dict(self._selected)

    @property
    def figure(self) -> go.FigureWidget:
        """The figure of the shown layer's stage."""
        return self._figures[self.layout_info.stage_of(self.layer).index]

    def head_maps(self) -> np.ndarray:
        """The maps shown, ``(head, gh, gw)`` in [0, 1]."""
        return np.stack([np.asarray(t.z, dtype=np.float32) for t in self.figure.data[: self._num_heads]])

    def toggle_head(self, head: int) -> None:
        """Toggle ``head`` of the shown layer's stage (in the linked Explorer, if any)."""
        stage = self.layout_info.stage_of(self.layer)
        if not 0 <= head < stage.num_heads:
            raise OptionError(f"no head {head} at layer {self.layer}, which has heads 0..{stage.num_heads - 1}.")
        if self.explorer is not None:
            self.explorer.toggle_head(head, stage.index)  # the Explorer's version change refreshes us
            return
        picked = set(self._selected[stage.index]) ^ {head}
        self._selected[stage.index] = frozenset(picked)
        self.refresh()

    @property
    def _num_heads(self) -> int:
        return self.layout_info.stage_of(self.layer).num_heads

    def _add_figure(self, stage_index: int, layer: int) -> None:
        """Build the stage's figure (one panel per head), draw ``layer`` into it, wrap it."""
        stage = self.layout_info.stages[stage_index]
        cols = min(self.cols, stage.num_heads)
        rows = -(-stage.num_heads // cols)
        titles = [f"head {h}" for h in range(stage.num_heads)]
        fig = overlay_figure(self.layout_info, titles, "", cols=cols, width=cols * self.panel_size + 70,
                             height=rows * self.panel_size + 40, show_image=False)
        for h in range(stage.num_heads):
            r, c = divmod(h, cols)
            fig.add_scatter(x=[], y=[], mode="lines", line=dict(color="#00e5ff", width=1.5),
                            hoverinfo="skip", row=r + 1, col=c + 1)
        self._draw(fig, layer)
        widget = as_widget(fig)
        widget.add_class("vitlens-figure")
        for h in range(stage.num_heads):
            widget.data[h].on_click(lambda trace, points, state, h=h: self.toggle_head(h) if points.xs else None)
        self._figures[stage_index] = widget
        self._boxes[stage_index] = widgets.Box([widget])

    def _draw(self, fig: go.Figure, layer: int) -> frozenset[int]:
        """Every head's map at ``layer`` into ``fig``, one batched update; returns the selected heads."""
        info = self.layout_info
        stage = info.stage_of(layer)
        query = self.query
        maps = head_attention(self.cap, info, self.sample, layer, query)
        chosen = self.selected()[stage.index]
        mx, my = patch_outline(info, layer, query)
        n = stage.num_heads
        with fig.batch_update():
            for h in range(n):
                trace = fig.data[h]
                trace.z = normalized(maps[h])
                trace.opacity = 1.0 if h in chosen else _DIMMED
                fig.data[n + h].update(x=mx, y=my)  # the query marker of head h's panel
                fig.layout.annotations[h].text = f"head {h}" + (" ✓" if h in chosen else "")
        return chosen

    def refresh(self) -> None:
        """Recompute every head's map of the shown layer and push one batched update."""
        layer, sample = self.layer, self.sample
        stage = self.layout_info.stage_of(layer).index
        chosen = self._draw(self._figures[stage], layer)
        if stage != self._stage:
            for index, box in self._boxes.items():
                box.layout.display = None if index == stage else "none"
            self._stage = stage
        self.caption.value = html.escape(
            f"Each panel: where {captions.query_text(self.query)} looks at block {layer}, one head at a time "
            f"(scaled to [0, 1]). Click a head to toggle it" + (" in the Explorer." if self.explorer else ".")
        )
        heads = ",".join(map(str, sorted(chosen)))
        self.probe.value = f"layer={layer} sample={sample} heads={heads}"
