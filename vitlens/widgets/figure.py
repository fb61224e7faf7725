"""Plotly figures of the widgets: the input image under a heatmap, and static export.

Each panel is two traces on one pair of axes in *pixel* coordinates: a
``go.Image`` of the input (sent once, as a compressed data URI) and a
``go.Heatmap`` of the token-grid map, its cells centred on their patches. All
heatmaps share one colour axis (``coloraxis``: [0, 1], one colour bar), which is
why every panel shows a min-max normalised map.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import io
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from .layout import CaptureLayout
from .text import Markup, escape, join, markup

#: Colour scale shared by every panel.
COLORSCALE = "Inferno"
#: The narrowest panel (CSS pixels) a live figure draws before it wraps its panels into more rows.
MIN_PANEL_PX = 140
#: What the colour bar and the margins take of a figure's width (CSS pixels).
COLORBAR_PX = 70
#: Average width of one title character at the live figures' 11 px font (CSS pixels).
TITLE_CHAR_PX = 6.6


def grid_shape(n: int, width: float, min_panel: float = MIN_PANEL_PX) -> tuple[int, int]:
    """``(rows, cols)`` for ``n`` panels in an output ``width`` pixels wide.

    As many panels a row as stay at least ``min_panel`` wide, then the rows
    balanced (4 panels that do not fit in one row make 2 × 2, not 3 + 1).

    Examples
    --------
    >>> grid_shape(4, 1300), grid_shape(4, 388), grid_shape(5, 560), grid_shape(4, 150)
    ((1, 4), (2, 2), (2, 3), (4, 1))
    """
    fit = max(1, int((width - COLORBAR_PX) // min_panel))
    rows = -(-n // min(n, fit))
    return rows, -(-n // rows)


def grid_height(rows: int, cols: int, width: float | None = None) -> int:
    """The figure height (CSS pixels) of a ``rows × cols`` grid of square panels.

    One row: 300. More rows: a row per panel height (at most 250; less in a
    narrow output, whose panels are smaller) plus room for its titles.

    Examples
    --------
    >>> grid_height(1, 4), grid_height(2, 2), grid_height(2, 2, width=388)
    (300, 560, 458)
    """
    if rows == 1:
        return 300
    panel = 250 if width is None else min(250, int((width - COLORBAR_PX) / cols))
    return 60 + rows * (panel + 40) if width is not None else 60 + 250 * rows


def _grid(rows: int, cols: int, titles: Sequence[str] = ()) -> go.Figure:
    """plotly's subplot grid (domains and title annotations) for ``rows × cols`` panels."""
    return make_subplots(rows=rows, cols=cols, subplot_titles=list(titles) or None, horizontal_spacing=0.02,
                         vertical_spacing=0.1 if rows > 1 else 0.0)


def set_grid(fig: go.Figure, n: int, rows: int, cols: int, height: int) -> None:
    """Move the ``n`` panels of an :func:`overlay_figure` onto a ``rows × cols`` grid (one batched update).

    Panel ``i`` goes to row ``i // cols``, column ``i % cols``; its title stays at
    its panel's top left corner.
    """
    template = _grid(rows, cols).layout
    with fig.batch_update():
        for i in range(n):
            suffix = "" if i == 0 else str(i + 1)
            x, y = template[f"xaxis{suffix}"].domain, template[f"yaxis{suffix}"].domain
            fig.layout[f"xaxis{suffix}"].domain = x
            fig.layout[f"yaxis{suffix}"].domain = y
            fig.layout.annotations[i].update(x=x[0], y=y[1])
        fig.layout.height = height


