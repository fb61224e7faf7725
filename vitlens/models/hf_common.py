"""What every Hugging Face ``transformers`` adapter shares.

- :func:`transformers_class`: a ``matches`` test that never imports
  ``transformers`` (a model of its classes can only exist once it is imported).
- The attention switch. ``transformers`` picks the attention kernel by the
  config's ``_attn_implementation`` (``"sdpa"``, ``"flash_attention_2"``,
  ``"eager"``...); only an explicit softmax yields the probabilities as a
  tensor. For a capture, :meth:`HFAdapter.explicit_attention` points every
  config the adapter's attention modules read at ``"vitlens_capture"``, an
  attention function registered once with ``transformers.AttentionInterface``
  that computes the eager softmax and passes the probabilities through a small
  per-module probe (an ``nn.Identity`` owned by the adapter, never attached to
  the model) for the hooks to see; on exit — also after an exception — every
  config gets its implementation back. The user's model is never changed.
- :class:`HFAdapter`: input size, class count, logits out of the model's output
  object, and preprocessing from the model's own image processor.
- :class:`HFClass` and :class:`Backbone`: one declaration per transformers class,
  made by its family's adapter (``classes``, ``backbones``). The adapter matches
  models by it; the refusal of other transformers classes, ``vl.with_head``'s
  backbones and pools, and the coverage check (:meth:`HFClass.tiny_config`) read it.
"""

from __future__ import annotations

import sys
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import ImageError, OptionError, UnsupportedModelError
from .adapter import Adapter, StageInfo
from .hf_loading import HF_EXTRA
from .parts import AttentionPart, LinearPart, MlpPart, Readout

#: The attention implementation a capture switches to.
CAPTURE_ATTENTION = "vitlens_capture"

_PROBES: "weakref.WeakKeyDictionary[nn.Module, nn.Module]" = weakref.WeakKeyDictionary()
_registered = False


def transformers_version() -> str:
    """The installed ``transformers`` version (imports it)."""
    import transformers

    return str(transformers.__version__)


def transformers_class(*names: str) -> Callable[[nn.Module], bool]:
    """A ``matches`` test: ``type(model)`` is one of ``transformers``' classes ``names``.

    Exact classes only (a subclass may change ``forward``); ``transformers`` is
    never imported by the test.

    Examples
    --------
    >>> import torch
    >>> transformers_class("ViTForImageClassification")(torch.nn.Linear(1, 1))
    False
    """

    def test(model: nn.Module) -> bool:
        if "transformers" not in sys.modules:
            return False
        cls = type(model)
        return cls.__name__ in names and cls.__module__.startswith("transformers.")

    test.__name__ = "is_" + "_or_".join(names)
    return test


def _capture_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       attention_mask: torch.Tensor | None, scaling: float | None = None,
                       dropout: float = 0.0, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager attention whose probabilities pass through the module's probe (if any)."""
    if scaling is None:
        scaling = query.size(-1) ** -0.5
    logits = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        logits = logits + attention_mask[..., : key.shape[-2]]
    probs = nn.functional.softmax(logits, dim=-1, dtype=torch.float32).to(query.dtype)
    probs = nn.functional.dropout(probs, p=dropout, training=module.training)
    probe = _PROBES.get(module)
    if probe is not None:
        probs = probe(probs)
    out = torch.matmul(probs, value).transpose(1, 2).contiguous()
    return out, probs


def _register() -> None:
    global _registered
    if not _registered:
        from transformers import AttentionInterface

        AttentionInterface.register(CAPTURE_ATTENTION, _capture_attention)
        _registered = True


