"""The contract every registered model family keeps, generated from the adapter registry.

As timm's tests are parametrized over its model registry, these are parametrized over
:func:`vitlens.models.registry.adapters`: every registered family, on the tiny random
models ``tests/family_models.py`` lists for it (timm families: one table; transformers
families: their own class declarations). Registering a family adds its tests; a family
without tiny models fails the first test. What each check compares against is
independent of the adapter's hooks: the model's own probabilities, plain autograd, a
relevance total, the model's state before the capture, pixels lit by hand.

Family-specific checks (attention recomputed by hand from timm's modules, read-out pools,
padded Swin windows, transformers against timm on the same weights) stay in
``test_family_<name>.py``, ``test_swin_padded.py`` and ``test_hf_*.py``.
"""

from __future__ import annotations

import dataclasses
from functools import cache

import numpy as np
import pytest
import torch
from family_checks import (
    assert_all_maps_finite,
    assert_attention_grads_equal_autograd,
    assert_conserved,
    assert_geometry,
    assert_parts_describe_the_attention,
    assert_state_restored,
    assert_targets_differ,
)
from family_models import Recipe, images, recipes

import vitlens as vl
from vitlens.models import registry

RECIPES = recipes()


def _params(rs: list[Recipe]) -> list:
    return [pytest.param(r, id=r.id, marks=() if r.fast else pytest.mark.slow) for r in rs]


@cache
def built(recipe: Recipe) -> tuple[torch.nn.Module, torch.Tensor | None]:
    """The recipe's model and prompts, built once per session."""
    return recipe.build()


@cache
def captured(recipe: Recipe):
    model, text = built(recipe)
    return vl.capture(model, images(recipe.size), text=text)


def _pixels(recipe: Recipe, seed: int) -> torch.Tensor:
    return torch.randn(2, 3, *recipe.size, generator=torch.Generator().manual_seed(seed))


def test_every_registered_family_has_tiny_models():
    have = {r.family for r in RECIPES}
    missing = [a.family for a in registry.adapters() if a.family not in have]
    assert not missing, f"registered families without tiny models: {missing}; add recipes to tests/family_models.py"
    assert len({r.id for r in RECIPES}) == len(RECIPES)


@pytest.mark.parametrize("recipe", _params(RECIPES))
def test_capture_layout_tiles_the_input(recipe):
    """The family that explains the model is the one it is listed under; every stage's token grid
    at its stride covers the input (less than one token over), prefix tokens come first, and in
    every windowed block each real token sits in exactly one window position."""
    cap = captured(recipe)
    assert cap.attrs["family"] == recipe.family
    h, w = recipe.size
    for name in cap.children:
        st = cap[name]
        (gh, gw), (sy, sx) = st.attrs["grid"], st.attrs["stride"]
        assert gh * sy >= h > (gh - 1) * sy and gw * sx >= w > (gw - 1) * sx, (name, (gh, gw), (sy, sx))
        kinds = st["kind"].values
        prefix = int(st.attrs["num_prefix_tokens"])
        assert (kinds[:prefix] != "patch").all() and (kinds[prefix:] == "patch").all() and kinds.size == prefix + gh * gw
        patch = kinds == "patch"
        np.testing.assert_allclose(st["center_y"].values[patch], (st["row"].values[patch] + 0.5) * sy)
        np.testing.assert_allclose(st["center_x"].values[patch], (st["col"].values[patch] + 0.5) * sx)
        if "window_token" in st:
            for layer_tokens in st["window_token"].values:
                real = layer_tokens[layer_tokens >= 0]
                assert sorted(real.tolist()) == list(range(gh * gw)), name


@pytest.mark.parametrize("recipe", _params(RECIPES))
def test_parts_reproduce_the_attention(recipe):
    model, text = built(recipe)
    assert_parts_describe_the_attention(model, _pixels(recipe, 0), text)


@pytest.mark.parametrize("recipe", _params(RECIPES))
def test_attention_grad_equals_autograd(recipe):
    model, text = built(recipe)
    assert_attention_grads_equal_autograd(model, _pixels(recipe, 0), [1, 0], text)


@pytest.mark.parametrize("recipe", _params(RECIPES))
def test_lrp_conserves_block_by_block_and_through_the_readout_without_biases(recipe):
    model, text = built(recipe)
    rtol, atol = recipe.conservation_tol
    assert_conserved(model, _pixels(recipe, 0), text, rtol=rtol, atol=atol)


@pytest.mark.parametrize("recipe", _params(RECIPES))
def test_all_maps_finite_and_state_restored(recipe):
    model, text = built(recipe)
    assert_all_maps_finite(captured(recipe))
    assert_state_restored(model, images(recipe.size, 1), text)


@pytest.mark.parametrize("recipe", _params(RECIPES))
def test_class_specific_maps_differ_between_targets(recipe):
    model, text = built(recipe)  # random init (the shipped trained models are checked in test_methods.py)
    assert_targets_differ(model, recipe.size, text)


@pytest.mark.parametrize("recipe", _params([r for r in RECIPES if r.geometry]))
def test_a_bright_token_cell_lights_its_token_and_pixels(recipe):
    model, text = built(recipe)
    assert_geometry(model, recipe.size, text)


# -- the contract catches a broken family -------------------------------------------------------
def _vit(name: str = "qk_norm"):
    return built(next(r for r in RECIPES if r.id == f"vit-{name}"))[0]


@pytest.mark.parametrize("wrong", ["scale", "q_norm"])
def test_a_wrong_attention_description_fails_the_contract(monkeypatch, wrong):
    """One family describing its attention wrongly (a scale off, a q norm forgotten) is caught."""
    from torch import nn

    from vitlens.models.families import vit as vit_family

    model, x = _vit(), torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert_parts_describe_the_attention(model, x)
    described = vit_family.vit_block_part

    def broken(block, where):
        part = described(block, where)
        attn = (dataclasses.replace(part.attn, scale=part.attn.scale * 1.5) if wrong == "scale"
                else dataclasses.replace(part.attn, q_norm=nn.Identity()))
        return dataclasses.replace(part, attn=attn)

    monkeypatch.setattr(vit_family, "vit_block_part", broken)
    with pytest.raises(AssertionError, match="block 0"):
        assert_parts_describe_the_attention(model, x)


def test_a_wrong_token_stride_fails_the_geometry_contract(monkeypatch):
    from vitlens.models.families import vit as vit_family

    model = _vit("layerscale")
    assert_geometry(model, (32, 32))
    monkeypatch.setattr(vit_family, "token_stride", lambda m, grid: (4, 4))  # half the real 8 px
    with pytest.raises(AssertionError):
        assert_geometry(model, (32, 32))
