"""No script from data: every text a widget puts on the page is escaped, by one helper.

Class names come from capture files, Hugging Face ``id2label`` and CLIP prompts,
so they may be hostile. Widgets make HTML only through ``vitlens.widgets.text``
(``html_text`` widgets take Markup only); this file checks that rule in the source
and in every widget built on a capture whose class names are markup.
The browser half (no dialog, the text shown literally) is
``tests/browser/test_hostile_names_browser.py``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import ipywidgets as widgets
import numpy as np
import pytest
from conftest import make_vit, random_images

import vitlens as vl
from vitlens.errors import OptionError
from vitlens.widgets import text as text_module
from vitlens.widgets.text import HTMLText, Markup, escape, html_text, join, markup

WIDGETS = Path(vl.__file__).parent / "widgets"
HOSTILE = ["<img src=x onerror=alert(1)>", "<script>alert(2)</script>", "\"'><svg onload=alert(3)>",
           "<b>bold</b>", "a & b", "plain"]


# -- the helper -------------------------------------------------------------------------------
def test_escape_leaves_no_markup_and_keeps_the_text():
    for name in HOSTILE:
        safe = escape(name)
        assert not set("<>\"'") & set(safe)
        assert safe.replace("&lt;", "<").replace("&gt;", ">").replace("&#34;", '"').replace("&#39;", "'") \
                   .replace("&amp;", "&") == name


def test_markup_escapes_arguments_not_the_template():
    assert markup("<b>{}</b>: {:.2f}", "<i>x</i>", 0.5) == "<b>&lt;i&gt;x&lt;/i&gt;</b>: 0.50"
    assert isinstance(markup("{}", 1), Markup)


def test_html_widget_refuses_plain_text():
    w = html_text(css="x")
    w.value = escape("<img src=x>")
    with pytest.raises(OptionError, match="escape"):
        w.value = "<img src=x onerror=alert(1)>"
    with pytest.raises(OptionError):
        w.value = escape("a") + "<b>"  # str + Markup is plain str again
    with pytest.raises(OptionError):
        join(["<b>"])
    assert w.value == "&lt;img src=x&gt;"


# -- the source: HTML made in one place only ------------------------------------------------
def _is_text_expression(node: ast.AST) -> bool:
    """An expression that builds a string by hand (f-string, literal, concatenation, str.join, %)."""
    if isinstance(node, ast.JoinedStr):
        return True
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value != ""
    if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Mod)):
        return _is_text_expression(node.left) or _is_text_expression(node.right)
    if isinstance(node, ast.IfExp):
        return _is_text_expression(node.body) or _is_text_expression(node.orelse)
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in ("join", "format"):
        return isinstance(node.func.value, ast.Constant)
    return False


def html_violations(source: str, name: str) -> list[str]:
    """Where a widget module makes an HTML widget, escapes, or sets a widget value to hand-built text."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call):
            f = node.func
            called = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
            if called in ("HTML", "HTMLMath"):
                found.append(f"{name}:{node.lineno}: {called}(...) made directly; use text.html_text")
            if called == "escape" and isinstance(f, ast.Attribute) and getattr(f.value, "id", "") == "html":
                found.append(f"{name}:{node.lineno}: html.escape; use text.escape (the one helper)")
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            if "html" in mods:
                found.append(f"{name}:{node.lineno}: imports html; use vitlens.widgets.text")
        if isinstance(node, ast.Assign):
            for target in node.targets:
                if isinstance(target, ast.Attribute) and target.attr in ("value", "text") \
                        and _is_text_expression(node.value):
                    found.append(f"{name}:{node.lineno}: .{target.attr} = hand-built text; use text.markup/escape")
    return found


def test_widget_modules_make_html_only_through_the_text_helper():
    modules = sorted(p for p in WIDGETS.glob("*.py") if p.name != "text.py")
    assert len(modules) >= 10
    found = [v for p in modules for v in html_violations(p.read_text(), p.name)]
    assert not found, "\n".join(found)


