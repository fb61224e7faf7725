"""The Explorer's ablate mode: switch heads off in the model and watch the prediction and the maps change.

:class:`AblateControls` adds to an :class:`~vitlens.widgets.Explorer` one toggle
per head of the shown block (a red, crossed-out button: that head is switched
off in the model), a reset button, a mode switch, and a bar chart of the top-5
class probabilities before (grey) and after (red) the ablation. Each change
recaptures the shown image once — one forward and one backward pass with the
heads ablated (:func:`vitlens.capture` with ``ablate=``) — and every panel of the
Explorer then reads that capture. A linked :class:`~vitlens.widgets.HeadGrid`
ablates the head it is clicked on while the mode is on.
"""

from __future__ import annotations

import weakref
from typing import Any

import ipywidgets as widgets
import numpy as np
import plotly.graph_objects as go

from ..capture.interventions import ABLATIONS, Intervention, reference_means
from ..errors import OptionError
from ..models import adapter_for
from .base import softmax
from .figure import as_widget
from .text import escape, html_text, markup

#: Colours of the probability bars: before (the capture) and after (the ablated model).
BEFORE, AFTER = "#9e9e9e", "#d62728"


class AblateControls:
    """Head switches, reset, mode and the before/after probability bars of one Explorer.

    ``ablated``: block → heads switched off (global block indices). :meth:`toggle`,
    :meth:`set_ablated` and :meth:`reset` change it; the Explorer is redrawn once per change.
    """

    def __init__(self, explorer: Any, *, ablation: str = "zero", reference: Any = None, active: bool = True) -> None:
        if explorer.model is None:
            raise OptionError("the ablate mode switches heads off in the model: pass it, "
                              "vl.Explorer(cap, model, ablate=True).")
        if ablation not in ABLATIONS:
            raise OptionError(f"ablation={ablation!r}; choose from {list(ABLATIONS)}.")
        self.explorer = explorer
        self.adapter = adapter_for(explorer.model)
        self.ablation = ablation
        self.values: dict[int, Any] = {}
        self.source: dict[str, Any] = {}
        if ablation == "mean":
            self.values, self.source = reference_means(self.adapter, reference, range(len(self.adapter.parts)),
                                                       progress=False)
        elif reference is not None:
            raise OptionError('reference= is only read by ablation="mean".')
        self.ablated: dict[int, frozenset[int]] = {}
        self.timings: list[float] = []
        self._followers: list[weakref.WeakMethod] = []  # linked views redrawn after each change (HeadGrid)
        widest = max(s.num_heads for s in explorer.layout_info.stages)
        self.mode = widgets.ToggleButton(value=active, description="ablate", icon="power-off",
                                         tooltip="on: the head switches below turn heads off in the model "
                                                 "(one forward + backward of this image per change)",
                                         layout=widgets.Layout(width="auto", margin="0 8px 0 0"))
        self.mode.add_class("vitlens-ablate-mode")
        self.label = html_text(css="vitlens-ablate-label", width="auto", margin="0 6px 0 0")
        self.toggles = []
        for h in range(widest):
            t = widgets.ToggleButton(value=False, description=str(h), tooltip=f"switch head {h} off in this block",
                                     layout=widgets.Layout(width="36px", padding="0px", margin="1px"))
            t.add_class("vitlens-ablate-toggle")
            t.add_class(f"vitlens-ablate-{h}")
            t.observe(lambda change, h=h: self._clicked(h, change), "value")
            self.toggles.append(t)
        self.reset_button = widgets.Button(description="reset", tooltip="switch every head on again",
                                           layout=widgets.Layout(width="auto", margin="1px 1px 1px 6px"))
        self.reset_button.add_class("vitlens-ablate-reset")
        self.reset_button.on_click(lambda _: self.reset())
        self.status = html_text(css="vitlens-ablate-status", margin="0 8px")
        self._quiet = False
        self.controls = widgets.HBox([self.label, *self.toggles, self.reset_button, self.status],
                                     layout=widgets.Layout(flex_flow="row wrap", align_items="center"))
        self.bars: Any = None  # the bar chart, made when the mode is first switched on (a page without it is lighter)
        self.panel = widgets.VBox([])  # shown while the mode is on, as the controls are
        self.box = widgets.VBox([widgets.HBox([self.mode, self.controls],
                                              layout=widgets.Layout(flex_flow="row wrap", align_items="center")),
                                 self.panel])
        self.box.add_class("vitlens-ablate")
        self.mode.observe(lambda _: self.apply(), "value")
        if active:
            self._make_bars()
        explorer.observe(lambda _: self.show(), "version")  # after every redraw: toggles and bars follow

    # -- state -----------------------------------------------------------------------------------
    @property
    def active(self) -> bool:
        """Whether heads are switched off in the model (the mode is on and some head is chosen)."""
        return bool(self.mode.value) and any(self.ablated.values())

    def intervention(self) -> Intervention | None:
        """The ablation the Explorer's recaptures apply (``None``: the model as it is)."""
        if not self.active:
            return None
        heads = {l: tuple(sorted(h)) for l, h in sorted(self.ablated.items()) if h}
        if self.ablation == "zero":
            return Intervention("zero", heads)
        return Intervention("mean", heads, {l: self.values[l] for l in heads}, source=self.source)

    def keep(self) -> list[str]:
        """The groups an ablated recapture stores: what the panels read (attention, LayerNorm statistics,
        gradients for the gradient-weighted fusion) and what the shown method reads, as its registration
        says (all groups when it does not say): no backward pass for class-agnostic views, and the LRP
        pass only for a method that reads relevance."""
        from ..capture import KEEP_GROUPS
        from ..registry import METHOD_INFO

        ex = self.explorer
        groups = {"attention", "ln"}  # the attention, statistic and (gradient-free) fusion panels
        if ex.fusion_grad.value:  # the gradient-weighted fusion
            groups.add("attention_grad")
        reads = getattr(METHOD_INFO[ex.method], "groups", None)
        groups |= set(reads(ex.cap)) if reads is not None else set(KEEP_GROUPS)
        return sorted(groups & set(KEEP_GROUPS))

    def toggle(self, head: int, layer: int | None = None) -> None:
        """Switch ``head`` of ``layer`` (default: the shown block) off, or on again."""
        layer = self.explorer.layer if layer is None else int(layer)
        n = self.adapter.parts[layer].attn.num_heads if 0 <= layer < len(self.adapter.parts) else 0
        if not 0 <= head < n:
            raise OptionError(f"no head {head} in block {layer}" + (f" (heads 0..{n - 1})." if n else "."))
        self.set_ablated({**self.ablated, layer: self.ablated.get(layer, frozenset()) ^ {int(head)}})

    def set_ablated(self, ablated: dict[int, Any]) -> None:
        """Switch off exactly ``ablated`` (block → heads) and redraw once."""
        from ..capture.interventions import parse_heads

        self.ablated = {l: frozenset(h) for l, h in parse_heads(self.adapter, ablated).items()}
        self.apply()

    def reset(self) -> None:
        """Every head on again: the Explorer shows the capture as it was."""
        self.set_ablated({})

    def apply(self) -> None:
        """Hand the ablation to the Explorer's recaptures and redraw."""
        import time

        start = time.perf_counter()
        ex = self.explorer
        iv = self.intervention()
        ex.classes.set_intervention(iv, self.keep)
        if ex.contrast_select is not None:
            ex.contrast.set_intervention(iv, self.keep)
        ex.refresh()
        for ref in list(self._followers):
            redraw = ref()
            if redraw is None:
                self._followers.remove(ref)
            else:
                redraw()
        self.timings.append(time.perf_counter() - start)

    def follow(self, redraw: Any) -> None:
        """Call the bound method ``redraw`` after every change (a linked view that marks switched-off
        heads); held weakly, once."""
        if not any(ref() == redraw for ref in self._followers):
            self._followers.append(weakref.WeakMethod(redraw))

    # -- drawing ---------------------------------------------------------------------------------
    def show(self) -> None:
        """Toggles of the shown block, the list of ablated heads and the before/after bars."""
        ex = self.explorer
        layer = ex.layer
        n = self.adapter.parts[layer].attn.num_heads
        off = self.switched_off(layer)
        self.panel.layout.display = self.controls.layout.display = None if self.mode.value else "none"
        self._quiet = True
        try:
            for h, t in enumerate(self.toggles):
                t.layout.display = None if h < n else "none"
                t.value = h in off
                t.disabled = not self.mode.value
                t.button_style = "danger" if h in off else ""
                t.icon = "times" if h in off else ""
        finally:
            self._quiet = False
        self.label.value = markup("Switch off, block <b>{}</b>:", layer)
        chosen = {l: sorted(h) for l, h in sorted(self.ablated.items()) if h}
        if not self.mode.value:
            text = "ablate mode off: the model as it is"
        elif chosen:
            text = "off: " + "; ".join(f"block {l} head{'s' if len(h) > 1 else ''} {', '.join(map(str, h))}"
                                       for l, h in chosen.items())
        else:
            text = "no head switched off"
        self.status.value = escape(text)
        self._bars()

    def probe(self) -> dict[str, str]:
        """The ablation's field of the Explorer's probe (what the browser tests read): ``{"ablated": "3:0,2;5:1"}``
        (``"-"``: none)."""
        off = ";".join(f"{l}:{','.join(map(str, sorted(h)))}" for l, h in sorted(self.ablated.items()) if h)
        return {"ablated": off if self.active else "-"}

    def switched_off(self, layer: int) -> frozenset[int]:
        """The heads of ``layer`` switched off in the model now (none while the mode is off)."""
        return self.ablated.get(layer, frozenset()) if self.mode.value else frozenset()

    def probabilities(self) -> tuple[np.ndarray, np.ndarray]:
        """Class probabilities of the shown sample before and after the ablation."""
        ex = self.explorer
        before = softmax(ex.cap["logits"].isel(sample=ex.sample).values)
        if not self.active:
            return before, before
        cap, i, _ = ex.classes.source(ex.sample, ex.target)
        return before, softmax(cap["logits"].isel(sample=i).values)

    def _make_bars(self) -> None:
        # the first view is drawn into a plain figure and wrapped (see figure.as_widget: a page that
        # connects later, as Voila's does, sees only the state the widget was made with)
        bars = go.Figure(layout=go.Layout(
            height=180, margin=dict(l=10, r=10, t=34, b=10), barmode="group", bargap=0.25,
            title=dict(text="top-5 class probabilities", font=dict(size=12), x=0.01, y=0.97, yanchor="top"),
            xaxis=dict(range=[0, 1], tickformat=".0%", fixedrange=True),
            yaxis=dict(autorange="reversed", fixedrange=True, automargin=True),
            legend=dict(orientation="h", x=1, xanchor="right", y=1.0, yanchor="bottom")))
        bars.add_bar(orientation="h", name="before", marker_color=BEFORE)
        bars.add_bar(orientation="h", name="after switching heads off", marker_color=AFTER)
        self._draw_bars(bars)
        self.bars = as_widget(bars)
        self.bars.add_class("vitlens-ablate-bars")
        self.panel.children = [self.bars]

    def _bars(self) -> None:
        if self.bars is None:
            if not self.mode.value:
                return
            self._make_bars()
            return
        self._draw_bars(self.bars)

    def _draw_bars(self, figure: Any) -> None:
        before, after = self.probabilities()
        order = list(np.argsort(-np.maximum(before, after), kind="stable")[:5])
        names = [self.explorer.class_names[c] for c in order]
        labels = [escape(n if len(n) <= 18 else n[:17] + "…") for n in names]  # plotly renders tick labels as markup
        with figure.batch_update():
            figure.data[0].update(x=[float(before[c]) for c in order], y=labels)
            figure.data[1].update(x=[float(after[c]) for c in order], y=labels, visible=self.active)

    def _clicked(self, head: int, change: Any) -> None:
        if self._quiet:
            return
        self.toggle(head)
