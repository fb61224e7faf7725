"""The precision of the αβ LRP pass (#30.7): ``lrp_dtype="float64"`` and the recorded conditioning."""

from __future__ import annotations

import html
import warnings

import numpy as np
import pytest
import torch

import vitlens as vl
from vitlens.capture import precision
from vitlens.models.lrp_rules import conditioning, residual_add

from conftest import make_swin, make_vit, random_images
from test_attnlrp import _spread

KEEP = ["attention", "attention_grad", "attention_relevance"]


@pytest.mark.parametrize("build", [lambda: _spread(make_vit(depth=3)), make_swin], ids=["vit", "swin"])
def test_a_float64_lrp_pass_leaves_the_model_as_it_was_and_agrees_where_float32_is_well_conditioned(build):
    model = build()
    size = vl.models.adapter_for(model).input_size[0]
    images = random_images(3, size, seed=6)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    single = vl.capture(model, images, target=1, keep=KEEP)
    double = vl.capture(model, images, target=1, keep=KEEP, lrp_dtype="float64")
    for k, v in model.state_dict().items():
        assert v.dtype == before[k].dtype and torch.equal(v, before[k]), k
    assert "lrp_dtype" not in single.attrs["options"] and '"lrp_dtype": "float64"' in double.attrs["options"]
    np.testing.assert_allclose(double["stage0"]["attention"].values, single["stage0"]["attention"].values, atol=1e-6)
    assert (single["lrp_condition"].values >= precision.RELIABLE_CONDITION).all()  # well conditioned here
    np.testing.assert_allclose(double["lrp_condition"].values, single["lrp_condition"].values, rtol=1e-3)
    a = vl.explain(single, "transformer_attribution")
    b = vl.explain(double, "transformer_attribution")
    for p, q in zip(a.values, b.values):
        assert np.corrcoef(p.ravel(), q.ravel())[0, 1] > 0.9999
    assert a.attrs["lrp_dtype"] == "float32" and b.attrs["lrp_dtype"] == "float64"
    np.testing.assert_array_equal(a["lrp_condition"].values, single["lrp_condition"].values)
    with pytest.raises(vl.OptionError, match="lrp_dtype"):
        vl.capture(model, images, lrp_dtype="float16")


def test_the_conditioning_says_how_much_float32_rounding_a_residual_rescaling_amplifies():
    """A branch whose raw relevance nearly cancels: its rescaled relevance in float32 is off from
    float64 by about eps/condition — small where the condition is near 1, large near 0."""
    rng = np.random.default_rng(0)
    errors = {}
    for cancel in (0.5, 1e-3, 1e-6):
        a = rng.standard_normal((1, 4096))
        a -= a.mean() * (1 - cancel)  # the raw shares of branch a (a·R/(a+b) with R = a + b) nearly cancel
        a[0, 0] += cancel * np.abs(a).sum()
        b = rng.standard_normal((1, 4096))
        r = a + b
        with conditioning() as seen:
            r64 = residual_add(*(torch.from_numpy(t) for t in (a, b, r)))[0]
        r32 = residual_add(*(torch.from_numpy(t).float() for t in (a, b, r)))[0]
        cond = float(seen[0][0])
        errors[cond] = float((r32.double() - r64).abs().max() / r64.abs().max())
    conds = sorted(errors)
    assert conds[0] < 1e-5 < 0.01 < conds[-1]
    assert errors[conds[-1]] < 1e-5 < errors[conds[0]]  # the small condition is where float32 goes wrong
    assert errors[conds[0]] > 100 * errors[conds[-1]]


def test_explain_marks_and_warns_about_samples_whose_float32_map_depends_on_rounding(vit, images32, monkeypatch):
    cap = vl.capture(vit, images32[:3], target=2, keep=KEEP)
    condition = cap["lrp_condition"].values
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # well conditioned at the real threshold: no warning
        assert vl.explain(cap, "transformer_attribution").attrs["lrp_unreliable"] == []
    monkeypatch.setattr(precision, "RELIABLE_CONDITION", float(np.median(condition)) * 1.0001)
    worst = [int(s) for s in cap["sample"].values[condition < np.median(condition) * 1.0001]]
    with pytest.warns(vl.PrecisionWarning, match=r"lrp_dtype='float64'"):
        out = vl.explain(cap, "transformer_attribution")
    assert out.attrs["lrp_unreliable"] == worst and len(worst) == 2
    double = vl.capture(vit, images32[:3], target=2, keep=KEEP, lrp_dtype="float64")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a float64 pass is never flagged
        assert vl.explain(double, "transformer_attribution").attrs["lrp_unreliable"] == []


def test_the_explorer_and_compare_say_where_the_float32_lrp_map_is_unreliable(vit, images32, monkeypatch):
    cap = vl.capture(vit, images32[:2], target=2)
    ex = vl.Explorer(cap, method="transformer_attribution")
    assert "lrp_dtype" not in ex.captions.value
    condition = cap["lrp_condition"].values
    monkeypatch.setattr(precision, "RELIABLE_CONDITION", float(condition[1]) * 1.0001)  # sample 1 only
    flagged = [i for i in (0, 1) if condition[i] < condition[1] * 1.0001]
    for sample in (0, 1):
        ex = vl.Explorer(cap, method="transformer_attribution", sample=sample)
        assert ("lrp_dtype='float64'" in html.unescape(ex.captions.value)) == (sample in flagged)
        cmp = vl.Compare(cap, sample=sample)
        assert ("lrp_dtype='float64'" in html.unescape(cmp.captions.value)) == (sample in flagged)
    ex = vl.Explorer(cap, method="rollout", sample=flagged[0])  # a map that does not read the LRP relevance
    assert "lrp_dtype" not in ex.captions.value
