"""Small ipywidgets pieces shared by the widgets: head toggles, class choices, probes."""

from __future__ import annotations

from collections.abc import Callable

import ipywidgets as widgets
import numpy as np
import xarray as xr

from .layout import CaptureLayout
from .text import HTMLText, html_text, markup


class HeadToggles:
    """One toggle button per head of every stage, plus "all" and "none".

    Only the current stage's toggles are shown (:attr:`box`). A selected head is
    a filled blue button, a deselected one a plain light-grey button,
    and the label counts the selection ("Heads 2/3"). ``on_change(choice)`` is
    called once per user action (a toggle, or all/none), never per button;
    :meth:`set_choice` updates the buttons quietly (a linked widget changed the heads).
    """

    def __init__(self, layout: CaptureLayout, choice: dict[int, frozenset[int]],
                 on_change: Callable[[dict[int, frozenset[int]]], None]) -> None:
        self.layout = layout
        self.on_change = on_change
        self._quiet = False
        self.stage = layout.first.index
        self.toggles: dict[int, list[widgets.ToggleButton]] = {}
        for stage in layout.stages:
            row = []
            for h in range(stage.num_heads):
                t = widgets.ToggleButton(
                    value=h in choice[stage.index], description=str(h), tooltip=f"head {h} of stage {stage.index}",
                    layout=widgets.Layout(width="36px", padding="0px", margin="1px"),
                )
                t.add_class("vitlens-head-toggle")
                t.add_class(f"vitlens-head-{h}")
                style(t)
                t.observe(self._toggled, "value")
                row.append(t)
            self.toggles[stage.index] = row
        self.all_button = widgets.Button(description="all", tooltip="select every head of this stage",
                                         layout=widgets.Layout(width="auto", padding="0 10px", margin="1px 1px 1px 6px"))
        self.none_button = widgets.Button(description="none", tooltip="deselect every head of this stage",
                                          layout=widgets.Layout(width="auto", padding="0 10px", margin="1px"))
        self.all_button.add_class("vitlens-heads-all")
        self.none_button.add_class("vitlens-heads-none")
        self.all_button.on_click(lambda _: self.set_stage(self.stage, range(self._num_heads)))
        self.none_button.on_click(lambda _: self.set_stage(self.stage, ()))
        self.label = html_text(css="vitlens-heads-label", width="auto", margin="0 6px 0 0")
        self.box = widgets.HBox(layout=widgets.Layout(flex_flow="row wrap", align_items="center"))
        self.show(self.stage)

    @property
    def _num_heads(self) -> int:
        return len(self.toggles[self.stage])

    def choice(self) -> dict[int, frozenset[int]]:
        return {s: frozenset(h for h, t in enumerate(row) if t.value) for s, row in self.toggles.items()}

    def show(self, stage: int) -> None:
        """Show the toggles of ``stage``."""
        self._count()
        if stage == self.stage and self.box.children:
            return
        self.stage = stage
        self._count()
        self.box.children = [self.label, *self.toggles[stage], self.all_button, self.none_button]

    def _count(self) -> None:
        on = sum(t.value for t in self.toggles[self.stage])
        self.label.value = markup("Heads <b>{}</b>/{}", on, self._num_heads)

    def set_choice(self, choice: dict[int, frozenset[int]]) -> None:
        """Show ``choice`` without calling ``on_change``."""
        self._quiet = True
        try:
            for s, row in self.toggles.items():
                for h, t in enumerate(row):
                    t.value = h in choice[s]
        finally:
            self._quiet = False
        self._count()

    def set_stage(self, stage: int, heads) -> None:
        """Select exactly ``heads`` in ``stage``; one ``on_change`` call."""
        wanted = {int(h) for h in heads}
        choice = self.choice()
        choice[stage] = frozenset(wanted)
        self.set_choice(choice)
        self.on_change(self.choice())

    def toggle(self, stage: int, head: int) -> None:
        t = self.toggles[stage][head]
        t.value = not t.value  # observer calls on_change

    def _toggled(self, change) -> None:
        style(change["owner"])
        if not self._quiet:
            self._count()
            self.on_change(self.choice())


