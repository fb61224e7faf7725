"""Publication figures from code: method grids, per-layer strips, overlays; export.

Static figures are drawn with matplotlib's Agg renderer — no browser, no
display, nothing to install beyond matplotlib — so PNG, SVG and PDF come out
the same on a laptop, a headless server and CI. :func:`render_panels` is the
one renderer: :func:`grid`, :func:`layers` and the widgets' exports describe
panels (image, overlay, title) and hand them to it. :func:`save` writes PNG,
SVG or PDF atomically and byte-for-byte deterministically; the live plotly
figures of the widgets save as self-contained HTML.

Images are drawn the right way up (row 0 at the top). xarray's own
``DataArray.plot()`` puts ``y = 0`` at the bottom unless told
``yincrease=False``; :func:`plot` is the xarray call with that fixed.

Examples
--------
>>> import numpy as np, timm, vitlens as vl
>>> model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=3)
>>> cap = vl.capture(model, np.random.default_rng(0).random((2, 32, 32, 3)))
>>> fig = vl.figures.grid(cap, methods=["rollout", "lnstat"])
>>> len(fig.axes)  # 2 samples x (input + 2 methods), plus the colour bar
7
"""

from __future__ import annotations

import io
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from .errors import ExportError, OptionError
from .capture.images import sample_sources
from .methods import METHOD_INFO, METHODS, explain, minmax, normalize, to_pixels
from .registry import method_info, resolve_methods
from .methods import normalize as normalize_maps  # vl.plot's own argument is called normalize

__all__ = ["render_panels", "grid", "layers", "head_atlas", "draw_head_atlas", "plot", "overlay", "colormap", "save"]

DEFAULT_CMAP = "inferno"
DEFAULT_COLORSCALE = DEFAULT_CMAP  # the old (plotly-era) name, kept for callers
PANEL_INCHES = 1.9  # one panel's side in a static figure
MAX_ROWS = 8  # samples a method grid shows unless told which (it says so when it leaves some out)
TITLES = {name: info.title for name, info in METHOD_INFO.items()}  # from the method registry
# fixed metadata: the same figure always writes the same bytes
_METADATA = {
    "png": {"Software": None},
    "svg": {"Date": None, "Creator": None},
    "pdf": {"CreationDate": None, "ModDate": None, "Producer": None, "Creator": None},
}


def _title(method: str) -> str:
    return METHOD_INFO[method].title if method in METHOD_INFO else method


# -- colour ------------------------------------------------------------------------------
def _cmap(name: str) -> Any:
    """A matplotlib colormap by name, case-insensitively (``"Inferno"`` works too)."""
    import matplotlib

    names = {n.lower(): n for n in matplotlib.colormaps}
    key = names.get(str(name).lower())
    if key is None:
        raise OptionError(f"unknown colour map {name!r}; use a matplotlib name such as 'inferno' or 'viridis'.")
    return matplotlib.colormaps[key]


def colormap(name: str = DEFAULT_CMAP, n: int = 256) -> np.ndarray:
    """A matplotlib colour map as an ``(n, 3)`` uint8 lookup table.

    Examples
    --------
    >>> colormap("Greys", 2).tolist()
    [[255, 255, 255], [0, 0, 0]]
    """
    rgba = _cmap(name)(np.linspace(0, 1, n))
    return (rgba[:, :3] * 255).round().astype(np.uint8)


def overlay(image: np.ndarray, heat: np.ndarray, *, alpha: float = 0.5, cmap: str = DEFAULT_CMAP,
            colorscale: str | None = None) -> np.ndarray:
    """Blend a [0, 1] heat map (H, W) onto an RGB image (H, W, 3) in [0, 1]; uint8 out.

    ``colorscale`` is the old name of ``cmap``.

    Examples
    --------
    >>> overlay(np.zeros((2, 2, 3)), np.ones((2, 2)), alpha=1.0).shape
    (2, 2, 3)
    """
    image, heat = np.asarray(image), np.asarray(heat)
    if image.shape[:2] != heat.shape:
        raise OptionError(f"overlay: image {image.shape[:2]} and map {heat.shape} differ in size; use vl.to_pixels first.")
    lut = colormap(colorscale or cmap)
    colours = lut[np.clip((np.nan_to_num(heat) * 255).round(), 0, 255).astype(int)] / 255.0
    out = (1 - alpha) * np.clip(image, 0, 1) + alpha * colours
    return (out * 255).round().astype(np.uint8)


def _upsample(heat: np.ndarray, shape: tuple[int, int], smooth: bool) -> np.ndarray:
    """A token-grid map at image size: token blocks (nearest) or bilinear like ``vl.to_pixels``."""
    if heat.shape == tuple(shape):
        return heat
    h, w = shape
    if smooth:
        import torch

        t = torch.from_numpy(np.ascontiguousarray(heat, dtype=np.float32))[None, None]
        return torch.nn.functional.interpolate(t, size=(h, w), mode="bilinear", align_corners=False)[0, 0].numpy()
    rows = np.minimum(((np.arange(h) + 0.5) * heat.shape[0] / h).astype(int), heat.shape[0] - 1)
    cols = np.minimum(((np.arange(w) + 0.5) * heat.shape[1] / w).astype(int), heat.shape[1] - 1)
    return heat[np.ix_(rows, cols)]


