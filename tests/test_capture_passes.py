"""A capture pays only for what is asked (#30.4): each request runs the passes its groups need,
and a map from such a capture is the map of a full capture."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import random_images

import vitlens as vl
from vitlens.capture import hooks, reduced, relevance
from vitlens.capture.api import EXTRA_GROUPS, GROUP_PASSES
from vitlens.registry import METHOD_INFO


@pytest.fixture
def passes(monkeypatch):
    """The passes the next captures run: ``backward`` (autograd calls), ``lrp`` (relevance walks),
    and whether the Recorder kept what only the LRP pass reads (block inputs)."""
    ran: list[str] = []
    grad, walk, enter = torch.autograd.grad, relevance.attention_relevance, hooks.Recorder.__enter__

    def counted_grad(*args, **kwargs):
        ran.append("backward")
        return grad(*args, **kwargs)

    def counted_walk(*args, **kwargs):
        ran.append("lrp")
        return walk(*args, **kwargs)

    def checked_enter(self):
        if self.keep_block_inputs:
            ran.append("block inputs kept")
        return enter(self)

    monkeypatch.setattr(torch.autograd, "grad", counted_grad)
    monkeypatch.setattr(relevance, "attention_relevance", counted_walk)
    monkeypatch.setattr(hooks.Recorder, "__enter__", checked_enter)
    return ran


@pytest.mark.parametrize("request_, expected", [
    (dict(keep=["attention"]), []),
    (dict(keep=["attention", "ln", "norms"]), []),
    (dict(keep=["attention", "attention_grad"]), ["backward"]),
    (dict(keep=["features"]), ["backward"]),
    (dict(keep=["attention_relevance"]), ["lrp", "block inputs kept"]),
    (dict(keep="all"), ["backward", "lrp", "block inputs kept"]),
    (dict(keep="all", grads=False), []),
], ids=["attention", "attention+tokens", "gradients", "features", "relevance", "all", "no-grads"])
def test_a_capture_runs_only_the_passes_its_groups_need(passes, vit, request_, expected):
    imgs = random_images(4, 32)
    vl.capture(vit, imgs, batch_size=2, progress=False, **request_)
    assert sorted(set(passes)) == sorted(expected)
    assert passes.count("backward") in (0, 2) and passes.count("lrp") in (0, 2)  # once per batch


MODELS = {"vit": 32, "swin": 64, "vit_avg": 32}
CASES = [(which, name, {}) for which in MODELS for name in METHOD_INFO] + [
    ("swin", name, {"merge": "lrp"}) for name in METHOD_INFO if "merge" in METHOD_INFO[name].options()]


@pytest.fixture(scope="module")
def full_captures(request):
    """One full capture per model, shared by the cases below."""
    cache = {}

    def full(which, fused=True):
        if (which, fused) not in cache:
            model = request.getfixturevalue(which)
            images = random_images(2, MODELS[which], seed=5)
            saved, hooks.FUSED_ATTENTION = hooks.FUSED_ATTENTION, fused
            try:  # every group, the extra passes (AttnLRP, LeGrad) too
                cap = vl.capture(model, images, progress=False, keep=("all", *vl.methods.extra_groups()))
            finally:
                hooks.FUSED_ATTENTION = saved
            cache[which, fused] = model, images, cap
        return cache[which, fused]

    return full


@pytest.mark.parametrize("which, method, options", CASES, ids=[f"{w}-{m}{'-lrp' if o else ''}" for w, m, o in CASES])
def test_a_capture_of_the_groups_a_method_needs_gives_the_full_capture_map(full_captures, which, method, options):
    """Every registered method's ``needs`` is complete: its map from a capture of exactly those
    groups (fewer passes) equals its map from a full capture, bit for bit. A capture that runs no
    pass after its forward takes the probabilities from the model's explicit attention (a full
    capture runs the fused kernel and computes them again): it equals a full capture on that path."""
    model, images, full = full_captures(which)
    groups = METHOD_INFO[method].groups(full.attrs, options)
    assert groups < set(vl.KEEP_GROUPS) | set(EXTRA_GROUPS)
    if not set().union(*(GROUP_PASSES[g] for g in groups)):
        model, images, full = full_captures(which, fused=False)
    part = vl.capture(model, images, keep=sorted(groups), progress=False)
    want = vl.explain(full, method, **options)
    got = vl.explain(part, method, **options)
    np.testing.assert_array_equal(got.values, want.values)
    assert got.attrs == want.attrs


def test_rollout_with_lrp_merge_shares_runs_the_lrp_pass_without_a_backward_pass(passes, swin):
    groups = METHOD_INFO["rollout"].groups({"family": "swin", "readout": "avg"}, {"merge": "lrp"})
    assert groups == {"attention", "attention_relevance"}
    cap = vl.capture(swin, random_images(2, 64), keep=sorted(groups), progress=False)
    assert "merge_share" in cap["stage0"] and set(passes) == {"lrp", "block inputs kept"}


def test_every_capture_group_says_which_passes_record_it():
    from vitlens.capture.api import EXTRA_GROUPS, GROUP_PASSES

    assert set(GROUP_PASSES) == set(vl.KEEP_GROUPS) | set(EXTRA_GROUPS)
    assert set().union(*GROUP_PASSES.values()) == {"backward", "lrp", "ablations", "attnlrp", "attnlrp_cp", "legrad"}
    assert set(reduced.GROUP_VARS) == set(GROUP_PASSES)  # where each group's variables are kept or dropped


def test_an_inference_mode_model_is_captured_when_no_backward_pass_is_asked(vit):
    from conftest import make_vit

    with torch.inference_mode():
        frozen = make_vit()  # the fixture's seed: the same weights, as inference tensors
    imgs = random_images(2, 32)
    got = vl.capture(frozen, imgs, keep=["attention", "ln"], progress=False)
    want = vl.capture(vit, imgs, keep=["attention", "ln"], progress=False)
    np.testing.assert_array_equal(got["stage0"].attention.values, want["stage0"].attention.values)
    with pytest.raises(vl.ModelLoadError, match="inference_mode"):
        vl.capture(frozen, imgs, keep=["attention_grad"], progress=False)


def test_the_extra_passes_run_only_when_named(passes, vit):
    """AttnLRP's and LeGrad's passes are not part of "all": a capture pays for them only when asked."""
    imgs = random_images(2, 32)
    cap = vl.capture(vit, imgs, progress=False)
    assert "attnlrp_cp_relevance" not in cap["stage0"] and "legrad_mean" not in cap["stage0"]
    assert passes.count("backward") == 1
    passes.clear()
    cap = vl.capture(vit, imgs, progress=False, keep=["attnlrp_cp"])
    assert list(cap["stage0"].data_vars) == ["attnlrp_cp_relevance"] and passes == ["backward"]  # its own, no other


@pytest.mark.parametrize("keep, stats, cosines", [
    (["attention"], False, False),
    (["attention", "ln"], True, False),
    (["attention", "norms"], False, True),
    ("all", True, True),
], ids=["attention", "ln", "norms", "all"])
def test_the_per_token_records_are_computed_only_when_kept(monkeypatch, vit, keep, stats, cosines):
    """The LayerNorm statistics (``ln``) and the token norms and value path (``norms``, a matmul
    per block) are computed in the hooks only for a capture that keeps them (#30.5)."""
    calls = {"stats": 0, "cosines": 0}
    token_stats, cosine = hooks._token_stats, hooks._cosine

    def counted_stats(*args):
        calls["stats"] += 1
        return token_stats(*args)

    def counted_cosine(*args):
        calls["cosines"] += 1
        return cosine(*args)

    monkeypatch.setattr(hooks, "_token_stats", counted_stats)
    monkeypatch.setattr(hooks, "_cosine", counted_cosine)
    cap = vl.capture(vit, random_images(2, 32), keep=keep, progress=False)
    assert (calls["stats"] > 0, calls["cosines"] > 0) == (stats, cosines)
    assert ("ln_mean" in cap["stage0"]) == stats and ("attn_value_cos" in cap["stage0"]) == cosines
