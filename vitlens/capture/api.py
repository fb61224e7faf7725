"""``vl.capture``: run the model once, keep everything labeled."""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
import xarray as xr
from torch import nn

from .._version import __version__
from ..errors import ImageError, OptionError, PrecisionWarning, TargetError
from ..models import adapter_for
from ..models.adapter import Adapter, StageInfo
from ..registry import CAPTURE_GROUPS, METHOD_INFO, STAT_INFO
from . import reduced
from .attrs import json_text
from .layout import NORM_VARIABLES
from .hooks import Recorder
from .images import image_sources, prepare
from .validate import check_finite, check_model
from .text import bind_inputs
from ..models.windows import window_tokens

#: What ``capture(keep=...)`` can store (the raw groups: the registry's list, which the methods'
#: ``needs`` name). ``"all"`` stores everything but the :data:`EXTRA_GROUPS`, ``"none"`` none of them.
KEEP_GROUPS = CAPTURE_GROUPS

#: The pass each group needs besides the forward pass (which the hooks record): ``"backward"``
#: (activation gradients of the target logit), ``"lrp"`` (the relevance walk of
#: :mod:`vitlens.capture.relevance`, which also gives Swin's merge shares). A capture runs the
#: passes of the groups it records, no more (:attr:`CapturePlan.passes`).
GROUP_PASSES: dict[str, tuple[str, ...]] = {
    "attention": (),
    "attention_grad": ("backward",),
    "attention_relevance": ("lrp",),
    "ln": (),
    "norms": (),
    "features": ("backward",),  # features_grad, for Grad-CAM on features
    "head_output": (),
    "ablation_effect": ("ablations",),  # one forward per head (capture/interventions.py), no backward
    "attnlrp": ("attnlrp",),  # a forward and backward of their own (vitlens.capture.attnlrp)
    "attnlrp_cp": ("attnlrp_cp",),
    "legrad": ("legrad",),  # a forward and one small backward per block (vitlens.capture.legrad)
}

#: Groups stored only when named in ``keep=`` (not part of ``"all"``: they cost storage or forwards):
#: ``head_output``, each head's output as it reaches the output projection (what mean-ablation
#: averages, see :mod:`vitlens.capture.interventions`); ``ablation_effect``, the drop of the target
#: logit and probability when each head alone is ablated (one forward per head, no backward);
#: ``attnlrp`` / ``attnlrp_cp``, the AttnLRP passes (relevance through the softmax / CP-LRP), and
#: ``legrad``, LeGrad's per-layer gradients — each a pass of its own, for those methods
#: (``keep=("all", *vl.methods.extra_groups())`` records what every method reads).
EXTRA_GROUPS = ("head_output", "ablation_effect", "attnlrp", "attnlrp_cp", "legrad")

#: the extra groups that need the target's gradients (dropped under ``grads=False``)
_GRADIENT_EXTRAS = ("attnlrp", "attnlrp_cp", "legrad")

_TOKEN_VARS = NORM_VARIABLES  # the "norms" group's variables (one list, beside the layout's KEPT_IN)

_DTYPES = {"float32": np.float32, "float16": np.float16}

#: Images per forward pass when ``batch_size=`` is left out.
DEFAULT_BATCH_SIZE = 32


def _resolve_keep(keep: str | Iterable[str] | None, grads: bool, answers: bool) -> tuple[set[str], bool]:
    """The raw groups to store, and whether to store the pictures (``image``)."""
    if keep is None:
        keep = "none" if answers else "all"
    if isinstance(keep, str):
        keep = {"all": (*KEEP_GROUPS, "image"), "none": ()}.get(keep, (keep,))
    elif not keep:
        raise OptionError(f"keep= is empty; choose from {list(KEEP_GROUPS)}, 'all' or 'none'.")
    chosen = set(keep)
    if "all" in chosen:  # e.g. keep=["all", "head_output"]
        chosen = (chosen - {"all"}) | set(KEEP_GROUPS) | {"image"}
    unknown = chosen - set(KEEP_GROUPS) - set(EXTRA_GROUPS) - {"image"}
    if unknown:
        raise OptionError(f"keep= got {sorted(unknown)}; choose from {list(KEEP_GROUPS)} (and, named, "
                          f"{list(EXTRA_GROUPS)}, or 'image', the pictures), 'all' or 'none'.")
    if not grads:
        chosen -= {"attention_grad", "attention_relevance", *_GRADIENT_EXTRAS}
    image = "image" in chosen or not answers  # a capture without maps=/stats= always shows its pictures
    return chosen - {"image"}, image


def class_names(model: nn.Module, num_classes: int) -> list[str]:
    """Human-readable class names: shipped models carry them; ImageNet models via timm."""
    names = getattr(model, "vitlens_class_names", None)
    if names is not None and len(names) == num_classes:
        return [str(n) for n in names]
    try:
        from timm.data import infer_imagenet_subset

        subset = infer_imagenet_subset(model)
        if subset:
            names = _imagenet_names(subset)
            if len(names) == num_classes:
                return list(names)
    except Exception:  # class names are a nicety; never fail a capture over them
        pass
    return [str(i) for i in range(num_classes)]


@functools.lru_cache(maxsize=8)
def _imagenet_names(subset: str) -> tuple[str, ...]:
    """timm's class descriptions of an ImageNet subset (read from timm's files once per process)."""
    from timm.data import ImageNetInfo

    info = ImageNetInfo(subset)
    return tuple(info.index_to_description(i) for i in range(info.num_classes()))


def _resolve_target(target: Any, n: int, names: Sequence[str]) -> np.ndarray | None:
    if target is None:
        return None
    if isinstance(target, (bool, np.bool_, float, np.floating)):
        raise TargetError(f"target={target!r}: pass a class index (int), a class name, one per image, or None.")
    if isinstance(target, (str, int, np.integer)):
        target = [target] * n
    values = list(np.asarray(target, dtype=object).ravel()) if not isinstance(target, list) else target
    if len(values) != n:
        raise TargetError(f"got {len(values)} targets for {n} images; pass one int per image, one int, or None.")
    out = []
    for v in values:
        if isinstance(v, str):
            if v not in names:
                raise TargetError(f"unknown class name {v!r}; the model's classes are {list(names)[:10]}...")
            out.append(list(names).index(v))
            continue
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool):
            raise TargetError(f"targets must be class indices (int) or names; got {v!r}.")
        if not 0 <= int(v) < len(names):
            raise TargetError(f"target {int(v)} is out of range: the model has {len(names)} classes (0..{len(names) - 1}).")
        out.append(int(v))
    return np.asarray(out, dtype=np.int64)


def _attention_array(stage: StageInfo, t: torch.Tensor, batch: int) -> torch.Tensor:
    """(B[·nW], H, Q, K) → a view (B, H, Q, K) or (B, H, nW, Q, K)."""
    a = t.detach()
    if stage.window is not None:
        nw = a.shape[0] // batch
        a = a.reshape(batch, nw, *a.shape[1:]).transpose(1, 2)
    return a


