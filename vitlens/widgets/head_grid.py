"""``vl.HeadGrid``: every head of one layer as small multiples over the image."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Any

import ipywidgets as widgets
import numpy as np
import plotly.graph_objects as go
import xarray as xr

from ..errors import OptionError
from . import captions
from .base import AttentionView
from .controls import probe_text
from .figure import as_widget, image_uri, overlay_figure, zsmooth
from .layout import Query, initial_query, parse_heads, patch_outline
from .panels import head_attention, normalized
from .text import escape, markup

#: Heatmap opacity of a deselected head, relative to the opacity slider.
DIMMED = 0.2
#: The title mark of a head switched off in the model (a linked Explorer's ablate mode).
SWITCHED_OFF = markup(" · <span style='color:#d62728'>✕ switched off</span>")


class HeadGrid(AttentionView):
    """All heads of one layer side by side: where the query token looks, head by head.

    Each small panel is the input image under one head's attention row of the
    query token (CLS for ViT, the centre token for Swin), scaled to [0, 1].
    Clicking a panel toggles that head; a deselected head is faded and titled
    "off". The state is in traits (``layer``, ``sample``, ``query``, ``heads``,
    ``opacity``, ``smooth``): ``HeadGrid(cap, explorer=ex)`` (or
    ``grid.link(ex)``) links the first four to an :class:`Explorer` with
    ``traitlets.link``, so the grid follows its layer, sample and query, and a
    click toggles the head in the Explorer — or, while the Explorer is in its
    ablate mode, switches the head off in the model (titled "✕ switched off").

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
    heads
        Initially selected heads (as for :class:`Explorer`).
    explorer
        An :class:`Explorer` of the same capture to link to.
    cols
        Panels per row.
    panel_size
        Height of one row of panels in pixels (the width follows the output area).
    opacity, smooth
        Heatmap opacity; bilinear overlays instead of token blocks.
    export_dir
        The only directory the "Save as" box writes into (default: the working directory).

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

    export_name = "vitlens-heads.png"

    def __init__(
        self,
        cap: xr.DataTree,
        layer: int | None = None,
        *,
        sample: int = 0,
        query: Query | str = "default",
        heads: None | Iterable[int] | Mapping[int, Iterable[int]] = None,
        explorer: Any = None,
        cols: int = 6,
        panel_size: int = 150,
        opacity: float = 0.6,
        smooth: bool = False,
        export_dir: str | os.PathLike | None = None,
    ) -> None:
        super().__init__()
        if explorer is not None and explorer.cap is not cap:
            raise OptionError("HeadGrid(cap, explorer=ex) needs the same capture as the Explorer: pass ex.cap.")
        layer = self._init_capture(cap, explorer.layer if explorer is not None else layer,
                                   explorer.sample if explorer is not None else sample)
        info = self.layout_info
        self.layer, self.sample, self.opacity, self.smooth = layer, sample, opacity, smooth
        self.query = initial_query(info, query)
        self.heads = {s: tuple(sorted(h)) for s, h in parse_heads(info, heads).items()}
        self.cols = cols
        self.panel_size = panel_size
        # One live figure per stage (Swin stages differ in head count), built once and
        # shown one at a time: a plotly view re-created later would show its first state.
        self._figures: dict[int, go.FigureWidget] = {}
        self._boxes: dict[int, widgets.Box] = {}
        self._stage: int | None = None

        self._view_controls()
        exporter = self._text_controls(export_dir)
        self._figure_box = widgets.VBox()
        wrap = widgets.Layout(align_items="center", flex_flow="row wrap")
        self.children = [widgets.HBox([self.layer_slider, self.sample_select, self.opacity_slider, self.smooth_toggle],
                                      layout=wrap),
                         self._figure_box, self.caption, exporter.box, self.probe]
        self.add_class("vitlens-head-grid")
        if explorer is not None:
            self.link(explorer)  # takes the Explorer's sample, layer, query and heads
        for stage in info.stages:  # filled with the view at each stage's current (or first) layer
            self._add_figure(stage.index, self.layer if stage.index == info.stage_of(self.layer).index
                             else stage.layers[0])
        self._figure_box.children = [self._boxes[s.index] for s in info.stages]
        self.observe(lambda _: self.refresh(), ["layer", "query", "heads"])
        self.observe(self._on_sample, "sample")
        self.observe(lambda _: self.refresh(), ["opacity", "smooth"])
        self._ready = True
        self.refresh()

    @property
    def explorer(self) -> Any:
        """The widget this grid is linked to (``None`` when it is not)."""
        links = getattr(self, "_links", [])
        return links[0].source[0] if links else None

    def selected(self) -> dict[int, frozenset[int]]:
        """Heads shown as selected, per stage."""
        return self.head_choice()

    @property
    def figure(self) -> go.FigureWidget:
        """The figure of the shown layer's stage."""
        return self._figures[self.layout_info.stage_of(self.layer).index]

    @property
    def num_panels(self) -> int:  # type: ignore[override]
        return self.layout_info.stage_of(self.layer).num_heads

    def head_maps(self) -> np.ndarray:
        """The maps shown, ``(head, gh, gw)`` in [0, 1]."""
        return np.stack([np.asarray(t.z, dtype=np.float32) for t in self.heatmaps()])

    def toggle_head(self, head: int) -> None:
        """Toggle ``head`` of the shown layer's stage (in a linked Explorer too)."""
        stage = self.layout_info.stage_of(self.layer)
        if not 0 <= head < stage.num_heads:
            raise OptionError(f"no head {head} at layer {self.layer}, which has heads 0..{stage.num_heads - 1}.")
        picked = set(self.heads[stage.index]) ^ {head}
        self.heads = {**self.heads, stage.index: tuple(sorted(picked))}

    def click_head(self, head: int) -> None:
        """What a click on a head's panel does: toggle it, or — the linked Explorer in its ablate
        mode — switch it off (or on again) in the model at the shown block."""
        ablate = getattr(self.explorer, "ablation", None)
        if ablate is not None and ablate.mode.value:
            ablate.toggle(head, self.layer)
            self.refresh()
        else:
            self.toggle_head(head)

    def export_panels(self) -> list[dict]:
        return [self._overlay_panel(t.z, ann.text) for t, ann in zip(self.heatmaps(), self.figure.layout.annotations,
                                                                      strict=True)]

    def context(self) -> str:
        return f"{super().context()} · {captions.query_text(self.query)} at block {self.layer}"

    # -- drawing --------------------------------------------------------------------------------
    def _panels_in(self, fig: Any) -> int:
        return len(fig.layout.annotations)  # one title per head

    def _add_figure(self, stage_index: int, layer: int) -> None:
        """Build the stage's figure (one panel per head), draw ``layer`` into it, wrap it."""
        stage = self.layout_info.stages[stage_index]
        cols = min(self.cols, stage.num_heads)
        rows = -(-stage.num_heads // cols)
        titles = [f"head {h}" for h in range(stage.num_heads)]
        fig = overlay_figure(self.layout_info, titles, "", cols=cols, height=rows * self.panel_size + 40,
                             opacity=self.opacity, smooth=self.smooth)
        for h in range(stage.num_heads):
            r, c = divmod(h, cols)
            fig.add_scatter(x=[], y=[], mode="lines", line=dict(color="#00e5ff", width=1.5),
                            hoverinfo="skip", row=r + 1, col=c + 1)

        uri = image_uri(self.image())
        for h in range(stage.num_heads):
            fig.data[2 * h].source = uri
        self._draw(fig, stage_index, layer)
        widget = as_widget(fig)
        widget.add_class("vitlens-figure")
        for h in range(stage.num_heads):
            widget.data[self.heatmap_trace(h)].on_click(
                lambda trace, points, state, h=h: self.click_head(h) if points.xs else None)
        self._figures[stage_index] = widget
        self._boxes[stage_index] = widgets.VBox([widget])  # a column: the figure takes its full width

    def _draw(self, fig: go.Figure, stage_index: int, layer: int) -> frozenset[int]:
        """Every head's map at ``layer`` into ``fig``, one batched update; returns the selected heads."""
        info = self.layout_info
        stage = info.stages[stage_index]
        query = self.query
        maps = head_attention(self.cap, info, self.sample, layer, query)
        chosen = self.head_choice()[stage.index]
        ablate = getattr(self.explorer, "ablation", None)
        off = frozenset()
        if ablate is not None:
            ablate.follow(self.refresh)  # switched-off heads are marked here too, whoever switches them
            off = ablate.switched_off(layer)
        mx, my = patch_outline(info, layer, query)
        n = stage.num_heads
        with fig.batch_update():
            for h in range(n):
                trace = fig.data[self.heatmap_trace(h)]
                trace.z = normalized(maps[h])
                trace.opacity = self.opacity if h in chosen else self.opacity * DIMMED
                trace.zsmooth = zsmooth(self.smooth)
                fig.data[2 * n + h].update(x=mx, y=my)  # the query marker of head h's panel
                fig.layout.annotations[h].text = markup("head {}{}{}", h, "" if h in chosen else " (off)",
                                                        SWITCHED_OFF if h in off else "")
        return chosen

    def refresh(self) -> None:
        """Recompute every head's map of the shown layer and push one batched update."""
        if not self._ready:
            return
        layer, sample = self.layer, self.sample
        stage = self.layout_info.stage_of(layer).index
        chosen = self._draw(self._figures[stage], stage, layer)
        if stage != self._stage:
            for index, box in self._boxes.items():
                box.layout.display = None if index == stage else "none"
            self._stage = stage
        linked = self.explorer is not None
        self.caption.value = escape(
            f"Each panel: the image under where {captions.query_text(self.query)} looks at block {layer}, one head "
            f"at a time (scaled to [0, 1]). Click a head to toggle it" + (" (linked)." if linked else ".")
        )
        heads = ",".join(map(str, sorted(chosen)))
        self.version += 1
        self.probe.value = probe_text(layer=layer, sample=sample, heads=heads)

    def _on_sample(self, change: Any) -> None:
        self._show_image(self._figures.values())
        self.refresh()
