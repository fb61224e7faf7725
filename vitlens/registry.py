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
>>> info.defaults_for({"family": "swin", "readout": "avg"})
{'on': 'attention'}
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence, TypeVar

from .errors import OptionError

F = TypeVar("F", bound=Callable[..., Any])

#: How a ``defaults`` table is read, in this order (later keys win): ``"*"`` (every
#: capture), the capture's read-out (``"cls"``, ``"avg"``, ...), then its family
#: (``"vit"``, ``"swin"``, ...: the most specific). A read-out other than ``"cls"`` with
#: no entry of its own (``"avg_with_prefix"``, ``"map"``) takes the ``"avg"`` entry:
#: every token is read out, as under average pooling.
DEFAULT_KEYS = ("*", "cls", "avg", "vit", "swin")

#: The groups of raw tensors a capture can record and store (``vl.KEEP_GROUPS``): what the
#: ``needs`` of methods and statistics name. A method or statistic that declares no ``needs``
#: is taken to read them all. A new group is added here and, with the pass that records it,
#: in ``vitlens.capture.api.GROUP_PASSES``.
CAPTURE_GROUPS = ("attention", "attention_grad", "attention_relevance", "ln", "norms", "features")


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
    needs
        The capture groups the map reads (``vl.capture``'s ``keep=`` groups,
        ``vitlens.KEEP_GROUPS``): under ``"*"`` always, under ``(option, value)``
        when that option has that value, e.g. ``{"*": ("attention",),
        ("merge", "lrp"): ("attention_relevance",)}``; see :meth:`groups`.
        Capture runs only the passes that record them.
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
    needs: Mapping[Any, tuple[str, ...]] = field(default_factory=dict)

    def defaults_for(self, cap_or_attrs: Any) -> dict[str, Any]:
        """The options to use for this capture's family and read-out.

        ``cap_or_attrs``: a capture (DataTree), its ``attrs`` mapping, or any
        object with ``family`` and ``readout`` attributes (a widget layout, a
        :class:`~vitlens.methods.operators.CaptureView`).

        Examples
        --------
        >>> import vitlens as vl
        >>> vl.methods.METHOD_INFO["transformer_attribution"].defaults_for({"family": "swin", "readout": "avg"})
        {'identity_path': 'drop'}
        """
        family, readout = _family_readout(cap_or_attrs)
        if readout and readout != "cls" and readout not in self.defaults:
            readout = "avg"  # other non-CLS read-outs (avg_with_prefix, map) read out every token too
        out: dict[str, Any] = {}
        for key in ("*", readout, family):
            out.update(self.defaults.get(key, {}))
        return out

    def options(self) -> list[str]:
        """Keyword options the method's function takes."""
        import inspect

        return [p for p in inspect.signature(self.function).parameters if p != "cap"]

    def resolve(self, cap_or_attrs: Any, options: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Every option's value for this capture: the function's own defaults, then the registry's
        for the capture's family and read-out (:meth:`defaults_for`), then ``options``.

        Examples
        --------
        >>> import vitlens as vl
        >>> vl.methods.METHOD_INFO["gradcam"].resolve({"family": "vit", "readout": "cls"})
        {'on': 'attention', 'layers': None, 'heads': None}
        """
        return {**_signature_defaults(self.function), **self.defaults_for(cap_or_attrs), **(options or {})}

    def groups(self, cap_or_attrs: Any, options: Mapping[str, Any] | None = None) -> frozenset[str]:
        """The capture groups the map reads under ``options`` (see ``needs``).

        Examples
        --------
        >>> import vitlens as vl
        >>> info = vl.methods.METHOD_INFO["gradcam"]
        >>> sorted(info.groups({"family": "vit", "readout": "cls"}))
        ['attention', 'attention_grad']
        >>> sorted(info.groups({"family": "swinv2", "readout": "avg"}))
        ['features']
        """
        return _groups(self.needs, self.resolve(cap_or_attrs, options))

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


def _signature_defaults(function: Callable[..., Any]) -> dict[str, Any]:
    import inspect

    return {name: p.default for name, p in inspect.signature(function).parameters.items()
            if name != "cap" and p.default is not inspect.Parameter.empty}


def _groups(needs: Mapping[Any, Sequence[str]], options: Mapping[str, Any]) -> frozenset[str]:
    out: set[str] = set()
    for key, groups in needs.items():
        if key == "*" or options.get(key[0], _MISSING) == key[1]:
            out.update(groups)
    return frozenset(out)


_MISSING = object()


def _check_needs(kind: str, name: str, needs: Mapping[Any, Sequence[str]]) -> dict[Any, tuple[str, ...]]:
    bad = [k for k, v in needs.items() if not (k == "*" or (isinstance(k, tuple) and len(k) == 2))
           or isinstance(v, str) or not all(isinstance(g, str) for g in v)]
    if bad:
        raise OptionError(f"{kind} {name!r}: needs must map '*' or an (option, value) pair to a tuple of capture "
                          f"groups (e.g. {{'*': ('attention',), ('grad', True): ('attention_grad',)}}); "
                          f"got keys {bad}.")
    return {k: tuple(v) for k, v in needs.items()}


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
    needs: Mapping[Any, Sequence[str]] | None = None,
) -> Callable[[F], F]:
    """Register ``function(cap, **options)`` as method ``name`` (a decorator).

    ``needs``: the capture groups the map reads (see :class:`MethodInfo`); a
    method that declares none is taken to read every group.

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
    needs = _check_needs("method", name, needs if needs is not None else {"*": CAPTURE_GROUPS})

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
            needs=needs,
        )
        return function

    return decorate