class _Buffers:
    """One array per stored variable for all ``n`` images, filled batch by batch.

    Each batch is copied once, straight into its rows and the stored dtype
    (no per-batch stacking, no final concatenation, no second cast).
    """

    def __init__(self, n: int, dtype: torch.dtype):
        self.n, self.dtype = n, dtype
        self.data: dict[str, torch.Tensor] = {}

    def put(self, key: str, start: int, value: torch.Tensor | list[torch.Tensor], dtype: torch.dtype | None = None) -> None:
        """Write ``value`` (B, ...) — or per-layer values, stacked on axis 1 — at rows ``start``…"""
        if not isinstance(value, list):
            self._rows(key, start, value, None, dtype).copy_(value.detach())
            return
        for i in range(len(value)):
            self.put_layer(key, start, i, len(value), value[i], dtype)
            value[i] = None  # the caller's list may hold the only reference: free each layer once copied

    def put_layer(self, key: str, start: int, index: int, layers: int, value: torch.Tensor,
                  dtype: torch.dtype | None = None) -> None:
        """Write one layer's ``value`` (B, ...) at rows ``start``… and position ``index`` of ``layers``."""
        self._rows(key, start, value, layers, dtype)[:, index].copy_(value.detach())

    def _rows(self, key: str, start: int, value: torch.Tensor, layers: int | None, dtype: torch.dtype | None):
        if key not in self.data:
            shape = (self.n, *(() if layers is None else (layers,)), *value.shape[1:])
            kind = dtype or (self.dtype if value.is_floating_point() else value.dtype)
            self.data[key] = torch.empty(shape, dtype=kind)
        return self.data[key][start : start + value.shape[0]]

    def items(self):
        return ((key, t.numpy()) for key, t in self.data.items())

    def __getitem__(self, key: str) -> np.ndarray:
        return self.data[key].numpy()


class _Sink:
    """Where one batch's records go: the groups the capture stores into the batch's rows of the
    capture's buffers, the groups only its maps and statistics read into buffers of the batch alone
    (dropped with it)."""

    def __init__(self, buffers: _Buffers, start: int, size: int, plan: CapturePlan):
        self.buffers, self.start, self.size, self.plan = buffers, start, size, plan
        self.scratch = _Buffers(size, buffers.dtype)
        self.written: set[str] = set()

    def _where(self, key: str) -> tuple[_Buffers, int]:
        node, _, var = key.rpartition("/")
        group = None if node in ("", reduced.MAPS, reduced.STATS) else reduced.group_of(var)
        if group is None or group in self.plan.kept:
            self.written.add(key)
            return self.buffers, self.start
        return self.scratch, 0

    def put(self, key: str, value: torch.Tensor | list[torch.Tensor], dtype: torch.dtype | None = None) -> None:
        """Write ``value`` (B, ...) — or per-layer values, stacked on axis 1 — as this batch's ``key``."""
        buffers, start = self._where(key)
        buffers.put(key, start, value, dtype)

    def put_layer(self, key: str, index: int, layers: int, value: torch.Tensor) -> None:
        """Write one layer's ``value`` (B, ...) at position ``index`` of ``layers``."""
        buffers, start = self._where(key)
        buffers.put_layer(key, start, index, layers, value)

    def arrays(self) -> dict[str, np.ndarray]:
        """This batch's arrays, stored or not (views, no copy)."""
        rows = {key: self.buffers[key][self.start : self.start + self.size] for key in self.written}
        return {**rows, **dict(self.scratch.items())}


def _model_name(model: nn.Module) -> str:
    name = getattr(model, "vitlens_name", None)
    if name:
        return str(name)
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return str(cfg.get("architecture") or type(model).__name__)


@dataclass(frozen=True)
class CapturePlan:
    """What one capture call records, which passes it runs and what it stores: its options, resolved once.

    Attributes
    ----------
    kept
        The raw groups (:data:`KEEP_GROUPS`) stored.
    grads
        Whether gradients (and LRP relevances) may be recorded at all (``grads=``).
    dtype
        The stored floating-point dtype of raw groups.
    batch_size
        Images per forward pass.
    maps, stats
        Reduced capture: the methods and head statistics computed on each batch, with their options.
    needed
        The raw groups those maps and statistics read (recorded for each batch, stored only if kept).
    image
        Whether the pictures are stored (the root ``image``).
    intervention
        The :class:`~vitlens.capture.interventions.Intervention` applied to every forward
        pass (ablation, patching), or ``None``.
    lrp_dtype
        The dtype of the αβ LRP pass (:mod:`vitlens.capture.precision`).
    """

    kept: frozenset[str]
    grads: bool
    dtype: str
    batch_size: int
    maps: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    stats: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    needed: frozenset[str] = frozenset()
    image: bool = True
    intervention: Any = None
    lrp_dtype: str = "float32"

    @property
    def answers(self) -> bool:
        """Whether maps or statistics are computed during the capture (a reduced capture)."""
        return bool(self.maps or self.stats)

    @property
    def recorded(self) -> frozenset[str]:
        """The groups each batch records: those stored and those its maps and statistics read."""
        return self.kept | self.needed

    @property
    def passes(self) -> frozenset[str]:
        """The passes each batch runs after its forward pass: those of the groups it records
        (:data:`GROUP_PASSES`); no backward pass under ``grads=False``."""
        passes = {p for group in self.recorded for p in GROUP_PASSES[group]}
        return frozenset(passes if self.grads else passes - {"backward"})

    @property
    def options(self) -> dict[str, Any]:
        """The options recorded in the capture's attrs and in a streaming run's fingerprint."""
        options: dict[str, Any] = {"grads": self.grads, "keep": sorted(self.kept), "dtype": self.dtype}
        if self.lrp_dtype != "float32":  # (recorded only when asked: older stores' fingerprints stay valid)
            options["lrp_dtype"] = self.lrp_dtype
        if self.answers:
            options.update(maps=reduced._canonical(self.maps), stats=reduced._canonical(self.stats),
                           image=self.image)
        return options

    @property
    def run_options(self) -> dict[str, Any]:
        """What a streaming run's fingerprint holds: the options and the intervention's digest."""
        if self.intervention is None:
            return self.options
        return {**self.options, "intervention": self.intervention.digest()}


