"""The head atlas in a real browser (chromium), served by JupyterLab and by Voila, narrow and wide.

The notebook (:func:`notebook_template.write_atlas_notebook`) saves its capture, so
this process computes what each figure must hold with ``vl.head_stats`` and the raw
attention arrays. After each action — a click on a heat-map cell, the statistic
drop-down, a click on a patch of an example image — the test reads plotly's state
from the page and compares it; the linked Explorer must follow the clicked head's
block. At both window sizes every figure must fit its output area.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from .conftest import TIMEOUT_MS, lab_server, open_and_run_in_lab, open_in_voila, voila_server
from .notebook_template import write_atlas_notebook
from .test_widgets_browser import (
    FIT_JS,
    NARROW,
    WIDE,
    diagnosed,
    minmax,
    resize,
    title_shows,
    wait_drawn,
    wait_steady,
)

import vitlens as vl

pytestmark = [pytest.mark.slow, pytest.mark.browser]

PLOT = {0: ".vitlens-atlas-overview .js-plotly-plot", 1: ".vitlens-atlas-examples .js-plotly-plot"}
#: Plots on the page: the Explorer, the atlas's overview and its examples.
PLOTS = 3
K = 3


@pytest.fixture(scope="module")
def atlas_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("atlas")
    write_atlas_notebook(folder)
    return folder


def plot_js(i: int) -> str:
    """Plot ``i`` of the atlas (0: overview, 1: examples)."""
    return f"document.querySelector('{PLOT[i]}')"


def expect_z(page, plot: int, trace: int, want, what: str, tol: float = 2e-5) -> None:
    """Wait until trace ``trace`` of atlas plot ``plot`` holds ``want`` (``None`` = a gap)."""
    js = f"""([want, tol]) => {{
      const gd = {plot_js(plot)}; const z = gd && gd.data && gd.data[{trace}] && gd.data[{trace}].z;
      if (!z || z.length !== want.length) return false;
      return want.every((row, r) => z[r] && row.every((v, c) => v === null ? z[r][c] === null
                                                      : Math.abs(z[r][c] - v) <= tol));
    }}"""
    try:
        page.wait_for_function(js, arg=[want, tol], timeout=TIMEOUT_MS)
    except Exception:
        got = page.evaluate(f"() => {plot_js(plot)}.data[{trace}].z")
        raise AssertionError(f"{what}: page holds {got}, expected {want}; the atlas says {probe(page)!r}") from None


def probe(page) -> str:
    """The atlas's state as its hidden probe reports it (statistic, head, query, shown samples)."""
    return page.evaluate("() => document.querySelector('.vitlens-head-atlas .vitlens-probe').textContent")





def mean_rows(cap, stat: str) -> list[list[float | None]]:
    mean = vl.head_stats(cap, stat).mean("sample").values
    return [[None if not np.isfinite(v) else float(v) for v in row] for row in mean]


def expected_examples(cap, stat: str, layer: int, head: int, query) -> list[list[list[float]]]:
    """The 2k example maps: the head's attention of ``query`` over the highest and lowest images."""
    column = vl.head_stats(cap, stat).sel(layer=layer, head=head).values
    top = sorted(range(len(column)), key=lambda s: (-column[s], s))[:K]
    low = sorted(range(len(column)), key=lambda s: (column[s], s))[:K]
    st = cap["stage0"]
    token = 0 if query is None else int(np.flatnonzero((st["row"].values == query[0])
                                                        & (st["col"].values == query[1]))[0])
    patches = np.flatnonzero(st["kind"].values == "patch")
    return [minmax(st.attention.sel(layer=layer, head=head).isel(sample=s, query=token, key=patches).values
                   .reshape(st.attrs["grid"])) for s in top + low]


def expect_examples(page, maps, what: str) -> None:
    for i, want in enumerate(maps):
        expect_z(page, 1, 2 * i + 1, want, f"{what}: example {i}")


def click_at(page, plot: int, axis: str, x: float, y: float, then: str) -> None:
    """Click data point (x, y) of subplot ``axis`` ('' or '2', ...) of atlas plot ``plot``, once, and wait
    until the atlas's probe says ``then``.

    plotly reports a click on the point it last worked out under the pointer (it looks at most every
    50 ms): the click waits for that state, plotly's hover label in the plot, and is then a quick press
    (35 ms), the click plotly used to lose when its deferred look ran while the button was down
    (``keepPressedPoint`` in vitlens/widgets/plotly_widget.js). One click must do.
    """
    wait_steady(page, PLOT[plot])
    px, py = page.evaluate(f"""([x, y]) => {{
        const gd = {plot_js(plot)}, fl = gd._fullLayout, box = gd.getBoundingClientRect();
        const xa = fl['xaxis{axis}'], ya = fl['yaxis{axis}'];
        return [box.left + xa._offset + xa.l2p(x), box.top + ya._offset + ya.l2p(y)]; }}""", [x, y])
    page.mouse.move(px, py)
    hover = (f"() => {{ const t = ({plot_js(plot)}).querySelector('.hoverlayer .hovertext'); "
             "return t ? t.textContent : null; }")
    try:
        page.wait_for_function(f"() => !!({hover})()", timeout=TIMEOUT_MS)
    except Exception as exc:
        raise AssertionError(f"pointing at ({x}, {y}) of plot {plot}: plotly shows no hover label there") from exc
    page.mouse.click(px, py, delay=35)
    try:
        page.wait_for_function("(t) => document.querySelector('.vitlens-head-atlas .vitlens-probe').textContent"
                               ".includes(t)", arg=then, timeout=TIMEOUT_MS)
    except Exception as exc:
        raise AssertionError(f"a click at ({x}, {y}) of plot {plot} (hover label {page.evaluate(hover)!r}): "
                             f"the atlas says {probe(page)!r}, not {then!r}") from exc


