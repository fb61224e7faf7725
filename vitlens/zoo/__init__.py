"""Small Vision Transformers trained on :func:`vitlens.datasets.shapes`, shipped offline.

Each model is a plain timm class (``VisionTransformer`` or ``SwinTransformer``)
stored as ``<name>.safetensors`` (state dict) beside ``<name>.json`` (constructor
kwargs, class names, normalisation, held-out scores and how it was trained).
:mod:`vitlens.zoo.train` rebuilds them.

Examples
--------
>>> from vitlens.zoo import available, load_shipped
>>> sorted(available())
['swin-shapes', 'vit-shapes']
>>> model = load_shipped("vit-shapes")
>>> model.vitlens_class_names[:2], model.pretrained_cfg["input_size"]
(['disk', 'ring'], (3, 64, 64))
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import math

import numpy as np
import torch
from timm.layers import PatchEmbed
from torch import nn

from vitlens.errors import ModelLoadError, OptionError

__all__ = [
    "ZOO_DIR",
    "TIMM_CLASSES",
    "ConvStemPatchEmbed",
    "available",
    "Catalog",
    "wilson_interval",
    "unseen_accuracy",
    "load_shipped",
    "build_from_config",
    "data_config",
]

#: Folder holding the shipped ``.safetensors`` / ``.json`` pairs.
ZOO_DIR = Path(__file__).resolve().parent

#: The only classes a zoo json may name (nothing else is imported from a json).
TIMM_CLASSES: dict[str, tuple[str, str]] = {
    "timm.models.vision_transformer.VisionTransformer": ("timm.models.vision_transformer", "VisionTransformer"),
    "timm.models.swin_transformer.SwinTransformer": ("timm.models.swin_transformer", "SwinTransformer"),
}


class ConvStemPatchEmbed(PatchEmbed):
    """timm ``PatchEmbed`` whose projection is a small convolutional stem.

    ``proj`` becomes ``log2(patch_size)`` stride-2 3x3 convolutions (BatchNorm +
    ReLU) followed by a 1x1 convolution to ``embed_dim``; everything else
    (``patch_size``, ``grid_size``, ``num_patches``, flattening, ``norm``) is timm's,
    so the token grid is the same as a plain patch embedding's.  Used by
    ``vit-shapes`` (early convolutions make a tiny ViT trainable on CPU in minutes).

    Examples
    --------
    >>> import torch
    >>> from vitlens.zoo import ConvStemPatchEmbed
    >>> pe = ConvStemPatchEmbed(img_size=64, patch_size=8, embed_dim=32)
    >>> pe(torch.zeros(2, 3, 64, 64)).shape, pe.grid_size
    (torch.Size([2, 64, 32]), (8, 8))
    """

    def __init__(self, *args: Any, stem_width: int = 24, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        ph, pw = self.patch_size
        depth = int(round(math.log2(ph)))
        if ph != pw or 2**depth != ph or depth < 1:
            raise ModelLoadError(
                f"ConvStemPatchEmbed needs a square power-of-two patch size, got {self.patch_size}; "
                f"use e.g. patch_size=8."
            )
        in_chans = self.proj.in_channels
        embed_dim = self.proj.out_channels
        bias = self.proj.bias is not None
        layers: list[nn.Module] = []
        width, chans = stem_width, in_chans
        for _ in range(depth):
            layers += [
                nn.Conv2d(chans, width, kernel_size=3, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
            ]
            chans, width = width, width * 2
        layers.append(nn.Conv2d(chans, embed_dim, kernel_size=1, bias=bias))
        self.proj = nn.Sequential(*layers)


#: Patch-embedding classes a zoo json may name in ``kwargs["embed_layer"]``.
EMBED_LAYERS: dict[str, type[nn.Module]] = {"vitlens.zoo.ConvStemPatchEmbed": ConvStemPatchEmbed}


def _read_json(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelLoadError(
            f"cannot read the zoo config {path}: {exc}. Reinstall vitlens or retrain the "
            f"model with `vitlens train-zoo --model {path.stem} --out {path.parent}`."
        ) from exc


def available(directory: str | Path | None = None) -> dict[str, dict[str, Any]]:
    """Shipped model names and their configs.

    Parameters
    ----------
    directory : str or Path, optional
        Folder to look in; defaults to the package folder :data:`ZOO_DIR`.

    Returns
    -------
    dict of str to dict
        ``{name: config}`` for every ``<name>.json`` with a ``<name>.safetensors``
        beside it.  ``config["scores"]`` holds the held-out accuracies.

    Examples
    --------
    >>> from vitlens.zoo import available
    >>> available()["vit-shapes"]["family"]
    'vit'
    """
    folder = Path(directory) if directory is not None else ZOO_DIR
    found: dict[str, dict[str, Any]] = {}
    for cfg_path in sorted(folder.glob("*.json")):
        if cfg_path.with_suffix(".safetensors").is_file():
            found[cfg_path.stem] = _read_json(cfg_path)
    return found


def wilson_interval(correct: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """Wilson score interval of a proportion ``correct / n`` (95 % for the default ``z``).

    Unlike the normal approximation it stays inside [0, 1] and is not empty at 0 or ``n``
    correct, which is where an accuracy near 100 % sits.

    Parameters
    ----------
    correct : int
        Successes (images classified correctly).
    n : int
        Trials (images), at least 1.
    z : float, default 1.96
        The normal quantile of the two-sided level (1.96: 95 %).

    Returns
    -------
    tuple of float
        ``(low, high)``.

    Examples
    --------
    >>> from vitlens.zoo import wilson_interval
    >>> low, high = wilson_interval(951, 1000)
    >>> round(low, 4), round(high, 4)
    (0.9358, 0.9627)
    """
    if not (isinstance(n, (int, np.integer)) and n >= 1 and 0 <= correct <= n):
        raise OptionError(f"wilson_interval({correct!r}, {n!r}): give 0 <= correct <= n and n >= 1 (counts of images).")
    p, z2 = correct / n, z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z / (1 + z2 / n) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def unseen_accuracy(config: dict[str, Any]) -> dict[str, Any] | None:
    """A zoo model's one-object accuracy on the unseen seeds its json records, with a 95 % Wilson interval.

    The json stores counts (``scores["one_object_unseen"]``: ``seeds``, ``images_per_seed``,
    ``correct`` per seed, made by :func:`vitlens.zoo.train.unseen_one_object`); the accuracy
    and interval are computed from them here, never stored as text.

    Parameters
    ----------
    config : dict
        A zoo json (see :func:`available`).

    Returns
    -------
    dict or None
        ``correct``, ``n``, ``accuracy``, ``low``, ``high`` (all seeds pooled) and ``seeds``;
        None for a json without the record.

    Examples
    --------
    >>> from vitlens.zoo import available, unseen_accuracy
    >>> acc = unseen_accuracy(available()["swin-shapes"])
    >>> acc["n"], acc["low"] < acc["accuracy"] < acc["high"]
    (2000, True)
    """
    record = config.get("scores", {}).get("one_object_unseen")
    if not record:
        return None
    correct, n = int(sum(record["correct"])), int(record["images_per_seed"]) * len(record["correct"])
    low, high = wilson_interval(correct, n)
    return {"correct": correct, "n": n, "accuracy": correct / n, "low": low, "high": high,
            "seeds": [int(s) for s in record["seeds"]]}


def _interval_text(config: dict[str, Any]) -> str:
    acc = unseen_accuracy(config)
    if acc is None:
        return "–"
    return f"{100 * acc['accuracy']:.1f} % [{100 * acc['low']:.1f}, {100 * acc['high']:.1f}]"


class Catalog(dict):
    """Shipped models ``{name: config}`` that show themselves as a table of names and scores.

    ``curves=False`` drops each config's training curve (``train["curve"]``, hundreds
    of rows); ``curves=True`` keeps it and the table is followed by each curve.
    """

    def __init__(self, configs: dict[str, dict[str, Any]], curves: bool = False) -> None:
        if not curves:
            configs = {name: {**cfg, "train": {k: v for k, v in cfg.get("train", {}).items() if k != "curve"}}
                       for name, cfg in configs.items()}
        super().__init__(configs)
        self.curves = curves

    def rows(self) -> list[list[str]]:
        """The table: a header row, then one row per model."""
        out = [["model", "family", "input", "classes", "one-object top-1", "two-object: both in top 2",
                "held-out images", "one-object, 2 unseen seeds [95 % CI]"]]
        for name, cfg in self.items():
            scores = cfg.get("scores", {})
            size = cfg.get("input_size", [0, 0, 0])
            pct = lambda v: f"{100 * v:.1f} %" if isinstance(v, (int, float)) else "–"  # noqa: E731
            out.append([name, str(cfg.get("family", "")), f"{size[-2]}×{size[-1]}", str(len(cfg.get("class_names", []))),
                        pct(scores.get("one_object_top1")), pct(scores.get("two_object_both_in_top2")),
                        f"{scores.get('n_per_set', '–')} + {scores.get('n_per_set', '–')}", _interval_text(cfg)])
        return out

    def __repr__(self) -> str:
        rows = self.rows()
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        numeric = {3, 4, 5, 7}
        text = "\n".join("  ".join(c.rjust(w) if i in numeric and k else c.ljust(w)
                                   for i, (c, w) in enumerate(zip(r, widths))).rstrip()
                          for k, r in enumerate(rows))
        if self.curves:
            from .train import curve_table

            text += "".join(f"\n\n{name}: training curve\n{curve_table(cfg, every=10)}" for name, cfg in self.items())
        return text

    __str__ = __repr__

    def _repr_html_(self) -> str:
        import html

        rows = self.rows()
        head = "".join(f"<th>{html.escape(c)}</th>" for c in rows[0])
        body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows[1:])
        return f"<table><tr>{head}</tr>{body}</table>" + (f"<pre>{html.escape(repr(self))}</pre>" if self.curves else "")


def data_config(config: dict[str, Any]) -> dict[str, Any]:
    """The timm ``pretrained_cfg`` a zoo model carries (what timm's transforms read).

    Parameters
    ----------
    config : dict
        A zoo json (see :func:`available`).

    Returns
    -------
    dict
        ``input_size``, ``mean``, ``std``, ``interpolation="bilinear"``,
        ``crop_pct=1.0``, ``num_classes`` and related keys.

    Examples
    --------
    >>> from vitlens.zoo import available, data_config
    >>> data_config(available()["swin-shapes"])["crop_pct"]
    1.0
    """
    family = config.get("family")
    names = list(config["class_names"])
    return {
        "architecture": config.get("name"),
        "input_size": tuple(int(v) for v in config["input_size"]),
        "fixed_input_size": True,
        "interpolation": "bilinear",
        "crop_pct": 1.0,
        "crop_mode": "center",
        "mean": tuple(float(v) for v in config["mean"]),
        "std": tuple(float(v) for v in config["std"]),
        "num_classes": len(names),
        "label_names": tuple(names),
        "first_conv": "patch_embed.proj.0" if "embed_layer" in config.get("kwargs", {}) else "patch_embed.proj",
        "classifier": "head.fc" if family == "swin" else "head",
        "license": "mit",
        "description": "vitlens shapes model (see vitlens/zoo/TRAINING.md)",
    }


def build_from_config(config: dict[str, Any]) -> torch.nn.Module:
    """Construct the (untrained) timm model a zoo json describes.

    Parameters
    ----------
    config : dict
        Must hold ``timm_class`` (one of :data:`TIMM_CLASSES`) and ``kwargs``.

    Returns
    -------
    torch.nn.Module
        A freshly initialised model, with ``pretrained_cfg``/``default_cfg`` and
        ``vitlens_class_names`` attached.

    Examples
    --------
    >>> from vitlens.zoo import available, build_from_config
    >>> type(build_from_config(available()["vit-shapes"])).__name__
    'VisionTransformer'
    """
    import importlib

    cls_name = config.get("timm_class")
    if cls_name not in TIMM_CLASSES:
        raise ModelLoadError(
            f"zoo config names timm_class={cls_name!r}; only {sorted(TIMM_CLASSES)} can be "
            f"built. Fix the json or retrain with `vitlens train-zoo`."
        )
    module_name, attr = TIMM_CLASSES[cls_name]
    cls = getattr(importlib.import_module(module_name), attr)
    kwargs = dict(config.get("kwargs", {}))
    for key in ("depths", "num_heads"):
        if isinstance(kwargs.get(key), list):
            kwargs[key] = tuple(kwargs[key])
    if "embed_layer" in kwargs:
        layer = kwargs["embed_layer"]
        if layer not in EMBED_LAYERS:
            raise ModelLoadError(
                f"zoo config names embed_layer={layer!r}; only {sorted(EMBED_LAYERS)} are known. "
                f"Fix the json or retrain with `vitlens train-zoo`."
            )
        kwargs["embed_layer"] = EMBED_LAYERS[layer]
    try:
        model = cls(**kwargs)
    except TypeError as exc:
        raise ModelLoadError(
            f"timm's {attr} rejected the stored kwargs ({exc}); the installed timm "
            f"version may be too old or new. Retrain with `vitlens train-zoo`."
        ) from exc
    cfg = data_config(config)
    model.pretrained_cfg = cfg
    model.default_cfg = cfg
    model.vitlens_class_names = list(config["class_names"])
    model.vitlens_name = config.get("name")
    return model


def load_shipped(name: str, *, directory: str | Path | None = None) -> torch.nn.Module:
    """Load a shipped, trained shapes model (offline), in eval mode.

    Parameters
    ----------
    name : str
        ``"vit-shapes"`` or ``"swin-shapes"`` (see :func:`available`).
    directory : str or Path, optional
        Folder with ``<name>.json`` / ``<name>.safetensors``; defaults to the
        package folder (use it for models retrained with ``--out``).

    Returns
    -------
    torch.nn.Module
        A plain timm ``VisionTransformer`` / ``SwinTransformer`` on CPU in eval mode,
        with ``pretrained_cfg`` / ``default_cfg`` (mean, std, input size,
        ``interpolation="bilinear"``, ``crop_pct=1.0``), ``vitlens_class_names`` and
        ``vitlens_name`` attached.

    Raises
    ------
    vitlens.errors.ModelLoadError
        If the name is unknown (the message lists the available names) or the files
        cannot be read.

    Examples
    --------
    >>> import torch
    >>> from vitlens.zoo import load_shipped
    >>> model = load_shipped("swin-shapes")
    >>> model(torch.zeros(1, 3, 64, 64)).shape
    torch.Size([1, 8])
    """
    from safetensors.torch import load_file

    folder = Path(directory) if directory is not None else ZOO_DIR
    models = available(folder)
    if not isinstance(name, str) or name not in models:
        listed = ", ".join(repr(k) for k in models) or "none"
        raise ModelLoadError(
            f"no shipped model named {name!r} in {folder}; available: {listed}. "
            f"For a timm model use its timm name (e.g. 'vit_base_patch16_224')."
        )
    config = dict(models[name])
    config.setdefault("name", name)
    model = build_from_config(config)
    weights_path = folder / f"{name}.safetensors"
    try:
        state = load_file(str(weights_path), device="cpu")
    except Exception as exc:  # safetensors raises its own error types
        raise ModelLoadError(
            f"cannot read weights {weights_path}: {exc}. Reinstall vitlens or retrain with "
            f"`vitlens train-zoo --model {name}`."
        ) from exc
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ModelLoadError(
            f"weights {weights_path} do not fit the architecture in {name}.json ({exc}). "
            f"Retrain with `vitlens train-zoo --model {name}` so both files match."
        ) from exc
    model.vitlens_name = name
    model.eval()
    return model