def _plan(adapter: Adapter, keep: str | Iterable[str] | None, grads: bool, dtype: str, batch_size: int | None,
          maps: Any = None, stats: Any = None, lrp_dtype: str = "float32") -> CapturePlan:
    from .precision import LRP_DTYPES

    if dtype not in _DTYPES:
        raise OptionError(f"dtype={dtype!r}; choose 'float32' or 'float16'.")
    if lrp_dtype not in LRP_DTYPES:
        raise OptionError(f"lrp_dtype={lrp_dtype!r}; choose 'float32' or 'float64' (the αβ LRP pass's precision).")
    if batch_size is None:
        batch_size = DEFAULT_BATCH_SIZE
    if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise OptionError(f"batch_size must be a positive int; got {batch_size!r}.")
    maps, stats = reduced.resolve_maps(maps), reduced.resolve_stat_options(stats)
    kept, image = _resolve_keep(keep, grads, bool(maps or stats))
    attrs = adapter.describe()
    needed = reduced.needed_groups(maps, stats, attrs)
    if not grads:  # what needs the target's gradients (a backward or LRP pass) cannot be made without them
        def gradient(groups: frozenset[str]) -> bool:
            return any(p != "ablations" for g in groups for p in GROUP_PASSES[g])

        wanting = [name for name, options in maps.items() if gradient(METHOD_INFO[name].groups(attrs, options))]
        wanting += [name for name, options in stats.items() if gradient(STAT_INFO[name].groups(options))]
        if wanting:
            raise OptionError(f"{', '.join(wanting)} need the gradients of the target; drop grads=False "
                              "(or leave them out of maps=/stats=).")
    return CapturePlan(kept=frozenset(kept), grads=bool(grads), dtype=dtype, batch_size=int(batch_size),
                       maps=maps, stats=stats, needed=needed, image=image, lrp_dtype=lrp_dtype)


def capture(
    model: nn.Module | str | Callable[[], nn.Module],
    images: Any,
    target: int | str | Sequence[int | str] | None = None,
    *,
    grads: bool = True,
    keep: str | Iterable[str] | None = None,
    dtype: str = "float32",
    batch_size: int | None = None,
    device: str | torch.device | None = None,
    progress: bool | None = None,
    store: str | os.PathLike | None = None,
    resume: bool = False,
    text: Sequence[str] | torch.Tensor | None = None,
    processor: Any = None,
    ablate: Mapping[int, Any] | None = None,
    ablation: str = "zero",
    reference: Any = None,
    intervention: Any = None,
    lrp_dtype: str = "float32",
    maps: str | Sequence[str] | Mapping[str, Mapping[str, Any]] | None = None,
    stats: str | Sequence[str] | Mapping[str, Mapping[str, Any]] | None = None,
    client: Any = None,
) -> xr.DataTree:
    """Run ``model`` once on ``images`` and record its internals into a labeled DataTree.

    One forward and one backward pass (of the target logit, per image) record
    everything the seven explanation methods need; methods, metrics and widgets
    then work on the returned tree without running the model again.

    Parameters
    ----------
    model
        A model of a supported family: timm ViT/DeiT/EVA/BEiT/Swin v1-v2 or transformers
        ViT/DeiT/DINOv2/BEiT/Swin/CLIP/SigLIP (see :func:`vitlens.load_model`). For a
        capture sharded over dask workers (``client=``): a name
        :func:`vitlens.load_model` accepts, or a picklable function of no
        arguments that builds the model (each worker builds it once).
    images
        A folder (its image files, sorted by name: see
        :func:`~vitlens.capture.images.folder_images`), a path or list of
        paths, PIL image(s), arrays ``(H, W, 3)`` or
        ``(sample, H, W, 3)`` in [0, 1] or uint8 (xarray too), or a ready,
        normalised tensor ``(B, 3, H, W)`` (e.g. a processor's ``pixel_values``).
        Arrays at the model's input size are only normalised; others go through
        timm's eval transform for the model (a transformers model's image processor).
    target
        Class to explain: ``None`` (each image's predicted class), one int or
        class name for all images, or one per image; or a callable
        ``f(logits) -> (batch,)`` tensor, or a :class:`vitlens.targets.Target`
        (``vl.targets.similarity(reference)``, ``vl.targets.patch_similarity(row, col)``):
        every gradient, LRP pass and class-specific method then explains that
        scalar (``attrs["target"]`` names it, ``target_score`` holds its values).
        A headless ``transformers`` backbone (``Dinov2Model``, a SigLIP tower)
        takes a :class:`~vitlens.targets.Target` without a head.
    grads
        Allow the backward pass (needed by gradient-based methods and LRP).
        Each batch runs only the passes of what it records: attention alone
        needs no backward pass, gradients no LRP pass.
    keep
        The raw groups to store: ``"all"``, ``"none"`` or a subset of
        :data:`KEEP_GROUPS` (plus ``"image"``, the pictures, which a capture
        without ``maps=``/``stats=`` always stores). Default: ``"all"``, or
        ``"none"`` with ``maps=``/``stats=``. The groups of :data:`EXTRA_GROUPS`
        are stored only when named (``keep=["all", "head_output"]``;
        ``keep=("all", "legrad")`` for LeGrad's pass, ``"attnlrp_cp"``/``"attnlrp"`` for AttnLRP's).
    dtype
        ``"float32"`` or ``"float16"`` for the stored floating-point arrays.
    batch_size
        Images per forward pass (default: 32).
    device
        Where to run (default: where the model's parameters are).
    progress
        Show a progress bar (default: when there is more than one batch, and
        always when streaming to a store).
    store
        A ``.zarr`` path: capture any number of images (an array, a folder of
        image files, ``vl.datasets.shapes(...)``, a torch ``DataLoader``, any
        iterable of batches) batch by batch, appending each batch to the store
        as it goes; returns the store opened lazily (dask). Nothing already
        written is lost if the run is interrupted.
    resume
        Continue an interrupted ``store`` run after its last committed image.
    text
        Image–text models (CLIP): the prompts to score each image against, as
        strings or a LongTensor of token ids (one row per prompt). The logits
        are then the similarities (one column per prompt), the class names the
        prompts, and ``target`` picks a prompt by index or text. See
        :mod:`vitlens.capture.text`.
    processor
        Hugging Face models: the image processor that preprocesses the pictures
        (default: the one saved or loaded with the model), the tokenizer of the
        ``text`` prompts, or a multimodal processor holding both. A ready tensor
        needs none: the maps do not depend on it, and without one the picture is
        the tensor itself (with an :class:`~vitlens.ImageProcessorWarning`).
    ablate
        Switch heads off in the model for this capture: ``{block: [heads]}`` (global
        block indices; ``"all"`` for every head of a block). A head's output is its slice
        of the input of the attention's output projection; in Swin it is switched off in
        every window of its block. Everything is recorded from the ablated forward and
        backward; the capture's ``intervention`` attribute says what was done.
    ablation
        ``"zero"`` (the heads' outputs become 0) or ``"mean"`` (their mean over
        ``reference``, per token position).
    reference
        For ``ablation="mean"``: images, or a capture/store made with
        ``keep=[..., "head_output"]``.
    intervention
        A ready :class:`~vitlens.capture.interventions.Intervention` (what
        :func:`vitlens.patch` and the widgets pass) instead of ``ablate``/``ablation``/``reference``.
    lrp_dtype
        ``"float32"`` (default) or ``"float64"``: the precision of the αβ LRP
        pass behind Transformer Attribution (:mod:`vitlens.capture.precision`).
        Either way the capture records ``lrp_condition`` (sample): the worst
        cancellation the pass divided by; a float32 map is unreliable where it is
        small (docs/METHODS.md, "Sensitivity to rounding").
    maps
        Reduced capture: registered methods (``"all"``, a list, or
        ``{name: options}``) computed on each batch while it is in memory and
        stored under ``/maps`` (``(sample, map_y, map_x)`` on the token grid,
        options in attrs); ``vl.explain`` returns them. See
        :mod:`vitlens.capture.reduced`.
    stats
        Reduced capture: head statistics (``"all"`` or a list; ``vl.HEAD_STATS``)
        stored under ``/stats`` as ``(sample, layer, head)``.
    client
        A ``dask.distributed.Client``: capture ``store=`` with its workers, each
        writing whole batches into the one store (:mod:`vitlens.capture.shard`;
        resumable, equal to a one-process capture). Left out, a Client that is
        active is used when ``model`` is a name or a factory and ``store=`` is
        given; ``False`` always captures in this process.

    Returns
    -------
    xarray.DataTree
        Root: ``image``, ``logits``, ``target`` (and, for images read from files,
        ``source``: each one's name in the folder or its path as given); one child per stage
        (``stage0``…) with ``attention``, ``attention_grad``, ``ln_mean``,
        ``ln_std``, token norms and value-path quantities, labeled by
        ``layer``, ``head``, ``token`` (with ``row``, ``col``, ``kind``).

    Examples
    --------
    >>> import numpy as np, timm, vitlens as vl
    >>> model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=3)
    >>> cap = vl.capture(model, np.random.default_rng(0).random((2, 32, 32, 3)))
    >>> cap["stage0"].attention.dims
    ('sample', 'layer', 'head', 'query', 'key')
    >>> off = vl.capture(model, np.random.default_rng(0).random((2, 32, 32, 3)), ablate={11: [0, 1, 2]})
    >>> off.attrs["intervention"]
    '{"ablation": "zero", "heads": {"11": [0, 1, 2]}, "kind": "ablate"}'
    >>> small = vl.capture(model, np.random.default_rng(0).random((2, 32, 32, 3)), maps=["rollout"])
    >>> small["maps"]["rollout"].dims, "attention" in small["stage0"]
    (('sample', 'map_y', 'map_x'), False)
    """
    from .shard import sharding_client

    chosen = sharding_client(client, model, store)
    if chosen is not None:
        from .shard import capture_sharded

        options = dict(grads=grads, keep=keep, dtype=dtype, batch_size=batch_size, device=device, text=text,
                       processor=processor, ablate=ablate, ablation=ablation, reference=reference,
                       intervention=intervention, lrp_dtype=lrp_dtype, maps=maps, stats=stats)
        return _said(capture_sharded(chosen, model, images, target, store=store, resume=resume, progress=progress,
                                     options=options))
    model, adapter, plan, device = _prepare(model, target, grads=grads, keep=keep, dtype=dtype,
                                            batch_size=batch_size, device=device, progress=progress, text=text,
                                            processor=processor, ablate=ablate, ablation=ablation,
                                            reference=reference, intervention=intervention, lrp_dtype=lrp_dtype,
                                            maps=maps, stats=stats)
    if store is not None:
        from .stream import capture_to_store

        part, fingerprint = _stream_step(model, adapter, plan, device, images, target)
        return _said(capture_to_store(part, images, store, target=target, batch_size=plan.batch_size,
                                      resume=resume, progress=progress, fingerprint=fingerprint))
    if resume:
        raise OptionError("resume=True continues a streaming capture: pass store='run.zarr' too.")
    tree = _capture_images(adapter, model, images, target, plan, device, progress)
    # keep the caller's labels (e.g. a subset of a dataset)
    return _said(_label_samples(tree, _input_samples(images, tree["sample"].size), image_sources(images)))


