"""Which timm registry names vitlens explains: build each at random init, small, and check it.

The families come from the adapter registry (each adapter lists the timm modules
whose names it covers, ``Adapter.timm_modules``); nothing here lists families.
:func:`check` builds a name with reduced depth and a small input, captures two
images, computes all seven maps, and runs the LRP pass on a bias-free copy to
check conservation block by block and through the read-out. Used by
``benchmarks/coverage.py`` (which writes ``docs/COVERAGE.md``) and the coverage tests.

Examples
--------
>>> from vitlens.coverage import timm_names as catalog
>>> result = catalog.check("deit_tiny_patch16_224")
>>> result.status, result.family
('explained', 'vit')
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from ..errors import UnsupportedModelError
from ..models.registry import adapter_for, registry_names

#: relative LRP conservation tolerance per block (float32 sums; shifted windows leak a little through the −100 mask)
TOLERANCE = 1e-3
#: input side for the checks, and blocks kept per stage
SIZE, DEPTH = 64, 2
SWIN_SIZE = 56  # patch 4: grids 14, 7, 4, 2 in windows of 4 (padded, and an odd merge)


def tiny_kwargs(name: str) -> dict[str, Any]:
    """Reduced depth and a small input for ``name``.

    Swin (v1 and v2) is built at :data:`SWIN_SIZE` with windows of 4: stage grids of 14
    and 7 tokens, which timm pads to whole windows, and an odd 7×7 grid merged into 4×4,
    so every registry name is also checked with padding.
    """
    import re

    if name.startswith("swin"):
        return dict(img_size=SWIN_SIZE, window_size=4, depths=(DEPTH, DEPTH, 1, 1), num_classes=5)
    patch = re.search(r"patch(\d+)", name)
    size = SIZE
    if patch:  # a whole number of patches (some embeddings insist): 70 px for patch 14
        p = int(patch.group(1))
        size = p * max(2, round(SIZE / p))
    return dict(img_size=size, depth=DEPTH, num_classes=5)


def build(name: str, seed: int = 0) -> nn.Module:
    import timm

    torch.manual_seed(seed)
    kwargs = tiny_kwargs(name)
    try:
        model = timm.create_model(name, pretrained=False, **kwargs).eval()
    except TypeError:  # a create function that fixes some of these arguments
        kwargs.pop("depth", None)
        kwargs.pop("depths", None)
        model = timm.create_model(name, pretrained=False, **kwargs).eval()
    except AssertionError as exc:  # per-block key/value heads (Sapiens2): one entry per block
        if "num_kv_heads" not in str(exc):
            raise
        model = timm.create_model(name, pretrained=False, **kwargs, **kv_heads_kwargs(name)).eval()
    return switch_on(model, seed)


def kv_heads_kwargs(name: str, heads: int = 4) -> dict[str, Any]:
    """A narrow ``name`` with :data:`DEPTH` blocks and the full-size model's key/value-head pattern.

    The full-size model is built on the meta device (no memory) to read each block's
    key/value heads per query head; the small one gets the first block's ratio and then the
    smallest, so it has a grouped-query block exactly when the full-size model has one.
    """
    import timm

    with torch.device("meta"):
        full = timm.create_model(name, pretrained=False)
    ratios = [int(getattr(b.attn, "num_kv_heads", b.attn.num_heads)) / int(b.attn.num_heads) for b in full.blocks]
    kv = [max(1, round(heads * ratios[0]))] * (DEPTH - 1) + [max(1, round(heads * min(ratios)))]
    return dict(embed_dim=16 * heads, num_heads=heads, num_kv_heads=tuple(kv))


def switch_on(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give zero-initialised norm weights (SwinV2's res-post-norms start at 0, switching every
    branch off) values around 1, so a random-init check exercises every branch."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in model.modules():
            w = getattr(mod, "weight", None)
            if isinstance(mod, nn.LayerNorm) and isinstance(w, torch.Tensor) and not w.any():
                w.copy_(1 + 0.3 * torch.randn(w.shape, generator=g))
    return model


def bias_free(model: nn.Module, seed: int = 0) -> nn.Module:
    """A copy without additive biases (Linear, q/v, relative-position tables, SwinV2's cpb bias).

    Linear weights are redrawn at unit gain (std 1/√fan_in): with timm's 0.02 init the MLP
    branches carry almost no relevance, and a wrong branch rule would hide in the tolerance.
    """
    m = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.Linear):
                mod.weight.copy_(torch.randn(mod.weight.shape, generator=g) / mod.weight.shape[1] ** 0.5)
            if isinstance(mod, nn.Linear) and mod.bias is not None:
                mod.bias.zero_()
            for attr in ("gamma", "gamma_1", "gamma_2"):  # LayerScale at 1: every branch carries relevance
                p = getattr(mod, attr, None)
                if isinstance(p, torch.Tensor) and p.ndim == 1:
                    p.fill_(1.0)
            for attr in ("q_bias", "k_bias", "v_bias", "relative_position_bias_table"):
                p = getattr(mod, attr, None)
                if isinstance(p, torch.Tensor):
                    p.zero_()
        for mod in m.modules():
            cpb = getattr(mod, "cpb_mlp", None)
            if cpb is not None:  # 16·sigmoid(−100) ≈ 0
                cpb[0].weight.zero_()
                cpb[0].bias.fill_(1.0)
                cpb[-1].weight.fill_(-100.0 / cpb[-1].weight.shape[1])
    return m


def conservation_leak(model: nn.Module, x: torch.Tensor) -> float:
    """Largest relative relevance leak over blocks and the read-out, on a bias-free copy."""
    m = bias_free(model)
    return relevance_leak(adapter_for(m), m, x)


def relevance_leak(ad: Any, logits_of: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> float:
    """Largest relative relevance leak over the blocks and the read-out of adapter ``ad`` (of a bias-free
    model, whose logits of ``x`` are ``logits_of(x)``), explaining each input's top class."""
    from ..capture.hooks import Recorder
    from ..capture.relevance import attention_relevance

    with Recorder(ad, keep_block_inputs=True) as rec:
        target = logits_of(x).argmax(-1)
        attention_relevance(ad, rec, target, to_input=True)
    with torch.no_grad():
        onehot = torch.nn.functional.one_hot(target, ad.num_classes).float()
        head = ad.head.relevance(ad.tokens(rec.final_output), onehot).reshape(x.shape[0], -1).sum(1)  # type: ignore[union-attr]
    leaks = [float((head - 1).abs().max())]
    for r_in, r_out in rec.relevance_totals.values():
        leaks.append(float((r_in - r_out).abs().max() / r_out.abs().max().clamp_min(1e-12)))
    return max(leaks)


def config_key(model: nn.Module) -> tuple:
    """What distinguishes one architecture configuration from another, for vitlens."""
    ad = adapter_for(model)
    blocks = []
    for p in ad.parts:
        a = p.attn
        blocks.append((
            type(p.module).__name__, type(a.module).__name__, p.post_norm, p.ls1 is not None, p.mlp.kind,
            a.fused, type(a.q_norm).__name__, type(a.inner_norm).__name__, a.position_bias is not None,
            a.logit_scale is not None, type(p.norm1).__name__,
        ))
    return (
        ad.family, ad.readout, type(getattr(model, "patch_embed", None)).__name__,
        tuple(s.prefix_kinds for s in ad.stages).__repr__(), tuple(sorted(set(blocks))),
        type(ad.final).__name__, type(getattr(ad.head, "fc_norm", None)).__name__,
        getattr(model, "rope", None) is not None, bool(getattr(model, "no_embed_class", False)),
    )


@dataclass
class Result:
    name: str
    family: str
    status: str  # "explained", "refused" (clear UnsupportedModelError), "failed" (anything else)
    reason: str = ""
    leak: float = float("nan")
    seconds: float = 0.0
    config: str = ""
    extra: dict = field(default_factory=dict)


def family_of(name: str) -> str:
    for family, names in registry_names().items():
        if name in names:
            return family
    return "?"


def check(name: str, family: str | None = None, seed: int = 0) -> Result:
    """Build ``name`` small at random init and check capture, all seven maps and LRP conservation."""
    import vitlens as vl

    family = family or family_of(name)
    t0 = time.perf_counter()
    try:
        model = build(name, seed)
    except Exception as exc:  # timm cannot build it small: not vitlens's refusal, report it
        return Result(name, family, "failed", f"timm could not build it small: {type(exc).__name__}: {exc}"[:300],
                      seconds=time.perf_counter() - t0)
    try:
        ad = adapter_for(model)
        key = repr(config_key(model))
        h, w = ad.input_size
        images = np.random.default_rng(seed).random((2, h, w, 3)).astype(np.float32)
        cap = vl.capture(model, images)
        maps = vl.explain(cap, "all", per_layer=False)
        bad = [m for m in vl.methods.explainable_methods(cap) if not np.isfinite(maps[m].values).all()]
        if bad:
            return Result(name, family, "failed", f"non-finite maps: {bad}", config=key,
                          seconds=time.perf_counter() - t0)
        x = torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(seed))
        leak = conservation_leak(model, x)
        if not leak <= TOLERANCE:
            return Result(name, family, "failed", f"LRP relevance not conserved (relative leak {leak:.2e})",
                          leak=leak, config=key, seconds=time.perf_counter() - t0)
        return Result(name, family, "explained", leak=leak, config=key, seconds=time.perf_counter() - t0)
    except UnsupportedModelError as exc:
        return Result(name, family, "refused", str(exc), seconds=time.perf_counter() - t0,
                      config="refused: " + str(exc).split(":", 1)[-1].strip())
    except Exception as exc:
        return Result(name, family, "failed", f"{type(exc).__name__}: {exc}"[:300], seconds=time.perf_counter() - t0)
