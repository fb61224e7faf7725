"""Publication figures from code: method grids, per-layer strips, overlays; export.

Figures are plotly figures (so they also show interactively in Jupyter) with
fixed trace ids, so the same capture always writes the same file. Static export
goes through kaleido, which drives the system's Chromium.

Examples
--------
>>> import numpy as np, timm, vitlens as vl
>>> model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=3)
>>> cap = vl.capture(model, np.random.default_rng(0).random((2, 32, 32, 3)))
>>> fig = vl.figures.grid(cap, methods=["rollout", "lnstat"])
>>> len(fig.data)  # per sample: the input, then image + heat map per method
10
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from .errors import ExportError, OptionError
from .methods import METHOD_INFO, METHODS, explain, normalize, to_pixels

DEFAULT_COLORSCALE = "Inferno"
TITLES = {name: info.title for name, info in METHOD_INFO.items()}  # from the method registry


# -- colour ------------------------------------------------------------------------------
def colormap(name: str = DEFAULT_COLORSCALE, n: int = 256) -> np.ndarray:
    """A plotly colour scale as an (n, 3) uint8 lookup table."""
    import plotly.colors as pc

    try:
        scale = pc.get_colorscale(name)
    except Exception as exc:
        raise OptionError(f"unknown colour scale {name!r}; use a plotly name such as 'Inferno' or 'Viridis'.") from exc
    stops = np.array([s for s, _ in scale], dtype=float)
    rgb = np.array([pc.unlabel_rgb(pc.convert_colors_to_same_type([c], "rgb")[0][0]) for _, c in scale], float)
    x = np.linspace(0, 1, n)
    return np.stack([np.interp(x, stops, rgb[:, k]) for k in range(3)], 1).round().astype(np.uint8)


def overlay(image: np.ndarray, heat: np.ndarray, *, alpha: float = 0.5, colorscale: str = DEFAULT_COLORSCALE) -> np.ndarray:
    """Blend a [0, 1] heat map (H, W) onto an RGB image (H, W, 3) in [0, 1]; uint8 out.

    Examples
    --------
    >>> overlay(np.zeros((2, 2, 3)), np.ones((2, 2)), alpha=1.0).shape
    (2, 2, 3)
    """
    if image.shape[:2] != heat.shape:
        raise OptionError(f"overlay: image {image.shape[:2]} and map {heat.shape} differ in size; use vl.to_pixels first.")
    lut = colormap(colorscale)
    colours = lut[np.clip((np.nan_to_num(heat) * 255).round(), 0, 255).astype(int)] / 255.0
    out = (1 - alpha) * np.clip(image, 0, 1) + alpha * colours
    return (out * 255).round().astype(np.uint8)


# -- figures -----------------------------------------------------------------------------
def _pixel_maps(cap: xr.DataTree, methods: Sequence[str], options: dict[str, Any]) -> xr.Dataset:
    maps = explain(cap, "all", **options) if set(methods) == set(METHODS) else xr.Dataset(
        {m: explain(cap, m, **{k: v for k, v in options.items() if k in _options(m)}) for m in methods}
    )
    return xr.Dataset({m: normalize(to_pixels(maps[m])) for m in methods})


def _options(method: str) -> list[str]:
    from .methods import options_of

    return options_of(method)


def _check_methods(methods: Sequence[str] | str | None) -> list[str]:
    if methods is None or methods == "all":
        return list(METHODS)
    if isinstance(methods, str):
        methods = [methods]
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise OptionError(f"methods {bad or '[]'} not known; choose from {list(METHODS)}.")
    return list(methods)


def _image_trace(img: np.ndarray, uid: str) -> Any:
    import plotly.graph_objects as go

    return go.Image(z=(np.clip(img, 0, 1) * 255).round().astype(np.uint8), uid=uid, hoverinfo="skip")


def _heat_trace(heat: np.ndarray, uid: str, opacity: float, colorscale: str, showscale: bool) -> Any:
    import plotly.graph_objects as go

    return go.Heatmap(
        z=heat, zmin=0, zmax=1, colorscale=colorscale, opacity=opacity, showscale=showscale, uid=uid,
        colorbar=dict(title=dict(text="relevance", side="right"), thickness=12, len=0.8),
        hovertemplate="x %{x}, y %{y}: %{z:.2f}<extra></extra>",
    )


def grid(
    cap: xr.DataTree,
    methods: Sequence[str] | str | None = None,
    samples: Sequence[int] | None = None,
    *,
    opacity: float = 0.6,
    colorscale: str = DEFAULT_COLORSCALE,
    colorbar: bool = True,
    titles: bool = True,
    cell: int = 150,
    **options: Any,
) -> Any:
    """Images × methods: each row one sample (its input, then each method's map over it).

    Parameters
    ----------
    cap
        A capture.
    methods
        Methods as columns (default: all seven).
    samples
        Sample indices as rows (default: all, at most 8).
    opacity, colorscale, colorbar, titles
        Look of the overlay: one colour scale for every panel (maps are min-max
        normalised per image), an optional shared colour bar, column titles.
    cell
        Size of one panel in pixels.
    **options
        Passed to the methods that take them (e.g. ``heads=``, ``start_layer=``).

    Returns
    -------
    plotly.graph_objects.Figure
    """
    from plotly.subplots import make_subplots

    methods = _check_methods(methods)
    n = int(cap["sample"].size)
    samples = list(range(min(n, 8))) if samples is None else [int(s) for s in samples]
    if not samples or any(not 0 <= s < n for s in samples):
        raise OptionError(f"samples {samples} must be a non-empty selection of 0..{n - 1}.")
    sub = cap.isel(sample=samples)
    maps = _pixel_maps(sub, methods, options)
    images = sub.image.values
    cols = 1 + len(methods)
    names = cap["class_name"].values
    targets = sub.target.values
    col_titles = ["input"] + [TITLES.get(m, m) for m in methods] if titles else None
    fig = make_subplots(rows=len(samples), cols=cols, column_titles=col_titles,
                        horizontal_spacing=0.01, vertical_spacing=0.02)
    for r, s in enumerate(samples):
        fig.add_trace(_image_trace(images[r], f"img-{r}"), row=r + 1, col=1)
        for c, m in enumerate(methods):
            fig.add_trace(_image_trace(images[r], f"img-{r}-{m}"), row=r + 1, col=c + 2)
            show = colorbar and r == 0 and c == len(methods) - 1
            fig.add_trace(_heat_trace(maps[m].values[r], f"heat-{r}-{m}", opacity, colorscale, show),
                          row=r + 1, col=c + 2)
        if titles:
            fig.update_yaxes(title_text=f"#{s}: {names[targets[r]]}", row=r + 1, col=1)
    fig.update_xaxes(showticklabels=False, showgrid=False, zeroline=False)
    fig.update_yaxes(showticklabels=False, showgrid=False, zeroline=False, autorange="reversed", scaleanchor=None)
    fig.update_layout(width=cell * cols + (80 if colorbar else 0), height=cell * len(samples) + (40 if titles else 0),
                      margin=dict(l=40, r=10, t=40 if titles else 10, b=10), plot_bgcolor="white",
                      paper_bgcolor="white", font=dict(size=11))
    return fig


def layers(
    cap: xr.DataTree,
    method: str = "rollout",
    sample: int = 0,
    *,
    layers: Sequence[int] | None = None,
    columns: int = 6,
    opacity: float = 0.6,
    colorscale: str = DEFAULT_COLORSCALE,
    cell: int = 130,
    **options: Any,
) -> Any:
    """One panel per layer: ``method``'s cumulative map after each block (``per_layer=True``).

    For ``attention`` each panel is that block's own attention; gradcam has no
    per-layer form.
    """
    from plotly.subplots import make_subplots

    if method not in METHODS or not METHOD_INFO[method].per_layer:
        raise OptionError(f"layers() needs a method with a per-layer form: {[m for m in METHODS if METHOD_INFO[m].per_layer]}.")
    n = int(cap["sample"].size)
    if not 0 <= sample < n:
        raise OptionError(f"sample {sample} out of range 0..{n - 1}.")
    sub = cap.isel(sample=[sample])
    kwargs = dict(options)
    if layers is not None:
        kwargs["layers"] = list(layers)
    per = normalize(to_pixels(explain(sub, method, per_layer=True, **kwargs)))
    chosen = per["layer"].values.tolist()
    rows = -(-len(chosen) // columns)
    fig = make_subplots(rows=rows, cols=min(columns, len(chosen)),
                        subplot_titles=[f"after block {l}" for l in chosen],
                        horizontal_spacing=0.01, vertical_spacing=0.06)
    img = sub.image.values[0]
    for i, layer in enumerate(chosen):
        r, c = divmod(i, columns)
        fig.add_trace(_image_trace(img, f"img-{layer}"), row=r + 1, col=c + 1)
        fig.add_trace(_heat_trace(per.values[0, i], f"heat-{layer}", opacity, colorscale, i == len(chosen) - 1),
                      row=r + 1, col=c + 1)
    fig.update_xaxes(showticklabels=False, showgrid=False, zeroline=False)
    fig.update_yaxes(showticklabels=False, showgrid=False, zeroline=False, autorange="reversed")
    fig.update_layout(width=cell * min(columns, len(chosen)) + 80, height=cell * rows + 50,
                      title=dict(text=f"{TITLES.get(method, method)} by depth", x=0.01),
                      margin=dict(l=10, r=10, t=60, b=10), plot_bgcolor="white", paper_bgcolor="white",
                      font=dict(size=11))
    return fig


# -- export ------------------------------------------------------------------------------
_PDF_DATES = re.compile(rb"/(CreationDate|ModDate) \(D:[^)]*\)")
_SVG_UID = re.compile(rb'id="defs-([0-9a-f]{6})"')
_SERVER_STARTED = False


def save(fig: Any, path: str | os.PathLike, *, dpi: int = 150) -> Path:
    """Write ``fig`` as PNG, SVG, PDF (via kaleido and the system Chromium) or HTML.

    ``dpi`` sets the PNG resolution (96 dpi is plotly's 1×). Output is
    deterministic: the same figure writes the same bytes (PDF dates are fixed).
    """
    path = Path(path)
    fmt = path.suffix.lower().lstrip(".")
    if fmt == "html":
        fig.write_html(path, include_plotlyjs=True, full_html=True, div_id="vitlens-figure")
        return path
    if fmt not in ("png", "svg", "pdf"):
        raise OptionError(f"{str(path)!r}: choose a .png, .svg, .pdf or .html file.")
    _ensure_browser()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*kopts argument is ignored.*")
        try:
            data = fig.to_image(format=fmt, scale=dpi / 96 if fmt == "png" else 1)
        except Exception as exc:  # kaleido missing, or no Chromium it can start
            raise ExportError(
                f"could not write {str(path)!r} ({type(exc).__name__}: {exc}); {fmt.upper()} export needs "
                "kaleido>=1 and a Chromium (set BROWSER_PATH, e.g. /usr/bin/chromium), or save as .html."
            ) from exc
    if fmt == "pdf":
        data = _PDF_DATES.sub(lambda m: b"/" + m.group(1) + b" (D:20000101000000Z)", data)
    elif fmt == "svg":  # plotly names clip paths after a random figure id: make it fixed
        match = _SVG_UID.search(data)
        if match:
            data = data.replace(match.group(1), b"vitlen")
    path.write_bytes(data)
    return path


def _ensure_browser() -> None:
    """Point kaleido at the system Chromium and keep one browser for all exports.

    kaleido finds Chromium via BROWSER_PATH or PATH (it never downloads one
    here); one persistent server makes each export ~0.2 s instead of ~3 s.
    """
    global _SERVER_STARTED
    if not os.environ.get("BROWSER_PATH"):
        for candidate in ("/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome"):
            if Path(candidate).exists():
                os.environ["BROWSER_PATH"] = candidate
                break
    if not _SERVER_STARTED:
        try:
            import kaleido

            kaleido.start_sync_server(silence_warnings=True)
        except Exception:  # an older kaleido, or one already running: export still works
            pass
        _SERVER_STARTED = True
