"""Train the shipped shapes models reproducibly on CPU.

Training data come from :func:`vitlens.datasets.shapes`, generated on the fly in
large chunks, each chunk with its own seed from a range that never meets the
evaluation (:data:`EVAL_SEED`) or validation (:data:`VAL_SEED`) seeds.  Images
hold one or two objects; a two-object image has the soft target 0.5/0.5 over its
two classes (cross-entropy with soft targets).  Optimiser: AdamW with linear
warm-up and cosine decay; augmentation: random horizontal/vertical flips (every
shape class is closed under flips).

Command line (wired as ``vitlens train-zoo``)::

    python -m vitlens.zoo.train --model vit-shapes --threads 1 --out vitlens/zoo

From Python: :func:`train` (its docstring has an example).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from vitlens.datasets.shapes import CLASS_NAMES, shapes
from vitlens.errors import OptionError

__all__ = [
    "MODELS",
    "EVAL_SEED",
    "VAL_SEED",
    "train",
    "evaluate_shipped",
    "unseen_one_object",
    "UNSEEN_SEEDS",
    "train_seed",
    "curve_table",
    "main",
]

#: Seed of the held-out evaluation images (one-object set; ``EVAL_SEED + 1`` for the
#: two-object set).  Never used for training.
EVAL_SEED = 777_000_001
#: Seed of the small validation set watched during training (``VAL_SEED + 1`` for
#: its two-object part).  Never used for training or final evaluation.
VAL_SEED = 555_000_001
_TRAIN_SEED_BASE = 1_000_000_000
#: Seeds of two more one-object sets, never used by training (seeds from 1e9), evaluation,
#: validation, the demo or the docs: the zoo jsons' ``scores["one_object_unseen"]`` counts
#: (:func:`unseen_one_object`), from which ``vl.models.available()`` shows a 95 % interval.
UNSEEN_SEEDS = (880_000_001, 880_000_003)

_MEAN = [0.5, 0.5, 0.5]
_STD = [0.25, 0.25, 0.25]
_SIZE = 64

#: Architecture and default recipe of every zoo model.
MODELS: dict[str, dict[str, Any]] = {
    "vit-shapes": {
        "family": "vit",
        "timm_class": "timm.models.vision_transformer.VisionTransformer",
        "kwargs": {
            "img_size": _SIZE,
            "patch_size": 8,
            "num_classes": len(CLASS_NAMES),
            "embed_dim": 128,
            "depth": 6,
            "num_heads": 4,
            "mlp_ratio": 2.0,
            "class_token": True,
            "global_pool": "token",
            "embed_layer": "vitlens.zoo.ConvStemPatchEmbed",
        },
        "recipe": {"steps": 5000, "batch_size": 64, "lr": 1e-3, "weight_decay": 0.05, "warmup": 300,
                   "aux_weight": 1.0, "aux_until": 0.5, "reuse": 2, "curriculum": 0.2},
    },
    "swin-shapes": {
        "family": "swin",
        "timm_class": "timm.models.swin_transformer.SwinTransformer",
        "kwargs": {
            "img_size": _SIZE,
            "patch_size": 4,
            "window_size": 4,
            "num_classes": len(CLASS_NAMES),
            "embed_dim": 48,
            "depths": [2, 2],  # stage 1; the shipped model grows to [2, 6] (TRAINING.md)
            "num_heads": [2, 4],
            "mlp_ratio": 2.0,
            "drop_path_rate": 0.0,
        },
        "recipe": {"steps": 9000, "batch_size": 64, "lr": 1e-3, "weight_decay": 0.05, "warmup": 300,
                   "aux_weight": 1.0, "aux_until": 0.5, "reuse": 2, "curriculum": 0.2},
    },
}


def train_seed(seed: int, chunk: int) -> int:
    """Dataset seed of training chunk ``chunk`` for run seed ``seed``.

    Training seeds start at 1e9, far from :data:`EVAL_SEED` and :data:`VAL_SEED`.

    Examples
    --------
    >>> train_seed(0, 0) > EVAL_SEED
    True
    """
    value = _TRAIN_SEED_BASE + seed * 10_000_000 + chunk
    assert value not in (EVAL_SEED, EVAL_SEED + 1, VAL_SEED, VAL_SEED + 1)
    return value


# ----------------------------------------------------------------------- tensors
def _to_tensor(image: np.ndarray, mean: list[float], std: list[float]) -> torch.Tensor:
    """``(n, y, x, 3)`` floats in [0, 1] -> normalised ``(n, 3, y, x)`` tensor.

    Values are first quantised to 8 bits, as timm's PIL transforms would see them.
    """
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(0, 3, 1, 2)
    x = torch.round(x * 255.0) / 255.0
    m = torch.tensor(mean, dtype=x.dtype).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype).view(1, 3, 1, 1)
    return ((x - m) / s).contiguous()


def _soft_targets(labels: np.ndarray, num_classes: int) -> torch.Tensor:
    """Spread probability mass evenly over each image's labelled classes."""
    lab = torch.from_numpy(labels)
    valid = lab >= 0
    target = torch.zeros(lab.shape[0], num_classes)
    target.scatter_add_(1, lab.clamp(min=0), valid.float())
    return target / valid.sum(1, keepdim=True).float()


