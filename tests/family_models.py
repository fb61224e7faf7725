"""Tiny random models of every registered family: the one table the contract tests read.

``tests/test_family_contract.py`` is generated from the adapter registry
(:func:`vitlens.models.registry.adapters`): every registered family is checked on
the tiny models listed for it here. A timm family lists recipes below (one per
configuration worth checking: heads, pools, MLPs, position terms); a transformers
family needs nothing here: its declarations (``HFClass`` / ``Backbone``, with a tiny
config, next to the family in ``vitlens/models/families/``) are the recipes, built by
:func:`vitlens.coverage.transformers_classes.build`.

A new timm family is tested by registering its adapter and adding its recipes to
:data:`TIMM`; a family without recipes fails ``test_every_registered_family_has_tiny_models``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import timm
import torch
from family_checks import randomize_biases
from timm.layers import GluMlp, SwiGLU, SwiGLUPacked
from timm.models.vision_transformer import ResPostBlock


@dataclass(frozen=True)
class Recipe:
    """How to build one tiny model of a family, and what it takes.

    ``fast``: checked in the fast lane (``make test-fast``: the first model of each family); the
    others are marked ``slow`` and run in ``make test``.
    ``geometry``: run the bright-square geometry check on it (a few captures more).
    """

    family: str
    name: str
    #: ``() -> (model, text)``: the model and, for image-text models, its prompts' token ids (else None)
    build: Callable[[], tuple[torch.nn.Module, torch.Tensor | None]]
    size: tuple[int, int]
    fast: bool = True
    geometry: bool = False
    #: LRP conservation tolerance per block (relative, absolute): float32 sums; transformers Swinv2's
    #: shifted windows leak ~1e-3 through their -100 mask (test_hf_swin.py's tolerance)
    conservation_tol: tuple[float, float] = (1e-4, 1e-5)

    @property
    def id(self) -> str:
        return f"{self.family}-{self.name}"


def images(size: tuple[int, int], n: int = 2, seed: int = 0) -> np.ndarray:
    """``n`` random pictures (sample, H, W, 3) in [0, 1]."""
    return np.random.default_rng(seed).random((n, *size, 3)).astype(np.float32)


# -- timm VisionTransformer ----------------------------------------------------------------
VIT_BASE = dict(img_size=32, patch_size=8, num_classes=5, embed_dim=48, depth=2, num_heads=3)
#: every block and head a pretrained VisionTransformer name uses
VIT_VARIANTS: dict[str, dict[str, Any]] = {
    "layerscale": dict(init_values=0.3),
    "qk_norm": dict(qk_norm=True),
    "swiglu_packed": dict(mlp_layer=SwiGLUPacked, mlp_ratio=2.0),
    "swiglu": dict(mlp_layer=SwiGLU),
    "glu_gate_last": dict(mlp_layer=GluMlp),
    "map": dict(global_pool="map"),
    "map_no_cls": dict(global_pool="map", class_token=False),
    "avg": dict(global_pool="avg"),
    "avg_with_prefix": dict(global_pool="avg", pool_include_prefix=True, reg_tokens=2),
    "avg_no_fc_norm": dict(global_pool="avg", fc_norm=False, class_token=False),
    "registers_no_embed_class": dict(reg_tokens=4, no_embed_class=True),
    "no_final_norm": dict(final_norm=False),
    "res_post_block": dict(block_fn=ResPostBlock, init_values=0.5),
    "scale_norms": dict(scale_attn_norm=True, scale_mlp_norm=True),
}
VIT_GEOMETRY = ("layerscale", "registers_no_embed_class")


def make_vit_variant(name: str, **extra: Any) -> torch.nn.Module:
    """The VisionTransformer variant ``name`` (biases nonzero), 2 blocks, 32 px."""
    torch.manual_seed(sum(map(ord, name)))
    return randomize_biases(timm.create_model("vit_tiny_patch16_224", **{**VIT_BASE, **VIT_VARIANTS[name], **extra}).eval())


# -- timm Eva (EVA02, DINOv3, vit_*_rope_*, PE-core) -------------------------------------------
EVA_NAMES: dict[str, dict[str, Any]] = {
    "eva02_tiny_patch14_224": dict(img_size=56),  # rope, SwiGLU, fused qkv with q/v bias, inner norm
    "vit_small_patch16_dinov3": dict(img_size=64),  # AttentionRope, registers, LayerScale
    "vit_base_patch16_rope_reg1_gap_256": dict(img_size=64, embed_dim=96, num_heads=4),  # avg pool, registers
    "vit_pe_core_tiny_patch16_384": dict(img_size=64),  # attention-pool head
    "eva_giant_patch14_224": dict(img_size=56, embed_dim=64, num_heads=4),  # no rope, plain MLP
    "vit_medium_patch16_rope_reg1_gap_256": dict(img_size=64, embed_dim=96, num_heads=4),
}
EVA_GEOMETRY = ("vit_small_patch16_dinov3",)


def make_eva(name: str) -> torch.nn.Module:
    """The timm registry configuration ``name`` at depth 2 (biases nonzero)."""
    torch.manual_seed(sum(map(ord, name)))
    return randomize_biases(timm.create_model(name, num_classes=5, depth=2, **EVA_NAMES[name]).eval())


# -- timm Beit (BEiT, BEiT v2) ------------------------------------------------------------------
BEIT_CONFIGS: dict[str, dict[str, Any]] = {
    "beit_base_patch16_224": dict(),
    "beitv2_base_patch16_224": dict(global_pool="token"),
    "beit_shared_bias": dict(use_shared_rel_pos_bias=True, use_rel_pos_bias=False, use_abs_pos_emb=True),
}
BEIT_GEOMETRY = ("beit_base_patch16_224",)


def make_beit(key: str) -> torch.nn.Module:
    """A Beit configuration at depth 2, 64 px (biases and position tables nonzero)."""
    torch.manual_seed(sum(map(ord, key)))
    name = key if key in timm.list_models("beit*") else "beit_base_patch16_224"
    model = timm.create_model(name, num_classes=5, depth=2, img_size=64, embed_dim=64, num_heads=4, **BEIT_CONFIGS[key])
    return randomize_biases(model.eval())


# -- timm Swin v1 and v2 ----------------------------------------------------------------------
SWIN_KW = dict(img_size=64, window_size=4, depths=(2, 2), num_heads=(2, 4), embed_dim=24, num_classes=5)
SWIN_NAMES = {"v1": "swin_tiny_patch4_window7_224", "v2": "swinv2_tiny_window8_256"}


def switch_on_res_post_norms(model: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """SwinV2 initialises its res-post-norm weights to 0: every branch starts switched off, so
    attention gradients and relevances would all be exactly 0. Switch them on, in place."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for blk in model.modules():
            if type(blk).__name__ == "SwinTransformerV2Block":
                for norm in (blk.norm1, blk.norm2):
                    norm.weight.copy_(1 + 0.3 * torch.randn(norm.weight.shape, generator=g))
    return model