def _said(tree: xr.DataTree) -> xr.DataTree:
    """A reduced capture's maps computed batch by batch: their ``lrp_unreliable`` set for the whole run
    and, where it names samples, one :class:`~vitlens.PrecisionWarning` for the run (none per batch)."""
    from .precision import settle_unreliable, warn_unreliable

    warn_unreliable(settle_unreliable(tree), stacklevel=3)
    return tree


def _prepare(model: nn.Module, target: Any, *, grads: bool = True, keep: str | Iterable[str] | None = None,
             dtype: str = "float32", batch_size: int | None = None, device: Any = None,
             progress: bool | None = None, text: Any = None, processor: Any = None,
             ablate: Mapping[int, Any] | None = None, ablation: str = "zero", reference: Any = None,
             intervention: Any = None, lrp_dtype: str = "float32", maps: Any = None, stats: Any = None,
             ) -> tuple[nn.Module, Adapter, CapturePlan, torch.device]:
    """``capture``'s options checked and resolved for ``model``: ``(model, adapter, plan, device)``.

    What a streaming run's per-batch step (:func:`_capture_part`) is built from, in this process
    or on each dask worker (:mod:`vitlens.capture.shard`).
    """
    from .targets import Target, is_callable_target

    if isinstance(target, Target):  # a headless backbone explains an embedding target without a head
        from ..models import embedding_model

        model = embedding_model(model) or model
    adapter = bind_inputs(adapter_for(model), text, processor)
    plan = _plan(adapter, keep, grads, dtype, batch_size, maps, stats, lrp_dtype)
    if is_callable_target(target) and not grads:
        raise OptionError("a callable target is explained through gradients: pass grads=True.")
    if is_callable_target(target) and "ablation_effect" in plan.recorded:
        raise OptionError("ablation_effect measures the drop of a class's logit; a callable target has none: "
                          "capture it with a class target.")
    # inference tensors are fine where no pass after the forward one differentiates
    device = check_model(model, device, bool(plan.passes - {"ablations"}))
    if intervention is None:
        from .interventions import resolve

        intervention = resolve(adapter, ablate, ablation, reference, for_importance="ablation_effect" in plan.recorded,
                               batch_size=plan.batch_size, progress=progress)
    elif ablate is not None or reference is not None:
        raise OptionError("pass either intervention= or ablate=/ablation=/reference=, not both.")
    plan = replace(plan, intervention=intervention)
    return model, adapter, plan, device


def _stream_step(model: nn.Module, adapter: Adapter, plan: CapturePlan, device: torch.device, images: Any,
                 target: Any) -> tuple[Callable[..., xr.DataTree], dict[str, Any]]:
    """A streaming run's per-batch step, ``step(images, target, offset) -> tree``, and the run's
    fingerprint (checked on resume). The one-process stream and each dask worker use it; ``images``
    (the whole input) gives the step the ``source`` of each image (the workers pass theirs per batch)."""
    from .fingerprint import run_fingerprint, text_fingerprint

    if plan.intervention is not None and plan.intervention.per_image:
        raise OptionError("a patched capture (one source per image) is made in memory: drop store=.")
    fingerprint = run_fingerprint(model, images, target, plan.run_options, text=text_fingerprint(adapter))
    return functools.partial(_capture_part, adapter, model, plan, device, sources=image_sources(images)), fingerprint