def _model_norm(model: torch.nn.Module) -> tuple[list[float], list[float]]:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return list(cfg.get("mean", _MEAN)), list(cfg.get("std", _STD))


@torch.no_grad()
def _logits(model: torch.nn.Module, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    return torch.cat([model(x[i : i + batch_size]) for i in range(0, x.shape[0], batch_size)])


def _score(logits_one: torch.Tensor, lab_one: np.ndarray, logits_two: torch.Tensor, lab_two: np.ndarray) -> dict[str, float]:
    top1 = logits_one.argmax(1).numpy()
    acc1 = float(np.mean(top1 == lab_one[:, 0]))
    top2 = logits_two.topk(2, dim=1).indices.numpy()
    both = np.array([set(t.tolist()) == set(lab.tolist()) for t, lab in zip(top2, lab_two)])
    return {"one_object_top1": acc1, "two_object_both_in_top2": float(both.mean())}


def evaluate_shipped(
    model: torch.nn.Module,
    n: int = 1000,
    seed: int = EVAL_SEED,
    batch_size: int = 250,
) -> dict[str, Any]:
    """Held-out scores of a shapes model.

    Generates ``n`` one-object images with ``seed`` and ``n`` two-object images with
    ``seed + 1`` (seeds never used in training) and scores one-object top-1 accuracy
    and the fraction of two-object images whose two classes are the top-2 logits.

    Parameters
    ----------
    model : torch.nn.Module
        A model taking ``(batch, 3, 64, 64)`` normalised images (its
        ``pretrained_cfg`` mean/std are used) and returning 8 logits.
    n : int, default 1000
        Images per set.
    seed : int, default EVAL_SEED
        Seed of the one-object set.
    batch_size : int, default 250
        Inference batch size.

    Returns
    -------
    dict
        ``one_object_top1``, ``two_object_both_in_top2``, ``n_per_set``, ``seed``.

    Examples
    --------
    >>> from vitlens.zoo import load_shipped
    >>> from vitlens.zoo.train import evaluate_shipped
    >>> s = evaluate_shipped(load_shipped("vit-shapes"), n=50)
    >>> s["one_object_top1"] > 0.8
    True
    """
    if n < 1:
        raise OptionError(f"n={n!r}: evaluate on at least one image per set, e.g. n=300.")
    mean, std = _model_norm(model)
    size = int((getattr(model, "pretrained_cfg", None) or {}).get("input_size", (3, _SIZE, _SIZE))[-1])
    one = shapes(n, seed=seed, size=size, objects=1)
    two = shapes(n, seed=seed + 1, size=size, objects=2)
    was_training = model.training
    model.eval()
    try:
        lo = _logits(model, _to_tensor(one.image.values, mean, std), batch_size)
        lt = _logits(model, _to_tensor(two.image.values, mean, std), batch_size)
    finally:
        model.train(was_training)
    scores = _score(lo, one.label.values, lt, two.label.values)
    return {**scores, "n_per_set": int(n), "seed": int(seed)}


def unseen_one_object(model: torch.nn.Module, seeds: tuple[int, ...] = UNSEEN_SEEDS, n: int = 1000,
                      batch_size: int = 250) -> dict[str, Any]:
    """Correctly classified one-object images of each of ``seeds`` (``n`` images each): the record a
    zoo json keeps as ``scores["one_object_unseen"]`` (counts, so the interval is computed, not stored).

    Parameters
    ----------
    model : torch.nn.Module
        A shapes model (see :func:`evaluate_shipped`).
    seeds : tuple of int, default UNSEEN_SEEDS
        One held-out one-object set per seed.
    n : int, default 1000
        Images per seed.
    batch_size : int, default 250
        Inference batch size.

    Returns
    -------
    dict
        ``seeds``, ``images_per_seed`` and ``correct`` (one count per seed).

    Examples
    --------
    >>> from vitlens.zoo import load_shipped
    >>> from vitlens.zoo.train import unseen_one_object
    >>> unseen_one_object(load_shipped("vit-shapes"), seeds=(880_000_001,), n=20)["images_per_seed"]
    20
    """
    if n < 1:
        raise OptionError(f"n={n!r}: evaluate on at least one image per seed, e.g. n=1000.")
    mean, std = _model_norm(model)
    size = int((getattr(model, "pretrained_cfg", None) or {}).get("input_size", (3, _SIZE, _SIZE))[-1])
    was_training = model.training
    model.eval()
    correct = []
    try:
        for seed in seeds:
            one = shapes(n, seed=seed, size=size, objects=1)
            logits = _logits(model, _to_tensor(one.image.values, mean, std), batch_size)
            correct.append(int((logits.argmax(1).numpy() == one.label.values[:, 0]).sum()))
    finally:
        model.train(was_training)
    return {"seeds": [int(s) for s in seeds], "images_per_seed": int(n), "correct": correct}


# -------------------------------------------------------------------------- train
def _lr_at(step: int, steps: int, warmup: int, lr: float, final_frac: float = 0.01) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return lr * (final_frac + (1.0 - final_frac) * 0.5 * (1.0 + math.cos(math.pi * t)))


def _with_depths(spec: dict[str, Any], depths: list[int] | None) -> dict[str, Any]:
    kwargs = copy.deepcopy(spec["kwargs"])
    if depths is not None:
        if "depths" not in kwargs:
            raise OptionError("depths= only applies to swin-shapes; leave it out for vit-shapes.")
        if len(depths) != len(kwargs["depths"]) or min(depths) < 1:
            raise OptionError(f"depths={depths}: give {len(kwargs['depths'])} positive block counts, e.g. 2 6.")
        kwargs["depths"] = [int(d) for d in depths]
    return kwargs


def _load_growing(model: torch.nn.Module, path: str | Path) -> list[str]:
    """Load weights, letting whole blocks be new (zero output projections -> identity)."""
    from safetensors.torch import load_file

    state = load_file(str(path), device="cpu")
    result = model.load_state_dict(state, strict=False)
    if result.unexpected_keys:
        raise OptionError(f"{path} holds weights this architecture lacks: {result.unexpected_keys[:5]}...; "
                          f"start from a model with fewer or equal blocks.")
    new_blocks = sorted({k.split(".blocks.")[0] + ".blocks." + k.split(".blocks.")[1].split(".")[0]
                         for k in result.missing_keys if ".blocks." in k})
    others = [k for k in result.missing_keys if ".blocks." not in k]
    if others:
        raise OptionError(f"{path} lacks weights outside transformer blocks: {others[:5]}; "
                          f"it does not come from the same architecture family.")
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name in new_blocks:
            block = modules[name]
            for lin in (block.attn.proj, block.mlp.fc2):
                lin.weight.zero_()
                if lin.bias is not None:
                    lin.bias.zero_()
    return new_blocks


def _tokens(model: torch.nn.Module, feats: torch.Tensor) -> torch.Tensor:
    """Final patch tokens ``(batch, tokens, dim)`` from ``forward_features``."""
    if feats.ndim == 4:  # Swin: NHWC
        return feats.reshape(feats.shape[0], -1, feats.shape[-1])
    return feats[:, int(getattr(model, "num_prefix_tokens", 1)) :]


def _patch_targets(labels: np.ndarray, masks: np.ndarray, grid: int, num_classes: int) -> torch.Tensor:
    """Per-patch class mix ``(n, grid, grid, num_classes + 1)``; last = background."""
    n, k, h, w = masks.shape
    frac = masks.reshape(n, k, grid, h // grid, grid, w // grid).mean(axis=(3, 5))
    out = np.zeros((n, grid, grid, num_classes + 1), dtype=np.float32)
    for j in range(k):
        rows = np.flatnonzero(labels[:, j] >= 0)
        out[rows, :, :, labels[rows, j]] += frac[rows, j]
    out[..., -1] = np.clip(1.0 - out[..., :-1].sum(-1), 0.0, 1.0)
    return torch.from_numpy(out)


def _difficulty(step: int, steps: int, curriculum: float) -> dict[str, Any]:
    """Dataset options at ``step``: easy at first, the full distribution after the ramp."""
    ramp = curriculum * steps
    d = 1.0 if ramp <= 0 else min(1.0, step / ramp)
    if d >= 1.0:
        return {}
    return {"texture": 0.25 + 0.75 * d, "clutter": d >= 0.5, "min_contrast": 0.7 - 0.3 * d}


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """No weight decay on biases, norms, position embeddings and tokens."""
    decay, no_decay = [], []
    skip = set(getattr(model, "no_weight_decay", lambda: set())())
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim <= 1 or name in skip or name.endswith(("pos_embed", "cls_token")) or "relative_position" in name:
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


@dataclass(frozen=True)
class _Recipe:
    """The optimisation recipe of one run: :data:`MODELS`' defaults with the caller's overrides."""

    steps: int
    batch_size: int
    lr: float
    weight_decay: float
    warmup: int
    reuse: int
    curriculum: float
    aux_weight: float
    aux_end: float  # step at which the auxiliary (and feature / hint) weights reach 0

    @classmethod
    def of(cls, spec: dict[str, Any], **overrides: Any) -> "_Recipe":
        recipe = dict(spec["recipe"])
        recipe.update({k: v for k, v in overrides.items() if v is not None})
        steps, bs = int(recipe["steps"]), int(recipe["batch_size"])
        if steps < 1 or bs < 1:
            raise OptionError(f"steps={steps} and batch_size={bs} must both be >= 1.")
        return cls(steps=steps, batch_size=bs, lr=float(recipe["lr"]), weight_decay=float(recipe["weight_decay"]),
                   warmup=min(int(recipe["warmup"]), max(1, steps // 10)), reuse=max(1, int(recipe.get("reuse", 1))),
                   curriculum=float(recipe.get("curriculum", 0.0)), aux_weight=float(recipe.get("aux_weight", 0.0)),
                   aux_end=float(recipe.get("aux_until", 0.0)) * steps)

    def fading(self, weight: float, step: int) -> float:
        """``weight`` fading linearly to 0 at :attr:`aux_end` (constant when there is no fade)."""
        return weight * max(0.0, 1.0 - step / self.aux_end) if self.aux_end > 0 else weight


def _zoo_config(name: str, spec: dict[str, Any], depths: list[int] | None) -> dict[str, Any]:
    """The architecture part of a zoo json (what :func:`vitlens.zoo.build_from_config` reads)."""
    return {
        "name": name,
        "family": spec["family"],
        "timm_class": spec["timm_class"],
        "kwargs": _with_depths(spec, depths),
        "class_names": list(CLASS_NAMES),
        "input_size": [3, _SIZE, _SIZE],
        "mean": list(_MEAN),
        "std": list(_STD),
    }


def _probe(model: torch.nn.Module) -> torch.Tensor:
    """The model's final patch tokens for one blank image (their count and width size the extra heads)."""
    with torch.no_grad():
        return _tokens(model, model.forward_features(torch.zeros(1, 3, _SIZE, _SIZE)))


class _Teacher:
    """Distillation from a trained zoo model: KL on temperature-2 logits, a cosine term on the final
    tokens through a temporary linear map and, optionally, a "hint" term matching the student's
    first-stage tokens to the teacher's convolutional stem on the same grid.

    Built after the auxiliary head, so that the temporary maps draw from torch's generator in the
    same order as ever (the same seed gives the same weights).
    """

    temperature = 2.0

    def __init__(self, path: str | Path, student: torch.nn.Module, student_width: int, kd_weight: float,
                 feat_weight: float, hint_weight: float):
        from vitlens.zoo import load_shipped

        self.path = Path(path)
        self.model = load_shipped(self.path.stem, directory=self.path.parent)
        for prm in self.model.parameters():
            prm.requires_grad_(False)
        self.kd_weight, self.feat_weight, self.hint_weight = kd_weight, feat_weight, hint_weight
        self.feat_map = torch.nn.Linear(student_width, _probe(self.model).shape[-1])
        self.parameters = list(self.feat_map.parameters())
        self.hint_cut = 0
        self._student_stage0: dict[str, torch.Tensor] = {}
        if hint_weight > 0:
            self._hint(student)

    def _hint(self, student: torch.nn.Module) -> None:
        """Find the teacher's stem layer on the student's first-stage grid and a map onto it."""
        stem = self.model.patch_embed.proj
        blank = torch.zeros(1, 3, _SIZE, _SIZE)
        with torch.no_grad():
            t_hint = stem[:-1](blank)  # conv stem before the 1x1 projection
            s_hint = student.layers[0](student.patch_embed(blank))
        cut = len(stem) - 1
        if t_hint.shape[-2:] != s_hint.shape[1:3]:
            for cut in range(len(stem) - 1, 0, -1):
                with torch.no_grad():
                    t_hint = stem[:cut](blank)
                if t_hint.shape[-2:] == s_hint.shape[1:3] and isinstance(stem[cut - 1], torch.nn.ReLU):
                    break
            else:
                raise OptionError("hint_weight needs a teacher stem layer on the student's first-stage grid.")
        self.hint_cut = cut
        self.hint_map = torch.nn.Linear(s_hint.shape[-1], t_hint.shape[1])
        self.parameters += list(self.hint_map.parameters())
        student.layers[0].register_forward_hook(lambda mod, inp, out: self._student_stage0.__setitem__("s", out))

    def loss(self, student: torch.nn.Module, x: torch.Tensor, logits: torch.Tensor, feats: torch.Tensor,
             step: int, recipe: _Recipe) -> torch.Tensor:
        """The distillation terms for one batch (added to the student's loss)."""
        with torch.no_grad():
            t_feats = self.model.forward_features(x)
            t_logits = self.model.forward_head(t_feats)
            t_tokens = _tokens(self.model, t_feats)
        temp = self.temperature
        kd = F.kl_div(F.log_softmax(logits / temp, dim=1), F.softmax(t_logits / temp, dim=1),
                      reduction="batchmean") * temp * temp
        total = self.kd_weight * kd
        if self.hint_weight > 0:
            with torch.no_grad():
                t_stem = self.model.patch_embed.proj[:self.hint_cut](x).permute(0, 2, 3, 1)
            cos_h = F.cosine_similarity(self.hint_map(self._student_stage0["s"]), t_stem, dim=-1)
            total = total + recipe.fading(self.hint_weight, step) * (1.0 - cos_h).mean()
        w_feat = recipe.fading(self.feat_weight, step)
        if w_feat > 0:
            cos = F.cosine_similarity(self.feat_map(_tokens(student, feats)), t_tokens, dim=-1)
            total = total + w_feat * (1.0 - cos).mean()
        return total

    def record(self) -> dict[str, Any]:
        """The teacher's part of the training record."""
        return {
            "weights": str(self.path), "kd_weight": self.kd_weight, "kd_temperature": self.temperature,
            "feat_weight": self.feat_weight, "feat": "1 - cosine(linear(student tokens), teacher tokens)",
            "hint_weight": self.hint_weight,
            "hint": "1 - cosine(linear(student stage-0 tokens), teacher conv-stem features on that grid)"}


class _Chunks:
    """Training images generated in chunks, each with its own seed, each shown ``reuse`` times
    (reshuffled), with random horizontal and vertical flips applied to images and patch targets."""

    def __init__(self, seed: int, recipe: _Recipe, chunk_size: int, grid: int):
        self.seed, self.recipe, self.grid = seed, recipe, grid
        self.size = max(recipe.batch_size, int(chunk_size) // recipe.batch_size * recipe.batch_size)
        self.steps_per_chunk = self.size * recipe.reuse // recipe.batch_size
        self.flips = torch.Generator().manual_seed(seed + 12345)

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Images, soft targets and per-patch targets of training step ``step``."""
        local = step % self.steps_per_chunk
        if local == 0:  # fresh chunk of training images
            r = self.recipe
            data = shapes(self.size, seed=train_seed(self.seed, step // self.steps_per_chunk), objects=(1, 2),
                          **_difficulty(step, r.steps, r.curriculum))
            self.xs = _to_tensor(data.image.values, _MEAN, _STD)
            self.ts = _soft_targets(data.label.values, len(CLASS_NAMES))
            self.ps = _patch_targets(data.label.values, data.mask.values, self.grid, len(CLASS_NAMES))
            self.order = torch.cat([torch.randperm(self.size, generator=self.flips) for _ in range(r.reuse)])
        idx = self.order[local * self.recipe.batch_size : (local + 1) * self.recipe.batch_size]
        x, t, p = self.xs[idx], self.ts[idx], self.ps[idx]
        flips = torch.rand(2, x.shape[0], generator=self.flips) < 0.5
        x = torch.where(flips[0].view(-1, 1, 1, 1), x.flip(3), x)
        p = torch.where(flips[0].view(-1, 1, 1, 1), p.flip(2), p)
        x = torch.where(flips[1].view(-1, 1, 1, 1), x.flip(2), x)
        p = torch.where(flips[1].view(-1, 1, 1, 1), p.flip(1), p)
        return x, t, p


class _Validation:
    """The small validation set watched during training (seeds :data:`VAL_SEED`, ``+ 1``)."""

    def __init__(self, n: int):
        self.one = shapes(n, seed=VAL_SEED, objects=1)
        self.two = shapes(n, seed=VAL_SEED + 1, objects=2)
        self.x1, self.x2 = _to_tensor(self.one.image.values, _MEAN, _STD), _to_tensor(self.two.image.values, _MEAN, _STD)

    def __call__(self, model: torch.nn.Module) -> dict[str, float]:
        model.eval()
        s = _score(_logits(model, self.x1, 250), self.one.label.values, _logits(model, self.x2, 250),
                   self.two.label.values)
        model.train()
        return s


def _aux_loss(aux_head: torch.nn.Module, tokens: torch.Tensor, p: torch.Tensor, grid: int) -> torch.Tensor:
    """Per-token class-mix loss: object tokens count 5x background."""
    aux_logp = F.log_softmax(aux_head(tokens), dim=-1)
    p = p.reshape(p.shape[0], grid * grid, -1)
    weight = 1.0 + 4.0 * (1.0 - p[..., -1])
    return (-(p * aux_logp).sum(-1) * weight).sum() / weight.sum()


class _Progress:
    """Running loss and one-object accuracy between validations, and the tqdm bar."""

    def __init__(self, name: str, steps: int, progress: bool):
        from tqdm.auto import tqdm

        self.name, self.steps, self.enabled = name, steps, progress
        self.bar = tqdm(range(steps), desc=name, disable=not progress, mininterval=2.0, dynamic_ncols=True)
        self.reset()

    def reset(self) -> None:
        self.loss, self.acc, self.n, self.acc_n = 0.0, 0.0, 0, 0

    def add(self, loss: torch.Tensor, logits: torch.Tensor, t: torch.Tensor, step: int, lr: float) -> None:
        with torch.no_grad():
            single = t.max(1).values > 0.99
            if single.any():
                self.acc += (logits[single].argmax(1) == t[single].argmax(1)).float().mean().item()
                self.acc_n += 1
        self.loss += loss.item()
        self.n += 1
        if self.enabled and (step + 1) % 10 == 0:
            self.bar.set_postfix(loss=f"{self.loss / self.n:.3f}", acc1=f"{self.acc / max(1, self.acc_n):.3f}",
                                 lr=f"{lr:.2e}", refresh=False)

    def row(self, step: int, lr: float, v: dict[str, float], seconds: float) -> dict[str, Any]:
        """One curve row (the running figures since the last row), printed under the bar."""
        from tqdm.auto import tqdm

        row = {"step": step + 1, "lr": lr, "train_loss": self.loss / self.n,
               "train_acc1": self.acc / max(1, self.acc_n), "val_one_top1": v["one_object_top1"],
               "val_two_top2": v["two_object_both_in_top2"], "seconds": round(seconds, 1)}
        if self.enabled:
            tqdm.write(f"[{self.name}] step {row['step']}/{self.steps} loss {row['train_loss']:.4f} "
                       f"acc1 {row['train_acc1']:.3f} val1 {row['val_one_top1']:.3f} "
                       f"val2 {row['val_two_top2']:.3f} ({row['seconds']:.0f}s)")
        self.reset()
        return row


def train(
    name: str,
    *,
    steps: int | None = None,
    batch_size: int | None = None,
    seed: int = 0,
    threads: int | None = None,
    out_dir: str | Path | None = None,
    lr: float | None = None,
    weight_decay: float | None = None,
    warmup: int | None = None,
    chunk_size: int = 4096,
    reuse: int | None = None,
    curriculum: float | None = None,
    aux_weight: float | None = None,
    aux_until: float | None = None,
    init_from: str | Path | None = None,
    depths: list[int] | None = None,
    teacher: str | Path | None = None,
    kd_weight: float = 1.0,
    feat_weight: float = 1.0,
    hint_weight: float = 0.0,
    val_every: int = 500,
    val_n: int = 300,
    eval_n: int = 1000,
    progress: bool = True,
    command: str | None = None,
) -> dict[str, Any]:
    """Train a zoo model from scratch and write ``<name>.safetensors`` + ``<name>.json``.

    Parameters
    ----------
    name : str
        ``"vit-shapes"`` or ``"swin-shapes"``.
    steps, batch_size, lr, weight_decay, warmup : optional
        Optimisation recipe; defaults from :data:`MODELS`.
    seed : int, default 0
        Seeds torch (initialisation, flips) and the training-data seeds
        (:func:`train_seed`).  The same seed and thread count give the same weights.
    threads : int, optional
        ``torch.set_num_threads`` for the run (``None`` leaves torch's default).
    out_dir : str or Path, optional
        Where to write the two files (created if needed); default ``./vitlens-zoo``.
        Pass the package folder (``vitlens/zoo``) to replace the shipped model.
    chunk_size : int, default 4096
        Images generated at once, each chunk with a fresh seed.
    reuse : int, optional
        Passes over each chunk (reshuffled, new flips) before a new one is made.
    curriculum : float, optional
        Fraction of the steps over which the data ramp from easy (faint texture, no
        clutter, strong contrast) to the full :func:`~vitlens.datasets.shapes`
        distribution; 0 trains on the full distribution from the start.
    aux_weight, aux_until : float, optional
        Weight of an auxiliary per-token loss (a temporary linear head on the final
        8x8 tokens predicts the class mix of its patch from the masks, background
        as a ninth class), fading linearly to 0 at ``aux_until`` x ``steps``.  It
        speeds up the start of training; the head is dropped, the shipped model is
        the plain classifier.
    init_from : str or Path, optional
        A ``<name>.safetensors`` to start from instead of a random initialisation
        (a second training stage); its path is recorded in the json.  It may come
        from a shallower model of the same family: blocks it lacks keep their fresh
        initialisation except that their output projections (``attn.proj``,
        ``mlp.fc2``) are zeroed, so each new block starts as the identity.
    depths : list of int, optional
        Swin only: blocks per stage, overriding the architecture in :data:`MODELS`
        (e.g. ``[2, 2]`` for the first stage of the shipped recipe).
    teacher : str or Path, optional
        A trained zoo model (``<name>.safetensors`` with its json beside it) to
        distil from: a KL term on temperature-2 logits (weight ``kd_weight``) and a
        cosine term matching the student's final 8x8 tokens, through a temporary
        linear map, to the teacher's (weight ``feat_weight``, fading like the
        auxiliary loss).
    kd_weight, feat_weight : float, default 1.0
        Weights of the two distillation terms.
    hint_weight : float, default 0.0
        Swin student with a conv-stem ViT teacher: weight of a "hint" term matching
        (cosine, through a temporary linear map) the student's first-stage tokens to
        the teacher's convolutional-stem features on the same grid; fades like the
        auxiliary loss.
    val_every, val_n : int
        Watch a small validation set (seed :data:`VAL_SEED`) every ``val_every``
        steps; the best validated weights (and the final ones) are candidates.
    eval_n : int, default 1000
        Images per held-out evaluation set at the end (:func:`evaluate_shipped`).
    progress : bool, default True
        Show a tqdm progress bar with loss and accuracy.
    command : str, optional
        Command line recorded in the json (defaults to a Python call).

    Returns
    -------
    dict
        The json written (config, scores, training record including the curve).

    Examples
    --------
    >>> import tempfile
    >>> from vitlens.zoo.train import train
    >>> with tempfile.TemporaryDirectory() as tmp:  # doctest: +SKIP
    ...     info = train("swin-shapes", steps=3, batch_size=8, out_dir=tmp, eval_n=16)
    """
    from vitlens.zoo import build_from_config

    if name not in MODELS:
        raise OptionError(f"unknown zoo model {name!r}; choose one of {sorted(MODELS)}.")
    spec = MODELS[name]
    r = _Recipe.of(spec, steps=steps, batch_size=batch_size, lr=lr, weight_decay=weight_decay, warmup=warmup,
                   reuse=reuse, curriculum=curriculum, aux_weight=aux_weight, aux_until=aux_until)
    if threads is not None:
        if threads < 1:
            raise OptionError(f"threads={threads}: use a positive int (1 per parallel run).")
        torch.set_num_threads(int(threads))
    out = Path(out_dir) if out_dir is not None else Path.cwd() / "vitlens-zoo"
    out.mkdir(parents=True, exist_ok=True)

    config = _zoo_config(name, spec, depths)
    torch.manual_seed(seed)
    model = build_from_config(config)
    grown = _load_growing(model, init_from) if init_from is not None else []
    model.train()
    probe = _probe(model)
    grid = int(round(math.sqrt(probe.shape[1])))
    aux_head = torch.nn.Linear(probe.shape[-1], len(CLASS_NAMES) + 1)
    extra = list(aux_head.parameters())
    tutor = None
    if teacher is not None:
        tutor = _Teacher(teacher, model, probe.shape[-1], kd_weight, feat_weight, hint_weight)
        extra += tutor.parameters
    groups = _param_groups(model, r.weight_decay)
    groups.append({"params": extra, "weight_decay": 0.0})
    opt = torch.optim.AdamW(groups, lr=r.lr, betas=(0.9, 0.999))
    chunks = _Chunks(seed, r, chunk_size, grid)
    validate = _Validation(val_n)

    curve: list[dict[str, Any]] = []
    best: tuple[float, int, dict[str, torch.Tensor]] | None = None
    t0 = time.perf_counter()
    run = _Progress(name, r.steps, progress)
    for step in run.bar:
        x, t, p = chunks.batch(step)
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, r.steps, r.warmup, r.lr)
        feats = model.forward_features(x)
        logits = model.forward_head(feats)
        loss = -(t * F.log_softmax(logits, dim=1)).sum(1).mean()
        total = loss
        w_aux = r.aux_weight * max(0.0, 1.0 - step / r.aux_end) if r.aux_end > 0 else 0.0
        if w_aux > 0:
            total = total + w_aux * _aux_loss(aux_head, _tokens(model, feats), p, grid)
        if tutor is not None:
            total = total + tutor.loss(model, x, logits, feats, step, r)
        opt.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(list(model.parameters()) + extra, 1.0)
        opt.step()

        run.add(loss, logits, t, step, opt.param_groups[0]["lr"])
        if (step + 1) % val_every == 0 or step + 1 == r.steps:
            v = validate(model)
            curve.append(run.row(step, opt.param_groups[0]["lr"], v, time.perf_counter() - t0))
            metric = v["one_object_top1"] + v["two_object_both_in_top2"]
            if best is None or metric >= best[0]:
                best = (metric, step + 1, {k: p.detach().clone() for k, p in model.state_dict().items()})
            sys.stdout.flush()
    run.bar.close()
    wall = time.perf_counter() - t0

    assert best is not None
    model.load_state_dict(best[2])
    model.eval()
    scores = evaluate_shipped(model, n=eval_n, seed=EVAL_SEED)
    scores["chosen_step"] = best[1]
    if command is None:
        command = (f"python -c \"from vitlens.zoo.train import train; train({name!r}, steps={r.steps}, "
                   f"batch_size={r.batch_size}, seed={seed}, threads={threads})\"")
    config["scores"] = scores
    config["train"] = _training_record(r, seed=seed, grid=grid, chunk_size=chunks.size, threads=threads,
                                       init_from=init_from, grown=grown, tutor=tutor, wall=wall, command=command,
                                       curve=curve)
    _write_zoo_files(out, name, model, config)
    if progress:
        print(
            f"[{name}] held-out (seed {EVAL_SEED}, {eval_n}+{eval_n} images): one-object top-1 "
            f"{scores['one_object_top1']:.4f}, two-object both-in-top-2 "
            f"{scores['two_object_both_in_top2']:.4f}; weights from step {best[1]}; "
            f"wall {wall:.0f}s; wrote {out / (name + '.safetensors')}",
            flush=True,
        )
    return config


def _training_record(r: _Recipe, *, seed: int, grid: int, chunk_size: int, threads: int | None,
                     init_from: str | Path | None, grown: list[str], tutor: _Teacher | None, wall: float,
                     command: str, curve: list[dict[str, Any]]) -> dict[str, Any]:
    """The ``train`` part of a zoo json: how the weights were made, with the validation curve."""
    return {
        "seed": seed,
        "steps": r.steps,
        "batch_size": r.batch_size,
        "lr": r.lr,
        "weight_decay": r.weight_decay,
        "warmup": r.warmup,
        "schedule": "linear warm-up, cosine decay to 1% of lr",
        "optimizer": "AdamW(betas=(0.9, 0.999)), grad-norm clip 1.0",
        "loss": "cross-entropy with soft targets (0.5/0.5 for two-object images)",
        "augmentation": "random horizontal and vertical flips; 8-bit quantisation",
        "curriculum": f"first {r.curriculum:.0%} of steps ramp texture 0.25->1, min_contrast 0.7->0.4, "
                      f"clutter from half-way; then the full shapes distribution",
        "aux_loss": f"per-token class-mix loss on the final {grid}x{grid} tokens (temporary linear head, "
                    f"object tokens weighted 5x), weight {r.aux_weight} fading to 0 at step {int(r.aux_end)}",
        "reuse": r.reuse,
        "data": f"vitlens.datasets.shapes(objects=(1, 2)), chunks of {chunk_size} images, each "
                f"used {r.reuse}x, "
                f"seeds train_seed(seed, chunk) = {_TRAIN_SEED_BASE} + seed*1e7 + chunk",
        "threads": threads,
        "init_from": None if init_from is None else str(init_from),
        "grown_blocks": grown,
        "teacher": None if tutor is None else tutor.record(),
        "wall_seconds": round(wall, 1),
        "command": command,
        "torch": torch.__version__,
        "timm": __import__("timm").__version__,
        "curve": curve,
    }


def _write_zoo_files(out: Path, name: str, model: torch.nn.Module, config: dict[str, Any]) -> None:
    """``<name>.safetensors`` and ``<name>.json`` in ``out``, readable by everyone."""
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / f"{name}.safetensors"), metadata={"format": "pt", "name": name})
    with open(out / f"{name}.json", "w", encoding="utf-8") as fh:
        json.dump(config, fh, indent=2)
        fh.write("\n")
    for suffix in (".safetensors", ".json"):
        os.chmod(out / f"{name}{suffix}", 0o644)


def curve_table(config: dict[str, Any], every: int = 1) -> str:
    """Markdown table of a zoo json's training curve (for TRAINING.md).

    Examples
    --------
    >>> from vitlens.zoo import available
    >>> from vitlens.zoo.train import curve_table
    >>> curve_table(available()["vit-shapes"]).splitlines()[0].startswith("| step")
    True
    """
    rows = config["train"]["curve"]
    lines = [
        "| step | lr | train loss | train acc (1 obj) | val top-1 (1 obj) | val both-in-top-2 (2 obj) | seconds |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for i, r in enumerate(rows):
        if i % every and i != len(rows) - 1:
            continue
        lines.append(
            f"| {r['step']} | {r['lr']:.2e} | {r['train_loss']:.3f} | {r['train_acc1']:.3f} | "
            f"{r['val_one_top1']:.3f} | {r['val_two_top2']:.3f} | {r['seconds']:.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point (``vitlens train-zoo`` / ``python -m vitlens.zoo.train``).

    Examples
    --------
    >>> from vitlens.zoo.train import main
    >>> main(["--model", "vit-shapes", "--steps", "3", "--batch-size", "8",
    ...       "--out", "/tmp/zoo-test", "--eval-n", "16", "--quiet"])  # doctest: +SKIP
    0
    """
    parser = argparse.ArgumentParser(
        prog="vitlens train-zoo",
        description="Retrain a shipped shapes model (vit-shapes or swin-shapes) on CPU.",
    )
    parser.add_argument("--model", required=True, choices=sorted(MODELS))
    parser.add_argument("--steps", type=int, default=None, help="optimiser steps (default: recipe)")
    parser.add_argument("--batch-size", type=int, default=None, help="images per step (default: recipe)")
    parser.add_argument("--lr", type=float, default=None, help="peak learning rate (default: recipe)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up steps (default: recipe)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (1 per parallel run)")
    parser.add_argument("--out", default=None,
                        help="output folder (default ./vitlens-zoo; vitlens/zoo replaces the shipped files)")
    parser.add_argument("--val-every", type=int, default=500)
    parser.add_argument("--curriculum", type=float, default=None, help="fraction of steps ramping easy->full data")
    parser.add_argument("--aux-weight", type=float, default=None, help="auxiliary per-token loss weight")
    parser.add_argument("--init", default=None, help="start from these .safetensors weights (second stage)")
    parser.add_argument("--hint-weight", type=float, default=0.0, help="swin: stem-feature hint loss weight")
    parser.add_argument("--depths", type=int, nargs="+", default=None, help="swin only: blocks per stage")
    parser.add_argument("--teacher", default=None, help="distil from this zoo .safetensors (json beside it)")
    parser.add_argument("--aux-until", type=float, default=None, help="fraction of steps the aux losses fade over")
    parser.add_argument("--chunk-size", type=int, default=4096, help="images generated per chunk")
    parser.add_argument("--reuse", type=int, default=None, help="passes over each generated chunk")
    parser.add_argument("--eval-n", type=int, default=1000, help="held-out images per set")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    command = "python -m vitlens.zoo.train " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    try:
        train(args.model, steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup=args.warmup,
              seed=args.seed, threads=args.threads, out_dir=args.out, val_every=args.val_every,
              curriculum=args.curriculum, aux_weight=args.aux_weight, init_from=args.init,
              teacher=args.teacher, hint_weight=args.hint_weight, depths=args.depths, aux_until=args.aux_until, chunk_size=args.chunk_size, reuse=args.reuse,
              eval_n=args.eval_n, progress=not args.quiet, command=command)
    except OptionError as exc:
        parser.error(str(exc))
    return 0


if __name__ == "__main__":  # pragma: no cover
    os.environ.setdefault("PYTHONHASHSEED", "0")
    raise SystemExit(main())