def split_attention(attn: nn.Module, where: str, *, proj: str = "o_proj") -> AttentionPart:
    """An attention module with ``q_proj``/``k_proj``/``v_proj``/``<proj>`` and a scaling.

    Its probabilities appear at a fresh probe module (see the module docstring).
    """
    names = ("q_proj", "k_proj", "v_proj", proj)
    if not all(isinstance(getattr(attn, n, None), nn.Linear) for n in names):
        import transformers

        raise UnsupportedModelError(
            f"{where}: {type(attn).__name__} has no q_proj/k_proj/v_proj/{proj} Linears. vitlens explains the "
            f"attention layout of transformers >= 5 (installed: {transformers.__version__}); upgrade it "
            f"({HF_EXTRA} --upgrade)."
        )
    heads = getattr(attn, "num_attention_heads", None) or getattr(attn, "num_heads", None)
    scale = getattr(attn, "scaling", None) or getattr(attn, "scale", None)
    if heads is None or scale is None:
        raise UnsupportedModelError(f"{where}: {type(attn).__name__} does not say its head count and scaling.")
    return AttentionPart(
        module=attn,
        probs=nn.Identity(),
        num_heads=int(heads),
        proj=LinearPart(getattr(attn, proj)),
        q=LinearPart(attn.q_proj),
        k=LinearPart(attn.k_proj),
        v=LinearPart(attn.v_proj),
        scale=float(scale),
    )


def mlp_part(mlp: nn.Module, where: str) -> MlpPart:
    """``fc1 → act → fc2`` (ViT, DeiT, CLIP, DINOv2) or SwiGLU ``down(silu(gate)·up)`` (DINOv2)."""
    if isinstance(getattr(mlp, "fc1", None), nn.Linear) and isinstance(getattr(mlp, "fc2", None), nn.Linear):
        return MlpPart(mlp, "plain", LinearPart(mlp.fc2), fc1=LinearPart(mlp.fc1))
    if all(isinstance(getattr(mlp, n, None), nn.Linear) for n in ("gate_proj", "up_proj", "down_proj")):
        return MlpPart(mlp, "swiglu", LinearPart(mlp.down_proj), fc1_g=LinearPart(mlp.gate_proj),
                       fc1_x=LinearPart(mlp.up_proj))
    raise UnsupportedModelError(f"{where} has a {type(mlp).__name__} MLP that vitlens does not know.")


def layer_scale(module: nn.Module | None) -> nn.Module | None:
    return None if module is None or isinstance(module, nn.Identity) else module


# -- declarations: one per transformers class --------------------------------------------------
#: the blocks of a tiny tower (2 blocks): what the coverage check builds every class from
TINY_BLOCKS: dict[str, Any] = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
#: a tiny image: 32 px in patches of 8
TINY_IMAGE: dict[str, Any] = dict(image_size=32, patch_size=8)


@dataclass(frozen=True, eq=False)
class HFClass:
    """One ``transformers`` class an adapter explains: everything vitlens records of it, in one place.

    ``config`` names its configuration class and ``tiny`` the arguments of a tiny
    one (2 blocks per stage, 32 px): the coverage check builds every declared
    class from it at random init.

    Examples
    --------
    >>> import transformers
    >>> vit = HFClass("ViTForImageClassification", "ViTConfig", {**TINY_BLOCKS, **TINY_IMAGE})
    >>> vit.tiny_config(transformers).num_hidden_layers
    2
    """

    name: str
    config: str
    tiny: Mapping[str, Any]

    def tiny_config(self, transformers: Any) -> Any:
        """The tiny configuration (``transformers`` is the imported module)."""
        return getattr(transformers, self.config)(**self.tiny)


@dataclass(frozen=True, eq=False)
class Backbone(HFClass):
    """A headless vision backbone (no logits of its own) that :func:`vitlens.with_head` gives a head.

    ``pools`` are the pooled vectors it offers the head (the first is the default):
    ``"cls"``, ``"mean"`` (patch tokens) or ``"pooler"`` (its own pooler). A family
    subclasses it to say where its blocks are (:meth:`stage`) and how a pool is
    read out (:meth:`readout`).
    """

    pools: tuple[str, ...] = ("cls",)
    #: the attention modules are called with keywords only (CLIP, SigLIP): Grad-CAM on features of a
    #: CLS read-out then reads the last block's norm1 output, not the attention's input
    keyword_attention: bool = False

    def num_prefix(self, backbone: nn.Module) -> int:
        """Tokens before the patch grid."""
        return 1

    def check(self, backbone: nn.Module, pool: str) -> None:
        """Refuse a pool this instance was built without."""
        if pool == "pooler" and getattr(backbone, "pooler", 1) is None:
            raise OptionError(f"vl.with_head: this {self.name} was built without its pooler (add_pooling_layer=False); "
                              "use pool='cls' or 'mean', or build it with add_pooling_layer=True.")

    def pooled(self, output: Any, pool: str, num_prefix: int) -> torch.Tensor:
        """The head's input (B, C) from the backbone's output object."""
        if pool == "pooler":
            return output.pooler_output
        tokens = output.last_hidden_state
        return tokens[:, 0] if pool == "cls" else tokens[:, num_prefix:].mean(1)

    def stage(self, backbone: nn.Module, input_size: tuple[int, int], name: str) -> StageInfo:
        """The backbone's one stage of blocks at ``input_size``."""
        raise NotImplementedError

    def readout(self, backbone: nn.Module, pool: str, head: nn.Module,
                rule: Callable[[Sequence[nn.Module]], Callable], num_prefix: int) -> tuple[nn.Module, Readout]:
        """``(final, read-out)`` for ``pool`` and the user's ``head``.

        ``rule(layers)`` is the head's LRP rule with ``layers`` of the backbone
        (e.g. its pooler's dense and activation) run before the head."""
        raise NotImplementedError