def _capture_part(adapter: Adapter, model: nn.Module, plan: CapturePlan, device: torch.device,
                  images: Any, target: Any, offset: int, sources: list[str] | None = None) -> xr.DataTree:
    """One part of a streaming capture, its samples numbered from ``offset`` (what the store appends);
    ``sources``: those of the whole input (:func:`~vitlens.capture.images.image_sources`)."""
    tree = _capture_images(adapter, model, images, target, plan, device, progress=False, first_sample=offset)
    n = int(tree["sample"].size)
    return _label_samples(tree, np.arange(offset, offset + n), None if sources is None else sources[offset:offset + n])


def _label_samples(tree: xr.DataTree, sample: np.ndarray | None, sources: list[str] | None) -> xr.DataTree:
    """The root's ``sample`` labels and, for images read from files, the ``source`` coordinate on ``sample``."""
    root = tree.to_dataset(inherit=False)
    if sample is not None:
        root = root.assign_coords(sample=sample)
    if sources is not None and len(sources) == root.sizes["sample"]:
        root = root.assign_coords(source=("sample", np.array(sources, dtype=object)))
        root["source"].attrs["description"] = ("the image file of each sample: its name in the captured folder, or "
                                               "the path as given; '' for an image not read from a file")
    tree.dataset = root
    return tree


def _capture_images(adapter: Adapter, model: nn.Module, images: Any, target: Any, plan: CapturePlan,
                    device: torch.device, progress: bool | None, first_sample: int = 0) -> xr.DataTree:
    """Prepare ``images``, capture them batch by batch into one set of buffers, assemble the tree.
    ``first_sample``: the number of the first image in the whole run (a streamed part's offset), so that
    what a reduced capture's methods say about a sample (e.g. a PrecisionWarning) names the run's sample."""
    batch = prepare(images, adapter)
    adapter = adapter.for_input(tuple(batch.pixels.shape[-2:]))  # dynamic_img_size: grid follows the input
    n = batch.pixels.shape[0]
    names = adapter.class_names() if hasattr(adapter, "class_names") else class_names(model, adapter.num_classes)
    from .targets import is_callable_target

    explained = target if is_callable_target(target) else None
    targets = None if explained is not None else _resolve_target(target, n, names)
    param = next(model.parameters(), None)
    model_dtype = param.dtype if param is not None and param.dtype.is_floating_point else torch.float32

    buffers = _Buffers(n, getattr(torch, plan.dtype))
    layouts: dict[str, xr.DataArray] = {}  # one batch's answer per stored map/statistic: its dims, coords, attrs
    starts = range(0, n, plan.batch_size)
    if progress is None:
        progress = len(starts) > 1
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="capture", unit="batch")
    from .interventions import Intervening, stored_values

    iv = plan.intervention
    if iv is not None and iv.per_image:
        _check_rows(iv, n)
    # the per-token records (LayerNorm statistics, norms and value path) only when kept
    with Recorder(adapter, keep_block_inputs="lrp" in plan.passes, param_grads=False,
                  fused=False if _explicit_attention(plan) else None,
                  ln="ln" in plan.recorded, norms="norms" in plan.recorded) as rec, \
            Intervening(adapter, iv, record_heads="head_output" in plan.recorded,
                        every_block="ablations" in plan.passes) as hooks:
        if iv is not None and iv.token_layer is not None:  # patched tokens: the LRP walk stops there
            rec.constant_tokens = {iv.token_layer: list(iv.token_index)}
        for start in starts:
            rec.reset()
            x = batch.pixels[start : start + plan.batch_size].to(device, model_dtype)
            hooks.select(start, start + x.shape[0])
            sink = _Sink(buffers, start, x.shape[0], plan)
            _capture_batch(adapter, rec, x, targets, start, plan, sink, hooks, bool(progress), explained)
            if plan.answers:
                rows = replace(batch, display=batch.display[start : start + x.shape[0]])
                part = _assemble(adapter, model, rows, sink.arrays(), names, plan, explained, image=False)
                first = first_sample + start
                with warnings.catch_warnings():  # said once for the run, by capture (precision.settle_unreliable)
                    warnings.simplefilter("ignore", PrecisionWarning)
                    _answer_batch(_label_samples(part, np.arange(first, first + x.shape[0]), None), plan, sink,
                                  layouts)
    # a statistic is NaN where a block has no such head (Swin stages differ in heads): not damage
    check_finite((key, arr) for key, arr in buffers.items() if not key.startswith(reduced.STATS + "/"))
    tree = _assemble(adapter, model, batch, dict(buffers.items()), names, plan, explained, layouts)
    if iv is not None and (iv.heads or iv.token_layer is not None):
        tree.attrs["intervention"] = json_text(iv.describe())
        for name, variables in stored_values(iv, adapter).items():  # what redoing it needs (mean ablation)
            node = tree[name].to_dataset(inherit=False)
            tree[name].dataset = node.assign_coords(ablated_layer=variables.pop("ablated_layer")).assign(variables)
    if "ablations" in plan.passes:  # how each head was ablated in turn
        tree.attrs["ablation_effect"] = json_text({"ablation": iv.mode, **iv.source})
    return tree


#: A capture that runs no pass after its forward (no gradient, no relevance, no ablation) and no
#: intervention takes the probabilities where the model computes them (timm's explicit attention)
#: instead of running the fused kernel and computing them again afterwards (docs/METHODS.md, "How
#: capture computes what the methods read"). ``False``: every capture runs the fused path.
EXPLICIT_WITHOUT_PASSES = True


def _explicit_attention(plan: CapturePlan) -> bool:
    """Whether ``plan``'s capture runs the model's explicit attention path (:data:`EXPLICIT_WITHOUT_PASSES`).

    Not with an intervention or recorded head outputs: those are the references interventions
    compare with, and those run the fused path (so an intervention's results stay bit for bit
    those of the capture it is compared with)."""
    return (EXPLICIT_WITHOUT_PASSES and not plan.passes and plan.intervention is None
            and "head_output" not in plan.recorded)


def _check_rows(intervention: Any, n: int) -> None:
    rows = {v.shape[0] for v in intervention.values.values()}
    if intervention.token_values is not None:
        rows.add(intervention.token_values.shape[0])
    if rows - {1, n}:
        raise OptionError(f"the intervention holds values for {sorted(rows - {1})} images; the capture has {n}: "
                          "give one source image for all, or one per image.")


def _input_samples(images: Any, n: int) -> np.ndarray | None:
    """The ``sample`` coordinate of xarray input, if it has one of length ``n``."""
    data = images["image"] if isinstance(images, xr.Dataset) and "image" in images else images
    if not isinstance(data, xr.DataArray) or "sample" not in data.coords:
        return None
    values = np.asarray(data["sample"].values)
    if values.ndim != 1 or values.size != n or len(np.unique(values)) != n:
        return None
    return values