def image_uri(image: np.ndarray) -> str:
    """An RGB image ``(H, W, 3)`` in [0, 1] as a data URI (PNG up to 96 px, else JPEG).

    Examples
    --------
    >>> image_uri(np.zeros((4, 4, 3)))[:22]
    'data:image/png;base64,'
    """
    from PIL import Image

    pixels = (np.clip(np.asarray(image, dtype=np.float32), 0, 1) * 255 + 0.5).astype(np.uint8)
    buf = io.BytesIO()
    if max(pixels.shape[:2]) <= 96:
        Image.fromarray(pixels).save(buf, format="PNG")
        kind = "png"
    else:
        Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
        kind = "jpeg"
    return f"data:image/{kind};base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def overlay_figure(
    layout: CaptureLayout,
    titles: Sequence[str],
    uri: str,
    *,
    cols: int,
    height: int,
    width: int | None = None,
    opacity: float = 0.6,
    colorbar: bool = True,
    show_image: bool = True,
    smooth: bool = False,
) -> go.Figure:
    """A figure with one image+heatmap panel per title (fill it, then :func:`as_widget`).

    Trace ``2·i`` is panel ``i``'s image, trace ``2·i + 1`` its heatmap (without
    the image: trace ``i`` is the heatmap; see :func:`heatmap_trace`). Axes are
    in pixels, y pointing down. ``width=None`` (the default) lets the figure
    fill the width of the output area it is drawn in (and follow the window's
    size); the panels keep their aspect ratio inside it.
    """
    n = len(titles)
    rows = -(-n // cols)
    fig = _grid(rows, cols, titles)
    h, w = layout.input_size
    sy, sx = layout.stride
    gh, gw = layout.grid
    zeros = np.zeros((gh, gw), dtype=np.float32)
    for i in range(n):
        r, c = divmod(i, cols)
        if show_image:
            fig.add_trace(go.Image(source=uri, x0=0, dx=1, y0=0, dy=1, hoverinfo="skip", name="image"),
                          row=r + 1, col=c + 1)
        fig.add_trace(
            go.Heatmap(
                z=zeros, x0=(sx - 1) / 2, dx=sx, y0=(sy - 1) / 2, dy=sy, coloraxis="coloraxis",
                opacity=opacity if show_image else 1.0, name=str(titles[i]), zsmooth=zsmooth(smooth),
                hovertemplate="row %{customdata[0]}, col %{customdata[1]}<br>%{z:.3f}<extra></extra>",
                customdata=np.stack(np.meshgrid(np.arange(gh), np.arange(gw), indexing="ij"), -1),
            ),
            row=r + 1, col=c + 1,
        )
    axes = {}
    for i in range(n):
        suffix = "" if i == 0 else str(i + 1)
        axes[f"xaxis{suffix}"] = dict(range=[-0.5, w - 0.5], visible=False, constrain="domain")
        axes[f"yaxis{suffix}"] = dict(range=[h - 0.5, -0.5], visible=False, scaleanchor=f"x{suffix}",
                                      constrain="domain", constraintoward="top")  # panels right under their titles
    fig.update_layout(
        width=width, height=height, autosize=width is None, margin=dict(l=4, r=4, t=46, b=4, autoexpand=True),
        coloraxis=dict(colorscale=COLORSCALE, cmin=0, cmax=1, showscale=colorbar,
                       colorbar=dict(title=dict(text="scaled 0–1", side="right"), thickness=10, len=0.9,
                                     xpad=6, tickvals=[0, 0.5, 1], tickfont=dict(size=10))),
        showlegend=False, dragmode=False, hovermode="closest", font=dict(size=11),
        paper_bgcolor="white", plot_bgcolor="white", **axes,
    )
    for i, ann in enumerate(fig.layout.annotations):  # titles start at their panel's left edge: never clipped
        axis = fig.layout[f"xaxis{'' if i == 0 else i + 1}"]
        ann.update(x=axis.domain[0], xanchor="left", align="left", font=dict(size=11), text=live_title(ann.text))
    return fig


def live_title(title: str, chars: int | None = None) -> Markup:
    """A panel title for the live figure: its name on one line, block and details on a second.

    ``chars``: the most characters a line may have (the panel's width; longer
    lines end in "…"), so that neighbouring titles never overlap. plotly renders
    titles as (a little) HTML, so the text is escaped: a class name like
    ``<b>x</b>`` is shown as it is written.

    Examples
    --------
    >>> live_title("attention · block 3 · CLS")
    'attention<br>block 3 · CLS'
    >>> live_title("method · block 1 · class <i>")
    'method<br>block 1 · class &lt;i&gt;'
    >>> live_title("Transformer Attribution · block 11 · class hexagon", chars=16)
    'Transformer Att…<br>block 11 · clas…'
    """
    name, _, rest = str(title).partition(" · ")
    if chars is not None:
        fit = lambda line: line if len(line) <= chars else line[: max(1, chars - 1)] + "…"  # noqa: E731
        name, rest = fit(name), fit(rest)
    return join([escape(name), markup("<br>"), escape(rest)]) if rest else escape(name)


def title_chars(width: float, cols: int) -> int:
    """How many title characters fit over one of ``cols`` panels in an output ``width`` pixels wide.

    Examples
    --------
    >>> title_chars(388, 2)
    24
    """
    return max(8, int((width - COLORBAR_PX) / cols / TITLE_CHAR_PX))


def with_gaps(values: np.ndarray) -> list:
    """A heatmap's ``z`` for the page: NaN cells become ``None`` (a gap to plotly).

    Widget state travels as JSON, which has no NaN: a NaN in it makes the kernel
    print "Out of range float values are not JSON compliant" into the notebook.

    Examples
    --------
    >>> with_gaps(np.array([[0.5, np.nan]]))
    [[0.5, None]]
    """
    values = np.asarray(values, dtype=np.float64)
    return np.where(np.isfinite(values), values, None).tolist()


def heatmap_trace(panel: int, show_image: bool = True) -> int:
    """Index in ``figure.data`` of panel ``panel``'s heatmap in an :func:`overlay_figure`.

    Examples
    --------
    >>> heatmap_trace(2), heatmap_trace(2, show_image=False)
    (5, 2)
    """
    return 2 * panel + 1 if show_image else panel


def image_trace(panel: int) -> int:
    """Index in ``figure.data`` of panel ``panel``'s image (figures drawn with the image)."""
    return 2 * panel


def zsmooth(smooth: bool) -> str | bool:
    """plotly's ``zsmooth`` for token blocks (``False``) or a bilinear overlay (``"best"``)."""
    return "best" if smooth else False


#: The widgets' plotly config: no modebar (it covered the panel titles; export has its
#: own button) and a figure that follows the window's size.
PLOTLY_CONFIG = {"displayModeBar": False, "responsive": True, "scrollZoom": False, "doubleClick": False}


# plotly's FigureWidget is an anywidget whose module (~5 MB of JavaScript, all of
# plotly.js) is sent with, and compiled for, every figure; anywidget then gives each
# model 2 s to initialise before it reports "Failed to initialize model" as a page
# error. With half a dozen figures on a page (Explorer, HeadGrid, ModelView, ...)
# on a busy machine, parsing that much state alone takes longer. So vitlens wraps
# plotly's module (plotly_widget.js, package data): only the first figure of a
# kernel carries the bundle, every other figure's module is a few kilobytes, and the
# page compiles the bundle once (a promise on ``globalThis`` keyed by its hash). A
# page without the carrier (reloaded, say) asks the kernel for the bundle once, by a
# custom message answered with a binary buffer. Each model initialises at once;
# plotly's own ``initialize``/``render`` run as soon as the bundle is there (a view
# aborted meanwhile is skipped). Python → page updates only start with user actions,
# after the first render, so none is sent before plotly listens.
_SHARED_BUNDLE = "plotly_widget.js"  # beside this module; package data (pyproject.toml)
_CARRIED = {"done": False}  # whether this kernel has sent the bundle with a figure


class _CompleteOnOpen:
    """Open the widget's comm only once the figure is in its state (and the bundle arranged).

    FigureWidget opens its comm (the page's model is born from that message)
    before it assigns ``_widget_data`` and ``_widget_layout``, which then follow
    as an update. plotly's view draws whatever the model holds when it renders
    and ignores later ``_widget_data`` changes; a view that renders before that
    update is applied (quickly, once the bundle is cached) would stay empty.
    """

    _state_complete = False
    _bundle_source = ""
    _carrier_esm = ""

    def __init__(self, *args, config: dict | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if config is not None:
            self._config = dict(config)  # part of the state the comm opens with
        if not _CARRIED["done"]:
            self._esm = self._carrier_esm  # the first figure of this kernel brings the bundle
            _CARRIED["done"] = True
        self.on_msg(self._bundle_requested)
        self._state_complete = True
        self.open()

    def open(self) -> None:
        if self._state_complete:
            super().open()

    def _bundle_requested(self, widget, content, buffers) -> None:
        if isinstance(content, dict) and content.get("vitlens") == "bundle":
            self.send({"vitlens": "bundle"}, buffers=[self._bundle_source.encode("utf-8")])
        elif isinstance(content, dict) and content.get("vitlens") == "width":
            self.page_width_changed(float(content.get("width", 0)))

    #: The width (CSS pixels) the page last drew this figure at (None before the page said).
    page_width: float | None = None

    def on_page_width(self, callback) -> None:
        """Call ``callback(width)`` whenever the page draws this figure at another width."""
        self._width_callbacks = [*getattr(self, "_width_callbacks", []), callback]

    def page_width_changed(self, width: float) -> None:
        """What the page's message does (and what tests call): record the width, tell the callbacks."""
        if width <= 0 or width == self.page_width:
            return
        self.page_width = width
        # Draw at the element's width, said in the layout. Plotly's own resize gives up on a figure
        # whose layout holds both a width and a height, and a height set from here (a new grid) makes
        # plotly pin the width it had: after the page narrowed, the figure stayed at its old width.
        self.layout.width = round(width)
        for callback in getattr(self, "_width_callbacks", []):
            callback(width)


@functools.cache
def _widget_class() -> type[go.FigureWidget]:
    """A FigureWidget whose plotly bundle reaches the page once (plain FigureWidget if that cannot be done)."""
    source = getattr(go.FigureWidget, "_esm", None)
    source = str(source) if source is not None else ""
    if "export" not in source:  # not an anywidget module we know how to wrap
        return go.FigureWidget
    key = hashlib.sha1(source.encode()).hexdigest()[:16]
    template = (Path(__file__).with_name(_SHARED_BUNDLE)).read_text(encoding="utf-8").replace("__KEY__", key)
    return type("PlotlyWidget", (_CompleteOnOpen, go.FigureWidget), {
        "_esm": template.replace("__SOURCE__", "null"),
        "_carrier_esm": template.replace("__SOURCE__", json.dumps(source)),
        "_bundle_source": source,
        "__module__": __name__,
    })


def as_widget(fig: go.Figure) -> go.FigureWidget:
    """The finished figure as a FigureWidget.

    A FigureWidget syncs its full state only when it is made; later changes
    travel as messages that a page which connects afterwards (Voila renders
    after the notebook has run) or whose plotly module is still loading never
    sees. So widgets build the complete first view on a plain figure and wrap
    it here; only user actions send updates.
    """
    cls = _widget_class()
    if cls is go.FigureWidget:
        widget = cls(fig)
        widget._config = dict(PLOTLY_CONFIG)
    else:
        widget = cls(fig, config=PLOTLY_CONFIG)
    return widget
