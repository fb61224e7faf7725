"""``vl.ModelView``: every layer × every head for one query token (bertviz's model view, for images)."""

from __future__ import annotations

import os
from typing import Any

import ipywidgets as widgets
import numpy as np
import plotly.graph_objects as go
import xarray as xr

from . import captions
from .base import AttentionView
from .controls import opacity_slider, probe_text, sample_dropdown, sample_options
from .figure import COLORSCALE, image_uri, with_gaps
from .layout import Query, initial_query
from .panels import head_attention, normalized, pooled
from .text import escape

#: Tiles show at most this many cells per side (finer Swin grids are averaged down).
MAX_CELLS = 16


class ModelView(AttentionView):
    """Where one query token looks, in every head of every block at once.

    A mosaic: one row per block, one column per head; each tile is the input
    image under that head's attention row of the query (scaled to [0, 1] per
    tile). The current ``layer``'s row is outlined. Click a patch in any tile to
    make it the query and that tile's block the layer. Traits ``sample``,
    ``layer`` and ``query`` link to an :class:`Explorer` (``explorer=ex`` or
    :func:`vitlens.widgets.link`). Swin stages with fewer heads leave their last
    columns empty; grids finer than 16×16 are averaged to at most 16 cells a side.

    Parameters
    ----------
    cap
        A capture from :func:`vitlens.capture` or :func:`vitlens.open`.
    sample, layer, query
        Initial sample, outlined block and query (``"default"``, ``None`` for CLS,
        or a patch ``(row, col)``).
    explorer
        An :class:`Explorer` of the same capture to follow.
    tile
        Height of one tile in pixels (the width follows the output area).
    opacity
        Heatmap opacity over the image.
    export_dir
        The only directory the "Save as" box writes into (default: the working directory).

    Examples
    --------
    >>> import numpy as np, timm, vitlens as vl
    >>> model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=3, depth=2)
    >>> cap = vl.capture(model, np.random.default_rng(0).random((1, 32, 32, 3)))
    >>> vl.ModelView(cap).tile_maps().shape  # (layer, head, row, col)
    (2, 3, 4, 4)
    """

    export_name = "vitlens-model-view.png"

    def __init__(
        self,
        cap: xr.DataTree,
        *,
        sample: int = 0,
        layer: int | None = None,
        query: Query | str = "default",
        explorer: Any = None,
        tile: int = 64,
        opacity: float = 0.7,
        export_dir: str | os.PathLike | None = None,
    ) -> None:
        super().__init__()
        layer = self._init_capture(cap, layer, sample)
        info = self.layout_info
        self.layer, self.sample, self.opacity = layer, sample, opacity
        self.query = initial_query(info, query)
        self.heads = {s.index: tuple(range(s.num_heads)) for s in info.stages}
        gh, gw = info.grid
        self.factor = max(1, -(-max(gh, gw) // MAX_CELLS))
        self.cells = (gh // self.factor, gw // self.factor)
        self.num_heads = max(s.num_heads for s in info.stages)
        self.tile_px = max(1, round(tile / self.cells[0]))  # image pixels per cell in the mosaic
        self.sample_select = sample_dropdown(sample_options(self.cap), sample)
        self.opacity_slider = opacity_slider(opacity)
        self._link_control(self.sample_select, "sample")
        self._link_control(self.opacity_slider, "opacity")
        exporter = self._text_controls(export_dir)
        if explorer is not None:
            self.link(explorer, ["sample", "layer", "query"])

        self._draw_first_view(self._figure(tile))
        self.figure.data[1].on_click(self._clicked)
        self.observe(lambda _: self.refresh(), ["sample", "query"])
        self.observe(lambda _: self._outline(), "layer")
        self.observe(self._on_opacity, "opacity")
        self.children = [widgets.HBox([self.sample_select, self.opacity_slider],
                                      layout=widgets.Layout(align_items="center", flex_flow="row wrap")),
                         self.figure, self.caption, exporter.box, self.probe]
        self.add_class("vitlens-model-view")

    # -- geometry of the mosaic ------------------------------------------------------------------
    @property
    def _pitch(self) -> tuple[int, int]:
        """Cells from one tile to the next (a one-cell gap between tiles)."""
        return self.cells[0] + 1, self.cells[1] + 1

    def _figure(self, tile: int) -> go.Figure:
        info = self.layout_info
        L, H = len(info.layers), self.num_heads
        (ch, cw), (py, px), p = self.cells, self._pitch, self.tile_px
        height_px, width_px = (L * py - 1) * p, (H * px - 1) * p
        fig = go.Figure()
        fig.add_trace(go.Image(source="", x0=0, dx=1, y0=0, dy=1, hoverinfo="skip", name="image"))
        fig.add_trace(go.Heatmap(z=with_gaps(np.full((L * py - 1, H * px - 1), np.nan)), x0=(p - 1) / 2, dx=p, y0=(p - 1) / 2,
                                 dy=p, colorscale=COLORSCALE, zmin=0, zmax=1, opacity=self.opacity, hoverongaps=False,
                                 colorbar=dict(title=dict(text="scaled 0–1", side="right"), thickness=10,
                                               tickvals=[0, 0.5, 1], len=0.6),
                                 hovertemplate="%{text}<br>%{z:.3f}<extra></extra>", text=self._hover_text(), name="maps"))
        fig.add_scatter(x=[], y=[], mode="lines", line=dict(color="#00e5ff", width=2), hoverinfo="skip", name="layer")
        yt = [(li * py + ch / 2) * p - 0.5 for li in range(L)]
        xt = [(h * px + cw / 2) * p - 0.5 for h in range(H)]
        fig.update_layout(
            height=max(240, L * (tile + tile // 8) + 70), autosize=True, margin=dict(l=70, r=10, t=40, b=10),
            xaxis=dict(range=[-0.5, width_px - 0.5], tickvals=xt, ticktext=[f"head {h}" for h in range(H)],
                       side="top", showgrid=False, zeroline=False, constrain="domain", tickfont=dict(size=10)),
            yaxis=dict(range=[height_px - 0.5, -0.5], tickvals=yt, ticktext=[f"block {l}" for l in info.layers],
                       showgrid=False, zeroline=False, scaleanchor="x", constrain="domain", tickfont=dict(size=10)),
            showlegend=False, dragmode=False, hovermode="closest", paper_bgcolor="white", plot_bgcolor="white",
            font=dict(size=11),
        )
        return fig

    def _hover_text(self) -> list[list[str]]:
        info = self.layout_info
        (py, px), f = self._pitch, self.factor
        rows, cols = len(info.layers) * py - 1, self.num_heads * px - 1
        return [[f"block {info.layers[r // py]}, head {c // px}, patch ({(r % py) * f}, {(c % px) * f})"
                 for c in range(cols)] for r in range(rows)]

    def _mosaic_image(self) -> np.ndarray:
        from PIL import Image

        info = self.layout_info
        (ch, cw), (py, px), p = self.cells, self._pitch, self.tile_px
        pixels = (np.clip(self.image(), 0, 1) * 255 + 0.5).astype(np.uint8)
        small = np.asarray(Image.fromarray(pixels).resize((cw * p, ch * p), Image.BILINEAR))
        out = np.full(((len(info.layers) * py - 1) * p, (self.num_heads * px - 1) * p, 3), 255, dtype=np.uint8)
        for li, l in enumerate(info.layers):
            for h in range(info.stage_of(l).num_heads):
                out[li * py * p:(li * py + ch) * p, h * px * p:(h * px + cw) * p] = small
        return out

    # -- the maps -----------------------------------------------------------------------------------
    def tile_maps(self) -> np.ndarray:
        """The maps shown, ``(layer, head, rows, cols)`` in [0, 1]; NaN where a stage has no such head."""
        z = np.asarray(self.figure.data[1].z, dtype=np.float64)
        (ch, cw), (py, px) = self.cells, self._pitch
        L, H = len(self.layout_info.layers), self.num_heads
        return np.stack([np.stack([z[li * py:li * py + ch, h * px:h * px + cw] for h in range(H)]) for li in range(L)])

    def _compute(self) -> np.ndarray:
        info = self.layout_info
        (ch, cw), (py, px) = self.cells, self._pitch
        z = np.full((len(info.layers) * py - 1, self.num_heads * px - 1), np.nan)
        for li, l in enumerate(info.layers):
            maps = pooled(head_attention(self.cap, info, self.sample, l, self.query), self.factor)
            for h, m in enumerate(maps):
                z[li * py:li * py + ch, h * px:h * px + cw] = normalized(m)
        return z

    def refresh(self) -> None:
        """Recompute every tile for the sample and query; one batched update."""
        if not self._ready:
            return
        z = self._compute()
        with self.figure.batch_update():
            self.figure.data[0].source = image_uri(self._mosaic_image() / 255.0)
            self.figure.data[1].z = with_gaps(z)  # gaps between tiles: None, never NaN (JSON)
        self.caption.value = escape(
            f"Row = block, column = head. Each tile: the image under where {captions.query_text(self.query)} looks "
            f"(scaled to [0, 1] per tile). Click a patch in a tile to make it the query and that block the layer.")
        self.version += 1
        self._outline()

    def _outline(self) -> None:
        info = self.layout_info
        (py, px), p = self._pitch, self.tile_px
        li = info.layers.index(self.layer)
        y0, y1 = li * py * p - p / 2 - 0.5, (li * py + self.cells[0]) * p + p / 2 - 0.5
        x0, x1 = -p / 2 - 0.5, (self.num_heads * px - 1) * p + p / 2 - 0.5
        self.figure.data[2].update(x=[x0, x1, x1, x0, x0], y=[y0, y0, y1, y1, y0])
        self._probe()

    def _probe(self) -> None:
        query = "cls" if self.query is None else f"{self.query[0]},{self.query[1]}"
        self.probe.value = probe_text(v=self.version, layer=self.layer, sample=self.sample, query=query)

    def _on_opacity(self, change: Any) -> None:
        self.figure.data[1].opacity = self.opacity

    def _clicked(self, trace: Any, points: Any, state: Any) -> None:
        if not points.xs:
            return
        info = self.layout_info
        (py, px), p, f = self._pitch, self.tile_px, self.factor
        col, row = int(points.xs[0] // p), int(points.ys[0] // p)
        li, r, c = row // py, row % py, col % px
        if li >= len(info.layers) or r >= self.cells[0] or c >= self.cells[1]:
            return  # a gap between tiles
        self.layer = info.layers[li]
        self.query = (min(r * f + f // 2, info.grid[0] - 1), min(c * f + f // 2, info.grid[1] - 1))

    # -- export ----------------------------------------------------------------------------------------
    def context(self) -> str:
        return f"{super().context()} · {captions.query_text(self.query)}"

    def export_panels(self) -> list[dict]:
        info = self.layout_info
        maps = self.tile_maps()
        panels = []
        for li, l in enumerate(info.layers):
            for h in range(self.num_heads):
                m = maps[li, h]
                panels.append({**self._overlay_panel(np.nan_to_num(m), f"b{l} h{h}"),
                               **({} if np.isfinite(m).all() else {"image": None, "overlay": None})})
        return panels

    def export_figure(self, **options: Any) -> Any:
        options.setdefault("ncols", self.num_heads)
        return super().export_figure(**options)