def _capture_batch(adapter: Adapter, rec: Recorder, x: torch.Tensor, targets: np.ndarray | None, start: int,
                   plan: CapturePlan, sink: _Sink, hooks: Any = None, progress: bool = False,
                   explained: Any = None) -> None:
    """One batch: record the forward pass, run the plan's passes, keep what the plan records.

    The passes are chosen here, from the groups the plan records (:attr:`CapturePlan.passes`):
    the backward pass in :func:`_record`, one forward per head in :func:`_store_interventions`,
    the LRP walk in :func:`_store_blocks`, AttnLRP's and LeGrad's in :func:`_extra_passes`.
    """
    from .targets import score

    if not plan.passes and "attention" in plan.recorded:  # nothing reads them after the forward: out at once
        put = _block_writer(adapter, sink, x.shape[0])
        rec.store_attention = lambda layer, probs: put("attention", layer, probs)
    try:
        recorded = _record(adapter, rec, x, targets, start, "backward" in plan.passes, explained)
    finally:
        rec.store_attention = None
    logits, tgt, feat_grad = recorded.logits, recorded.target, recorded.features_grad
    sink.put("logits", logits, torch.float32)
    sink.put("target", tgt.to(torch.int64))
    if recorded.scores is not None:
        sink.put("target_score", recorded.scores, torch.float32)
    _store_interventions(adapter, rec, x, tgt, logits, plan, sink, hooks, progress)
    _store_blocks(adapter, rec, tgt, plan, sink, recorded.seed, recorded.seed_tokens)
    _store_tokens(adapter, rec, plan, sink, feat_grad)
    _extra_passes(adapter, rec, x, plan, sink, lambda out: score(explained, out, tgt))


def _answer_batch(tree: xr.DataTree, plan: CapturePlan, sink: _Sink, layouts: dict[str, xr.DataArray]) -> None:
    """A reduced capture's maps and statistics of one batch (``tree``), stored in its rows, in the
    dtypes :func:`reduced.answers` gives them (float32, a map's float64 minimum apart: see
    :data:`reduced.ANSWER_DTYPE`)."""
    for key, da in reduced.answers(tree, plan.maps, plan.stats).items():
        values = torch.from_numpy(np.ascontiguousarray(da.transpose("sample", ...).values))
        sink.put(key, values, values.dtype)
        layouts.setdefault(key, da)


@dataclass
class _Recorded:
    """What :func:`_record` hands on: the logits, the explained class (-1 for a callable target), the
    gradient of the features, and for a callable target its values and the LRP pass's seed."""

    logits: torch.Tensor
    target: torch.Tensor
    features_grad: torch.Tensor | None = None
    scores: torch.Tensor | None = None
    seed: torch.Tensor | None = None  # (B, classes): the callable's gradient at the logits
    seed_tokens: torch.Tensor | None = None  # (B, N, C): a Target's gradient × input at the final tokens


def _record(adapter: Adapter, rec: Recorder, x: torch.Tensor, targets: np.ndarray | None, start: int,
            backward: bool, explained: Any = None) -> _Recorded:
    """The forward pass (hooks record it) and, with ``backward``, the gradients of the target logit
    (or of ``explained``, a callable target, per image)."""
    from .targets import FinalTokens, Target, outputs_of, score

    b = x.shape[0]
    out = _Recorded(logits=torch.empty(0), target=torch.empty(0))
    with torch.inference_mode(False), torch.enable_grad() if backward else torch.no_grad(), \
            FinalTokens(adapter) as final:
        if backward:
            x = x.clone().requires_grad_(True)  # a graph exists even for frozen models
        logits = adapter.logits(x) if hasattr(adapter, "logits") else adapter.model(x)
        if logits.ndim != 2 or logits.shape[0] != b:
            raise ImageError(f"the model returned logits of shape {tuple(logits.shape)}; expected ({b}, classes).")
        if explained is not None:
            tgt = torch.full((b,), -1, dtype=torch.int64, device=logits.device)
        elif targets is None:
            tgt = logits.detach().argmax(-1)
        else:
            tgt = torch.as_tensor(targets[start : start + b], device=logits.device)
        if backward:
            given = None if explained is None else outputs_of(adapter, logits, final.output)
            values = logits.gather(1, tgt[:, None]).squeeze(1) if given is None else score(explained, given, tgt)
            extra = [] if given is None else [given.logits, given.tokens]
            y = values.sum()  # sum over images: each keeps its own gradient
            outs = list(torch.autograd.grad(y, rec.grad_targets() + [rec.batch.features] + extra, allow_unused=True))
            del y
            if given is not None:  # the LRP pass starts from what the callable makes of the output
                g_tokens, g_logits = outs.pop(), outs.pop()
                if isinstance(explained, Target):
                    out.seed_tokens = given.tokens.detach() * (0 if g_tokens is None else g_tokens)
                else:
                    out.seed = torch.zeros_like(logits) if g_logits is None else g_logits.detach()
                out.scores = values.detach()
            del given, values
            rec.finish_attention(outs[:-1])
            out.features_grad = outs[-1]
            del outs
        else:
            rec.finish_attention()
    out.logits, out.target = logits.detach(), tgt
    return out


def _store_interventions(adapter: Adapter, rec: Recorder, x: torch.Tensor, tgt: torch.Tensor, logits: torch.Tensor,
                         plan: CapturePlan, sink: _Sink, hooks: Any, progress: bool) -> None:
    """The heads' outputs (``head_output``) and, one forward per head, each head's ablation effect."""
    b = x.shape[0]
    if "head_output" in plan.recorded:
        from .interventions import head_output_array

        for stage in adapter.stages:
            sink.put(f"{stage.name}/head_output",
                     [head_output_array(hooks.head_outputs.pop(l), b, stage.num_heads) for l in stage.layers])
    if "ablations" in plan.passes:
        from .interventions import ablation_effects

        rec.paused = True
        try:
            effects = ablation_effects(adapter, x.detach(), tgt, logits, hooks, rows=plan.batch_size,
                                       progress=progress)
        finally:
            rec.paused = False
        for stage in adapter.stages:
            for i, var in enumerate(("ablation_effect", "ablation_probability_drop")):
                sink.put(f"{stage.name}/{var}", [effects[l][i] for l in stage.layers], torch.float32)


def _block_writer(adapter: Adapter, sink: _Sink, batch: int) -> Callable[[str, int, torch.Tensor], None]:
    """``put(var, layer, t)``: block ``layer``'s (B[·nW], heads, Q, K) array ``t`` written to the batch's
    rows of ``<stage>/<var>``, at the block's place in its stage."""
    where = {l: (stage, stage.layers.index(l)) for stage in adapter.stages for l in stage.layers}

    def put(var: str, layer: int, t: torch.Tensor) -> None:
        stage, i = where[layer]
        sink.put_layer(f"{stage.name}/{var}", i, len(stage.layers), _attention_array(stage, t, batch))

    return put


