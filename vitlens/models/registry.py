"""Adapters register themselves; ``adapter_for`` picks the first that matches a model.

A model family is one module in ``vitlens/models/families/`` defining an
:class:`~vitlens.models.adapter.Adapter` subclass decorated with
:func:`register_adapter`; every module of the package is imported on first use,
so nothing else lists the families. Third-party packages can add adapters
through the ``vitlens.adapters`` entry-point group (each entry point names a
module to import, as xarray's backends do).

Models that are recognised but not explained are listed with
:func:`register_refusal`: the refusal names the block or head that is missing
and, where one exists, a supported model to use instead. A model nothing
recognises is told what the adapters explain, in their own terms
(:meth:`Adapter.explains <vitlens.models.adapter.Adapter.explains>`: timm
families, transformers classes, ...).

Examples
--------
>>> from vitlens.models import registry
>>> [a.family for a in registry.adapters()][:5]  # timm families first; transformers ones (hf_*) follow
['vit', 'swin', 'eva', 'beit', 'swinv2']
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from ..errors import UnsupportedModelError
from .adapter import Adapter

_ADAPTERS: list[type[Adapter]] = []
_REFUSALS: list["Refusal"] = []
_loaded = False


@dataclass(frozen=True)
class Refusal:
    """A recognised but unsupported model: what is missing, and what to use instead.

    Either text may be a function, read when a model is refused (e.g. a list of the
    classes the adapters declare, which is complete only once every family is loaded).
    """

    matches: Callable[[nn.Module], bool]
    missing: str | Callable[[], str]
    instead: str | Callable[[], str] = ""

    def texts(self) -> tuple[str, str]:
        """``(missing, instead)`` as text."""
        return tuple(t() if callable(t) else t for t in (self.missing, self.instead))  # type: ignore[return-value]

    def message(self, model: nn.Module) -> str:
        missing, instead = self.texts()
        text = f"{type(model).__name__}: vitlens cannot explain {missing}."
        if instead:
            text += f" Supported models of a similar kind: {instead}."
        return text


def register_adapter(cls: type[Adapter]) -> type[Adapter]:
    """Class decorator: make ``cls`` one of the adapters :func:`adapter_for` tries (in order)."""
    if not (isinstance(cls, type) and issubclass(cls, Adapter)):
        raise TypeError(f"register_adapter takes an Adapter subclass; got {cls!r}")
    if cls.family in {a.family for a in _ADAPTERS if a is not cls}:
        raise ValueError(f"an adapter for family {cls.family!r} is already registered")
    if cls not in _ADAPTERS:
        _ADAPTERS.append(cls)
    return cls


def register_refusal(matches: Callable[[nn.Module], bool], missing: str | Callable[[], str],
                     instead: str | Callable[[], str] = "") -> None:
    """Refuse models for which ``matches(model)``, naming what is ``missing`` and a supported alternative."""
    _REFUSALS.append(Refusal(matches, missing, instead))


def timm_class(module_name: str, class_name: str) -> Callable[[nn.Module], bool]:
    """A ``matches`` test: ``model`` is an instance of ``timm.models.<module_name>.<class_name>``."""

    def test(model: nn.Module) -> bool:
        try:
            mod = importlib.import_module(f"timm.models.{module_name}")
        except ImportError:
            return False
        cls = getattr(mod, class_name, None)
        return cls is not None and isinstance(model, cls)

    test.__name__ = f"is_{class_name}"
    return test


_BUILTIN_ORDER = ("vit", "swin")  # modules imported first, so that their order is stable


def _load() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    package = __name__.rpartition(".")[0] + ".families"
    names = [m.name for m in pkgutil.iter_modules(importlib.import_module(package).__path__)]
    first = [n for n in _BUILTIN_ORDER if n in names]
    for name in first + sorted(set(names) - set(first)):
        importlib.import_module(f"{package}.{name}")
    try:
        from importlib.metadata import entry_points

        for ep in entry_points(group="vitlens.adapters"):
            ep.load()
    except Exception:  # a broken third-party plugin never breaks vitlens itself
        pass


# built-ins first, whatever the import order: timm's, then transformers' (as messages list them)
_FAMILY_ORDER = ("vit", "swin", "eva", "beit", "swinv2", "hf_vit", "hf_beit", "hf_swin", "hf_swinv2", "hf_clip",
                 "hf_siglip", "hf_headed")


def adapters() -> list[type[Adapter]]:
    """The registered adapter classes, in the order :func:`adapter_for` tries them."""
    _load()
    rank = {f: i for i, f in enumerate(_FAMILY_ORDER)}
    return sorted(_ADAPTERS, key=lambda a: rank.get(a.family, len(rank)))  # stable for the rest


def registry_names() -> dict[str, list[str]]:
    """timm registry names per supported family (from each adapter's ``timm_modules``)."""
    import timm

    out: dict[str, list[str]] = {}
    for cls in adapters():
        names: list[str] = []
        for module in cls.timm_modules:
            names += timm.list_models(module=module)
        if names:
            out[cls.family] = sorted(set(names))
    return out


def families() -> list[str]:
    return [a.family for a in adapters()]


def supported() -> str:
    """What the registered adapters explain, grouped as they say (timm families, transformers classes, ...).

    Examples
    --------
    >>> supported().startswith("timm families: vit, swin, eva, beit, swinv2")
    True
    """
    kinds: dict[str, list[str]] = {}
    for cls in adapters():
        for kind, names in cls.explains().items():
            kinds.setdefault(kind, []).extend(names)
    return "; ".join(f"{kind}: {', '.join(names)}" for kind, names in kinds.items() if names)


def adapter_for(model: nn.Module) -> Adapter:
    """The :class:`Adapter` for ``model``; raises :class:`UnsupportedModelError` otherwise.

    Examples
    --------
    >>> import timm, vitlens as vl
    >>> model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1)
    >>> vl.models.adapter_for(model).family
    'vit'
    """
    if not isinstance(model, nn.Module):
        raise UnsupportedModelError(
            f"expected a torch.nn.Module (vitlens explains {supported()}); got {type(model).__name__}"
        )
    for cls in adapters():
        if cls.matches(model):
            return cls(model)
    for refusal in _REFUSALS:
        if refusal.matches(model):
            raise UnsupportedModelError(refusal.message(model))
    raise UnsupportedModelError(
        f"{type(model).__name__}: vitlens explains {supported()} (docs/COVERAGE.md lists the timm model names "
        "and transformers classes); load one with vl.load_model(...)."
    )