def _unknown(kind: str, name: Any, known: Mapping[str, Any], every: bool = True) -> OptionError:
    """The one message for a name that is not registered (``every``: where ``'all'`` is accepted too)."""
    import difflib

    close = difflib.get_close_matches(str(name), list(known), n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    also = " or 'all'" if every else ""
    return OptionError(f"unknown {kind} {name!r}; choose from {list(known)}{also}.{hint}")


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


def _info(kind: str, name: Any, known: Mapping[str, Any]) -> Any:
    if not isinstance(name, str) or name not in known:
        raise _unknown(kind, name, known, every=False)
    return known[name]


def method_info(name: str) -> MethodInfo:
    """The registration of ``name``, or an OptionError listing the registered methods."""
    return _info("method", name, METHOD_INFO)


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
    needs
        The capture groups it reads, as for :class:`MethodInfo` (default:
        ``attention``, and ``attention_grad`` with ``needs_gradients``).
    """

    name: str
    function: Callable[..., Any]
    title: str
    unit: str
    caption: str
    needs_gradients: bool = False
    reference: str = ""
    needs: Mapping[Any, tuple[str, ...]] = field(default_factory=dict)

    def groups(self, options: Mapping[str, Any] | None = None) -> frozenset[str]:
        """The capture groups the statistic reads under ``options``."""
        return _groups(self.needs, {**_signature_defaults(self.function), **(options or {})})


#: Every registered head statistic, in registration order.
STAT_INFO: dict[str, StatInfo] = {}


def register_stat(name: str, *, title: str, unit: str, caption: str, needs_gradients: bool = False,
                  reference: str = "", needs: Mapping[Any, Sequence[str]] | None = None) -> Callable[[F], F]:
    """Register ``function(cap, **options)`` as head statistic ``name`` (a decorator)."""
    if needs is None:
        needs = {"*": ("attention", "attention_grad") if needs_gradients else ("attention",)}
    needs = _check_needs("head statistic", name, needs)

    def decorate(function: F) -> F:
        if name in STAT_INFO and STAT_INFO[name].function is not function:
            raise OptionError(f"a head statistic named {name!r} is already registered; choose another name.")
        STAT_INFO[name] = StatInfo(name=name, function=function, title=title, unit=unit, caption=caption,
                                   needs_gradients=needs_gradients, reference=reference, needs=needs)
        return function

    return decorate


def stat_info(name: str) -> StatInfo:
    """The registration of head statistic ``name``, or an OptionError listing them."""
    return _info("head statistic", name, STAT_INFO)


def resolve_stats(spec: Any) -> list[str]:
    """Head-statistic names from ``"all"``, one name or a list (as :func:`resolve_methods`)."""
    return _resolve("head statistic", spec, STAT_INFO)
