"""The registries of explanation methods and head statistics, and the one reader of their names.

Each method module decorates its function with :func:`register_method`; each
head-statistic module with :func:`register_stat`. The method list
(:data:`vitlens.METHODS`), ``vl.explain(cap, "all")``, a reduced capture's
``maps=``/``stats=``, the widgets' titles and captions and the figures' titles
all read :data:`METHOD_INFO` and :data:`STAT_INFO`, and every name a user gives
goes through :func:`resolve_methods` / :func:`resolve_stats` (with a
did-you-mean hint). Adding a method or a statistic means one new module plus
its tests.

This module sits at the bottom of the package (it imports only the errors), so
that capture can run registered methods on each batch without importing the
methods: they register themselves when :mod:`vitlens` is imported.

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

from .errors import OptionError

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
    >>> from vitlens.registry import register_method, METHOD_INFO
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


def _unknown(kind: str, name: Any, known: Mapping[str, Any]) -> OptionError:
    import difflib

    close = difflib.get_close_matches(str(name), list(known), n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return OptionError(f"unknown {kind} {name!r}; choose from {list(known)} or 'all'.{hint}")


def _resolve(kind: str, spec: Any, known: Mapping[str, Any]) -> list[str]:
    if isinstance(spec, str):
        spec = list(known) if spec == "all" else [spec]
    elif isinstance(spec, Mapping):
        spec = list(spec)
    elif spec is None:
        return []
    else:
        try:
            spec = list(spec)
        except TypeError:
            raise OptionError(f"{kind}s: give a name, a list of names or 'all'; got {spec!r}.") from None
    names: list[str] = []
    for name in spec:
        if not isinstance(name, str) or name not in known:
            raise _unknown(kind, name, known)
        if name not in names:
            names.append(name)
    return names


def method_info(name: str) -> MethodInfo:
    """The registration of ``name``, or an OptionError listing the registered methods."""
    if not isinstance(name, str) or name not in METHOD_INFO:
        raise _unknown("method", name, METHOD_INFO)
    return METHOD_INFO[name]


def resolve_methods(spec: Any) -> list[str]:
    """Method names from ``"all"``, one name, a list of names or a ``{name: options}`` mapping.

    Examples
    --------
    >>> import vitlens as vl
    >>> vl.registry.resolve_methods(["rollout", "attention", "rollout"])
    ['rollout', 'attention']
    >>> vl.registry.resolve_methods("rolout")
    Traceback (most recent call last):
    ...
    vitlens.errors.OptionError: unknown method 'rolout'; choose from [...] or 'all'. Did you mean 'rollout'?
    """
    return _resolve("method", spec, METHOD_INFO)


@dataclass(frozen=True)
class StatInfo:
    """What vitlens knows about one head statistic: ``function(cap, **options) -> (sample, layer, head)``.

    Attributes
    ----------
    name, function, title
        As for :class:`MethodInfo`.
    unit
        The unit of its values (``"px"``, ``"nats"``, ``"share"``, ...), for axes and colour bars.
    caption
        One sentence saying what a value means, for the atlas and figures.
    needs_gradients
        Whether it reads the target's gradients (``attention_grad``).
    reference
        The paper, and the section of ``docs/METHODS.md``.
    """

    name: str
    function: Callable[..., Any]
    title: str
    unit: str
    caption: str
    needs_gradients: bool = False
    reference: str = ""


#: Every registered head statistic, in registration order.
STAT_INFO: dict[str, StatInfo] = {}


def register_stat(name: str, *, title: str, unit: str, caption: str, needs_gradients: bool = False,
                  reference: str = "") -> Callable[[F], F]:
    """Register ``function(cap, **options)`` as head statistic ``name`` (a decorator)."""

    def decorate(function: F) -> F:
        if name in STAT_INFO and STAT_INFO[name].function is not function:
            raise OptionError(f"a head statistic named {name!r} is already registered; choose another name.")
        STAT_INFO[name] = StatInfo(name=name, function=function, title=title, unit=unit, caption=caption,
                                   needs_gradients=needs_gradients, reference=reference)
        return function

    return decorate


def stat_info(name: str) -> StatInfo:
    """The registration of head statistic ``name``, or an OptionError listing them."""
    if not isinstance(name, str) or name not in STAT_INFO:
        raise _unknown("head statistic", name, STAT_INFO)
    return STAT_INFO[name]


def resolve_stats(spec: Any) -> list[str]:
    """Head-statistic names from ``"all"``, one name or a list (as :func:`resolve_methods`)."""
    return _resolve("head statistic", spec, STAT_INFO)
