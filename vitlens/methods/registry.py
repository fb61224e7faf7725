"""One registration per method: its function and everything the rest of vitlens says about it.

Each method module decorates its function with :func:`register_method`; the
method list (:data:`vitlens.METHODS`), ``vl.explain(cap, "all")``, the widgets'
titles and captions and the figures' titles all read :data:`METHOD_INFO`.
Adding a method means one new module (imported in :mod:`vitlens.methods`) plus
its tests.

Examples
--------
>>> import vitlens as vl
>>> info = vl.methods.METHOD_INFO["gradcam"]
>>> info.title, info.class_specific, info.per_layer
('Grad-CAM', True, False)
>>> info.defaults_for({"family": "vit", "readout": "avg"})
{'on': 'features'}
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, TypeVar

from ..errors import OptionError

F = TypeVar("F", bound=Callable[..., Any])

#: How a ``defaults`` table is read, in this order (later keys win): ``"*"`` (every
#: capture), the capture's family (``"vit"``, ``"swin"``, ...), then its read-out
#: (``"cls"``, ``"avg"``, ...). A read-out other than ``"cls"`` with no entry of its
#: own (``"avg_with_prefix"``, ``"map"``) takes the ``"avg"`` entry: every token is
#: read out, as under average pooling.
DEFAULT_KEYS = ("*", "vit", "swin", "cls", "avg")


@dataclass(frozen=True)
class MethodInfo:
    """What vitlens knows about one explanation method.

    Attributes
    ----------
    name
        The name ``vl.explain`` takes.
    function
        ``function(cap, **options) -> DataArray``.
    title
        Short title for figure columns and widget panels.
    caption
        One sentence for the widgets, a format string with the fields ``{l}``
        (the block shown), ``{blocks}`` (e.g. ``"blocks 0–3"``), ``{readout}``
        (e.g. ``"the CLS token"``) and ``{cls}`` (the explained class, quoted).
    class_specific
        Whether the map depends on the explained class.
    per_layer
        Whether the method takes ``per_layer=True`` (one map per block).
    defaults
        Options by capture family / read-out (see :data:`DEFAULT_KEYS`),
        e.g. ``{"avg": {"on": "features"}}``; see :meth:`defaults_for`.
    variant_captions
        Captions replacing ``caption`` under an option value, keyed by
        ``(option, value)``, e.g. ``{("on", "features"): "..."}``.
    layerless
        Option values under which the map ignores ``layers`` and ``heads``
        (gradcam ``on="features"``: the final feature map).
    reference
        The paper, and the section of ``docs/METHODS.md``.
    """

    name: str
    function: Callable[..., Any]
    title: str
    caption: str
    class_specific: bool
    per_layer: bool
    defaults: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    variant_captions: Mapping[tuple[str, Any], str] = field(default_factory=dict)
    layerless: Mapping[str, Any] = field(default_factory=dict)
    reference: str = ""

    def defaults_for(self, cap_or_attrs: Any) -> dict[str, Any]:
        """The options to use for this capture's family and read-out.

        ``cap_or_attrs``: a capture (DataTree), its ``attrs`` mapping, or any
        object with ``family`` and ``readout`` attributes (a widget layout, a
        :class:`~vitlens.methods.operators.CaptureView`).

        Examples
        --------
        >>> import vitlens as vl
        >>> vl.methods.METHOD_INFO["gradcam"].defaults_for({"family": "swin", "readout": "avg"})
        {'on': 'features'}
        """
        family, readout = _family_readout(cap_or_attrs)
        if readout and readout != "cls" and readout not in self.defaults:
            readout = "avg"  # other non-CLS read-outs (avg_with_prefix, map) read out every token too
        out: dict[str, Any] = {}
        for key in ("*", family, readout):
            out.update(self.defaults.get(key, {}))
        return out

    def options(self) -> list[str]:
        """Keyword options the method's function takes."""
        import inspect

        return [p for p in inspect.signature(self.function).parameters if p != "cap"]

    def caption_for(self, options: Mapping[str, Any] | None = None) -> str:
        """The caption template under ``options`` (a variant caption if one matches)."""
        for (key, value), text in self.variant_captions.items():
            if options is not None and options.get(key) == value:
                return text
        return self.caption

    def uses_layers(self, options: Mapping[str, Any] | None = None) -> bool:
        """Whether the map depends on ``layers``/``heads`` under ``options``."""
        if not self.layerless:
            return True
        options = options or {}
        return not all(options.get(k) == v for k, v in self.layerless.items())


def _family_readout(obj: Any) -> tuple[str, str]:
    """``(family, readout)`` of a capture, attrs mapping or layout; ``("", "")`` if it has none.

    (Something that is not a capture gets only the ``"*"`` defaults; the method
    itself then says what is wrong with it.)
    """
    attrs = obj if isinstance(obj, Mapping) else getattr(obj, "attrs", None)
    if isinstance(attrs, Mapping) and "readout" in attrs:
        return str(attrs.get("family", "")), str(attrs["readout"])
    if hasattr(obj, "readout") and not isinstance(getattr(obj, "readout"), Callable):
        return str(getattr(obj, "family", "")), str(obj.readout)
    return "", ""


#: Every registered method, in registration order.
METHOD_INFO: dict[str, MethodInfo] = {}


def register_method(
    name: str,
    *,
    title: str,
    caption: str,
    class_specific: bool,
    per_layer: bool,
    defaults: Mapping[str, Mapping[str, Any]] | None = None,
    variant_captions: Mapping[tuple[str, Any], str] | None = None,
    layerless: Mapping[str, Any] | None = None,
    reference: str = "",
) -> Callable[[F], F]:
    """Register ``function(cap, **options)`` as method ``name`` (a decorator).

    Examples
    --------
    >>> from vitlens.methods.registry import register_method, METHOD_INFO
    >>> @register_method("demo", title="Demo", caption="a demo", class_specific=False, per_layer=False)
    ... def demo(cap):
    ...     return cap
    >>> METHOD_INFO.pop("demo").title
    'Demo'
    """
    bad = [k for k, v in (defaults or {}).items() if not isinstance(k, str) or not isinstance(v, Mapping)]
    if bad:
        raise OptionError(f"method {name!r}: defaults must map '*', a family or a read-out name to a dict of "
                          f"options (e.g. {{'avg': {{'on': 'features'}}}}); got keys {bad}.")

    def decorate(function: F) -> F:
        if name in METHOD_INFO and METHOD_INFO[name].function is not function:
            raise OptionError(f"a method named {name!r} is already registered; choose another name.")
        METHOD_INFO[name] = MethodInfo(
            name=name,
            function=function,
            title=title,
            caption=caption,
            class_specific=class_specific,
            per_layer=per_layer,
            defaults={k: dict(v) for k, v in (defaults or {}).items()},
            variant_captions=dict(variant_captions or {}),
            layerless=dict(layerless or {}),
            reference=reference,
        )
        return function

    return decorate


def method_info(name: str) -> MethodInfo:
    """The registration of ``name``, or an OptionError listing the registered methods."""
    if name not in METHOD_INFO:
        import difflib

        close = difflib.get_close_matches(str(name), list(METHOD_INFO), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise OptionError(f"unknown method {name!r}; choose from {list(METHOD_INFO)} or 'all'.{hint}")
    return METHOD_INFO[name]
