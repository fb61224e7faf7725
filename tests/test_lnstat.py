"""lnstat's gradient-weighted reading (grad=True) against its definition (docs/METHODS.md §6)."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr
from conftest import make_swin, make_vit, random_images

import vitlens as vl


@pytest.fixture(scope="module")
def vit_cap():
    return vl.capture(make_vit(depth=3, seed=31), random_images(2, 32, seed=6))


@pytest.fixture(scope="module")
def swin_cap():
    return vl.capture(make_swin(seed=32), random_images(2, 64, seed=7))


def _with(cap: xr.DataTree, stage: str, **values) -> xr.DataTree:
    tree = cap.copy(deep=True)
    ds = tree[stage].to_dataset(inherit=False)
    for name, v in values.items():
        ds[name] = (ds[name].dims, np.asarray(v, dtype=ds[name].dtype))
    tree[stage] = xr.DataTree(ds)
    return tree


def _stat(std: np.ndarray, p: int) -> np.ndarray:
    """s_l: patch tokens scaled to max 1, prefix tokens 1 (stat="std", stat_norm="max")."""
    s = std.astype(np.float64).copy()
    s[p:] = s[p:] / s[p:].max()
    s[:p] = 1.0
    return s


def test_hand_computed_one_block_case(vit_cap):
    # one block; uniform attention 1/N; gradient g_j by key column, the same for every
    # head and query; statistic s_j. Then Ā[i, j] = g_j⁺/N and the CLS row of
    # (I + Ā·diag(s)) on the patches is g_j⁺·s_j/N.
    st = vit_cap["stage0"]
    b, nl, h, n, _ = st.attention.shape
    g = np.linspace(-1.0, 2.0, n)  # some negative: the clamp must cut them
    std = np.linspace(0.5, 3.0, n)[::-1].copy()
    att = np.full(st.attention.shape, 1.0 / n)
    grad = np.broadcast_to(g, st.attention_grad.shape).copy()
    ln = st.ln_std.values.copy()
    ln[:, 0, 0] = std  # block 0's norm1 input
    cap = _with(vit_cap, "stage0", attention=att, attention_grad=grad, ln_std=ln)
    got = vl.explain(cap, "lnstat", grad=True, layers=[0]).values[0].ravel()
    s = std[1:] / std[1:].max()
    want = np.clip(g[1:], 0, None) * s / n
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-12)
    assert (got[g[1:] <= 0] == 0).all() and got.max() > 0


def _dense_reference(cap: xr.DataTree, drop: bool = False) -> np.ndarray:
    """R ← R + Ā·diag(s)·R with dense global operators (Swin windows scattered), float64, read out."""
    stages = [cap[n] for n in sorted(cap.children, key=lambda n: int(n.removeprefix("stage")))]
    maps = []
    for i in range(cap["sample"].size):
        r = None
        base = None
        for k, st in reversed(list(enumerate(stages))):
            p = int(st.attrs["num_prefix_tokens"])
            gh, gw = (int(v) for v in st.attrs["grid"])
            n = p + gh * gw
            if r is None:
                r = np.zeros(n)
                if cap.attrs["readout"] == "cls":
                    r[0] = 1.0
                else:
                    r[p:] = 1.0 / (gh * gw)
                base = r.copy()
            for j in reversed(range(st.layer.size)):
                x = np.clip(st.attention_grad.values[i, j].astype(np.float64) * st.attention.values[i, j], 0, None)
                x = x.mean(0)  # heads
                if "window_token" in st:
                    wt = st.window_token.values[j]
                    dense = np.zeros((n, n))
                    for w in range(wt.shape[0]):
                        dense[np.ix_(wt[w], wt[w])] = x[w]
                else:
                    dense = x
                s = _stat(st.ln_std.values[i, j, 0], p)
                r = r @ (np.eye(n) + dense * s[None, :])
            if k > 0:
                r = np.repeat(np.repeat(r[p:].reshape(gh, gw), 2, 0), 2, 1).reshape(-1) / 4
                base = np.repeat(np.repeat(base[p:].reshape(gh, gw), 2, 0), 2, 1).reshape(-1) / 4
        p0 = int(stages[0].attrs["num_prefix_tokens"])
        maps.append((r - base if drop else r)[p0:])
    return np.stack(maps)


@pytest.mark.parametrize("which", ["vit", "swin"])
def test_matches_a_dense_reimplementation(which, vit_cap, swin_cap):
    cap = vit_cap if which == "vit" else swin_cap
    got = vl.explain(cap, "lnstat", grad=True, identity_path="keep")
    want = _dense_reference(cap)
    np.testing.assert_allclose(got.values.reshape(want.shape), want, rtol=1e-5, atol=1e-6 * np.abs(want).max())
    drop = vl.explain(cap, "lnstat", grad=True, identity_path="drop").values.reshape(want.shape)
    np.testing.assert_allclose(drop, _dense_reference(cap, drop=True), rtol=1e-5, atol=1e-6 * np.abs(want).max())
    assert got.attrs["grad"] == "true" and got.dtype == np.float64


@pytest.mark.parametrize("which", ["vit", "swin"])
def test_constant_statistic_reduces_to_generic_attention(which, vit_cap, swin_cap):
    cap = vit_cap if which == "vit" else swin_cap
    const = cap
    for stage in cap.children:
        const = _with(const, stage, ln_std=np.full(cap[stage].ln_std.shape, 0.3))
    for path in ("keep", "drop"):
        got = vl.explain(const, "lnstat", grad=True, identity_path=path).values
        want = vl.explain(cap, "generic_attention", identity_path=path).values
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-15)
    per = vl.explain(const, "lnstat", grad=True, per_layer=True, identity_path="keep").values
    np.testing.assert_allclose(per, vl.explain(cap, "generic_attention", per_layer=True, identity_path="keep").values,
                               rtol=1e-9)
    # the real statistic changes the map
    real = vl.explain(cap, "lnstat", grad=True, identity_path="drop").values
    assert not np.allclose(real, vl.explain(cap, "generic_attention", identity_path="drop").values, rtol=1e-2)


def test_swin_row_path_equals_dense_operators(swin_cap, monkeypatch):
    from vitlens.methods import maps, operators

    # both in float64: they agree far below the class-specific part (~1e-4 of the map here)
    kws = [(m, p) for m in ("uniform", "lrp") for p in ("keep", "drop")]
    fast = {kw: vl.explain(swin_cap, "lnstat", grad=True, merge=kw[0], identity_path=kw[1]).values for kw in kws}
    monkeypatch.setattr(maps, "propagate", operators.propagate_dense)
    for kw, values in fast.items():
        dense = vl.explain(swin_cap, "lnstat", grad=True, merge=kw[0], identity_path=kw[1]).values
        np.testing.assert_allclose(values, dense, rtol=1e-9, atol=1e-9 * np.abs(dense).max())


def test_grad_reading_is_class_specific_and_the_other_is_not():
    model = make_vit(depth=3, seed=33)
    img = random_images(1, 32, seed=9)
    cap = vl.capture(model, np.concatenate([img, img]), target=[0, 1])
    a, b = vl.normalize(vl.explain(cap, "lnstat", grad=True)).values
    assert np.abs(a - b).max() > 1e-4
    a, b = vl.explain(cap, "lnstat", grad=False).values
    np.testing.assert_allclose(a, b, rtol=1e-6)


@pytest.mark.parametrize("fusion", ["mean", "max", "entropy"])
def test_head_fusions_apply_to_the_gradient_weighted_attention(vit_cap, fusion):
    out = vl.explain(vit_cap, "lnstat", grad=True, head_fusion=fusion)
    assert out.attrs["head_fusion"] == fusion and np.isfinite(out.values).all() and (out.values >= 0).all()
    one = vl.explain(vit_cap, "lnstat", grad=True, head_fusion=fusion, heads=[1])
    mean_one = vl.explain(vit_cap, "lnstat", grad=True, head_fusion="mean", heads=[1])
    np.testing.assert_allclose(one.values, mean_one.values, rtol=1e-6)  # one head: every fusion is that head


def test_default_reading_comes_from_the_registry(vit_cap):
    info = vl.methods.METHOD_INFO["lnstat"]
    default = info.defaults_for(vit_cap)["grad"]
    assert vl.explain(vit_cap, "lnstat").attrs["grad"] == str(default).lower()
    assert vl.methods.lnstat(vit_cap).attrs["grad"] == str(default).lower()
    assert info.class_specific == default


def test_explorer_fusion_toggle_switches_to_the_gradient_weighted_reading():
    from vitlens.widgets import Explorer

    model = make_vit(depth=3, seed=34)
    cap = vl.capture(model, random_images(2, 32, seed=10))
    ex = Explorer(cap, model, layer=2)
    assert ex.fusion_grad.value is False and ex.fusion_grad.description == "gradient-weighted"

    def want(**kw):
        m = vl.explain(cap, "lnstat", layers=range(3), **kw).isel(sample=0).values
        return (m - m.min()) / (m.max() - m.min())

    np.testing.assert_allclose(ex.panel_maps()["fusion"], want(grad=False), atol=2e-5)
    ex.fusion_grad.value = True
    np.testing.assert_allclose(ex.panel_maps()["fusion"], want(grad=True), atol=2e-5)
    assert "gradient-weighted" in ex.captions.value and "(grad)" in ex.figure.layout.annotations[2].text
    # class-specific: another class recaptures and changes the fusion panel
    before = ex.panel_maps()["fusion"].copy()
    ex.class_select.value = [c for _, c in ex.class_select.options if c != ex.target][0]
    recap = vl.capture(model, cap.image.isel(sample=[0]).values, target=ex.target)
    m = vl.explain(recap, "lnstat", grad=True, layers=range(3)).isel(sample=0).values
    np.testing.assert_allclose(ex.panel_maps()["fusion"], (m - m.min()) / (m.max() - m.min()), atol=2e-5)
    assert not np.allclose(before, ex.panel_maps()["fusion"], atol=1e-3)


def test_results_section_is_spliced_without_touching_the_rest(tmp_path):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import make_results

    path = tmp_path / "RESULTS.md"
    path.write_text("# head\n\n## Explanation quality\n\ntables\n\n## Cost\n\ncost rows\n", encoding="utf-8")
    first = [make_results.CLAIM_START, "## claim", "one", make_results.CLAIM_END]
    make_results.splice_claim(path, first)
    text = path.read_text(encoding="utf-8")
    assert text.index("tables") < text.index("## claim") < text.index("## Cost") and "cost rows" in text
    make_results.splice_claim(path, [make_results.CLAIM_START, "## claim", "two", make_results.CLAIM_END])
    again = path.read_text(encoding="utf-8")
    assert "two" in again and "\none\n" not in again and again.count("## claim") == 1
    assert again.replace("two", "one") == text
    # the cost section: a file from before its markers has its old one replaced, nothing else
    cost = [make_results.COST_START, "## Cost", "", "new rows", make_results.COST_END]
    make_results.splice(path, cost, make_results.COST_START, make_results.COST_END, replaces="\n## Cost")
    spliced = path.read_text(encoding="utf-8")
    assert "cost rows" not in spliced and spliced.count("## Cost") == 1 and "new rows" in spliced
    assert spliced.split(make_results.COST_START)[0] == again.split("## Cost")[0]
    make_results.splice(path, [*cost[:3], "newer rows", cost[-1]], make_results.COST_START, make_results.COST_END,
                        replaces="\n## Cost")
    assert path.read_text(encoding="utf-8") == spliced.replace("new rows", "newer rows")
