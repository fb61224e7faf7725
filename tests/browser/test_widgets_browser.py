"""The Explorer in a real browser (chromium), served by JupyterLab and by Voila.

After each action — move the layer slider, toggle a head, click a patch, switch
the statistic — the test reads plotly's state from the page
(``.js-plotly-plot``'s ``data[k].z``) and asserts it equals what vitlens computes
in this process from the very capture the notebook saved (``vl.save``).
"""

from __future__ import annotations

import contextlib
import os
import statistics
import time
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from .conftest import CHROMIUM

try:
    from playwright.sync_api import expect
except ImportError:  # skipped only where the browser tests skip anyway (no chromium, not CI)
    if os.environ.get("CI") or CHROMIUM.exists():
        raise
    pytest.skip(f"{CHROMIUM} is missing (and so is playwright)", allow_module_level=True)

import vitlens as vl
from vitlens.methods import statistic_maps

pytestmark = [pytest.mark.slow, pytest.mark.browser]

REPO = Path(__file__).resolve().parents[2]
SCREENSHOT = REPO / "docs" / "explorer.png"
TIMEOUT_MS = 30_000
#: Panels of the Explorer, and the trace index of each panel's heatmap in figure.data.
HEATMAP = {"attention": 1, "statistic": 3, "fusion": 5, "method": 7}
GRID_TRACE, MARKER_TRACE = 8, 9
LATENCIES: dict[str, list[float]] = {}


# -- what the panels must show, computed here from the saved capture ------------------------
def minmax(a) -> list[list[float]]:
    a = np.asarray(a, dtype=np.float64)
    span = a.max() - a.min()
    return (np.zeros_like(a) if span <= 0 else (a - a.min()) / span).tolist()