@pytest.mark.parametrize("snippet", [
    "import ipywidgets as widgets\nw = widgets.HTML()",
    "self.status.value = f'capturing {name!r}'",
    "self.caption.value = '<b>' + name",
    "import html\nx = html.escape(name)",
    "ann.text = 'class ' + name",
])
def test_the_source_check_catches_each_way_of_going_around_the_helper(snippet):
    assert html_violations(snippet, "snippet")


# -- every widget, built on hostile class names ------------------------------------------------
@pytest.fixture(scope="module")
def hostile():
    model = make_vit(seed=5, num_classes=len(HOSTILE))
    model.vitlens_class_names = list(HOSTILE)
    cap = vl.capture(model, random_images(2, 32, seed=3))
    return model, cap


def descendants(w):
    yield w
    for child in getattr(w, "children", ()):
        yield from descendants(child)


def plotly_texts(fig) -> list[str]:
    return [str(a.text) for a in fig.layout.annotations] + [str(fig.layout.title.text or "")]


def test_hostile_class_names_reach_every_widget_escaped(hostile):
    model, cap = hostile
    ex = vl.Explorer(cap, model, compare_class=True)
    others = [vl.HeadGrid(cap, explorer=ex), vl.ModelView(cap, explorer=ex), vl.TokenCurves(cap, explorer=ex),
              vl.Compare(cap, model)]
    # another class: recaptured, and the status line names it, literally
    other = next(o for _, o in ex.class_select.options if o != ex.target)
    ex.class_select.value = other
    assert escape(repr(HOSTILE[other])) in str(ex.class_status.value)
    assert escape(repr(HOSTILE[other])) in str(ex.captions.value)  # the method caption names the class
    # every top class, in both class selectors: recaptures, status lines, titles, captions
    for c in [o for _, o in ex.class_select.options][:4]:
        ex.class_select.value = c
        if c in [o for _, o in others[-1].class_select.options]:
            others[-1].class_select.value = c
        ex.contrast_select.value = next(o for _, o in ex.contrast_select.options if o != ex.target)
        shown = []
        for w in [ex, *others]:
            for d in descendants(w):
                if isinstance(d, widgets.HTML):
                    assert isinstance(d, HTMLText), f"{type(w).__name__}: a plain HTML widget {d}"
                    shown.append(str(d.value))
            figs = getattr(w, "_figures", {}).values() or [w.figure]
            for fig in figs:
                shown += plotly_texts(fig)
        page = "\n".join(shown)
        for bad in ("<img", "<script", "<svg", "<b>bold"):
            assert bad not in page, bad
    assert "&lt;" in str(ex.figure.layout.annotations[3].text)  # the class in a panel title, escaped for plotly


def test_the_ablate_mode_shows_hostile_class_names_escaped(hostile):
    model, cap = hostile
    ex = vl.Explorer(cap, model, ablate=True)
    ex.ablation.toggle(0)  # the "after" bars and a recapture: every text of the mode is drawn
    labels = [str(y) for trace in ex.ablation.bars.data for y in trace.y]
    shown = labels + [str(ex.ablation.label.value), str(ex.ablation.status.value), str(ex.class_status.value)]
    for bad in ("<img", "<script", "<svg", "<b>bold"):
        assert bad not in "\n".join(shown), bad
    cut = [n if len(n) <= 18 else n[:17] + "…" for n in HOSTILE]  # the bars' labels: names cut to 18 characters
    assert set(labels) <= {escape(n) for n in cut} and len(set(labels)) == 5  # the top 5, each escaped once


def test_static_exports_show_the_class_names_as_written(hostile):
    model, cap = hostile
    ex = vl.Explorer(cap, model, compare_class=True)
    ex.class_select.value = 0
    fig = ex.export_figure()
    texts = [fig._suptitle.get_text()] + [ax.get_title() for ax in fig.axes]
    assert any("<img src=x onerror=alert(1)>" in t for t in texts), texts  # matplotlib text is not markup
    assert not any("&lt;" in t for t in texts)