def _store_blocks(adapter: Adapter, rec: Recorder, tgt: torch.Tensor, plan: CapturePlan, sink: _Sink,
                  seed: torch.Tensor | None = None, seed_tokens: torch.Tensor | None = None) -> None:
    """Each block's attention, its gradient and (LRP pass) relevance, stored as soon as it is ready."""
    b = tgt.shape[0]
    put = _block_writer(adapter, sink, b)

    def store_layer(layer: int, r_probs: torch.Tensor | None) -> None:
        """Store block ``layer``'s attention, its gradient and relevance, then let them go."""
        if "attention" in plan.recorded and layer not in rec.batch.stored_attention:
            put("attention", layer, rec.probs(layer))
        if "attention_grad" in plan.recorded:
            put("attention_grad", layer, rec.probs_grad(layer))
        if r_probs is not None:
            put("attention_relevance", layer, r_probs)
        rec.release(layer)

    if "lrp" in plan.passes:  # each block is stored as soon as the LRP walk has passed it
        from ..models.lrp_rules import conditioning
        from .precision import lrp_precision
        from .relevance import attention_relevance

        with lrp_precision(adapter, rec, plan.lrp_dtype), conditioning() as seen:
            attention_relevance(adapter, rec, tgt, release=True, on_layer=store_layer, seed=seed,
                                seed_tokens=seed_tokens)
        # per image, the worst cancellation a residual rescaling divided by (1: none)
        worst = torch.stack(seen).amin(0) if seen else torch.ones(b, dtype=torch.float64)
        sink.put("lrp_condition", worst, torch.float64)
    else:
        for layer in range(len(adapter.blocks)):
            store_layer(layer, None)


def _store_tokens(adapter: Adapter, rec: Recorder, plan: CapturePlan, sink: _Sink,
                  feat_grad: torch.Tensor | None) -> None:
    """The per-token records of every stage (merge shares, LayerNorm statistics, norms), the
    read-out weights and the Grad-CAM features."""
    state = rec.batch
    for stage in adapter.stages:
        key = stage.name
        if stage.index in state.merge_shares:
            sink.put(f"{key}/merge_share", state.merge_shares[stage.index])
        recs = [state.records[l] for l in stage.layers]
        if "ln" in plan.recorded:
            for stat in ("mean", "std"):
                sink.put(f"{key}/ln_{stat}", [torch.stack([r[f"ln1_{stat}"], r[f"ln2_{stat}"]], 1) for r in recs])
        if "norms" in plan.recorded:
            for var in _TOKEN_VARS:
                sink.put(f"{key}/{var}", [r[var] for r in recs])
    last = adapter.stages[-1].name
    if adapter.readout == "map":  # the read-out row: each token's weight in the attention pool
        assert adapter.head is not None and state.final_output is not None
        with torch.no_grad():
            weights = adapter.head.pool_weights(adapter.tokens(state.final_output))
        sink.put(f"{last}/readout_weights", weights)
    if "features" in plan.recorded:
        sink.put(f"{last}/features", adapter.tokens(state.features))
        if feat_grad is not None:
            sink.put(f"{last}/features_grad", adapter.tokens(feat_grad))


def _extra_passes(adapter: Adapter, rec: Recorder, x: torch.Tensor, plan: CapturePlan, sink: _Sink,
                  explained: Any) -> None:
    """The passes of the :data:`EXTRA_GROUPS` the plan records, each a forward and backward of its own
    (the capture's hooks paused; the model's state is the capture's). ``explained(outputs) -> (B,)``."""
    wanted = [g for g in EXTRA_GROUPS if g in plan.passes]
    if not wanted:
        return
    rec.paused = True
    try:
        with torch.inference_mode(False):
            for group in ("attnlrp", "attnlrp_cp"):
                if group in wanted:
                    from .attnlrp import token_relevance

                    per_layer, _ = token_relevance(adapter, x, explained, "cp" if group == "attnlrp_cp" else "attnlrp")
                    for stage in adapter.stages:
                        sink.put(f"{stage.name}/{group}_relevance", [per_layer[l] for l in stage.layers])
            if "legrad" in wanted:
                from .legrad import legrad_gradients

                last = adapter.stages[-1]
                for name, per_layer in legrad_gradients(adapter, x, explained).items():
                    sink.put(f"{last.name}/legrad_{name}", [per_layer[l] for l in last.layers])
    finally:
        rec.paused = False


_DIMS = {
    "attention": ("sample", "layer", "head", "query", "key"),
    "ln_mean": ("sample", "layer", "norm", "token"),
    "ln_std": ("sample", "layer", "norm", "token"),
    "features": ("sample", "token", "feature"),
    "features_grad": ("sample", "token", "feature"),
}


def _dims(var: str, windowed: bool) -> tuple[str, ...]:
    if var in ("ablation_effect", "ablation_probability_drop"):
        return ("sample", "layer", "head")
    if var == "head_output":
        return ("sample", "layer", "head", *(("window",) if windowed else ()), "query", "head_dim")
    if var.startswith("attention"):
        d = _DIMS["attention"]
        return d[:3] + ("window",) + d[3:] if windowed else d
    if var in ("merge_share", "readout_weights"):
        return ("sample", "token")
    if var.startswith("legrad_"):
        return ("sample", "layer", "head", "token")
    return _DIMS.get(var, ("sample", "layer", "token"))