def make_swin(version: str, **kw: Any) -> torch.nn.Module:
    """timm Swin ``version`` ("v1", "v2"): two stages of two blocks (one shifted), 64 px, biases
    nonzero; v2 with its res-post-norms switched on and a logit scale away from its init on every head."""
    torch.manual_seed(0)
    model = randomize_biases(timm.create_model(SWIN_NAMES[version], **{**SWIN_KW, **kw}).eval())
    if version == "v2":
        with torch.no_grad():
            for m in model.modules():
                if hasattr(m, "logit_scale"):
                    m.logit_scale.uniform_(0.5, 3.0)
        switch_on_res_post_norms(model, seed=1)
    return model


def _timm(family: str, names, build, size, geometry=()) -> list[Recipe]:
    """One recipe per name; the first is in the fast lane."""
    return [Recipe(family, n, (lambda n=n: (build(n), None)), size(n) if callable(size) else size,
                   fast=i == 0, geometry=n in geometry) for i, n in enumerate(names)]


#: the timm families' tiny models, by family (the adapter's ``family``)
TIMM: dict[str, list[Recipe]] = {
    "vit": _timm("vit", VIT_VARIANTS, make_vit_variant, (32, 32), VIT_GEOMETRY),
    "eva": _timm("eva", EVA_NAMES, make_eva, lambda n: (EVA_NAMES[n]["img_size"],) * 2, EVA_GEOMETRY),
    "beit": _timm("beit", BEIT_CONFIGS, make_beit, (64, 64), BEIT_GEOMETRY),
    "swin": [Recipe("swin", "v1", lambda: (make_swin("v1"), None), (64, 64), geometry=True)],
    "swinv2": [Recipe("swinv2", "v2", lambda: (make_swin("v2"), None), (64, 64), geometry=True)],
}


# -- transformers: from the families' own declarations ----------------------------------------------
def transformers_recipes() -> list[Recipe]:
    """One recipe per declared transformers class (and headless backbone + ``vl.with_head``).

    The first class of each family is in the fast lane (with the geometry check); the others
    run in ``make test``.
    """
    try:
        import transformers  # noqa: F401
    except ImportError:
        return []
    from vitlens.coverage import transformers_classes as hf_catalog
    from vitlens.models.registry import adapters

    family = {c.name: a.family for a in adapters() for c in getattr(a, "classes", ())}
    out, seen = [], set()
    for name in hf_catalog.classes():
        fam = "hf_headed" if name.endswith(hf_catalog.HEADED) else family[name]
        out.append(Recipe(fam, name.replace(hf_catalog.HEADED, "+head"), (lambda name=name: hf_catalog.build(name)),
                          (32, 32), fast=fam not in seen, geometry=fam not in seen,
                          conservation_tol=(1e-3, 1e-4) if fam in ("hf_swin", "hf_swinv2") else (1e-4, 1e-5)))
        seen.add(fam)
    return out


def recipes() -> list[Recipe]:
    """Every tiny model the contract tests check: the timm table, then the transformers declarations."""
    return [r for rs in TIMM.values() for r in rs] + transformers_recipes()
