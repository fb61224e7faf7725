"""The one way text reaches a page: escaped, as :class:`Markup`.

Class names, file names and error messages come from data (a capture file, a
Hugging Face ``id2label``, a CLIP prompt) and may hold ``<img onerror=...>``.
An ``ipywidgets.HTML`` value and a plotly title are rendered as markup, so
every such text must be escaped first. To make that impossible to forget:

- :func:`escape` (and :func:`markup`, which escapes every argument it fills
  into a vitlens-written template) are the only producers of :class:`Markup`;
- :func:`html_text` makes the only HTML widget the widgets use, an
  :class:`HTMLText` whose ``value`` refuses anything that is not Markup;
- plotly titles go through :func:`escape` too (plotly decodes the entities and
  shows the text literally; ``<br>`` and ``<b>`` of vitlens' own templates stay markup).

``tests/test_widgets_text.py`` scans the widget modules for HTML widgets and
escaping made anywhere else.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import ipywidgets as widgets
import traitlets

from ..errors import OptionError

#: Characters that mean something in HTML (and in plotly's pseudo-HTML), with numeric
#: entities plotly decodes too (it knows no ``&quot;``).
_ENTITIES = {"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&#34;", "'": "&#39;"}
_TABLE = str.maketrans(_ENTITIES)


class Markup(str):
    """Text that is safe to render as HTML: made by :func:`escape`, :func:`markup` or :func:`join`.

    Concatenating a Markup with a plain ``str`` gives a plain ``str`` again, which
    an :class:`HTMLText` refuses; build longer markup with :func:`markup` or :func:`join`.
    """

    __slots__ = ()


def escape(text: Any) -> Markup:
    """``text`` as Markup: ``& < > " '`` replaced by entities (Markup is returned unchanged).

    Examples
    --------
    >>> escape("<img src=x onerror=alert(1)>")
    '&lt;img src=x onerror=alert(1)&gt;'
    >>> escape(escape("a & b"))  # escaping twice changes nothing
    'a &amp; b'
    """
    if isinstance(text, Markup):
        return text
    return Markup(str(text).translate(_TABLE))


def markup(template: str, *args: Any, **kwargs: Any) -> Markup:
    """A vitlens-written HTML ``template`` (``str.format`` syntax) with every argument escaped.

    The template is trusted code; the arguments are data. Format specs apply to
    the value before it is escaped (``{:.1f}`` works for numbers).

    Examples
    --------
    >>> markup("<b>{}</b> ({:.1f} %)", "<script>", 12.34)
    '<b>&lt;script&gt;</b> (12.3 %)'
    >>> markup("<i>{}</i>", markup("<b>{}</b>", "&"))  # Markup arguments are kept as they are
    '<i><b>&amp;</b></i>'
    """
    return Markup(_EscapingFormatter().vformat(template, args, kwargs))


def join(parts: Iterable[Markup], sep: str = "") -> Markup:
    """Markup parts joined by a vitlens-written separator (each part must already be Markup).

    Examples
    --------
    >>> join([escape("a<"), markup("<br>")], " ")
    'a&lt; <br>'
    """
    parts = list(parts)
    for p in parts:
        if not isinstance(p, Markup):
            raise OptionError(f"join takes Markup parts (escape() or markup() them first); got {type(p).__name__}.")
    return Markup(sep.join(parts))


class _EscapingFormatter:
    """``str.format`` whose substituted fields are escaped after their format spec is applied."""

    def vformat(self, template: str, args: tuple, kwargs: dict) -> str:
        import string

        class Formatter(string.Formatter):
            def format_field(self, value: Any, spec: str) -> str:
                if isinstance(value, Markup) and not spec:
                    return value  # already safe (a nested markup() or escape())
                return escape(format(value, spec))

        return Formatter().vformat(template, args, kwargs)


class HTMLText(widgets.HTML):
    """The only HTML widget of vitlens: its ``value`` must be :class:`Markup` (or empty).

    Assigning a plain string raises :class:`~vitlens.errors.OptionError`, so text
    from data can never reach the page unescaped by mistake.
    """

    @traitlets.validate("value")
    def _only_markup(self, proposal: Any) -> str:
        value = proposal["value"]
        if value == "" or isinstance(value, Markup):
            return value
        raise OptionError("an HTML widget of vitlens takes Markup only: pass the text through "
                          "vitlens.widgets.text.escape() or markup() (it may come from data).")


def html_text(value: Markup | str = "", *, css: str | None = None, **layout: Any) -> HTMLText:
    """A new :class:`HTMLText` (``css``: a class name for the page; ``layout``: ipywidgets Layout fields).

    Examples
    --------
    >>> w = html_text(escape("<b>"), css="vitlens-demo", margin="0 8px")
    >>> w.value
    '&lt;b&gt;'
    """
    w = HTMLText(layout=widgets.Layout(**layout))
    w.value = value
    if css:
        w.add_class(css)
    return w