def _hf_adapters() -> list[type["HFAdapter"]]:
    from .registry import adapters

    return [a for a in adapters() if issubclass(a, HFAdapter)]


def declared() -> list[HFClass]:
    """Every transformers class an adapter explains (with logits of its own), in registry order."""
    return [c for a in _hf_adapters() for c in a.classes]


def backbones() -> dict[str, Backbone]:
    """Every headless backbone :func:`vitlens.with_head` takes, by class name."""
    return {b.name: b for a in _hf_adapters() for b in a.backbones}


def declaration(name: str) -> HFClass:
    """The declaration of the transformers class ``name`` (a class with logits or a headless backbone).

    Examples
    --------
    >>> declaration("Dinov2Model").pools
    ('cls', 'mean')
    """
    found = {c.name: c for c in declared()} | backbones()
    if name not in found:
        raise KeyError(f"{name}: no transformers adapter declares this class")
    return found[name]


class HFAdapter(Adapter):
    """Base of the ``transformers`` adapters.

    Subclasses set :attr:`vision_config` (the config the vision tower's modules
    read) in ``__init__`` before building their parts.
    """

    family = ""
    #: the transformers classes (exact classes, with logits) this adapter explains
    classes: tuple[HFClass, ...] = ()
    #: headless backbones of this family that vl.with_head gives a head (explained by ``hf_headed``)
    backbones: tuple[Backbone, ...] = ()

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return transformers_class(*(c.name for c in cls.classes))(model) if cls.classes else False

    @classmethod
    def explains(cls) -> dict[str, list[str]]:
        return {"transformers classes": [c.name for c in cls.classes],
                "headless transformers backbones (given a head with vl.with_head)": [b.name for b in cls.backbones]}

    @classmethod
    def declaration_of(cls, model: nn.Module) -> HFClass:
        """This adapter's declaration of ``type(model)``."""
        return next(c for c in cls.classes if c.name == type(model).__name__)

    def __init__(self, model: nn.Module):
        super().__init__(model)
        self.vision_config: Any = model.config
        version = transformers_version()
        if int(version.split(".")[0]) < 5:
            raise UnsupportedModelError(
                f"{type(model).__name__}: vitlens explains the module layout and attention interface of "
                f"transformers >= 5 (installed: {version}); upgrade it: {HF_EXTRA} --upgrade"
            )

    # -- geometry ---------------------------------------------------------------------
    @property
    def input_size(self) -> tuple[int, int]:
        size = self.vision_config.image_size
        if isinstance(size, (list, tuple)):
            return (int(size[0]), int(size[1]))
        return (int(size), int(size))

    @property
    def num_classes(self) -> int:
        return int(self.model.config.num_labels)

    def class_names(self) -> list[str]:
        """The config's ``id2label`` (``vl.load_model`` copies it to ``vitlens_class_names``)."""
        names = getattr(self.model, "vitlens_class_names", None)
        id2label = getattr(self.model.config, "id2label", None) or {}
        if names is None and len(id2label) == self.num_classes:
            names = [id2label[i] for i in range(self.num_classes)]
        if names is None or len(names) != self.num_classes:
            names = [str(i) for i in range(self.num_classes)]
        return [str(n) for n in names]

    # -- running ------------------------------------------------------------------------
    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits of a normalised batch (the output object's ``logits``)."""
        return self.model(pixel_values=x).logits

    def configs(self) -> list[Any]:
        """Every distinct config the attention modules of the parts read."""
        seen: dict[int, Any] = {}
        for part in self.parts:
            cfg = getattr(part.attn.module, "config", None) or self.vision_config
            seen.setdefault(id(cfg), cfg)
        return list(seen.values())

    @contextmanager
    def explicit_attention(self) -> Iterator[None]:
        """Attention as an explicit softmax whose probabilities reach the parts' probes."""
        _register()
        saved = [(cfg, cfg._attn_implementation_internal) for cfg in self.configs()]
        try:
            for part in self.parts:
                _PROBES[part.attn.module] = part.attn.probs
            for cfg, _ in saved:
                cfg._attn_implementation_internal = CAPTURE_ATTENTION
            yield
        finally:
            for cfg, impl in saved:
                cfg._attn_implementation_internal = impl
            for part in self.parts:
                _PROBES.pop(part.attn.module, None)

    # -- preprocessing ----------------------------------------------------------------
    def with_image_processor(self, processor: Any) -> "HFAdapter":
        """This adapter preprocessing with ``processor`` (``vl.capture(..., processor=)``); the model is untouched."""
        self._image_processor = processor
        return self

    def image_processor(self, required: bool = True) -> Any:
        """The model's own image processor: the one given to the capture, the one ``vl.load_model("hf:...")``
        attached, or the one saved beside the weights; ``None`` when there is none and it is not ``required``."""
        proc = getattr(self, "_image_processor", None) or getattr(self.model, "vitlens_image_processor", None)
        if proc is not None:
            return proc
        source = getattr(self.model.config, "_name_or_path", "") or getattr(self.model, "name_or_path", "")
        if source:
            try:
                from transformers import AutoImageProcessor

                return AutoImageProcessor.from_pretrained(source, local_files_only=True)
            except Exception:  # not cached / not a directory: say what to do below
                pass
        if not required:
            return None
        raise ImageError(
            f"{type(self.model).__name__}: vitlens preprocesses pictures with the model's own image processor, and "
            "none was found. Pass it: vl.capture(model, images, processor=AutoImageProcessor.from_pretrained(...)); "
            "or pass the pixel_values tensor your processor made; or load the model with vl.load_model('hf:<dir>')."
        )

    def data_config(self, required: bool = True) -> dict[str, Any] | None:
        """``mean``, ``std`` and ``input_size`` from the image processor's config (``None``: no processor)."""
        proc = self.image_processor(required)
        if proc is None:
            return None
        h, w = self.input_size
        return {"input_size": (3, h, w), "mean": tuple(proc.image_mean), "std": tuple(proc.image_std)}

    def eval_transform(self) -> Callable[[Any], torch.Tensor]:
        """PIL image → normalised (3, H, W) tensor, by the image processor itself."""
        proc = self.image_processor()
        h, w = self.input_size

        def transform(image: Any) -> torch.Tensor:
            x = proc(images=image, return_tensors="pt")["pixel_values"][0]
            if tuple(x.shape[-2:]) != (h, w):
                raise ImageError(
                    f"the image processor makes {x.shape[-2]}x{x.shape[-1]} inputs but the model takes "
                    f"{h}x{w}; save a processor that matches the model."
                )
            return x

        return transform


def _any_transformers_model(model: nn.Module) -> bool:
    return "transformers" in sys.modules and type(model).__module__.startswith("transformers.")


def _missing() -> str:
    image_text = [c.name for a in _hf_adapters() if getattr(a, "needs_text", False) for c in a.classes]
    heads = list(backbones())
    return ("this transformers class (a model without class or image-text logits, or a family vitlens has no "
            f"adapter for; give a headless {', '.join(heads[:-1])} or {heads[-1]} a head with "
            f"vl.with_head(model, head), or load the full {'/'.join(image_text)} and pass text=[...])")


def _supported() -> str:
    return ", ".join(c.name for c in declared())


def _refusal() -> None:
    from .registry import register_refusal

    register_refusal(_any_transformers_model, _missing, _supported)


_refusal()
