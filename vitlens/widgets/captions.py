"""One-sentence captions that say what each panel shows (written for teaching).

Method captions come from each method's registration (:data:`vitlens.methods.METHOD_INFO`).
"""

from __future__ import annotations

from typing import Any

from ..registry import METHOD_INFO, method_info
from .layout import CaptureLayout, HeadChoice, Query

_STAT_TEXT = {
    "std": "std",
    "mean": "mean",
    "var": "variance",
    "norm": "norm ‖x − mean‖",
}


def blocks_text(first: int, layer: int) -> str:
    """``"block 3"`` or ``"blocks 0–3"``."""
    return f"block {layer}" if first >= layer else f"blocks {first}–{layer}"


def heads_text(layout: CaptureLayout, heads: HeadChoice, layer: int) -> str:
    """``"all 12 heads"``, ``"heads 0, 2 of 12"`` or ``"no head"`` at ``layer``'s stage."""
    stage = layout.stage_of(layer)
    chosen = sorted(heads[stage.index])
    if not chosen:
        return "no head"
    if len(chosen) == stage.num_heads:
        return f"all {stage.num_heads} heads"
    return f"head{'s' if len(chosen) > 1 else ''} {', '.join(map(str, chosen))} of {stage.num_heads}"


def query_text(query: Query) -> str:
    return "the CLS token" if query is None else f"patch (row {query[0]}, col {query[1]})"


def readout_text(layout: CaptureLayout) -> str:
    return "the CLS token" if layout.readout == "cls" else "the average of all tokens"


def stage_text(layout: CaptureLayout, layer: int) -> str:
    """Stage indicator, e.g. ``"stage 1 of 4 · 28×28 tokens · windows 7×7, shifted by 3"``."""
    stage = layout.stage_of(layer)
    text = f"stage{stage.index} ({stage.index + 1} of {len(layout.stages)}) · {stage.shape_text} tokens"
    if stage.window is not None:
        sy, sx = stage.shift(layer)
        text += f" · windows {stage.window[0]}×{stage.window[1]}" + (f", shifted by ({sy}, {sx})" if sy or sx else "")
    if stage.factor > 1:
        text += f" (drawn on the {layout.grid[0]}×{layout.grid[1]} grid)"
    return text


def attention_caption(layout: CaptureLayout, layer: int, heads: HeadChoice, query: Query) -> str:
    text = f"Where {query_text(query)} looks at block {layer}: its attention row, mean over {heads_text(layout, heads, layer)}"
    if layout.windowed:
        text += "; Swin attends only inside its window (faint grid)"
    return text + ". Click a patch to make it the query."


def statistic_caption(layout: CaptureLayout, layer: int, stat: str) -> str:
    return f"{_STAT_TEXT.get(stat, stat)} of each token entering block {layer}'s first LayerNorm (scaled to [0, 1])."


def fusion_caption(layout: CaptureLayout, layer: int, heads: HeadChoice, stat: str, grad: bool = False,
                   class_name: str | None = None) -> str:
    first = layout.layers[0]
    if grad:
        cls = f" for class {class_name!r}" if class_name is not None else ""
        return (
            f"Attention fusion (lnstat, gradient-weighted): gradient × attention, each token's column scaled by its "
            f"{_STAT_TEXT.get(stat, stat)}, accumulated with Chefer's rule over {blocks_text(first, layer)} with "
            f"{heads_text(layout, heads, layer)}, read out from {readout_text(layout)}{cls}."
        )
    return (
        f"Attention fusion (lnstat): attention × the token {_STAT_TEXT.get(stat, stat)}, accumulated like rollout over "
        f"{blocks_text(first, layer)} with {heads_text(layout, heads, layer)}, read out from {readout_text(layout)}."
    )


def method_caption(layout: CaptureLayout, method: str, layer: int, first: int, class_name: str, on_features: bool,
                   options: dict | None = None) -> str:
    """The method panel's caption, from the method's registration.

    ``options``: the options the panel passed (picks a variant caption, e.g. gradcam
    ``on="features"``); default: the method's defaults for this capture.
    """
    info = method_info(method)
    opts = info.defaults_for(layout) if options is None else options
    if layer < first and info.uses_layers(opts) and not on_features:
        return f"{method} starts at block {first} (its default start_layer): nothing is accumulated at block {layer} yet."
    text = info.caption_for(opts).format(l=layer, blocks=blocks_text(first, layer), readout=readout_text(layout),
                                         cls=repr(class_name))
    return text[0].upper() + text[1:] + "."


def precision_note(cap: Any, sample: int, method: str, layout: CaptureLayout) -> str:
    """A sentence for a panel whose map rests on a float32 LRP pass that divided by nearly cancelling
    sums at position ``sample`` of ``cap`` (its ``lrp_condition``), else ``""``. Any method that reads
    the LRP relevance (its registered ``needs``) gets it."""
    from ..capture.layout import capture_options
    from ..capture.precision import RELIABLE_CONDITION, unreliable

    if "lrp_condition" not in cap.dataset:
        return ""
    info = method_info(method)
    if "attention_relevance" not in info.groups(layout, info.defaults_for(layout)):
        return ""
    options = capture_options(cap)
    condition = float(cap["lrp_condition"].values[sample])
    if not unreliable(condition, str(options.get("lrp_dtype", "float32"))):
        return ""
    return (f" On this image the float32 LRP pass divided by nearly cancelling sums (lrp_condition {condition:.1e} "
            f"< {RELIABLE_CONDITION:g}): the map depends on rounding; capture with lrp_dtype='float64'.")


def method_title(method: str) -> str:
    """The method's short title (its registration's ``title``)."""
    return METHOD_INFO[method].title if method in METHOD_INFO else method


def panel_title(kind: str, layer: int, detail: str = "") -> str:
    """Short subplot title, e.g. ``"attention · block 3"``."""
    return f"{kind} · block {layer}" + (f" · {detail}" if detail else "")
