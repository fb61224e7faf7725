"""What every vitlens widget shares: its capture, linkable traits, class choice, overlays and export.

:class:`CaptureView` holds the state as *traitlets* (``sample``, ``layer``,
``opacity``, ``smooth``; the attention views add ``query`` and ``heads``), so
that two widgets follow each other with plain ``traitlets.link`` (see
:func:`link`). The controls a widget shows are linked to these traits too.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import ipywidgets as widgets
import numpy as np
import traitlets
import xarray as xr

from ..errors import ImageProcessorWarning, OptionError
from .controls import class_label, layer_slider, opacity_slider, probe, sample_dropdown, sample_options, top_classes
from .export import ExportControls
from .figure import (as_widget, grid_height, grid_shape, heatmap_trace, image_trace, image_uri, live_title, set_grid,
                     title_chars, zsmooth)
from ..capture.attrs import json_attr
from ..capture.layout import capture_options
from .layout import CaptureLayout, Query, check_view, checked_query, explorable_layout
from .panels import PanelMaps
from .text import Markup, escape, html_text, markup

#: Traits two views of one capture can share (each widget links those both have).
LINKABLE = ("sample", "layer", "query", "heads")


def link(a: traitlets.HasTraits, b: traitlets.HasTraits, traits: Sequence[str] | None = None) -> list[traitlets.link]:
    """Link two widgets of the same capture: ``traitlets.link`` on every shared trait.

    By default the traits both widgets have among ``sample``, ``layer``, ``query``
    and ``heads`` (a widget's ``linkable`` may name fewer: the head atlas, a view of
    a dataset, links no ``sample``); ``b`` takes ``a``'s values first. Returns the
    links (``l.unlink()`` undoes one). Both widgets show one capture, except that
    a :class:`~vitlens.widgets.HeadAtlas` links to a widget of any capture of the
    same model (same blocks, heads and grids).

    Examples
    --------
    >>> import numpy as np, timm, vitlens as vl
    >>> model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=3)
    >>> cap = vl.capture(model, np.random.default_rng(0).random((1, 32, 32, 3)))
    >>> ex, grid = vl.Explorer(cap), vl.HeadGrid(cap)
    >>> links = vl.widgets.link(ex, grid)
    >>> ex.layer = 1
    >>> grid.layer
    1
    """
    if getattr(a, "cap", None) is not getattr(b, "cap", None) and not _same_model(a, b):
        raise OptionError("link widgets of the same capture (make both from one cap); the head atlas links to a "
                          "widget of any capture of the same model.")
    shared = [t for t in LINKABLE if t in getattr(a, "linkable", LINKABLE) and t in getattr(b, "linkable", LINKABLE)]
    names = [t for t in (traits or shared) if a.has_trait(t) and b.has_trait(t)]
    if traits is not None and len(names) != len(traits):
        missing = sorted(set(traits) - set(names))
        raise OptionError(f"cannot link {missing}: not a trait of both widgets (shared: {names}).")
    return [traitlets.link((a, t), (b, t)) for t in names]


def _same_model(a: Any, b: Any) -> bool:
    """Whether one of two widgets links across captures (the head atlas of a store) and both show
    the same blocks, heads and token grids: their layer, query and heads then mean the same."""
    if not (getattr(a, "links_across_captures", False) or getattr(b, "links_across_captures", False)):
        return False
    la, lb = getattr(a, "layout_info", None), getattr(b, "layout_info", None)
    if la is None or lb is None:
        return False
    return [(s.layers, s.num_heads, s.grid) for s in la.stages] == [(s.layers, s.num_heads, s.grid) for s in lb.stages]


def export_title(title: str) -> str:
    r"""A panel title for a static figure: its details on a second line, so neighbours do not overlap.

    Examples
    --------
    >>> export_title("attention · block 3 · CLS"), export_title("attention<br>block 3 · CLS")
    ('attention · block 3\nCLS', 'attention · block 3\nCLS')
    """
    parts = str(title).replace("<br>", " · ").split(" · ")
    return " · ".join(parts[:2]) + ("\n" + " · ".join(parts[2:]) if len(parts) > 2 else "")


def softmax(logits: np.ndarray) -> np.ndarray:
    logits = np.asarray(logits, dtype=np.float64)
    p = np.exp(logits - logits.max())
    return p / p.sum()


class ClassChoice:
    """The class a widget explains, per sample, and the recaptures another class needs.

    A class other than the captured target needs the model: that sample is
    captured again with ``target=class`` (once; kept in a small cache).
    """

    def __init__(self, cap: xr.DataTree, model: Any, *, description: str = "Class", css: str = "vitlens-class") -> None:
        self.cap = cap
        self.model = model
        self.names = [str(n) for n in cap["class_name"].values]
        self.targets = {s: int(t) for s, t in enumerate(np.asarray(cap["target"].values))}
        self.recaptures = PanelMaps(size=4)
        self.intervention: Any = None  # applied to every recapture (the Explorer's ablate mode)
        self.captured = _captured_intervention(cap, model)  # the one the capture itself was made with
        self._intervention_key: Any = None
        self._keep: Any = None  # () -> the groups a recapture stores (None: as the capture did)
        self.dropdown = widgets.Dropdown(description=description, layout=widgets.Layout(width="250px"))
        self.dropdown.add_class(css)
        self.status = html_text(css=f"{css}-status", margin="0 8px")
        if model is None:
            self.dropdown.disabled = True
            self.dropdown.tooltip = ("Explaining another class needs the model: pass it as the second argument, "
                                     "e.g. vl.Explorer(cap, model). Class-agnostic panels do not depend on it.")
        else:
            self.dropdown.tooltip = "Explain another class (recaptures this sample once with target=class)"

    def options(self, sample: int, current: int) -> list[tuple[str, int]]:
        """The top-5 classes of ``sample``, plus ``current`` if it is not among them."""
        options = [(class_label(n, p), c) for c, n, p in top_classes(self.cap, sample, 5)]
        if current not in [c for _, c in options]:
            options.append((f"{self.names[current]} (target)", current))
        return options

    def probability(self, sample: int, c: int) -> float:
        return float(softmax(self.cap["logits"].isel(sample=sample).values)[c])

    def set_intervention(self, intervention: Any, keep: Any = None) -> None:
        """Recapture with ``intervention`` (an ablation) from now on, storing the groups ``keep()``
        returns when it runs (default: what the capture stored); ``None``: read the capture again."""
        self.intervention = intervention
        self._keep = keep
        self._intervention_key = None if intervention is None else intervention.digest()

    def _groups(self) -> Any:
        return None if self._keep is None else tuple(sorted(self._keep()))

    def source(self, sample: int, c: int) -> tuple[xr.DataTree, int, Any]:
        """The capture explaining class ``c`` of ``sample``, its sample index there, and a cache key."""
        if c == int(self.cap["target"].values[sample]) and self.intervention is None:
            return self.cap, sample, "capture"
        if self.model is None:
            raise OptionError("explaining another class needs the model: pass it, e.g. vl.Explorer(cap, model).")
        keep = self._groups()
        key = (sample, c, self._intervention_key, keep)
        return self.recaptures.get(key, lambda: self._recapture(sample, c, keep)), 0, key

    def _recapture(self, sample: int, c: int, keep: Any = None) -> xr.DataTree:
        import torch

        from ..capture import capture

        self.status.value = markup("capturing sample {} again to explain {}…", sample, repr(self.names[c]))
        try:
            options = capture_options(self.cap)
            image = np.asarray(self.cap["image"].isel(sample=[sample]).values, dtype=np.float32)
            # the model's input again: the picture normalised as the capture recorded (also for a model
            # captured from a tensor, without the image processor that made it)
            mean = torch.tensor(self.cap.attrs["mean"], dtype=torch.float32).view(1, 3, 1, 1)
            std = torch.tensor(self.cap.attrs["std"], dtype=torch.float32).view(1, 3, 1, 1)
            pixels = (torch.from_numpy(image).permute(0, 3, 1, 2) - mean) / std
            ids = json_attr(self.cap.attrs, "text_input_ids", [])  # image-text models: the same prompts
            text = {"text": torch.tensor(ids)} if ids else {}
            keep = keep if keep is not None else options.get("keep", "all")
            with warnings.catch_warnings():  # the capture already said how its picture was made
                warnings.simplefilter("ignore", ImageProcessorWarning)
                return capture(self.model, pixels, target=c, keep=keep,
                               grads=options.get("grads", True), progress=False,
                               intervention=self.intervention if self.intervention is not None else self.captured(),
                               **text)
        finally:
            self.status.value = ""

    def describe(self, sample: int, c: int) -> Markup:
        """The status line for class ``c`` of ``sample``: empty for the captured class as captured, else where
        it comes from (a recapture, for another class or with heads switched off)."""
        ablated = " with heads switched off" if self.intervention is not None else ""
        if c == int(self.cap["target"].values[sample]):
            return markup("sample {} captured again{}", sample, ablated) if ablated else escape("")
        return markup("sample {} captured again for {}{}", sample, repr(self.names[c]), ablated)


def _captured_intervention(cap: xr.DataTree, model: Any):
    """``() -> `` the intervention ``cap`` was made with (an ablated capture's recaptures repeat it)."""
    def rebuild():
        if model is None or not cap.attrs.get("intervention"):
            return None
        from ..capture.interventions import intervention_of
        from ..models import adapter_for

        return intervention_of(cap, adapter_for(model))

    return rebuild


class CaptureView(widgets.VBox):
    """Base of the vitlens widgets: one capture, linkable traits, overlay panels, export.

    Subclasses build ``self.figure`` with :func:`~vitlens.widgets.figure.overlay_figure`
    (``self.num_panels`` panels, images under heatmaps), keep their view in
    :meth:`refresh`, and describe it for export in :meth:`export_panels`.
    """

    sample = traitlets.Int(0)
    layer = traitlets.Int(0)
    opacity = traitlets.Float(0.6)
    smooth = traitlets.Bool(False)
    #: Incremented after every update of the view.
    version = traitlets.Int(0)

    num_panels = 0
    show_image = True
    export_name = "vitlens-view.png"
    #: Whether the constructor has built every piece: until then :meth:`refresh` draws nothing.
    _ready = False

    def _init_capture(self, cap: xr.DataTree, layer: int | None, sample: int) -> int:
        self.cap = cap
        self.layout_info: CaptureLayout = explorable_layout(cap)
        layer = check_view(self.layout_info, cap, layer, sample)
        self.class_names = [str(n) for n in cap["class_name"].values]
        self.num_samples = int(cap["sample"].size)
        return layer

    @traitlets.validate("layer")
    def _valid_layer(self, proposal: Any) -> int:
        layer = int(proposal["value"])
        self.layout_info.stage_of(layer)  # OptionError naming the layers there are
        return layer

    @traitlets.validate("sample")
    def _valid_sample(self, proposal: Any) -> int:
        sample = int(proposal["value"])
        if not 0 <= sample < self.num_samples:
            raise OptionError(f"sample={sample}: this capture has samples 0..{self.num_samples - 1}.")
        return sample

    @traitlets.validate("opacity")
    def _valid_opacity(self, proposal: Any) -> float:
        value = float(proposal["value"])
        if not 0.0 <= value <= 1.0:
            raise OptionError(f"opacity={value}: choose a value in [0, 1].")
        return value

    def link(self, other: traitlets.HasTraits, traits: Sequence[str] | None = None) -> list[traitlets.link]:
        """Follow ``other`` (same capture): :func:`link` on the shared traits; this widget takes its values."""
        self._links = link(other, self, traits)
        return self._links

    def unlink(self) -> None:
        """Undo :meth:`link` (the widget keeps its current view)."""
        for l in getattr(self, "_links", []):
            l.unlink()
        self._links = []

    # -- trace indexing -------------------------------------------------------------------
    def heatmap_trace(self, panel: int) -> int:
        """Index in ``figure.data`` of panel ``panel``'s heatmap (its image is the trace before)."""
        return heatmap_trace(panel, self.show_image)

    def heatmaps(self, figure: Any = None) -> list[Any]:
        fig = self.figure if figure is None else figure
        return [fig.data[self.heatmap_trace(i)] for i in range(self.num_panels)]

    # -- the image, opacity and smoothing of every panel ------------------------------------
    def image(self, sample: int | None = None) -> np.ndarray:
        """The input image ``(H, W, 3)`` in [0, 1] of ``sample`` (default: the current one)."""
        s = self.sample if sample is None else sample
        return np.asarray(self.cap["image"].isel(sample=s).values, dtype=np.float32)

    def _show_image(self, figures: Iterable[Any]) -> None:
        uri = image_uri(self.image())
        for fig in figures:
            with fig.batch_update():
                for i in range(self._panels_in(fig)):
                    fig.data[image_trace(i)].source = uri

    def _style_heatmaps(self, figures: Iterable[Any]) -> None:
        for fig in figures:
            with fig.batch_update():
                for i in range(self._panels_in(fig)):
                    trace = fig.data[self.heatmap_trace(i)]
                    trace.opacity = self._opacity_of(i, fig)
                    trace.zsmooth = zsmooth(self.smooth)

    def _panels_in(self, fig: Any) -> int:
        return self.num_panels

    # -- the grid of panels follows the width the page draws the figure at --------------------
    #: The most panels a row when the widget chooses (None: as many as fit).
    max_cols: int | None = None

    def _init_grid(self, cols: int | None, height: int | None, default_cols: int) -> tuple[int, int]:
        """The first grid: ``cols`` if given (then fixed), else ``default_cols`` until the page reports its width."""
        self._cols_override, self._height_override = cols, height
        cols = default_cols if cols is None else cols
        cols = max(1, min(int(cols), self.num_panels))
        self.grid = (-(-self.num_panels // cols), cols)
        self._title_chars: int | None = None
        self._titles: list[str] = []
        return self.grid

    def follow_width(self, width: float) -> None:
        """Fit the panels to a figure drawn ``width`` pixels wide (the page reports it; tests call it).

        Below :data:`~vitlens.widgets.figure.MIN_PANEL_PX` per panel the panels wrap
        into more rows (the Explorer's 4 panels: 2 × 2 at a 388-px output); titles are
        shortened to their panel's width, so neighbours never overlap. ``cols=``
        given to the widget fixes the grid.
        """
        if self._cols_override is not None:
            rows, cols = self.grid
        else:
            rows, cols = grid_shape(self.num_panels, width)
            if self.max_cols is not None and cols > self.max_cols:
                cols = self.max_cols
                rows = -(-self.num_panels // cols)
        chars = title_chars(width, cols)
        if (rows, cols) != self.grid:
            set_grid(self.figure, self.num_panels, rows, cols, self._height_override or grid_height(rows, cols, width))
            self.grid = (rows, cols)
        if chars != self._title_chars:
            self._title_chars = chars
            with self.figure.batch_update():
                for ann, text in zip(self.figure.layout.annotations, self._titles, strict=False):
                    ann.text = live_title(text, chars)

    def _follow_page_width(self) -> None:
        if hasattr(self.figure, "on_page_width"):  # vitlens' plotly widget (a plain FigureWidget says nothing)
            self.figure.on_page_width(self.follow_width)

    def _opacity_of(self, panel: int, fig: Any) -> float:
        return self.opacity

    def _on_class(self, change: Any) -> None:
        """A widget with a :class:`ClassChoice` (``self.classes``) explains the class chosen in its drop-down."""
        if self._hold or change["new"] is None or self.model is None:
            return
        self.classes.targets[self.sample] = int(change["new"])
        self.export_status.value = ""
        self.refresh()

    # -- controls linked to the traits ---------------------------------------------------------
    def _link_control(self, control: widgets.Widget, trait: str) -> None:
        widgets.link((self, trait), (control, "value"))

    def _view_controls(self) -> None:
        """The layer slider, sample drop-down, opacity slider and smooth toggle, each linked to its trait."""
        self.layer_slider = layer_slider(self.layout_info, self.layer)
        self.sample_select = sample_dropdown(sample_options(self.cap), self.sample)
        self.opacity_slider = opacity_slider(self.opacity)
        for control, trait in ((self.layer_slider, "layer"), (self.sample_select, "sample"),
                               (self.opacity_slider, "opacity")):
            self._link_control(control, trait)
        self.smooth_toggle = self._smooth_toggle()

    def _smooth_toggle(self) -> widgets.Checkbox:
        box = widgets.Checkbox(value=self.smooth, description="smooth", indent=False,
                               tooltip="bilinear overlay instead of one block per token",
                               layout=widgets.Layout(width="auto", margin="0 8px"))
        box.add_class("vitlens-smooth")
        self._link_control(box, "smooth")
        return box

    # -- export --------------------------------------------------------------------------------
    def _export_controls(self, export_dir: str | os.PathLike | None) -> ExportControls:
        self.exporter = ExportControls(self.save, export_dir, self.export_name)
        self.filename = self.exporter.filename
        self.export_button = self.exporter.button
        self.export_status = self.exporter.status
        return self.exporter

    def _text_controls(self, export_dir: str | os.PathLike | None) -> ExportControls:
        """What goes under the figure: the captions line, the hidden probe and the export box."""
        self.caption = html_text(css="vitlens-captions")
        self.probe = probe("vitlens-probe")
        return self._export_controls(export_dir)

    def _draw_first_view(self, fig: Any) -> None:
        """Draw the first view into the plain figure ``fig``, then make it the live widget ``self.figure``."""
        self.figure = fig
        self._ready = True
        self.refresh()
        self.figure = as_widget(fig)
        self.figure.add_class("vitlens-figure")

    @property
    def export_dir(self) -> Path:
        """Where the "Save as" box writes (set in code: ``export_dir=`` or this attribute)."""
        return self.exporter.directory

    @export_dir.setter
    def export_dir(self, value: str | os.PathLike) -> None:
        self.exporter.directory = Path(value)

    def context(self) -> str:
        """Model, sample, class and probability of the current view (the export's title)."""
        model = str(self.cap.attrs.get("model", "model"))
        c, name, p = top_classes(self.cap, self.sample, 1)[0]
        return f"{model} · sample {self.sample} · predicted {name!r} (p = {p:.2f})"

    def export_panels(self) -> list[dict]:
        """The current view as :func:`vitlens.figures.render_panels` panels."""
        raise NotImplementedError

    def export_figure(self, **options: Any) -> Any:
        """The current view as a static matplotlib figure (no browser), titled with :meth:`context`."""
        from ..figures import figure_title, render_panels

        return render_panels(self.export_panels(), suptitle=figure_title(self.cap, self.context()), **options)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the current view to ``path`` (``.png``, ``.svg`` or ``.pdf``; matplotlib, no browser).

        From Python any path works; the "Save as" box only writes into ``export_dir``.

        Examples
        --------
        >>> widget.save("view.pdf")  # doctest: +SKIP
        PosixPath('view.pdf')
        """
        import matplotlib.pyplot as plt

        from ..figures import save

        fig = self.export_figure()
        try:
            return save(fig, path)
        finally:
            plt.close(fig)

    def _overlay_panel(self, z: Any, title: str) -> dict:
        return {"image": self.image(), "overlay": np.asarray(z, dtype=np.float32), "title": export_title(title),
                "cmap": "inferno", "vmin": 0.0, "vmax": 1.0, "alpha": float(self.opacity), "smooth": bool(self.smooth)}


class QueryView(CaptureView):
    """A view of one query token, a linkable trait."""

    #: The query patch ``(row, col)`` on the first-stage grid, or ``None`` for CLS.
    query = traitlets.Any(None, allow_none=True)

    @traitlets.validate("query")
    def _valid_query(self, proposal: Any) -> Query:
        return checked_query(self.layout_info, proposal["value"])


class AttentionView(QueryView):
    """A view of attention, with the query token and the selected heads as linkable traits."""

    #: Selected heads per stage index, ``{stage: (head, ...)}``.
    heads = traitlets.Dict()

    @traitlets.validate("heads")
    def _valid_heads(self, proposal: Any) -> dict[int, tuple[int, ...]]:
        from .layout import parse_heads

        value = dict(proposal["value"])
        for s in self.layout_info.stages:
            value.setdefault(s.index, tuple(range(s.num_heads)))
        return {k: tuple(sorted(v)) for k, v in parse_heads(self.layout_info, value).items()}

    def head_choice(self) -> dict[int, frozenset[int]]:
        return {int(s): frozenset(h) for s, h in self.heads.items()}

    @property
    def selected_heads(self) -> dict[int, list[int]]:
        """Selected heads per stage index."""
        return {s: sorted(h) for s, h in self.heads.items()}

