"""No script from data, in a real browser: class names that are markup are shown, never run (issue 31.1).

The served notebook (``notebook_template.write_hostile_notebook``) builds every
widget on a capture whose class names are ``<img src=x onerror=alert(1)>``,
``<script>…``, ``"><svg onload=…>``, ``<b>bold</b>``, ``<style>…`` and friends,
then the test picks other classes (each a recapture, announced in a status line).
In JupyterLab and in Voila: no dialog opens, no element the names describe
exists in the page, and the names are shown as written — in the title, the
sample and class selectors, the status lines and the captions.
"""

from __future__ import annotations


import pytest

from .conftest import TIMEOUT_MS, lab_server, open_and_run_in_lab, open_in_voila, playwright_expect, served_folder, voila_server
from .notebook_template import HOSTILE_NAMES, write_hostile_notebook

expect = playwright_expect()

pytestmark = [pytest.mark.slow, pytest.mark.browser]

#: Explorer, HeadGrid, ModelView, TokenCurves, Compare.
PLOTS = 5
WIDGETS = ".vitlens-explorer, .vitlens-head-grid, .vitlens-model-view, .vitlens-token-curves, .vitlens-compare"

#: What the hostile names would create if they were rendered as markup (none may exist).
INJECTED_JS = f"""() => {{
  const found = [];
  for (const el of document.querySelectorAll('[onerror], [onload]')) found.push(el.outerHTML.slice(0, 80));
  for (const el of document.querySelectorAll('img[src="x"], svg[onload]')) found.push(el.outerHTML.slice(0, 80));
  for (const root of document.querySelectorAll('{WIDGETS}')) {{
    for (const el of root.querySelectorAll('img, script, style, i:not(.fa)')) found.push(el.outerHTML.slice(0, 80));
    for (const el of root.querySelectorAll('b')) if (el.textContent === 'bold') found.push(el.outerHTML);
  }}
  if (getComputedStyle(document.body).display === 'none') found.push('body hidden by an injected style');
  return found;
}}"""


def option_names(select) -> list[str]:
    """Class names of a class selector's options ("name · 12.3 %")."""
    return [t.replace("\xa0", " ").rsplit(" · ", 1)[0] for t in select.locator("option").all_text_contents()]


def check_page(page, problems) -> None:
    explorer = page.locator(".vitlens-explorer").first
    compare = page.locator(".vitlens-compare").first
    classes = explorer.locator(".vitlens-class select")
    names = option_names(classes)
    assert names and set(names) <= set(HOSTILE_NAMES), names  # the dropdown shows the names as written
    predicted = names[0]
    expect(explorer.locator(".vitlens-title")).to_contain_text(f"predicted {predicted} (", timeout=TIMEOUT_MS)
    samples = [t.replace("\xa0", " ") for t in explorer.locator(".vitlens-sample option").all_text_contents()]
    assert all(t.split(": ", 1)[1] in HOSTILE_NAMES for t in samples), samples

    # other classes, those whose names would run script first: each a recapture, announced by name
    scripted = [k for k, n in enumerate(names) if k and ("onerror" in n or "onload" in n)]
    for k in (scripted + [k for k in range(1, len(names)) if k not in scripted])[:2]:
        classes.select_option(index=k)
        shown(page, ".vitlens-explorer", names[k])
        check_nothing_ran(page, problems)
        expect(explorer.locator(".vitlens-class-status")).to_contain_text(f"captured again for '{names[k]}'",
                                                                         timeout=TIMEOUT_MS)
        expect(explorer.locator(".vitlens-captions")).to_contain_text(f"'{names[k]}'", timeout=TIMEOUT_MS)
    compare.scroll_into_view_if_needed()
    compare_names = option_names(compare.locator(".vitlens-class select"))
    k = next((k for k, n in enumerate(compare_names) if k and "onerror" in n), 1)
    compare.locator(".vitlens-class select").select_option(index=k)
    shown(page, ".vitlens-compare", compare_names[k])
    check_nothing_ran(page, problems)
    expect(compare.locator(".vitlens-class-status")).to_contain_text(f"'{compare_names[k]}'", timeout=TIMEOUT_MS)
    expect(compare.locator(".vitlens-captions")).to_contain_text(f"'{compare_names[k]}'", timeout=TIMEOUT_MS)


def shown(page, widget: str, name: str) -> None:
    """Wait until the widget's probe says its view is of class ``name`` (the recapture is done and drawn)."""
    page.wait_for_function("""([widget, c]) => {
        const p = document.querySelector(widget + ' .vitlens-probe');
        return !!p && new RegExp('class=' + c + '( |$)').test(p.textContent); }""",
                           arg=[widget, HOSTILE_NAMES.index(name)], timeout=TIMEOUT_MS * 2)


def check_nothing_ran(page, problems) -> None:
    injected = page.evaluate(INJECTED_JS)
    assert not injected, f"markup from class names was rendered: {injected}"
    problems.check()  # no dialog, no page error


def test_hostile_class_names_are_shown_not_run_in_jupyterlab(page_factory, tmp_path_factory):
    folder = served_folder(tmp_path_factory, "hostile-lab", write_hostile_notebook)
    with lab_server(folder, "hostile.ipynb") as lab:
        page, problems = page_factory()
        open_and_run_in_lab(page, lab, PLOTS)
        check_page(page, problems)


def test_hostile_class_names_are_shown_not_run_in_voila(page_factory, tmp_path_factory):
    folder = served_folder(tmp_path_factory, "hostile-voila", write_hostile_notebook)
    with voila_server(folder, "hostile.ipynb") as voila:
        page, problems = page_factory(allow_offline="fontawesome-free")
        open_in_voila(page, voila, PLOTS)
        check_page(page, problems)
