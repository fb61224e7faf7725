"""The Explorer's ablate mode in a real browser (chromium), in JupyterLab and in Voila.

A head switch clicked on the page turns that head off in the model: the test
reads the probability bars and the method panel from plotly's state in the page
and checks them against an ablated capture made here, in the test process, with
the same random model (``vl.capture(..., ablate=...)``); "reset" restores the
first view; a click on a head of the linked HeadGrid ablates that head.
"""

from __future__ import annotations

import time

import nbformat
import numpy as np
import pytest

from .conftest import TIMEOUT_MS, lab_server, open_and_run_in_lab, open_in_voila, playwright_expect, served_folder, voila_server
from .test_widgets_browser import HEATMAP, click_point, diagnosed, expect_panels, explorer, minmax, wait_steady

expect = playwright_expect()

import vitlens as vl

pytestmark = [pytest.mark.slow, pytest.mark.browser]

MODEL = """\
import os
os.environ.setdefault("OMP_NUM_THREADS", "1")
import timm, torch
import vitlens as vl
torch.set_num_threads(1)

def make_model():
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", img_size=64, patch_size=8, num_classes=8,
                             embed_dim=48, depth=4, num_heads=3).eval()
"""

CELLS = (
    MODEL + """\
HERE = {here!r}
model = make_model()
image = vl.datasets.shapes(1, seed=3, size=64).image.values
cap = vl.capture(model, image)
vl.save(cap, os.path.join(HERE, "ablate.nc"), overwrite=True)
explorer = vl.Explorer(cap, model, ablate=True)
explorer
""",
    """\
vl.HeadGrid(cap, explorer=explorer)
""",
)

BARS = "() => document.querySelector('.vitlens-ablate .js-plotly-plot')"


def write(folder):
    """The ablate-mode notebook, ``explorer.ipynb`` (a ``served_folder`` writer)."""
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [nbformat.v4.new_code_cell(c.format(here=str(folder)) if "{here" in c else c) for c in CELLS]
    nbformat.write(nb, folder / "explorer.ipynb")


@pytest.fixture(scope="module")
def ablate_voila(tmp_path_factory):
    with voila_server(served_folder(tmp_path_factory, "ablate-voila", writer=write)) as server:
        yield server


@pytest.fixture(scope="module")
def ablate_lab(tmp_path_factory):
    with lab_server(served_folder(tmp_path_factory, "ablate-lab", writer=write)) as server:
        yield server


def _model():
    namespace: dict = {}
    exec(MODEL, namespace)  # the notebook's own model: same code, same seed
    return namespace["make_model"]()


def _bars(page) -> tuple[list[float], list[float], bool]:
    return tuple(page.evaluate(f"""() => {{ const gd = ({BARS})();
        return [Array.from(gd.data[0].x), Array.from(gd.data[1].x), gd.data[1].visible !== false]; }}"""))


def drive_ablation(page, server) -> None:
    cap = vl.open(server.folder / "ablate.nc")
    model = _model()
    np.testing.assert_allclose(vl.capture(model, cap["image"].values)["logits"].values, cap["logits"].values,
                               rtol=1e-5, atol=1e-6)  # the test's model is the notebook's
    target = int(cap["target"][0])
    method = "generic_attention"
    first = {"method": minmax(vl.explain(cap, method).isel(sample=0).values)}
    expect_panels(page, 0, first, "first view")
    before, _, shown = _bars(page)
    assert not shown  # nothing switched off: no "after" bars

    # switch head 1 of the shown (last) block off: bars and the method panel follow the ablated model
    box = explorer(page, 0)
    box.locator(".vitlens-ablate").scroll_into_view_if_needed()
    t0 = time.perf_counter()
    box.locator(".vitlens-ablate-1").click()
    ablated = vl.capture(model, cap["image"].values, target=target, ablate={3: [1]})
    expect_panels(page, 0, {"method": minmax(vl.explain(ablated, method).isel(sample=0).values)},
                  "head 1 of block 3 switched off")
    print(f"\n{server.name}: head switch → redrawn maps in {1000 * (time.perf_counter() - t0):.0f} ms")
    p = np.exp(ablated["logits"].values[0] - ablated["logits"].values[0].max())
    p /= p.sum()
    page.wait_for_function(f"() => {{ const gd = ({BARS})(); return gd.data[1].visible !== false; }}",
                           timeout=TIMEOUT_MS)
    got_before, got_after, shown = _bars(page)
    assert shown and not np.allclose(got_before, got_after)
    np.testing.assert_allclose(sorted(got_after, reverse=True)[0], p.max(), rtol=1e-5)
    assert "mod-danger" in (box.locator(".vitlens-ablate-1").get_attribute("class") or "")  # looks switched off
    expect(box.locator(".vitlens-ablate-status")).to_contain_text("block 3 head 1", timeout=TIMEOUT_MS)

    # reset: the first view again, no "after" bars
    box.locator(".vitlens-ablate-reset").click()
    expect_panels(page, 0, first, "reset")
    page.wait_for_function(f"() => {{ const gd = ({BARS})(); return gd.data[1].visible === false; }}",
                           timeout=TIMEOUT_MS)
    assert "mod-danger" not in (box.locator(".vitlens-ablate-1").get_attribute("class") or "")

    # a click on head 2 of the linked HeadGrid switches it off in the model
    grid = page.locator(".vitlens-head-grid .js-plotly-plot")
    grid.scroll_into_view_if_needed()
    grid.wait_for(state="visible", timeout=TIMEOUT_MS)
    page.wait_for_function("() => { const gd = document.querySelector('.vitlens-head-grid .js-plotly-plot');"
                           " return !!(gd && gd._fullLayout && gd._fullLayout.xaxis3); }", timeout=TIMEOUT_MS)
    wait_steady(page, ".vitlens-head-grid .js-plotly-plot")
    hx, hy = page.evaluate("""(gd) => { const fl = gd._fullLayout, xa = fl.xaxis3, ya = fl.yaxis3;
        const box = gd.getBoundingClientRect();
        return [box.left + xa._offset + xa._length / 2, box.top + ya._offset + ya._length / 2]; }""",
                           grid.element_handle())
    click_point(page, ".vitlens-head-grid", hx, hy, "row ")  # any patch of head 2's panel
    by_grid = vl.capture(model, cap["image"].values, target=target, ablate={3: [2]})
    expect_panels(page, 0, {"method": minmax(vl.explain(by_grid, method).isel(sample=0).values)},
                  "head 2 clicked in the HeadGrid")
    expect(page.locator(".vitlens-head-grid")).to_contain_text("switched off", timeout=TIMEOUT_MS)
    assert HEATMAP["method"] == 7


def test_ablate_mode_in_jupyterlab(page_factory, ablate_lab):
    page, problems = page_factory()
    with diagnosed(page, ablate_lab, problems):
        open_and_run_in_lab(page, ablate_lab, plots=3)  # the Explorer, its bars, the HeadGrid
        drive_ablation(page, ablate_lab)
    problems.check()


def test_ablate_mode_in_voila(page_factory, ablate_voila):
    page, problems = page_factory(allow_offline="fontawesome-free")
    with diagnosed(page, ablate_voila, problems):
        open_in_voila(page, ablate_voila, 3)
        drive_ablation(page, ablate_voila)
    problems.check()