class Expected:
    """The four panels for one selection, straight from vitlens (no widget code)."""

    def __init__(self, cap: xr.DataTree, method: str = "generic_attention") -> None:
        self.cap = cap
        self.method = method

    def attention(self, layer: int, heads: list[int], query: tuple[int, int] | None):
        node = next(n for n in self.cap.children.values() if layer in n["layer"].values)
        att = node.attention.sel(layer=layer, head=heads).mean("head").isel(sample=0)
        if "window" not in att.dims:  # ViT
            token = 0 if query is None else int(np.flatnonzero((node["row"].values == query[0])
                                                               & (node["col"].values == query[1]))[0])
            keys = att.isel(query=token, key=np.flatnonzero(node["kind"].values == "patch"))
            return minmax(keys.values.reshape(node.attrs["grid"]))
        gh, gw = node.attrs["grid"]
        f = self.cap["stage0"].attrs["grid"][0] // gh
        token = (query[0] // f) * gw + query[1] // f
        wt = node.window_token.sel(layer=layer).values
        w, p = (int(i[0]) for i in np.nonzero(wt == token))
        flat = np.zeros(gh * gw)
        flat[wt[w]] = att.isel(window=w, query=p).values
        return minmax(np.kron(flat.reshape(gh, gw), np.ones((f, f))))

    def statistic(self, layer: int, stat: str):
        return minmax(statistic_maps(self.cap, stat=stat).isel(sample=0).sel(layer=layer).values)

    def fusion(self, layer: int, heads: list[int] | None, stat: str):
        return minmax(vl.explain(self.cap, "lnstat", heads=heads, stat=stat, grad=False, layers=range(0, layer + 1))
                      .isel(sample=0).values)

    def method_map(self, layer: int, heads: list[int]):
        return minmax(vl.explain(self.cap, self.method, heads=heads, layers=range(0, layer + 1)).isel(sample=0).values)

    def panels(self, layer: int, heads: list[int], query, stat: str) -> dict[str, list]:
        return {"attention": self.attention(layer, heads, query), "statistic": self.statistic(layer, stat),
                "fusion": self.fusion(layer, heads, stat), "method": self.method_map(layer, heads)}


# -- reading the page ---------------------------------------------------------------------------
PLOT_JS = "(i) => document.querySelectorAll('.vitlens-explorer')[i].querySelector('.js-plotly-plot')"

MATCHES_JS = """([i, want, tol]) => {
  const ex = document.querySelectorAll('.vitlens-explorer')[i];
  const gd = ex && ex.querySelector('.js-plotly-plot');
  if (!gd || !gd.data) return false;
  for (const [k, rows] of Object.entries(want)) {
    const z = gd.data[k] && gd.data[k].z;
    if (!z || z.length !== rows.length) return false;
    for (let r = 0; r < rows.length; r++) {
      if (!z[r] || z[r].length !== rows[r].length) return false;
      for (let c = 0; c < rows[r].length; c++) if (!(Math.abs(z[r][c] - rows[r][c]) <= tol)) return false;
    }
  }
  return true;
}"""


def page_z(page, i: int, k: int) -> np.ndarray:
    return np.asarray(page.evaluate(f"([i, k]) => Array.from(({PLOT_JS})(i).data[k].z, r => Array.from(r))", [i, k]))


def expect_panels(page, i: int, want: dict[str, list], what: str) -> None:
    """Wait until the page's heatmaps equal ``want`` (then compare exactly, for a readable failure)."""
    by_trace = {HEATMAP[name]: rows for name, rows in want.items()}
    try:
        page.wait_for_function(MATCHES_JS, arg=[i, by_trace, 2e-5], timeout=TIMEOUT_MS)
    except Exception:  # show what the page holds instead of a bare timeout
        for name, rows in want.items():
            np.testing.assert_allclose(page_z(page, i, HEATMAP[name]), rows, atol=2e-5, err_msg=f"{what}: {name} panel")
        raise


def title_shows(page, i: int, layer: int, timeout: float = TIMEOUT_MS) -> None:
    """Wait (one check per animation frame) until the drawn first panel title names block ``layer``."""
    page.wait_for_function(
        rf"""([i, layer]) => {{
          const t = ({PLOT_JS})(i).querySelector('.annotation-text');
          const words = t ? t.textContent.split(/\s+/) : [];
          const at = words.indexOf('block');
          return at >= 0 && words[at + 1] === String(layer);
        }}""", arg=[i, layer], polling="raf", timeout=timeout)


def explorer(page, i: int):
    return page.locator(".vitlens-explorer").nth(i)


def move_slider(page, i: int, key: str, layer: int) -> float:
    """Press ``key`` on explorer ``i``'s focused layer slider; seconds until the redrawn title shows ``layer``."""
    t0 = time.perf_counter()
    page.keyboard.press(key)
    title_shows(page, i, layer)
    return time.perf_counter() - t0


def patch_point(page, i: int, panel: int, row: int, col: int, stride: int) -> tuple[float, float]:
    """Page coordinates of a patch centre in one panel (plotly's own axis mapping)."""
    cx, cy = col * stride + (stride - 1) / 2, row * stride + (stride - 1) / 2
    return tuple(page.evaluate(
        f"""([i, panel, cx, cy]) => {{
          const gd = ({PLOT_JS})(i), fl = gd._fullLayout, s = panel ? String(panel + 1) : '';
          const xa = fl['xaxis' + s], ya = fl['yaxis' + s], box = gd.getBoundingClientRect();
          return [box.left + xa._offset + xa.l2p(cx), box.top + ya._offset + ya.l2p(cy)];
        }}""", [i, panel, cx, cy]))


def open_saved(folder: Path, name: str) -> xr.DataTree:
    return vl.open(folder / name)


# -- the scenario, the same in JupyterLab and Voila ------------------------------------------------
def drive_explorers(page, server, label: str, head_grid: bool) -> None:
    vit = Expected(open_saved(server.folder, "vit.nc"))
    stride = vit.cap["stage0"].attrs["stride"][0]
    all_heads = [0, 1, 2]

    expect_panels(page, 0, vit.panels(3, all_heads, None, "std"), "first view")

    # layer slider: keyboard on the noUiSlider handle; every move checked, every move timed
    explorer(page, 0).locator(".vitlens-layer .noUi-handle").click()
    times = []
    for key, layer in (("ArrowLeft", 2), ("ArrowLeft", 1), ("ArrowLeft", 0), ("ArrowRight", 1), ("ArrowRight", 2)):
        times.append(move_slider(page, 0, key, layer))
        expect_panels(page, 0, vit.panels(layer, all_heads, None, "std"), f"layer slider → {layer}")
    LATENCIES[label] = times

    # toggle head 1 off
    explorer(page, 0).locator(".vitlens-head-1").click()
    expect_panels(page, 0, vit.panels(2, [0, 2], None, "std"), "head 1 toggled off")

    # click a patch of the attention panel: it becomes the query, marked on the image
    explorer(page, 0).locator(".js-plotly-plot").scroll_into_view_if_needed()
    x, y = patch_point(page, 0, 0, 2, 5, stride)
    page.mouse.move(x, y)
    page.mouse.click(x, y)
    expect_panels(page, 0, {"attention": vit.attention(2, [0, 2], (2, 5))}, "patch (2, 5) clicked")
    marker = page.evaluate(f"(i) => ({PLOT_JS})(i).data[{MARKER_TRACE}].x.length", 0)
    assert marker == 5  # a closed square around the query patch

    # switch the LayerNorm statistic
    explorer(page, 0).locator(".vitlens-stat select").select_option("var")
    expect_panels(page, 0, {"statistic": vit.statistic(2, "var"), "fusion": vit.fusion(2, [0, 2], "var"),
                            "method": vit.method_map(2, [0, 2])}, "statistic → var")
    expect(explorer(page, 0).locator(".vitlens-captions")).to_contain_text(
        "variance of each token entering block 2's first LayerNorm", timeout=TIMEOUT_MS)

    if head_grid:  # clicking head 1 in the linked HeadGrid turns it back on in the Explorer
        grid = page.locator(".vitlens-head-grid .js-plotly-plot")
        grid.scroll_into_view_if_needed()  # JupyterLab draws off-screen outputs lazily
        grid.wait_for(state="visible", timeout=TIMEOUT_MS)
        page.wait_for_function("() => { const gd = document.querySelector('.vitlens-head-grid .js-plotly-plot');"
                               " return !!(gd && gd._fullLayout && gd._fullLayout.xaxis2); }", timeout=TIMEOUT_MS)
        hx, hy = page.evaluate("""(gd) => { const fl = gd._fullLayout, xa = fl.xaxis2, ya = fl.yaxis2;
            const box = gd.getBoundingClientRect();
            return [box.left + xa._offset + xa._length / 2, box.top + ya._offset + ya._length / 2]; }""",
                               grid.element_handle())
        page.mouse.move(hx, hy)
        page.mouse.click(hx, hy)
        expect_panels(page, 0, {"fusion": vit.fusion(2, all_heads, "var")}, "head 1 clicked in the HeadGrid")

    # Swin: the stage indicator follows the slider; the query's window row on a window grid
    swin = Expected(open_saved(server.folder, "swin.nc"))
    explorer(page, 1).locator(".vitlens-layer .noUi-handle").click()
    move_slider(page, 1, "ArrowLeft", 2)
    expect_panels(page, 1, {"attention": swin.attention(2, [0, 1, 2, 3], (8, 8)),
                            "fusion": swin.fusion(2, None, "std")}, "swin layer → 2")  # all heads
    expect(explorer(page, 1).locator(".vitlens-stage")).to_contain_text("stage1", timeout=TIMEOUT_MS)
    assert page.evaluate(f"(i) => ({PLOT_JS})(i).data[{GRID_TRACE}].x.length", 1) > 0
    move_slider(page, 1, "ArrowLeft", 1)
    expect(explorer(page, 1).locator(".vitlens-stage")).to_contain_text("stage0", timeout=TIMEOUT_MS)
    expect_panels(page, 1, {"attention": swin.attention(1, [0, 1], (8, 8))}, "swin layer → 1")


def report(label: str, lines: list[str]) -> None:
    ms = [1000 * t for t in LATENCIES[label]]
    line = (f"{label}: slider move → plotly redraw, {len(ms)} moves: median {statistics.median(ms):.0f} ms, "
            f"max {max(ms):.0f} ms ({', '.join(f'{v:.0f}' for v in ms)})")
    print("\n" + line)
    lines.append(line)  # printed again in pytest's terminal summary


def save_screenshot(page) -> None:
    """The ViT Explorer as docs/explorer.png (for the README), kept under 300 KB."""
    from PIL import Image

    SCREENSHOT.parent.mkdir(exist_ok=True)
    explorer(page, 0).screenshot(path=str(SCREENSHOT), animations="disabled")
    image = Image.open(SCREENSHOT)
    if SCREENSHOT.stat().st_size > 250_000:
        image.convert("RGB").quantize(colors=128, method=Image.Quantize.MEDIANCUT).save(SCREENSHOT, optimize=True)
    assert SCREENSHOT.stat().st_size < 300_000


@contextlib.contextmanager
def diagnosed(page, server, problems):
    """On failure, keep a screenshot of the page and show the page's errors and the server's log."""
    try:
        yield
    except BaseException as exc:
        shot = server.folder / "failure.png"
        try:
            page.screenshot(path=str(shot), full_page=True)
        except Exception:  # the page may be gone; the log still helps
            pass
        errors = "\n".join(problems.errors) or "none"
        raise AssertionError(f"{exc}\n(screenshot: {shot})\n--- page errors ---\n{errors}\n"
                             f"--- {server.name} log ---\n{server.tail()}") from exc


def test_explorer_in_jupyterlab(page_factory, lab, latency_lines):
    page, problems = page_factory()
    with diagnosed(page, lab, problems):
        run_in_jupyterlab(page, lab, latency_lines)
    problems.check()


KERNEL_DIALOG = ".jp-Dialog"
IDLE = "!!document.querySelector(\".jp-Notebook-ExecutionIndicator[data-status='idle']\")"
BOTH_DRAWN = "document.querySelectorAll('.vitlens-explorer .js-plotly-plot').length == 2"


def answer_kernel_dialog(page) -> bool:
    """Accept JupyterLab's "Select Kernel" dialog (python3) if it is open; whether it was."""
    if not page.locator(KERNEL_DIALOG).count():
        return False
    page.locator(f"{KERNEL_DIALOG} .jp-mod-accept").click()
    page.wait_for_function(f"() => !document.querySelector('{KERNEL_DIALOG}') && {IDLE}", timeout=TIMEOUT_MS * 3)
    return True


def run_all(page) -> None:
    page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
    page.locator("[data-command='runmenu:run-all']").click()


def kernel_connected(lab) -> bool:
    """The server's word that the notebook's kernel is up, idle, and the page connected to it."""
    return any(s["path"].endswith("explorer.ipynb") and s["kernel"]["execution_state"] == "idle"
               and s["kernel"]["connections"] > 0 for s in lab.api("sessions"))


def run_in_jupyterlab(page, lab, latency_lines) -> None:
    page.goto(lab.url, timeout=TIMEOUT_MS * 2)
    page.wait_for_function(f"() => {IDLE} || !!document.querySelector('{KERNEL_DIALOG}')", timeout=TIMEOUT_MS * 3)
    answer_kernel_dialog(page)
    deadline = time.monotonic() + TIMEOUT_MS / 1000 * 3
    while not kernel_connected(lab):  # the page shows "idle" before it has a kernel
        assert time.monotonic() < deadline, f"no kernel connected: {lab.api('sessions')}"
        answer_kernel_dialog(page)
        page.wait_for_timeout(250)
    run_all(page)
    page.wait_for_function(f"() => {BOTH_DRAWN} || !!document.querySelector('{KERNEL_DIALOG}')",
                           timeout=TIMEOUT_MS * 4)
    if answer_kernel_dialog(page):  # it can also open once the run has started: run again
        run_all(page)
        page.wait_for_function(f"() => {BOTH_DRAWN}", timeout=TIMEOUT_MS * 4)
    drive_explorers(page, lab, "JupyterLab", head_grid=True)
    report("JupyterLab", latency_lines)


def test_explorer_in_voila(page_factory, voila, latency_lines):
    page, problems = page_factory(allow_offline="fontawesome-free")
    with diagnosed(page, voila, problems):
        page.goto(voila.url, timeout=TIMEOUT_MS * 4)
        page.wait_for_function("() => document.querySelectorAll('.vitlens-explorer .js-plotly-plot').length == 2",
                               timeout=TIMEOUT_MS * 4)
        drive_explorers(page, voila, "Voila", head_grid=True)
        report("Voila", latency_lines)
        save_screenshot(page)
    problems.check()
    assert len(problems.offline) <= 2  # only the two fontawesome stylesheets