def check_fit(page, label: str) -> None:
    """Every figure fits its output area and fills most of it; colour bars inside; no modebar."""
    page.wait_for_function(f"() => ({FIT_JS})().plots.length >= {PLOTS}", timeout=TIMEOUT_MS * 2)
    wait_drawn(page)  # plotly follows a resize asynchronously (each figure looked at on screen)
    fits = f"() => ({FIT_JS})().plots.every((p) => p.fig > 0.85 * p.area && p.fig <= p.area + 1)"
    try:
        page.wait_for_function(fits, timeout=TIMEOUT_MS)  # a state: every figure drawn at its area's width
    except Exception as exc:  # say which figure did not follow its area, and how
        raise AssertionError(f"{label}: a figure does not fit its output area: {page.evaluate(FIT_JS)['plots']}") from exc
    plots = page.evaluate(FIT_JS)["plots"]
    print(f"\n{label}: figure/output width px: " + ", ".join(f"{p['fig']:.0f}/{p['area']:.0f}" for p in plots))
    for p in plots:
        assert p["area"] * 0.85 <= p["fig"] <= p["area"] + 1 and p["right"] <= p["areaRight"] + 1, f"{label}: {p}"
        assert p["barMax"] <= p["areaRight"] + 1 and not p["modebar"] and p["titlesInside"], f"{label}: {p}"


def drive_atlas(page, folder, label: str) -> None:
    cap = vl.open(folder / "atlas.nc")
    expect_z(page, 0, 0, mean_rows(cap, "attention_distance"), "first view: mean distances")
    expect_examples(page, expected_examples(cap, "attention_distance", 3, 0, None), "first view")

    # a click on the heat map's cell (block 2, head 1): its images, and the linked Explorer moves to block 2
    page.locator(".vitlens-head-atlas").scroll_into_view_if_needed()
    t0 = time.perf_counter()
    click_at(page, 0, "", 1, 2, then="layer=2 head=1")
    expect_examples(page, expected_examples(cap, "attention_distance", 2, 1, None), "cell (2, 1) clicked")
    print(f"{label}: cell click → six example maps redrawn in {time.perf_counter() - t0:.2f} s")
    title_shows(page, 0, 2)  # the Explorer (the page's first) shows block 2

    # the statistic drop-down
    page.locator(".vitlens-head-atlas .vitlens-stat select").select_option(label="Attention entropy")
    expect_z(page, 0, 0, mean_rows(cap, "attention_entropy"), "statistic → entropy")
    expect_examples(page, expected_examples(cap, "attention_entropy", 2, 1, None), "statistic → entropy")

    # a patch of the first example image becomes the query of every image
    stride = cap["stage0"].attrs["stride"][0]
    page.locator(PLOT[1]).scroll_into_view_if_needed()
    click_at(page, 1, "", 5 * stride + (stride - 1) / 2, 2 * stride + (stride - 1) / 2, then="query=2,5")
    expect_examples(page, expected_examples(cap, "attention_entropy", 2, 1, (2, 5)), "patch (2, 5) clicked")


def test_head_atlas_in_jupyterlab_wide_then_narrow(page_factory, atlas_folder):
    with lab_server(atlas_folder, "atlas.ipynb") as lab:
        page, problems = page_factory(viewport=WIDE)
        with diagnosed(page, lab, problems):
            open_and_run_in_lab(page, lab, PLOTS)
            check_fit(page, "JupyterLab wide")
            drive_atlas(page, atlas_folder, "JupyterLab")
            resize(page, NARROW)
            check_fit(page, "JupyterLab narrow")
            page.screenshot(path=str(atlas_folder / "atlas-jupyterlab-narrow.png"), full_page=True)
        problems.check()


def test_head_atlas_in_voila_narrow_then_wide(page_factory, atlas_folder):
    with voila_server(atlas_folder, "atlas.ipynb") as voila:
        page, problems = page_factory(allow_offline="fontawesome-free", viewport=NARROW)
        with diagnosed(page, voila, problems):
            open_in_voila(page, voila, PLOTS)
            check_fit(page, "Voila narrow")
            drive_atlas(page, atlas_folder, "Voila")
            resize(page, WIDE)
            check_fit(page, "Voila wide")
            page.screenshot(path=str(atlas_folder / "atlas-voila-wide.png"), full_page=True)
        problems.check()
