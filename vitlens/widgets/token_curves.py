"""``vl.TokenCurves``: one token's norm and LayerNorm statistics across depth."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import ipywidgets as widgets
import numpy as np
import xarray as xr
from plotly.subplots import make_subplots

from ..errors import VitlensError
from . import captions
from .base import QueryView
from .controls import probe_text, sample_dropdown, sample_options
from .layout import Query, initial_query
from .panels import CURVES, token_curves
from .text import escape

TOKEN_COLOUR = "#d62728"
PATCH_COLOUR = "#7f7f7f"
#: Plot titles in the live widget (narrow outputs); exports use the full labels.
SHORT = {"token norm ‖x‖": "token norm ‖x‖", "LayerNorm std (norm1)": "LN std", "LayerNorm mean (norm1)": "LN mean"}


class TokenCurves(QueryView):
    """Curves across depth for the query token: its norm and its LayerNorm mean and std.

    Three small plots, block on the x axis: the norm of the token entering each
    block (``token_norm``), and the std and mean over features that the block's
    first LayerNorm normalises away (``ln_std``, ``ln_mean``). Each shows the
    selected token (solid) against the mean over all patch tokens (dashed); the
    current ``layer`` is a vertical line. Click a point to move the layer. Traits
    ``sample``, ``layer`` and ``query`` link to an :class:`Explorer`
    (``explorer=ex``): click a patch there to see its curves.

    Parameters
    ----------
    cap
        A capture with norms and LayerNorm statistics (``keep="all"``, the default).
    sample, layer, query
        Initial sample, marked block and token (``"default"``, ``None`` for CLS, or ``(row, col)``).
    explorer
        An :class:`Explorer` of the same capture to follow.
    height
        Figure height in pixels (the width follows the output area).
    export_dir
        The only directory the "Save as" box writes into (default: the working directory).

    Examples
    --------
    >>> import numpy as np, timm, vitlens as vl
    >>> model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=3, depth=2)
    >>> cap = vl.capture(model, np.random.default_rng(0).random((1, 32, 32, 3)))
    >>> curves = vl.TokenCurves(cap, query=(1, 2))
    >>> sorted(curves.curves())[0]
    'LayerNorm mean (norm1)'
    """

    export_name = "vitlens-token-curves.png"

    def __init__(
        self,
        cap: xr.DataTree,
        *,
        sample: int = 0,
        layer: int | None = None,
        query: Query | str = "default",
        explorer: Any = None,
        height: int = 260,
        export_dir: str | os.PathLike | None = None,
    ) -> None:
        super().__init__()
        layer = self._init_capture(cap, layer, sample)
        self.layer, self.sample = layer, sample
        self.query = initial_query(self.layout_info, query)
        self.sample_select = sample_dropdown(sample_options(self.cap), sample)
        self._link_control(self.sample_select, "sample")
        exporter = self._text_controls(export_dir)
        if explorer is not None:
            self.link(explorer, ["sample", "layer", "query"])
        labels = [label for _, _, label in CURVES]
        fig = make_subplots(rows=1, cols=len(labels), subplot_titles=[SHORT[label] for label in labels],
                            horizontal_spacing=0.08)
        for i in range(len(labels)):
            fig.add_scatter(x=[], y=[], mode="lines+markers", line=dict(color=TOKEN_COLOUR, width=2),
                            marker=dict(size=5), name="token", row=1, col=i + 1,
                            hovertemplate="block %{x}: %{y:.3f}<extra>token</extra>")
            fig.add_scatter(x=[], y=[], mode="lines", line=dict(color=PATCH_COLOUR, width=1.5, dash="dash"),
                            name="mean of patch tokens", row=1, col=i + 1,
                            hovertemplate="block %{x}: %{y:.3f}<extra>patch mean</extra>")
            fig.add_scatter(x=[], y=[], mode="lines", line=dict(color="#00a0c0", width=1), hoverinfo="skip",
                            name="layer", row=1, col=i + 1)
        fig.update_layout(height=height, autosize=True, margin=dict(l=40, r=10, t=40, b=30), showlegend=False,
                          dragmode=False, hovermode="closest", paper_bgcolor="white", font=dict(size=11))
        fig.update_xaxes(title_text="block", dtick=1 if len(self.layout_info.layers) <= 12 else None)
        for i, ann in enumerate(fig.layout.annotations):  # left-aligned over each plot: never clipped
            axis = fig.layout[f"xaxis{'' if i == 0 else i + 1}"]
            ann.update(x=axis.domain[0], xanchor="left", font=dict(size=11))
        self._draw_first_view(fig)
        for i in range(len(labels)):
            self.figure.data[3 * i].on_click(self._clicked)
        self.observe(lambda _: self.refresh(), ["sample", "query"])
        self.observe(lambda _: self._marker(), "layer")
        self.children = [self.sample_select, self.figure, self.caption, exporter.box, self.probe]
        self.add_class("vitlens-token-curves")

    def curves(self) -> dict[str, dict[str, np.ndarray]]:
        """The curves shown: ``{label: {"layer", "token", "patches"}}`` (empty if the capture lacks them)."""
        try:
            return token_curves(self.cap, self.layout_info, self.sample, self.query)
        except VitlensError:
            return {}

    def refresh(self) -> None:
        """Redraw the curves for the sample and token; one batched update."""
        if not self._ready:
            return
        try:
            data = token_curves(self.cap, self.layout_info, self.sample, self.query)
            message = ""
        except VitlensError as exc:
            data, message = {}, str(exc)
        fig = self.figure
        with fig.batch_update():
            for i, (_, _, label) in enumerate(CURVES):
                d = data.get(label)
                fig.data[3 * i].update(x=[] if d is None else d["layer"], y=[] if d is None else d["token"])
                fig.data[3 * i + 1].update(x=[] if d is None else d["layer"], y=[] if d is None else d["patches"])
        self._data = data
        self._marker()
        token = captions.query_text(self.query)
        self.caption.value = escape(message or (
            f"Solid: {token}; dashed: the mean over all patch tokens. Norm of the token entering each block, and "
            "the std and mean over its features that the block's first LayerNorm divides and subtracts away."))
        self.version += 1

    def _marker(self) -> None:
        fig = self.figure
        with fig.batch_update():
            for i, (_, _, label) in enumerate(CURVES):
                d = self._data.get(label)
                if d is None or not len(d["token"]):
                    fig.data[3 * i + 2].update(x=[], y=[])
                    continue
                lo = float(min(d["token"].min(), d["patches"].min()))
                hi = float(max(d["token"].max(), d["patches"].max()))
                fig.data[3 * i + 2].update(x=[self.layer, self.layer], y=[lo, hi])
        query = "cls" if self.query is None else f"{self.query[0]},{self.query[1]}"
        self.probe.value = probe_text(v=self.version, layer=self.layer, sample=self.sample, query=query)

    def _clicked(self, trace: Any, points: Any, state: Any) -> None:
        if points.xs:
            self.layer = int(round(points.xs[0]))

    # -- export: line plots, not image panels ---------------------------------------------------
    def export_figure(self, **options: Any) -> Any:
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator

        from ..figures import figure_title

        fig = Figure(figsize=(3.2 * len(CURVES), 2.8), layout="constrained")
        axes = fig.subplots(1, len(CURVES))
        for ax, (_, _, label) in zip(np.atleast_1d(axes), CURVES, strict=True):
            d = self._data.get(label)
            if d is not None:
                ax.plot(d["layer"], d["token"], "o-", color=TOKEN_COLOUR, ms=3, label=captions.query_text(self.query))
                ax.plot(d["layer"], d["patches"], "--", color=PATCH_COLOUR, label="patch mean")
                ax.axvline(self.layer, color="#00a0c0", lw=1)
            ax.set_title(label, fontsize=10)
            ax.set_xlabel("block")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        np.atleast_1d(axes)[0].legend(fontsize=8)
        fig.suptitle(figure_title(self.cap, self.context()), fontsize=10)
        return fig

    def context(self) -> str:
        return f"{super().context()} · {captions.query_text(self.query)}"

    def save(self, path: str | os.PathLike) -> Path:
        from ..figures import save

        return save(self.export_figure(), path)