def style(toggle: widgets.ToggleButton) -> None:
    """A selected head: filled blue ("primary"); a deselected one: the plain style."""
    toggle.button_style = "primary" if toggle.value else ""


def top_classes(cap: xr.DataTree, sample: int, k: int = 5) -> list[tuple[int, str, float]]:
    """The ``k`` most probable classes of one sample: ``(class, name, probability)``.

    Examples
    --------
    >>> import numpy as np, xarray as xr
    >>> t = xr.DataTree(xr.Dataset({"logits": (("sample", "class"), np.array([[0.0, 2.0, 1.0]]))},
    ...                            coords={"class_name": ("class", ["a", "b", "c"])}))
    >>> [c for c, _, _ in top_classes(t, 0, 2)]
    [1, 2]
    """
    logits = np.asarray(cap["logits"].isel(sample=sample).values, dtype=np.float64)
    p = np.exp(logits - logits.max())
    p /= p.sum()
    names = cap["class_name"].values
    order = np.argsort(-p, kind="stable")[:k]
    return [(int(c), str(names[c]), float(p[c])) for c in order]


def class_label(name: str, p: float) -> str:
    return f"{name} · {100 * p:.1f} %"


def layer_slider(layout: CaptureLayout, value: int) -> widgets.IntSlider:
    """The "Layer" slider over every block of the capture (global block indices)."""
    layers = layout.layers
    slider = widgets.IntSlider(value=value, min=layers[0], max=layers[-1], step=1, description="Layer",
                               continuous_update=True, layout=widgets.Layout(width="340px"))
    slider.add_class("vitlens-layer")
    return slider


def sample_options(cap: xr.DataTree, extra: list[str] | None = None) -> list[tuple[str, int]]:
    """The "Sample" selector's choices: ``"3"``, or ``"3: cat.jpg"`` for an image read from a file
    (its ``source``), and ``extra[i]`` if given (``"3: cat.jpg · tabby"``, the predicted class).

    A dropdown shows its labels as text, never as HTML, so a file name is shown as written.

    Examples
    --------
    >>> import xarray as xr
    >>> cap = xr.DataTree(xr.Dataset(coords={"sample": [0, 1], "source": ("sample", ["dir/a.png", ""])}))
    >>> sample_options(cap)
    [('0: a.png', 0), ('1', 1)]
    """
    from ..capture.images import sample_sources
    from ..figures import file_label

    n = int(cap["sample"].size)
    sources = sample_sources(cap) or [""] * n
    options = []
    for i in range(n):
        parts = [*([file_label(sources[i], 40)] if sources[i] else []), *([extra[i]] if extra else [])]
        options.append((f"{i}: {' · '.join(parts)}" if parts else str(i), i))
    return options


def sample_dropdown(options: list, value: int, width: str = "160px") -> widgets.Dropdown:
    """The "Sample" selector, hidden when the capture holds one image."""
    dropdown = widgets.Dropdown(options=options, value=value, description="Sample",
                                layout=widgets.Layout(width=width, display=None if len(options) > 1 else "none"))
    dropdown.add_class("vitlens-sample")
    return dropdown


def opacity_slider(value: float) -> widgets.FloatSlider:
    """Heatmap opacity over the image."""
    slider = widgets.FloatSlider(value=value, min=0.0, max=1.0, step=0.05, description="Opacity",
                                 readout_format=".2f", layout=widgets.Layout(width="280px"))
    slider.add_class("vitlens-opacity")
    return slider


def probe(css_class: str) -> HTMLText:
    """A hidden text widget whose content tests (and curious users) can read in the page.

    Set it with :func:`probe_text`.
    """
    return html_text(css=css_class, display="none")


def probe_text(**fields: object) -> str:
    """A probe's value: ``key=value`` pairs separated by spaces, escaped.

    Examples
    --------
    >>> probe_text(layer=3, query="cls")
    'layer=3 query=cls'
    """
    return markup(" ".join(f"{k}={{}}" for k in fields), *fields.values())