def _assemble(
    adapter: Adapter,
    model: nn.Module,
    batch: Any,
    arrays: Mapping[str, np.ndarray],
    names: list[str],
    plan: CapturePlan,
    explained: Any = None,
    layouts: Mapping[str, xr.DataArray] | None = None,
    image: bool | None = None,
) -> xr.DataTree:
    """The capture tree of ``arrays`` (keys ``logits``, ``<stage>/<var>``, ``maps/<name>``…) and the
    pictures of ``batch`` (stored when ``image``, by default the plan's choice)."""
    from .targets import describe

    np_dtype = _DTYPES[plan.dtype]
    n = batch.display.shape[0]
    h, w = adapter.input_size
    options = plan.options
    pictures = {"image": (("sample", "y", "x", "channel"), batch.display.astype(np_dtype))}
    root = xr.Dataset(
        {
            **(pictures if (plan.image if image is None else image) else {}),
            "logits": (("sample", "class"), arrays["logits"]),
            "target": ("sample", arrays["target"]),
        },
        coords={
            "sample": np.arange(n),
            "y": np.arange(h),
            "x": np.arange(w),
            "channel": ["r", "g", "b"],
            "class": np.arange(len(names)),
            "class_name": ("class", np.array(names, dtype=str)),
        },
        attrs={
            "model": _model_name(model),
            **adapter.describe(),
            "num_prefix_tokens": adapter.stages[0].num_prefix,
            "class_names": list(names),
            "mean": list(batch.mean),
            "std": list(batch.std),
            "vitlens_version": __version__,
            "options": json_text(options),
            # vl.load_model marks random weights; figures of such a capture say "untrained"
            **({"weights": "random"} if getattr(model, "vitlens_weights", None) == "random" else {}),
            **({} if explained is None else {"target": describe(explained)}),
        },
    )
    if "lrp_condition" in arrays:
        root["lrp_condition"] = ("sample", arrays["lrp_condition"])
        root["lrp_condition"].attrs["description"] = (
            f"LRP pass ({plan.lrp_dtype}): the smallest |Σ r|/Σ|r| of a residual branch it divided by; "
            "float32 Transformer Attribution maps are unreliable where it is small")
    if explained is not None:
        root["target_score"] = ("sample", arrays["target_score"])
        root["target_score"].attrs["description"] = f"the explained scalar, {describe(explained)}, per image"
    if "image" in root:
        root["image"].attrs["description"] = "model input shown as an RGB picture in [0, 1] (after resize/crop)"
    root["logits"].attrs["description"] = "pre-softmax class scores"
    root["target"].attrs["description"] = ("class explained for each image (gradients and LRP are of this logit); "
                                           "-1: a callable target, named in the attrs")

    tree: dict[str, xr.Dataset] = {"/": root}
    for stage in adapter.stages:
        windowed = stage.window is not None
        data_vars = {}
        for key, arr in arrays.items():
            prefix, _, var = key.partition("/")
            if prefix == stage.name:
                data_vars[var] = (_dims(var, windowed), arr)
        coords: dict[str, Any] = {
            "layer": np.asarray(stage.layers, dtype=np.int64),
            "head": np.arange(stage.num_heads),
            "token": np.arange(stage.num_tokens),
            "norm": ["norm1", "norm2"],
            **stage.token_coords(),
        }
        attrs: dict[str, Any] = {
            "stage": stage.index,
            "grid": list(stage.grid),
            "stride": list(stage.stride),
            "num_heads": stage.num_heads,
            "num_prefix_tokens": stage.num_prefix,
            "embed_dim": stage.embed_dim,
        }
        if windowed:
            assert stage.window is not None
            size = stage.window[0] * stage.window[1]
            coords["query"] = np.arange(size)
            coords["key"] = np.arange(size)
            wt = np.stack([window_tokens(stage.grid, stage.window, s, stage.pad_first) for s in stage.shifts])
            coords["window"] = np.arange(wt.shape[1])
            data_vars["window_token"] = (("layer", "window", "query"), wt.astype(np.int64))
            attrs["window_size"] = list(stage.window)
            attrs["shift_size"] = [list(s) for s in stage.shifts]
        else:
            coords["query"] = np.arange(stage.num_tokens)
            coords["key"] = np.arange(stage.num_tokens)
        ds = xr.Dataset(data_vars, coords=coords, attrs=attrs)
        _describe_stage(ds)
        tree[stage.name] = ds
    for node in (reduced.MAPS, reduced.STATS):
        stored = {key.partition("/")[2]: (layouts[key], arrays[key]) for key in layouts or {}
                  if key.startswith(node + "/")}
        if stored:
            tree[node] = _answers_node(stored)
    return xr.DataTree.from_dict(tree)


def _answers_node(stored: Mapping[str, tuple[xr.DataArray, np.ndarray]]) -> xr.Dataset:
    """The ``/maps`` or ``/stats`` node: each answer's values for every image, with the labels
    (coordinates without ``sample``) and attrs of one batch's answer."""
    data_vars, offsets = {}, {}
    for name, (layout, values) in stored.items():
        dims = ("sample", *(d for d in layout.dims if d != "sample"))
        if name.endswith(reduced.OFFSET) and name[: -len(reduced.OFFSET)] in stored:  # a map's minimum
            offsets[name] = (dims, values)
            continue
        coords = {c: v.variable for c, v in layout.coords.items() if "sample" not in v.dims}
        data_vars[name] = xr.DataArray(values, dims=dims, coords=coords, attrs=dict(layout.attrs))
    try:
        return xr.Dataset(data_vars, coords=offsets)
    except ValueError as exc:  # e.g. two per-layer maps of different layers
        raise OptionError(f"the requested maps/statistics do not share their labels ({exc}); capture those "
                          "that differ separately.") from None


_DESCRIPTIONS = {
    "attention": "post-softmax attention probabilities (rows: queries, sum to 1)",
    "attention_grad": "gradient of the target logit w.r.t. the attention probabilities",
    "attention_relevance": "LRP relevance (Chefer et al. 2021 rules) arriving at the attention probabilities",
    "ln_mean": "per-token mean over channels of the input of the block's LayerNorms",
    "ln_std": "per-token standard deviation (biased, no eps) of the input of the block's LayerNorms",
    "token_norm": "L2 norm of each token entering the block",
    "attn_value_norm": "L2 norm of the token's value path W_O·v (no bias, no attention mixing)",
    "attn_value_cos": "cosine between the token's value path and the token entering the block",
    "attn_out_norm": "L2 norm of the attention branch output added to the residual stream",
    "mlp_in_norm": "L2 norm of the token entering the MLP branch (before norm2)",
    "mlp_out_norm": "L2 norm of the MLP branch output",
    "mlp_cos": "cosine between the MLP output and the token entering the MLP branch",
    "block_out_norm": "L2 norm of each token leaving the block",
    "features": "normalised token features for Grad-CAM (CLS read-out: last block's attention input; otherwise the final norm's output)",
    "features_grad": "gradient of the target logit w.r.t. the features",
    "window_token": "stage token index of each window position (after the cyclic shift)",
    "readout_weights": "weight of each token in the attention-pool read-out (mean over heads): the read-out row",
    "head_output": "each head's output as it reaches the attention's output projection (after any intervention)",
    "ablation_effect": "drop of the target logit when this head alone is ablated (clean minus ablated)",
    "ablation_probability_drop": "drop of the target's softmax probability when this head alone is ablated",
    "ablation_mean": "the mean each ablated head's output was replaced with (mean ablation), per token position",
    "merge_share": "LRP share of each token in the relevance of the merged token it forms in the next stage",
    "attnlrp_relevance": "AttnLRP relevance (x·∂y/∂x over channels) of each token entering the block",
    "attnlrp_cp_relevance": "CP-LRP relevance (attention held constant) of each token entering the block",
    "legrad_mean": "LeGrad: mean over queries of (∂s_l/∂A_l)⁺, s_l = head(norm(mean of block l's tokens))",
    "legrad_readout": "LeGrad: mean over queries of (∂s_l/∂A_l)⁺, s_l = the model's read-out of block l's tokens",
}


def _describe_stage(ds: xr.Dataset) -> None:
    for name, text in _DESCRIPTIONS.items():
        if name in ds:
            ds[name].attrs["description"] = text
