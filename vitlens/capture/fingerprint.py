"""A run's fingerprint: what a resumed streaming capture must share with the run it continues.

Weights (a digest of every parameter and buffer), the capture options that
change what is stored, the targets, the text prompts of an image–text model
(their token ids: the classes), and the input source and its order. A
resume that differs in any of them would mix two runs into one store, so it is
refused with a message that names what differs.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import xarray as xr
from torch import nn

_SAMPLED = 16  # images hashed from an in-memory source: evenly spaced, first and last included


def weights_digest(model: nn.Module) -> str:
    """blake2b of every parameter and buffer (names, dtypes, shapes and bytes)."""
    h = hashlib.blake2b(digest_size=16)
    for name, t in sorted(model.state_dict(keep_vars=False).items()):
        if not isinstance(t, torch.Tensor):
            continue
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        if t.device.type != "meta" and t.numel():
            data = t.detach().to("cpu").contiguous()
            h.update(data.view(torch.uint8).numpy().tobytes() if data.dim() else data.reshape(1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _item_digest(item: Any, h: Any) -> None:
    if isinstance(item, (str, os.PathLike)):
        p = Path(item)
        size = p.stat().st_size if p.is_file() else -1
        h.update(f"path:{os.fspath(item)}:{size};".encode())
        return
    if isinstance(item, torch.Tensor):
        item = item.detach().cpu().numpy()
    if isinstance(item, xr.DataArray):
        item = item.values
    if isinstance(item, np.ndarray):
        h.update(f"array:{item.dtype}:{item.shape};".encode())
        h.update(np.ascontiguousarray(item).tobytes())
        return
    try:
        from PIL import Image

        if isinstance(item, Image.Image):
            h.update(f"pil:{item.mode}:{item.size};".encode())
            h.update(item.tobytes())
            return
    except ImportError:  # pragma: no cover
        pass
    h.update(f"object:{type(item).__name__};".encode())


def source_fingerprint(images: Any) -> dict[str, Any]:
    """What the input is, how many images, and a digest of their order and content."""
    from .stream import _length, image_source

    images = image_source(images)
    n = _length(images)
    if n is None:
        info: dict[str, Any] = {"kind": type(images).__name__}
        if isinstance(images, torch.utils.data.DataLoader):
            info["count"] = len(images.dataset) if hasattr(images.dataset, "__len__") else None
            info["shuffle"] = not isinstance(images.sampler, torch.utils.data.SequentialSampler)
        return info
    h = hashlib.blake2b(digest_size=16)
    data = images["image"] if isinstance(images, xr.Dataset) else images
    if isinstance(data, (list, tuple)) and all(isinstance(p, (str, os.PathLike)) for p in data):
        picks = range(n)  # paths are cheap: every name, in order
    else:
        picks = sorted(set(np.linspace(0, n - 1, min(n, _SAMPLED)).round().astype(int).tolist())) if n else []
    if isinstance(data, xr.DataArray) and "sample" not in data.dims:
        data = data.expand_dims("sample")
    if isinstance(data, (np.ndarray, torch.Tensor)) and data.ndim == 3:
        data = data[None]
    for i in picks:
        _item_digest(data.isel(sample=i) if isinstance(data, xr.DataArray) else data[i], h)
    return {"kind": type(data).__name__, "count": n, "digest": h.hexdigest()}


def text_fingerprint(adapter: Any) -> dict[str, Any] | None:
    """The prompts an image–text adapter is bound to: their count and a digest of their token ids.

    ``None`` for a model with class logits. Prompts given as strings and as the
    same token ids are the same classes, so the ids (what the model sees) are hashed.
    """
    ids = getattr(adapter, "input_ids", None)
    if ids is None:
        return None
    ids = ids.detach().cpu().to(torch.int64).contiguous()
    h = hashlib.blake2b(f"{tuple(ids.shape)};".encode(), digest_size=16)
    h.update(ids.numpy().tobytes())
    return {"prompts": int(ids.shape[0]), "digest": h.hexdigest()}


def target_fingerprint(target: Any) -> str | None:
    """The targets as a run's fingerprint holds them: a class, a callable's name, or a digest of a list."""
    if callable(target):  # a callable target (vl.targets): its name
        from .targets import describe

        return f"callable {describe(target)}"
    if target is None or isinstance(target, (int, np.integer, str)):
        return None if target is None else str(target)
    return hashlib.blake2b(",".join(map(str, list(target))).encode(), digest_size=16).hexdigest()


def run_fingerprint(model: nn.Module, images: Any, target: Any, options: dict[str, Any],
                    text: dict[str, Any] | None = None) -> dict[str, Any]:
    """The fingerprint recorded in a streaming store and checked on ``resume=True``.

    ``text`` is :func:`text_fingerprint` of the adapter bound to the prompts.
    """
    return {
        "model": type(model).__name__,
        "weights": weights_digest(model),
        "options": dict(options),
        "target": target_fingerprint(target),
        "text": text,
        "source": source_fingerprint(images),
    }


_WHAT = {
    "model": "the model class",
    "weights": "the model weights",
    "options": "the capture options",
    "target": "the targets",
    "text": "the text prompts (the classes of an image-text model)",
    "source": "the input images (source, count or order)",
}


def differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Human-readable list of what differs between two fingerprints."""
    out = []
    for key in _WHAT:
        a, b = old.get(key), new.get(key)
        if key == "source":
            # An iterable (generator, DataLoader) cannot be hashed without consuming it: its order
            # is the user's to keep. Only sources that are both verifiable are compared, by content.
            if not (isinstance(a, dict) and isinstance(b, dict) and "digest" in a and "digest" in b):
                continue
            a = {k: a.get(k) for k in ("count", "digest")}
            b = {k: b.get(k) for k in ("count", "digest")}
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            parts = [f"{k}: {a.get(k)!r} then, {b.get(k)!r} now" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
            out.append(f"{_WHAT[key]} ({'; '.join(parts)})")
        else:
            out.append(f"{_WHAT[key]} ({a!r} then, {b!r} now)")
    return out