# -- the renderer ------------------------------------------------------------------------
def _figure_class() -> type:
    """matplotlib's Figure with a PNG repr; made on first use so ``import vitlens`` skips matplotlib."""
    from matplotlib.figure import Figure

    global _FIGURE_CLASS
    if _FIGURE_CLASS is None:

        class VitlensFigure(Figure):
            """A matplotlib Figure that shows itself as PNG in Jupyter (no pyplot needed)."""

            def _repr_png_(self) -> bytes:
                buf = io.BytesIO()
                self.savefig(buf, format="png", metadata=_METADATA["png"])
                return buf.getvalue()

        _FIGURE_CLASS = VitlensFigure
    return _FIGURE_CLASS


_FIGURE_CLASS: type | None = None
_PANEL_KEYS = {"image", "overlay", "title", "cmap", "vmin", "vmax", "alpha", "smooth", "ylabel"}


def render_panels(
    panels: Sequence[Mapping[str, Any]],
    *,
    suptitle: str | None = None,
    colorbar: bool = True,
    ncols: int | None = None,
    colorbar_label: str = "relevance",
    panel_inches: float = PANEL_INCHES,
    caption: str | None = None,
) -> Any:
    """Draw panels (an image, a heat map over it, a title) into one static figure.

    Parameters
    ----------
    panels
        One dict per panel, filled row by row:

        - ``"image"``: ``(H, W, 3)`` float array in [0, 1] (or uint8), or None;
        - ``"overlay"``: a 2-D map (token grid or pixels; upsampled to the image), or None;
        - ``"title"``: str; ``"ylabel"``: str, a row label left of the panel (optional);
        - ``"cmap"`` (``"inferno"``), ``"vmin"``/``"vmax"`` (None: the map's range),
          ``"alpha"`` (0.5; an overlay without an image is drawn opaque),
          ``"smooth"`` (False: token blocks; True: bilinear like ``vl.to_pixels``).
    suptitle
        A title over the whole figure (the widgets put model, sample, class and
        probability here).
    colorbar
        One shared colour bar (from the last panel with an overlay) on the right.
    ncols
        Panels per row (default: all in one row, at most 6).
    colorbar_label, panel_inches
        Colour bar label; size of one panel in inches.
    caption
        Small print under the panels (wrapped to the figure's width): full class
        names that labels shortened, which samples were left out.

    Returns
    -------
    matplotlib.figure.Figure
        Drawn with the Agg canvas, never a GUI or a browser; shows itself in
        Jupyter and saves with :func:`save` (or ``fig.savefig``).

    Examples
    --------
    >>> import numpy as np
    >>> fig = render_panels([{"image": np.zeros((16, 16, 3)), "overlay": np.eye(4), "title": "a"},
    ...                      {"image": None, "overlay": np.ones((4, 4)), "title": "b"}], suptitle="demo")
    >>> [ax.get_title() for ax in fig.axes[:2]]
    ['a', 'b']
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    panels = list(panels)
    if not panels:
        raise OptionError("render_panels needs at least one panel.")
    for k, p in enumerate(panels):
        unknown = set(p) - _PANEL_KEYS
        if unknown:
            raise OptionError(f"panel {k}: unknown keys {sorted(unknown)}; a panel takes {sorted(_PANEL_KEYS)}.")
    ncols = min(len(panels), 6) if ncols is None else int(ncols)
    if ncols < 1:
        raise OptionError(f"ncols must be at least 1; got {ncols}.")
    nrows = -(-len(panels) // ncols)
    has_titles = any(p.get("title") for p in panels)
    has_labels = any(p.get("ylabel") for p in panels)
    has_overlay = any(p.get("overlay") is not None for p in panels)
    width = ncols * panel_inches + (0.35 if has_labels else 0) + (0.8 if colorbar and has_overlay else 0)
    height = nrows * (panel_inches + (0.3 if has_titles else 0)) + (0.4 if suptitle else 0)
    height += 0.18 * str(suptitle or "").count("\n")  # a wrapped title's further lines
    if caption:
        caption = _wrap(caption, width)
        height += 0.14 * (caption.count("\n") + 1) + 0.1
    fig = _figure_class()(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    # PDF and SVG: matplotlib would composite each panel's image and heat map into one
    # picture first, and got the transparency wrong (lighter overlays than the PNG);
    # drawn as two images, every format blends the heat map over the image alike.
    fig.suppressComposite = True
    fig.get_layout_engine().set(w_pad=0.02, h_pad=0.02, wspace=0.02, hspace=0.02)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    mappable = None
    for k, ax in enumerate(axes.flat):
        ax.set_xticks([])
        ax.set_yticks([])
        if k >= len(panels):
            ax.set_axis_off()
            continue
        p = panels[k]
        image = p.get("image")
        heat = p.get("overlay")
        if image is not None:
            image = np.asarray(image)
            if image.ndim != 3 or image.shape[-1] not in (3, 4):
                raise OptionError(f"panel {k}: 'image' must be (H, W, 3); got shape {image.shape}.")
            if image.dtype != np.uint8:
                image = np.clip(image.astype(float), 0, 1)
            ax.imshow(image, interpolation="nearest")
        if heat is not None:
            heat = np.asarray(heat, dtype=float)
            if heat.ndim != 2:
                raise OptionError(f"panel {k}: 'overlay' must be 2-D (y, x); got shape {heat.shape}.")
            if image is not None:
                heat = _upsample(heat, image.shape[:2], bool(p.get("smooth", False)))
            elif p.get("smooth", False):
                heat = _upsample(heat, (heat.shape[0] * 8, heat.shape[1] * 8), True)
            finite = heat[np.isfinite(heat)]
            vmin = p.get("vmin", None)
            vmax = p.get("vmax", None)
            vmin = float(finite.min()) if vmin is None and finite.size else vmin
            vmax = float(finite.max()) if vmax is None and finite.size else vmax
            alpha = float(p.get("alpha", 0.5)) if image is not None else 1.0
            mappable = ax.imshow(heat, cmap=_cmap(p.get("cmap", DEFAULT_CMAP)), vmin=vmin, vmax=vmax,
                                 alpha=alpha, interpolation="nearest")
        if image is None and heat is None:
            ax.set_axis_off()
        if p.get("title"):
            ax.set_title(str(p["title"]), fontsize=9)
        if p.get("ylabel"):
            ax.set_ylabel(str(p["ylabel"]), fontsize=9)
        for spine in ax.spines.values():
            spine.set_linewidth(0.5)
    if colorbar and mappable is not None:
        from matplotlib.cm import ScalarMappable

        solid = ScalarMappable(norm=mappable.norm, cmap=mappable.cmap)  # the bar at full opacity
        bar = fig.colorbar(solid, ax=axes, shrink=min(1.0, 0.9 if nrows > 1 else 0.8), aspect=25, pad=0.01)
        bar.set_label(colorbar_label, fontsize=9)
        bar.ax.tick_params(labelsize=8)
    if suptitle:
        fig.suptitle(str(suptitle), fontsize=10)
    if caption:  # a figure-level x label: constrained layout keeps room for it under the panels
        fig.supxlabel(caption, x=0.01, ha="left", multialignment="left", fontsize=7)
    # lay out once and keep it: constrained layout moves things a little on every
    # draw, so without this a figure saved twice would not give the same bytes
    fig.draw_without_rendering()
    fig.set_layout_engine("none")
    return fig


# -- labels that fit -----------------------------------------------------------------------
def _wrap(text: str, width_inches: float, fontsize: float = 7) -> str:
    """``text`` wrapped to lines that fit ``width_inches`` at ``fontsize`` (each paragraph on its own)."""
    import textwrap

    chars = max(20, int(width_inches * 72 / (0.62 * fontsize)))
    return "\n".join(textwrap.fill(line, chars) for line in str(text).splitlines())


def short_label(name: str, chars: int, lines: int = 2) -> str:
    r"""A class name that fits a row label: its first synonym, wrapped to ``lines`` lines of ``chars``.

    ImageNet names list synonyms ("sidewinder, horned rattlesnake, Crotalus
    cerastes"): the label keeps the first; a name still too long is wrapped and
    ends in "…". Figures give the full name in their caption.

    Examples
    --------
    >>> short_label("sidewinder, horned rattlesnake, Crotalus cerastes", 14)
    'sidewinder'
    >>> short_label("a very long class name without any commas at all", 14)
    'a very long\nclass name…'
    """
    import textwrap

    first = str(name).split(",")[0].strip() or str(name)
    wrapped = textwrap.wrap(first, chars, break_long_words=True) or [""]
    if len(wrapped) > lines:
        wrapped = wrapped[:lines]
        wrapped[-1] = wrapped[-1][: chars - 1] + "…"
    return "\n".join(wrapped)


def figure_title(cap: xr.DataTree, text: str | None) -> str | None:
    """A figure's title, marked "UNTRAINED (random weights)" when the capture's model had random weights.

    :func:`vitlens.load_model` marks a timm model created without ``pretrained=``
    or ``checkpoint=`` (it also warns, :class:`~vitlens.RandomWeightsWarning`), and
    the capture records it (``attrs["weights"] == "random"``).

    Examples
    --------
    >>> import xarray as xr
    >>> figure_title(xr.DataTree(xr.Dataset(attrs={"weights": "random"})), "Rollout")
    'UNTRAINED (random weights) · Rollout'
    """
    if cap.attrs.get("weights") != "random":
        return text
    return "UNTRAINED (random weights)" + (f" · {text}" if text else "")


def file_label(source: str, chars: int) -> str:
    """The file name of a sample's ``source`` (no folders), cut to ``chars`` characters with "…".

    Examples
    --------
    >>> file_label("photos/holiday/cat.jpg", 20)
    'cat.jpg'
    >>> file_label("a_very_long_file_name_indeed.png", 12)
    'a_very_long…'
    """
    from pathlib import PurePath

    name = PurePath(str(source)).name or str(source)
    return name if len(name) <= chars else name[: max(1, chars - 1)] + "…"


def literal(text: str) -> str:
    r"""``text`` as matplotlib shows it literally: a file name's ``$`` would start mathematics.

    Examples
    --------
    >>> literal("$5 off.png")
    '\\$5 off.png'
    """
    return str(text).replace("$", r"\$")


def _class_names(cap: xr.DataTree) -> list[str] | None:
    if "class_name" in cap.coords:
        return [str(n) for n in cap["class_name"].values]
    return [str(n) for n in cap.attrs.get("class_names", [])] or None


# -- figures -----------------------------------------------------------------------------
def _check_methods(methods: Sequence[str] | str | None, cap: xr.DataTree | None = None) -> list[str]:
    if methods is None or methods == "all":  # every method the capture holds what it reads for
        from .methods import explainable_methods

        return list(METHODS) if cap is None else list(explainable_methods(cap))
    names = resolve_methods(methods)  # the one reader of method names (did-you-mean hint)
    if not names:
        raise OptionError(f"methods is empty; choose from {list(METHODS)} or 'all'.")
    return names


def _token_maps(cap: xr.DataTree, methods: Sequence[str], options: dict[str, Any]) -> xr.Dataset:
    from .methods import options_of

    from .methods import explainable_methods

    if set(methods) == set(explainable_methods(cap, options)):
        maps = explain(cap, "all", **options)
    else:
        maps = xr.Dataset({m: explain(cap, m, **{k: v for k, v in options.items() if k in options_of(m)})
                           for m in methods})
    return xr.Dataset({m: normalize(maps[m]) for m in methods})


def _cmap_arg(cmap: str | None, colorscale: str | None) -> str:
    return cmap or colorscale or DEFAULT_CMAP


def grid(
    cap: xr.DataTree,
    methods: Sequence[str] | str | None = None,
    samples: Sequence[int] | None = None,
    *,
    opacity: float = 0.6,
    cmap: str | None = None,
    colorbar: bool = True,
    titles: bool = True,
    smooth: bool = True,
    cell: float = PANEL_INCHES,
    suptitle: str | None = None,
    colorscale: str | None = None,
    **options: Any,
) -> Any:
    """Images × methods: each row one sample (its input, then each method's map over it).

    Parameters
    ----------
    cap
        A capture.
    methods
        Methods as columns (default: every method the capture can explain:
        :func:`vitlens.methods.explainable_methods`; AttnLRP and LeGrad when it was made
        with their passes).
    samples
        Sample indices as rows (default: the first 8; a figure of more samples
        says which it left out under its panels).
    opacity, cmap, colorbar, titles, smooth
        Look of the overlay: one colour map for every panel (maps are min-max
        normalised per image, so the colour bar runs 0–1), an optional shared
        colour bar, column titles and row labels, bilinear (``smooth=True``) or
        token blocks. ``colorscale`` is the old name of ``cmap``.
    cell
        Size of one panel in inches.
    suptitle
        A title over the figure (a model with random weights is marked "UNTRAINED").
    **options
        Passed to the methods that take them (e.g. ``heads=``, ``start_layer=``).

    Row labels name each sample, its image file (a capture of files or a folder:
    its ``source``) and its class; a long class name (ImageNet's
    "sidewinder, horned rattlesnake, Crotalus cerastes") or file path is
    shortened to fit beside its row, with the full text under the panels.

    Returns
    -------
    matplotlib.figure.Figure
    """
    methods = _check_methods(methods, cap)
    n = int(cap["sample"].size)
    samples = list(range(min(n, MAX_ROWS))) if samples is None else [int(s) for s in samples]
    if not samples or any(not 0 <= s < n for s in samples):
        raise OptionError(f"samples {samples} must be a non-empty selection of 0..{n - 1}.")
    sub = cap.isel(sample=samples)
    maps = _token_maps(sub, methods, options)
    images = sub["image"].values
    names = _class_names(cap)
    targets = sub["target"].values
    sources = sample_sources(sub)
    chars = max(8, int(cell * 72 / (0.6 * 9)))  # characters that fit beside one row (9 pt)
    panels, notes = [], []
    for r, s in enumerate(samples):
        full = names[int(targets[r])] if names else f"class {int(targets[r])}"
        short = short_label(full, chars - len(f"#{s}: "))
        label = f"#{s}: {short}"
        if short.replace("\n", " ") != full:
            notes.append(f"#{s}: {full}")
        if sources and sources[r]:  # the image file above its class
            label = f"{literal(file_label(sources[r], chars))}\n{label}"
            if file_label(sources[r], chars) != sources[r]:
                notes.append(f"#{s}: {literal(sources[r])}")
        panels.append({"image": images[r], "title": "input" if titles and r == 0 else "",
                       "ylabel": label if titles else None})
        for m in methods:
            panels.append({"image": images[r], "overlay": maps[m].values[r], "vmin": 0.0, "vmax": 1.0,
                           "alpha": opacity, "cmap": _cmap_arg(cmap, colorscale), "smooth": smooth,
                           "title": _title(m) if titles and r == 0 else ""})
    if len(samples) < n and samples == list(range(len(samples))):
        notes.append(f"Samples 0–{len(samples) - 1} of {n} shown; samples= picks others.")
    elif len(samples) < n:
        notes.append(f"{len(samples)} of {n} samples shown.")
    return render_panels(panels, ncols=1 + len(methods), colorbar=colorbar, suptitle=figure_title(cap, suptitle),
                         colorbar_label="relevance (min-max per image)", panel_inches=cell,
                         caption="\n".join(notes) if titles and notes else None)


def layers(
    cap: xr.DataTree,
    method: str = "rollout",
    sample: int = 0,
    *,
    layers: Sequence[int] | None = None,
    columns: int = 6,
    opacity: float = 0.6,
    cmap: str | None = None,
    smooth: bool = True,
    cell: float = PANEL_INCHES,
    colorscale: str | None = None,
    **options: Any,
) -> Any:
    """One panel per layer: ``method``'s cumulative map after each block (``per_layer=True``).

    For ``attention`` each panel is that block's own attention; gradcam has no
    per-layer form. Each row's titles sit in their own space (no overlap with the
    images above, however many rows).

    Returns
    -------
    matplotlib.figure.Figure
    """
    if not method_info(method).per_layer:
        raise OptionError(f"layers() needs a method with a per-layer form: {[m for m in METHODS if METHOD_INFO[m].per_layer]}.")
    n = int(cap["sample"].size)
    if not 0 <= sample < n:
        raise OptionError(f"sample {sample} out of range 0..{n - 1}.")
    sub = cap.isel(sample=[sample])
    kwargs = dict(options)
    if layers is not None:
        kwargs["layers"] = list(layers)
    per = normalize(explain(sub, method, per_layer=True, **kwargs))
    chosen = per["layer"].values.tolist()
    img = sub["image"].values[0]
    panels = [{"image": img, "overlay": per.values[0, i], "title": f"after block {layer}", "vmin": 0.0,
               "vmax": 1.0, "alpha": opacity, "cmap": _cmap_arg(cmap, colorscale), "smooth": smooth}
              for i, layer in enumerate(chosen)]
    names = _class_names(cap)
    c = int(sub["target"].values[0])
    source = literal((sample_sources(sub) or [""])[0])
    title = (f"{_title(method)} by depth · {cap.attrs.get('model', 'model')} · sample {sample}"
             f"{f' ({source})' if source else ''} · class {names[c] if names else c!r}")
    ncols = min(columns, len(chosen))
    return render_panels(panels, ncols=ncols, suptitle=_wrap(figure_title(cap, title), ncols * cell + 0.8, 10),
                         colorbar_label="relevance (min-max per map)", panel_inches=cell)


def plot(obj: xr.DataArray, *, image: xr.DataArray | xr.DataTree | None = None, ax: Any = None,
         normalize: bool = True, **kwargs: Any) -> Any:
    """xarray's ``.plot()`` / ``.plot.imshow()`` the right way up (row 0 at the top).

    ``map.plot()`` and ``cap["image"].plot.imshow()`` follow xarray's default
    ``yincrease=True`` and so draw pictures upside down; this is the same call
    with ``yincrease=False`` and equal aspect. A map with a ``sample`` (or
    ``layer``) dimension is drawn as facets; an image (``channel`` dimension)
    as RGB.

    **Maps are min-max normalised per facet by default** (each sample's, or each
    layer's, map scaled to [0, 1], as :func:`vitlens.normalize` does), so a map
    whose values are a thousand times smaller than its neighbour's is not drawn
    black; the colour bar then runs 0–1. ``normalize=False`` draws the raw values
    on one shared scale (xarray's default).

    Parameters
    ----------
    obj
        A map ``([sample,] [layer,] y, x)`` from ``vl.explain``, or an image
        ``([sample,] y, x, channel)`` such as ``cap["image"]``.
    image
        Optional picture under a single map: a capture or its ``image`` (one
        sample); the map is upsampled to it and drawn at ``alpha=0.5``.
    normalize
        Min-max scale each facet's map to [0, 1] (default); False: raw values,
        one colour scale for all facets. Images are never rescaled.
    ax, **kwargs
        Passed on to xarray's plotting (``cmap=``, ``col_wrap=``, ...).

    Examples
    --------
    >>> import numpy as np, xarray as xr
    >>> m = xr.DataArray(np.arange(4.0).reshape(2, 2), dims=("y", "x"))
    >>> art = plot(m)
    >>> bool(art.axes.yaxis_inverted())
    True
    """
    if not isinstance(obj, xr.DataArray):
        raise OptionError(f"vl.plot draws a DataArray (a map or cap['image']); got {type(obj).__name__}.")
    if "y" not in obj.dims or "x" not in obj.dims:
        raise OptionError(f"vl.plot needs 'y' and 'x' dimensions; {obj.name!r} has {obj.dims}.")
    kwargs.setdefault("yincrease", False)
    if ax is not None:
        kwargs["ax"] = ax
    facets = [d for d in obj.dims if d not in ("y", "x", "channel") and obj.sizes[d] > 1]
    obj = obj.squeeze([d for d in obj.dims if d not in ("y", "x", "channel") and obj.sizes[d] == 1])
    if len(facets) > 1:
        raise OptionError(f"vl.plot draws one facet dimension; select from {facets} first (e.g. .isel(sample=0)).")
    if facets:
        kwargs.setdefault("col", facets[0])
        kwargs.setdefault("col_wrap", min(obj.sizes[facets[0]], 6))
    if "channel" in obj.dims:
        return obj.clip(0, 1).plot.imshow(rgb="channel", **kwargs)
    if normalize:  # per facet: each map scaled to [0, 1] on its own
        obj = normalize_maps(obj)
        kwargs.setdefault("vmin", 0.0)
        kwargs.setdefault("vmax", 1.0)
    if image is not None:
        if facets:
            raise OptionError("vl.plot(map, image=...) draws one map over one picture; select one sample first.")
        picture = image["image"] if isinstance(image, xr.DataTree) else image
        picture = picture.squeeze([d for d in picture.dims if d not in ("y", "x", "channel")])
        if picture.ndim != 3:
            raise OptionError("vl.plot(..., image=) needs one picture: select one sample (cap.isel(sample=[k])).")
        art = picture.clip(0, 1).plot.imshow(rgb="channel", **{k: v for k, v in kwargs.items()
                                                              if k in ("ax", "yincrease")})
        up = obj
        if obj.shape != picture.shape[:2]:
            up = to_pixels(obj.expand_dims("sample"), picture.shape[:2]).isel(sample=0)
            up = up.assign_coords(y=picture["y"].values, x=picture["x"].values) if "y" in picture.coords else up
        kwargs["ax"] = art.axes
        kwargs.setdefault("alpha", 0.5)
        kwargs.setdefault("cmap", DEFAULT_CMAP)
        return up.plot.imshow(**kwargs)
    kwargs.setdefault("cmap", DEFAULT_CMAP)
    return obj.plot.imshow(**kwargs)


# -- export ------------------------------------------------------------------------------
def save(fig: Any, path: str | os.PathLike, *, dpi: int = 150) -> Path:
    """Write a figure: PNG, SVG or PDF (matplotlib), or HTML (plotly figures).

    The file is written to a temporary sibling and renamed into place, so a
    failed export never leaves a half-written file or destroys an older one.
    The same figure always writes the same bytes (no dates in the metadata).
    Nothing here needs a browser.

    Parameters
    ----------
    fig
        A figure from :func:`grid`, :func:`layers`, :func:`render_panels` (or any
        matplotlib Figure); or a plotly figure, written as self-contained HTML.
    path
        Target file; the suffix picks the format. Its folder must exist.
    dpi
        PNG resolution.

    Examples
    --------
    >>> import numpy as np, tempfile, pathlib
    >>> fig = render_panels([{"image": np.zeros((8, 8, 3)), "title": "x"}])
    >>> save(fig, pathlib.Path(tempfile.mkdtemp()) / "x.png").suffix
    '.png'
    """
    path = Path(path)
    fmt = path.suffix.lower().lstrip(".")
    if fmt not in ("png", "svg", "pdf", "html"):
        raise OptionError(f"{str(path)!r}: choose a .png, .svg, .pdf or .html file.")
    parent = path.parent
    if not parent.is_dir():
        what = "is not a folder" if parent.exists() else "does not exist"
        raise ExportError(f"cannot write {str(path)!r}: the folder {str(parent)!r} {what}; create it first "
                          f"(Path({str(parent)!r}).mkdir(parents=True)) or choose another path.")
    if path.is_dir():
        raise ExportError(f"cannot write {str(path)!r}: it is a folder; give a file name such as {str(path / 'figure.' + fmt)!r}.")
    is_plotly = hasattr(fig, "write_html") and hasattr(fig, "to_plotly_json")
    if is_plotly:
        if fmt != "html":
            raise ExportError(
                f"cannot write {str(path)!r}: this is a live plotly figure, saved here as .html only. For "
                "PNG/SVG/PDF use the static figures (vl.figures.grid, vl.figures.layers, "
                "vl.figures.render_panels) or a widget's .save(), all drawn with matplotlib.")

        def write(handle: Any) -> None:
            handle.write(fig.to_html(include_plotlyjs=True, full_html=True, div_id="vitlens-figure").encode())
    elif hasattr(fig, "savefig"):
        if fmt == "html":
            raise ExportError(f"cannot write {str(path)!r}: static (matplotlib) figures save as .png, .svg or .pdf.")

        def write(handle: Any) -> None:
            import matplotlib

            with matplotlib.rc_context({"svg.hashsalt": "vitlens", "pdf.fonttype": 42, "svg.fonttype": "path"}):
                fig.savefig(handle, format=fmt, dpi=dpi, metadata=_METADATA[fmt])
    else:
        raise ExportError(f"cannot write {type(fig).__name__}: vl.figures.save takes a matplotlib figure "
                          "(vl.figures.*) or a plotly figure.")
    return _atomic_write(path, write)


def _file_mode(path: Path) -> int:
    """The replaced file's permissions, or what a plain ``open(path, "w")`` would give."""
    try:
        return path.stat().st_mode & 0o777
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def _atomic_write(path: Path, write: Any) -> Path:
    """Write through ``write(handle)`` into a temporary sibling, then rename it onto ``path``."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    try:
        os.chmod(tmp, _file_mode(path))  # mkstemp makes 0600; a figure gets the usual permissions
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(exc, (ExportError, OptionError)) or not isinstance(exc, Exception):
            raise
        raise ExportError(f"could not write {str(path)!r} ({type(exc).__name__}: {exc}); "
                          "the previous file, if any, is unchanged.") from exc
    return path


# -- the head atlas ---------------------------------------------------------------------------
def head_atlas(
    obj: xr.DataTree,
    stat: str = "attention_distance",
    *,
    head: tuple[int, int] | None = None,
    k: int = 4,
    query: tuple[int, int] | None | str = "default",
    model: Any = None,
    images: Any = None,
    cmap: str = "viridis",
) -> Any:
    """The head atlas of one statistic as a static figure: layers × heads, and the statistic by depth.

    Left: the dataset mean of the statistic per block (rows) and head (columns).
    Right: the ViT paper's view (Dosovitskiy et al. 2021, Fig. 7), the statistic
    against depth, one dot per head, the mean of the heads as a line. With
    ``head=(layer, h)`` two rows follow: the ``k`` images where that head's
    statistic is highest and the ``k`` where it is lowest, each under the head's
    attention of ``query`` (min-max per image).

    Parameters
    ----------
    obj
        A capture, or a store (full or reduced, see :func:`vitlens.head_stats`).
    stat
        One of :data:`vitlens.HEAD_STATS`.
    head
        ``(layer, head)`` whose extreme images to show (default: none).
    k
        Images per row.
    query
        ``"default"`` (CLS, or the centre patch without one), ``None`` (CLS) or a
        patch ``(row, col)`` on the first-stage grid.
    model, images
        For a reduced store without attention: the model to capture the ``2k``
        images again, and the images it was captured from if it kept none.
    cmap
        Colour map of the heat map.

    Returns
    -------
    matplotlib.figure.Figure

    Examples
    --------
    >>> import numpy as np, timm, vitlens as vl
    >>> model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=3, depth=2)
    >>> cap = vl.capture(model, np.random.default_rng(0).random((4, 32, 32, 3)), grads=False)
    >>> fig = vl.figures.head_atlas(cap, "attention_entropy", head=(1, 0), k=2)
    >>> [ax.get_title() for ax in fig.axes[:2]]
    ['Attention entropy: dataset mean', 'Attention entropy by depth']
    """
    from .stats import head_stats
    from .stats.atlas import default_query, examples, extremes, summary

    values = head_stats(obj, stat)
    picked = None
    if head is not None:
        layer, h = (int(v) for v in head)
        ext = extremes(values, layer, h, k)
        q = default_query(obj) if isinstance(query, str) and query == "default" else query
        rows = []
        for label, positions in (("highest", ext.highest), ("lowest", ext.lowest)):
            pictures, maps, _ = examples(obj, positions, layer, h, q, model=model, images=images)
            samples = values["sample"].values[positions]
            rows.append((label, [(pictures[i], maps[i], f"#{samples[i]} · {ext.value(p):.3g}")
                                 for i, p in enumerate(positions)]))
        picked = (layer, h, rows)
    title = f"{obj.attrs.get('model', 'model')} · {values.sizes['sample']} images"
    return draw_head_atlas(summary(values), stat, selected=picked, cmap=cmap, suptitle=title)


def draw_head_atlas(table: xr.Dataset, stat: str, *, selected: Any = None, cmap: str = "viridis",
                    suptitle: str | None = None) -> Any:
    """Draw a head atlas from a :func:`vitlens.stats.atlas.summary` (what :func:`head_atlas` and the
    widget's export call).

    ``selected``: ``(layer, head, rows)``, ``rows`` a list of ``(label, [(image, map, title), ...])``
    (image ``(H, W, 3)``, map on the token grid), drawn one row each under the overview.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.patches import Rectangle

    from .registry import stat_info

    info = stat_info(stat)
    mean = table["mean"]
    layers = [int(l) for l in mean["layer"].values]
    heads = mean.sizes["head"]
    rows = selected[2] if selected else []
    ncols = max((len(r[1]) for r in rows), default=0)
    width = max(8.0, 1.6 * ncols)
    height = 3.2 + (1.9 * len(rows) if rows else 0) + (0.4 if suptitle else 0)
    fig = _figure_class()(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    top, bottom = (fig.subfigures(2, 1, height_ratios=[3.2, 1.9 * len(rows)]) if rows else (fig, None))
    ax_map, ax_dots = top.subplots(1, 2, width_ratios=[max(1.0, heads / max(len(layers), 1)) + 0.4, 1.6])
    colours = _cmap(cmap).with_extremes(bad="#eeeeee")  # grey: a head the block does not have
    im = ax_map.imshow(np.ma.masked_invalid(mean.values), cmap=colours, aspect="auto", interpolation="nearest")
    ax_map.set_xticks(range(heads), [str(h) for h in range(heads)], fontsize=8)
    ax_map.set_yticks(range(len(layers)), [f"block {l}" for l in layers], fontsize=8)
    ax_map.set_xlabel("head", fontsize=9)
    ax_map.set_title(f"{info.title}: dataset mean", fontsize=10)
    bar = top.colorbar(im, ax=ax_map, shrink=0.9, aspect=25, pad=0.01)
    bar.set_label(info.unit, fontsize=9)
    bar.ax.tick_params(labelsize=8)
    offsets = (np.arange(heads) - (heads - 1) / 2) * (0.5 / max(heads, 1))
    for h in range(heads):
        ax_dots.scatter(np.arange(len(layers)) + offsets[h], mean.values[:, h], s=14, color="#3b6ea8", alpha=0.8,
                        linewidths=0)
    with np.errstate(invalid="ignore"):
        ax_dots.plot(range(len(layers)), np.nanmean(mean.values, axis=1), color="#888888", lw=1, zorder=0)
    if "stage" in mean.coords:  # Swin: where each stage begins (its tokens are coarser from there on)
        stages = [int(v) for v in mean["stage"].values]
        for i in range(1, len(stages)):
            if stages[i] != stages[i - 1]:
                ax_map.axhline(i - 0.5, color="white", lw=1.5)
                ax_dots.axvline(i - 0.5, color="#bbbbbb", lw=1, ls="--", zorder=0)
                ax_dots.text(i - 0.45, 1.0, f"stage {stages[i]}", transform=ax_dots.get_xaxis_transform(),
                             fontsize=7, color="#777777", va="top")
    ax_dots.set_xticks(range(len(layers)), [str(l) for l in layers], fontsize=8)
    ax_dots.set_xlabel("block", fontsize=9)
    ax_dots.set_ylabel(info.unit, fontsize=9)
    ax_dots.tick_params(labelsize=8)
    ax_dots.set_title(f"{info.title} by depth", fontsize=10)
    if selected:
        layer, h = selected[0], selected[1]
        li = layers.index(layer)
        ax_map.add_patch(Rectangle((h - 0.5, li - 0.5), 1, 1, fill=False, edgecolor="#e4002b", lw=2))
        ax_dots.scatter([li + offsets[h]], [mean.values[li, h]], s=40, facecolor="none", edgecolor="#e4002b", lw=1.5)
        axes = bottom.subplots(len(rows), ncols, squeeze=False)
        for r, (label, panels) in enumerate(rows):
            for c, ax in enumerate(axes[r]):
                ax.set_xticks([])
                ax.set_yticks([])
                if c >= len(panels):
                    ax.set_axis_off()
                    continue
                image, heat, text = panels[c]
                image = np.clip(np.asarray(image, dtype=float), 0, 1)
                heat = minmax(np.asarray(heat, dtype=float))
                ax.imshow(image, interpolation="nearest")
                ax.imshow(_upsample(heat, image.shape[:2], False), cmap=_cmap(DEFAULT_CMAP), vmin=0, vmax=1,
                          alpha=0.6, interpolation="nearest")
                ax.set_title(text, fontsize=8)
                if c == 0:
                    ax.set_ylabel(label, fontsize=9)
        bottom.suptitle(f"block {layer}, head {h}: highest and lowest {info.title.lower()}, under its attention "
                        f"(min-max per image)", fontsize=9)
    if suptitle:
        fig.suptitle(str(suptitle), fontsize=10)
    fig.draw_without_rendering()  # lay out once: the same figure then always saves the same bytes
    fig.set_layout_engine("none")
    return fig
