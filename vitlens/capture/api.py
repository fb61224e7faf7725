"""``vl.capture``: run the model once, keep everything labeled."""

from __future__ import annotations

import functools
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import xarray as xr
from torch import nn

from .._version import __version__
from ..errors import ImageError, OptionError, TargetError
from ..models import adapter_for
from ..models.adapter import Adapter, StageInfo
from ..registry import CAPTURE_GROUPS
from .attrs import json_text
from .hooks import Recorder
from .images import prepare
from .validate import check_finite, check_model
from .text import bind_inputs
from ..models.windows import window_tokens

#: What ``capture(keep=...)`` can store (the raw groups: the registry's list, which the methods'
#: ``needs`` name). ``"all"`` (default) stores everything.
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
}

_TOKEN_VARS = (
    "token_norm",
    "attn_value_norm",
    "attn_value_cos",
    "attn_out_norm",
    "mlp_in_norm",
    "mlp_out_norm",
    "mlp_cos",
    "block_out_norm",
)

_DTYPES = {"float32": np.float32, "float16": np.float16}


def _resolve_keep(keep: str | Iterable[str], grads: bool) -> set[str]:
    if isinstance(keep, str):
        keep = KEEP_GROUPS if keep == "all" else (keep,)
    chosen = set(keep)
    unknown = chosen - set(KEEP_GROUPS)
    if unknown:
        raise OptionError(f"keep= got {sorted(unknown)}; choose from {list(KEEP_GROUPS)} or 'all'.")
    if not chosen:
        raise OptionError(f"keep= is empty; choose from {list(KEEP_GROUPS)} or 'all'.")
    if not grads:
        chosen -= {"attention_grad", "attention_relevance"}
    return chosen


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
        The groups (:data:`KEEP_GROUPS`) stored.
    grads
        Whether gradients (and LRP relevances) may be recorded at all (``grads=``).
    dtype
        The stored floating-point dtype.
    batch_size
        Images per forward pass.
    """

    kept: frozenset[str]
    grads: bool
    dtype: str
    batch_size: int

    @property
    def recorded(self) -> frozenset[str]:
        """The groups each batch records."""
        return self.kept

    @property
    def passes(self) -> frozenset[str]:
        """The passes each batch runs after its forward pass: those of the groups it records
        (:data:`GROUP_PASSES`); no backward pass under ``grads=False``."""
        passes = {p for group in self.recorded for p in GROUP_PASSES[group]}
        return frozenset(passes if self.grads else passes - {"backward"})

    @property
    def options(self) -> dict[str, Any]:
        """The options recorded in the capture's attrs and in a streaming run's fingerprint."""
        return {"grads": self.grads, "keep": sorted(self.kept), "dtype": self.dtype}


def _plan(keep: str | Iterable[str], grads: bool, dtype: str, batch_size: int | None) -> CapturePlan:
    if dtype not in _DTYPES:
        raise OptionError(f"dtype={dtype!r}; choose 'float32' or 'float16'.")
    if batch_size is None:
        batch_size = 32
    if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise OptionError(f"batch_size must be a positive int; got {batch_size!r}.")
    return CapturePlan(kept=frozenset(_resolve_keep(keep, grads)), grads=bool(grads), dtype=dtype,
                       batch_size=int(batch_size))


def capture(
    model: nn.Module,
    images: Any,
    target: int | str | Sequence[int | str] | None = None,
    *,
    grads: bool = True,
    keep: str | Iterable[str] = "all",
    dtype: str = "float32",
    batch_size: int | None = None,
    device: str | torch.device | None = None,
    progress: bool | None = None,
    store: str | os.PathLike | None = None,
    resume: bool = False,
    text: Sequence[str] | torch.Tensor | None = None,
    processor: Any = None,
) -> xr.DataTree:
    """Run ``model`` once on ``images`` and record its internals into a labeled DataTree.

    One forward and one backward pass (of the target logit, per image) record
    everything the seven explanation methods need; methods, metrics and widgets
    then work on the returned tree without running the model again.

    Parameters
    ----------
    model
        A model of a supported family: timm ViT/DeiT/EVA/BEiT/Swin v1-v2 or transformers
        ViT/DeiT/DINOv2/BEiT/Swin/CLIP/SigLIP (see :func:`vitlens.load_model`).
    images
        A path or list of paths, PIL image(s), arrays ``(H, W, 3)`` or
        ``(sample, H, W, 3)`` in [0, 1] or uint8 (xarray too), or a ready,
        normalised tensor ``(B, 3, H, W)`` (e.g. a processor's ``pixel_values``).
        Arrays at the model's input size are only normalised; others go through
        timm's eval transform for the model (a transformers model's image processor).
    target
        Class to explain: ``None`` (each image's predicted class), one int or
        class name for all images, or one per image.
    grads
        Run the backward pass (needed by gradient-based methods and LRP).
    keep
        ``"all"`` or a subset of :data:`KEEP_GROUPS` to bound storage.
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

    Returns
    -------
    xarray.DataTree
        Root: ``image``, ``logits``, ``target``; one child per stage
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
    """
    adapter = bind_inputs(adapter_for(model), text, processor)
    plan = _plan(keep, grads, dtype, batch_size)
    device = check_model(model, device, grads)
    if store is not None:
        from .fingerprint import run_fingerprint
        from .stream import capture_to_store

        fingerprint = run_fingerprint(model, images, target, plan.options)
        part = functools.partial(_capture_part, adapter, model, plan, device)
        return capture_to_store(part, images, store, target=target, batch_size=plan.batch_size,
                                resume=resume, progress=progress, fingerprint=fingerprint)
    if resume:
        raise OptionError("resume=True continues a streaming capture: pass store='run.zarr' too.")
    tree = _capture_images(adapter, model, images, target, plan, device, progress)
    samples = _input_samples(images, tree["sample"].size)
    if samples is not None:  # keep the caller's labels (e.g. a subset of a dataset)
        tree.dataset = tree.to_dataset(inherit=False).assign_coords(sample=samples)
    return tree


def _capture_part(adapter: Adapter, model: nn.Module, plan: CapturePlan, device: torch.device,
                  images: Any, target: Any, offset: int) -> xr.DataTree:
    """One part of a streaming capture, its samples numbered from ``offset`` (what the store appends)."""
    tree = _capture_images(adapter, model, images, target, plan, device, progress=False)
    tree.dataset = tree.to_dataset(inherit=False).assign_coords(sample=np.arange(offset, offset + tree["sample"].size))
    return tree


def _capture_images(adapter: Adapter, model: nn.Module, images: Any, target: Any, plan: CapturePlan,
                    device: torch.device, progress: bool | None) -> xr.DataTree:
    """Prepare ``images``, capture them batch by batch into one set of buffers, assemble the tree."""
    batch = prepare(images, adapter)
    adapter = adapter.for_input(tuple(batch.pixels.shape[-2:]))  # dynamic_img_size: grid follows the input
    n = batch.pixels.shape[0]
    names = adapter.class_names() if hasattr(adapter, "class_names") else class_names(model, adapter.num_classes)
    targets = _resolve_target(target, n, names)
    param = next(model.parameters(), None)
    model_dtype = param.dtype if param is not None and param.dtype.is_floating_point else torch.float32

    buffers = _Buffers(n, getattr(torch, plan.dtype))
    starts = range(0, n, plan.batch_size)
    if progress is None:
        progress = len(starts) > 1
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="capture", unit="batch")
    with Recorder(adapter, keep_block_inputs="lrp" in plan.passes, param_grads=False) as rec:
        for start in starts:
            rec.reset()
            x = batch.pixels[start : start + plan.batch_size].to(device, model_dtype)
            _capture_batch(adapter, rec, x, targets, start, plan, buffers)
    check_finite(buffers.items())
    return _assemble(adapter, model, batch, buffers, names, plan)


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
                   plan: CapturePlan, buffers: _Buffers) -> None:
    """One batch: record the forward pass, run the plan's passes, store what the plan keeps."""
    logits, tgt, feat_grad = _record(adapter, rec, x, targets, start, "backward" in plan.passes)
    buffers.put("logits", start, logits, torch.float32)
    buffers.put("target", start, tgt.to(torch.int64))
    _store_blocks(adapter, rec, tgt, start, plan, buffers)
    _store_tokens(adapter, rec, start, plan, buffers, feat_grad)


def _record(adapter: Adapter, rec: Recorder, x: torch.Tensor, targets: np.ndarray | None, start: int,
            backward: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The forward pass (hooks record it) and, with ``backward``, the gradients of the target logit.

    Returns the logits, the explained class of each image and the gradient of the features.
    """
    b = x.shape[0]
    feat_grad = None
    with torch.inference_mode(False), torch.enable_grad() if backward else torch.no_grad():
        if backward:
            x = x.clone().requires_grad_(True)  # a graph exists even for frozen models
        logits = adapter.logits(x) if hasattr(adapter, "logits") else adapter.model(x)
        if logits.ndim != 2 or logits.shape[0] != b:
            raise ImageError(f"the model returned logits of shape {tuple(logits.shape)}; expected ({b}, classes).")
        if targets is None:
            tgt = logits.detach().argmax(-1)
        else:
            tgt = torch.as_tensor(targets[start : start + b], device=logits.device)
        if backward:
            y = logits.gather(1, tgt[:, None]).sum()  # sum over images: each keeps its own gradient
            outs = torch.autograd.grad(y, rec.grad_targets() + [rec.batch.features], allow_unused=True)
            del y
            rec.finish_attention(list(outs[:-1]))
            feat_grad = outs[-1]
            del outs
        else:
            rec.finish_attention()
    return logits.detach(), tgt, feat_grad


def _store_blocks(adapter: Adapter, rec: Recorder, tgt: torch.Tensor, start: int, plan: CapturePlan,
                  buffers: _Buffers) -> None:
    """Each block's attention, its gradient and (LRP pass) relevance, stored as soon as it is ready."""
    b = tgt.shape[0]
    where = {l: (stage, stage.layers.index(l)) for stage in adapter.stages for l in stage.layers}

    def store_layer(layer: int, r_probs: torch.Tensor | None) -> None:
        """Store block ``layer``'s attention, its gradient and relevance, then let them go."""
        stage, i = where[layer]
        size = len(stage.layers)
        if "attention" in plan.recorded:
            buffers.put_layer(f"{stage.name}/attention", start, i, size, _attention_array(stage, rec.probs(layer), b))
        if "attention_grad" in plan.recorded:
            buffers.put_layer(f"{stage.name}/attention_grad", start, i, size,
                              _attention_array(stage, rec.probs_grad(layer), b))
        if r_probs is not None:
            buffers.put_layer(f"{stage.name}/attention_relevance", start, i, size, _attention_array(stage, r_probs, b))
        rec.release(layer)

    if "lrp" in plan.passes:  # each block is stored as soon as the LRP walk has passed it
        from .relevance import attention_relevance

        attention_relevance(adapter, rec, tgt, release=True, on_layer=store_layer)
    else:
        for layer in range(len(adapter.blocks)):
            store_layer(layer, None)


def _store_tokens(adapter: Adapter, rec: Recorder, start: int, plan: CapturePlan, buffers: _Buffers,
                  feat_grad: torch.Tensor | None) -> None:
    """The per-token records of every stage (merge shares, LayerNorm statistics, norms), the
    read-out weights and the Grad-CAM features."""
    state = rec.batch
    for stage in adapter.stages:
        key = stage.name
        if stage.index in state.merge_shares:
            buffers.put(f"{key}/merge_share", start, state.merge_shares[stage.index])
        recs = [state.records[l] for l in stage.layers]
        if "ln" in plan.recorded:
            for stat in ("mean", "std"):
                buffers.put(f"{key}/ln_{stat}", start, [torch.stack([r[f"ln1_{stat}"], r[f"ln2_{stat}"]], 1) for r in recs])
        if "norms" in plan.recorded:
            for var in _TOKEN_VARS:
                buffers.put(f"{key}/{var}", start, [r[var] for r in recs])
    last = adapter.stages[-1].name
    if adapter.readout == "map":  # the read-out row: each token's weight in the attention pool
        assert adapter.head is not None and state.final_output is not None
        with torch.no_grad():
            weights = adapter.head.pool_weights(adapter.tokens(state.final_output))
        buffers.put(f"{last}/readout_weights", start, weights)
    if "features" in plan.recorded:
        buffers.put(f"{last}/features", start, adapter.tokens(state.features))
        if feat_grad is not None:
            buffers.put(f"{last}/features_grad", start, adapter.tokens(feat_grad))


_DIMS = {
    "attention": ("sample", "layer", "head", "query", "key"),
    "ln_mean": ("sample", "layer", "norm", "token"),
    "ln_std": ("sample", "layer", "norm", "token"),
    "features": ("sample", "token", "feature"),
    "features_grad": ("sample", "token", "feature"),
}


def _dims(var: str, windowed: bool) -> tuple[str, ...]:
    if var.startswith("attention"):
        d = _DIMS["attention"]
        return d[:3] + ("window",) + d[3:] if windowed else d
    if var in ("merge_share", "readout_weights"):
        return ("sample", "token")
    return _DIMS.get(var, ("sample", "layer", "token"))


def _assemble(
    adapter: Adapter,
    model: nn.Module,
    batch: Any,
    stores: _Buffers,
    names: list[str],
    plan: CapturePlan,
) -> xr.DataTree:
    np_dtype = _DTYPES[plan.dtype]
    n = batch.display.shape[0]
    h, w = adapter.input_size
    options = plan.options
    root = xr.Dataset(
        {
            "image": (("sample", "y", "x", "channel"), batch.display.astype(np_dtype)),
            "logits": (("sample", "class"), stores["logits"]),
            "target": ("sample", stores["target"]),
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
        },
    )
    root["image"].attrs["description"] = "model input shown as an RGB picture in [0, 1] (after resize/crop)"
    root["logits"].attrs["description"] = "pre-softmax class scores"
    root["target"].attrs["description"] = "class explained for each image (gradients and LRP are of this logit)"

    tree: dict[str, xr.Dataset] = {"/": root}
    for stage in adapter.stages:
        windowed = stage.window is not None
        data_vars = {}
        for key, arr in stores.items():
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
    return xr.DataTree.from_dict(tree)


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
    "merge_share": "LRP share of each token in the relevance of the merged token it forms in the next stage",
}


def _describe_stage(ds: xr.Dataset) -> None:
    for name, text in _DESCRIPTIONS.items():
        if name in ds:
            ds[name].attrs["description"] = text
