"""Capture: shapes, coordinates, values against independent recomputation, state restored."""

from __future__ import annotations


import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import make_swin, make_vit, random_images
from family_checks import assert_attention_grads_equal_autograd, swin_attention_by_hand

import vitlens as vl


def _normalise(images: np.ndarray, model) -> torch.Tensor:
    cfg = timm.data.resolve_data_config({}, model=model)
    mean = torch.tensor(cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(cfg["std"]).view(1, 3, 1, 1)
    return (torch.from_numpy(images).permute(0, 3, 1, 2) - mean) / std


# -- layout ------------------------------------------------------------------------
def test_vit_capture_has_the_documented_layout(vit, images32):
    cap = vl.capture(vit, images32)
    assert set(cap.children) == {"stage0"}
    assert cap.image.dims == ("sample", "y", "x", "channel")
    assert cap.image.shape == (3, 32, 32, 3)
    assert cap.logits.dims == ("sample", "class") and cap.logits.shape == (3, 5)
    assert cap.target.values.tolist() == cap.logits.argmax("class").values.tolist()
    st = cap["stage0"]
    assert st.attention.dims == ("sample", "layer", "head", "query", "key")
    assert st.attention.shape == (3, 3, 3, 17, 17)
    assert st.attention_grad.dims == st.attention.dims
    assert st.attention_relevance.dims == st.attention.dims
    assert st.ln_mean.dims == ("sample", "layer", "norm", "token")
    assert st.ln_std.sel(norm="norm2").shape == (3, 3, 17)
    for var in ("token_norm", "attn_value_norm", "attn_value_cos", "mlp_cos", "block_out_norm"):
        assert st[var].dims == ("sample", "layer", "token"), var
    assert st.features.dims == ("sample", "token", "feature")
    assert st.kind.values.tolist() == ["cls"] + ["patch"] * 16
    assert st.row.values.tolist() == [-1] + [r for r in range(4) for _ in range(4)]
    assert st.col.values.tolist() == [-1] + list(range(4)) * 4
    assert st.center_y.values[1:5].tolist() == [4.0] * 4 and st.center_x.values[1:5].tolist() == [4, 12, 20, 28]
    assert st.layer.values.tolist() == [0, 1, 2]
    attrs = cap.attrs
    assert attrs["family"] == "vit" and attrs["patch_size"] == [8, 8] and attrs["input_size"] == [3, 32, 32]
    assert attrs["class_names"] == ["0", "1", "2", "3", "4"] and attrs["vitlens_version"] == vl.__version__
    assert "grads" in attrs["options"]


def test_prefix_token_kinds_for_deit_registers_and_avg_pool(deit_distilled, vit_registers, vit_avg, images32):
    kinds = lambda m: vl.capture(m, images32[:1])["stage0"].kind.values.tolist()  # noqa: E731
    assert kinds(deit_distilled)[:3] == ["cls", "dist", "patch"]
    assert kinds(vit_registers)[:4] == ["cls", "register", "register", "patch"]
    cap = vl.capture(vit_avg, images32[:1])
    assert cap["stage0"].kind.values.tolist() == ["patch"] * 16 and cap.attrs["readout"] == "avg"


def test_swin_capture_has_one_node_per_stage_with_windows(swin, images64):
    cap = vl.capture(swin, images64)
    assert set(cap.children) == {"stage0", "stage1"}
    s0, s1 = cap["stage0"], cap["stage1"]
    assert s0.attention.dims == ("sample", "layer", "head", "window", "query", "key")
    assert s0.attention.shape == (2, 2, 2, 16, 16, 16)
    assert s1.attention.shape == (2, 2, 4, 4, 16, 16)
    assert s1.layer.values.tolist() == [2, 3]  # global block index
    assert s0.attrs["shift_size"] == [[0, 0], [2, 2]] and s0.attrs["grid"] == [16, 16]
    assert s0.token.size == 256 and s1.token.size == 64
    assert s1.center_y.values[0] == 4.0 and s0.center_y.values[0] == 2.0
    # unshifted windows tile the grid; shifted ones are a permutation of it
    wt = s0.window_token
    assert sorted(wt.sel(layer=1).values.ravel().tolist()) == list(range(256))
    assert wt.sel(layer=0, window=0).values.tolist()[:5] == [0, 1, 2, 3, 16]
    assert "features" in s1 and "features" not in s0


@pytest.mark.parametrize("which", ["vit", "swin"])
def test_attention_rows_sum_to_one(which, vit, swin, images32, images64):
    cap = vl.capture(vit, images32) if which == "vit" else vl.capture(swin, images64)
    for node in cap.children.values():
        np.testing.assert_allclose(node.attention.sum("key").values, 1.0, atol=1e-5)


# -- values against independent recomputation ----------------------------------------
def _vit_attention_by_hand(model, x):
    """Attention of every block, recomputed from the block's own q/k projections."""
    out = []
    with torch.no_grad():
        h = model.norm_pre(model._pos_embed(model.patch_embed(x)))
        for blk in model.blocks:
            a = blk.attn
            t = blk.norm1(h)
            b, n, c = t.shape
            qkv = t @ a.qkv.weight.T + a.qkv.bias
            q, k, _ = qkv.reshape(b, n, 3, a.num_heads, c // a.num_heads).permute(2, 0, 3, 1, 4)
            out.append(torch.softmax(q @ k.transpose(-1, -2) / (c // a.num_heads) ** 0.5, -1))
            h = blk(h)
    return torch.stack(out, 1)


def test_vit_attention_equals_recomputation_from_q_and_k(vit, images32):
    cap = vl.capture(vit, images32)
    expected = _vit_attention_by_hand(vit, _normalise(images32, vit))
    np.testing.assert_allclose(cap["stage0"].attention.values, expected.numpy(), atol=1e-5)


def _swin_attention_by_hand(model, x):
    from timm.models.swin_transformer import window_partition

    def logits(a, win):  # scaled dot products plus the relative position bias
        bw, n, _ = win.shape
        q, k, _ = (win @ a.qkv.weight.T + a.qkv.bias).reshape(bw, n, 3, a.num_heads, -1).permute(2, 0, 3, 1, 4)
        return q @ k.transpose(-1, -2) * a.scale + a._get_rel_pos_bias()

    return swin_attention_by_hand(model, x, window_partition, logits, pre_norm=True)


def test_swin_attention_equals_recomputation_with_shifted_windows(swin, images64):
    cap = vl.capture(swin, images64)
    expected = _swin_attention_by_hand(swin, _normalise(images64, swin))
    got = [cap["stage0"].attention.values[:, i] for i in range(2)] + [cap["stage1"].attention.values[:, i] for i in range(2)]
    for e, g in zip(expected, got):
        np.testing.assert_allclose(g, e.numpy(), atol=1e-5)


def test_vit_attention_grad_equals_autograd_on_an_explicit_forward(vit, images32):
    assert_attention_grads_equal_autograd(vit, _normalise(images32, vit), [0, 3, 1])


def test_swin_attention_grad_equals_autograd_on_an_explicit_forward(swin, images64):
    assert_attention_grads_equal_autograd(swin, _normalise(images64, swin), [2, 2])


def test_layernorm_statistics_and_token_norms_match_the_block_inputs(vit, images32):
    cap = vl.capture(vit, images32)
    x = _normalise(images32, vit)
    with torch.no_grad():
        h = vit.norm_pre(vit._pos_embed(vit.patch_embed(x)))
        blk = vit.blocks[0]
        a = blk.attn
        v = blk.norm1(h) @ a.qkv.weight[96:].T + a.qkv.bias[96:]
        t = v @ a.proj.weight.T
        h2 = h + blk.attn(blk.norm1(h))
        f = blk.mlp(blk.norm2(h2))
    st = cap["stage0"].sel(layer=0)
    np.testing.assert_allclose(st.ln_mean.sel(norm="norm1").values, h.mean(-1).numpy(), atol=1e-6)
    np.testing.assert_allclose(st.ln_std.sel(norm="norm1").values, h.std(-1, unbiased=False).numpy(), atol=1e-6)
    np.testing.assert_allclose(st.ln_std.sel(norm="norm2").values, h2.std(-1, unbiased=False).numpy(), atol=1e-5)
    np.testing.assert_allclose(st.token_norm.values, h.norm(dim=-1).numpy(), rtol=1e-5)
    np.testing.assert_allclose(st.attn_value_norm.values, t.norm(dim=-1).numpy(), rtol=1e-5)
    np.testing.assert_allclose(st.attn_value_cos.values, F.cosine_similarity(t, h, dim=-1).numpy(), atol=1e-5)
    np.testing.assert_allclose(st.attn_out_norm.values, (h2 - h).norm(dim=-1).numpy(), rtol=1e-4)
    np.testing.assert_allclose(st.mlp_out_norm.values, f.norm(dim=-1).numpy(), rtol=1e-5)
    np.testing.assert_allclose(st.mlp_cos.values, F.cosine_similarity(f, h2, dim=-1).numpy(), atol=1e-5)
    np.testing.assert_allclose(st.block_out_norm.values, (h2 + f).norm(dim=-1).numpy(), rtol=1e-5)


def test_features_gradient_equals_autograd(vit, images32):
    """ViT Grad-CAM features: the last block's norm1 output and its gradient."""
    cap = vl.capture(vit, images32, target=1)
    x = _normalise(images32, vit)
    h = vit.norm_pre(vit._pos_embed(vit.patch_embed(x)))
    for blk in vit.blocks[:-1]:
        h = blk(h)
    last = vit.blocks[-1]
    t = last.norm1(h).detach().requires_grad_(True)
    x2 = h + last.ls1(last.attn(t))
    out = x2 + last.ls2(last.mlp(last.norm2(x2)))
    vit.forward_head(vit.norm(out))[:, 1].sum().backward()
    np.testing.assert_allclose(cap["stage0"].features.values, t.detach().numpy(), atol=1e-5)
    np.testing.assert_allclose(cap["stage0"].features_grad.values, t.grad.numpy(), atol=1e-6)


def test_swin_features_are_the_final_norm_output_with_gradient(swin, images64):
    cap = vl.capture(swin, images64, target=3)
    feats = swin.forward_features(_normalise(images64, swin)).detach().requires_grad_(True)
    swin.forward_head(feats)[:, 3].sum().backward()
    np.testing.assert_allclose(cap["stage1"].features.values, feats.detach().flatten(1, 2).numpy(), atol=1e-5)
    np.testing.assert_allclose(cap["stage1"].features_grad.values, feats.grad.flatten(1, 2).numpy(), atol=1e-6)


# -- batches, options, state --------------------------------------------------------
@pytest.mark.parametrize("which", ["vit", pytest.param("swin", marks=pytest.mark.slow)])
def test_batch_capture_equals_single_image_captures(which, vit, swin):
    model = vit if which == "vit" else swin
    size = 32 if which == "vit" else 64
    imgs = random_images(3, size, seed=5)
    together = vl.capture(model, imgs, batch_size=2)  # two batches of unequal size
    for i in range(3):
        alone = vl.capture(model, imgs[i : i + 1])
        for path, node in together.subtree_with_keys:
            for name, var in node.to_dataset(inherit=False).data_vars.items():
                if "sample" in var.dims:
                    np.testing.assert_allclose(
                        var.isel(sample=i).values, alone[path][name].isel(sample=0).values,
                        rtol=1e-4, atol=1e-6, err_msg=f"{path}/{name}",
                    )


def test_keep_grads_and_dtype_bound_what_is_stored(vit, images32):
    cap = vl.capture(vit, images32, keep=["attention", "ln"], dtype="float16")
    st = cap["stage0"]
    assert set(st.data_vars) == {"attention", "ln_mean", "ln_std"}
    assert st.attention.dtype == np.float16
    cap = vl.capture(vit, images32, grads=False)
    assert "attention_grad" not in cap["stage0"] and "attention_relevance" not in cap["stage0"]
    assert "features_grad" not in cap["stage0"] and "attention" in cap["stage0"]


def _model_state(model):
    return (
        [(n, m.training) for n, m in model.named_modules()],
        [m.fused_attn for m in model.modules() if hasattr(m, "fused_attn")],
        [(len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks)) for m in model.modules()],
        [(n, p.requires_grad, p.grad) for n, p in model.named_parameters()],
    )


@pytest.mark.parametrize("which", ["vit", "swin"])
def test_capture_leaves_the_model_exactly_as_it_was(which):
    model = make_vit() if which == "vit" else make_swin()
    model.train()
    for m in model.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = True
    model.patch_embed.proj.weight.requires_grad_(False)
    before = _model_state(model)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    vl.capture(model, random_images(2, 32 if which == "vit" else 64))
    assert _model_state(model) == before
    for k, v in model.state_dict().items():
        assert torch.equal(v, weights[k]), k


def test_capture_restores_the_model_after_an_exception():
    model = make_vit()
    model.train()
    before = _model_state(model)

    def explode(module, inputs, output):
        raise RuntimeError("boom")

    handle = model.blocks[1].register_forward_hook(explode)
    with pytest.raises(RuntimeError, match="boom"):
        vl.capture(model, random_images(1, 32))
    handle.remove()
    assert _model_state(model) == before


def test_capture_inside_no_grad_still_records_gradients(vit, images32):
    with torch.no_grad():
        cap = vl.capture(vit, images32)
    assert float(abs(cap["stage0"].attention_grad).sum()) > 0


# -- inputs and targets -------------------------------------------------------------
@pytest.mark.slow  # five input forms, each captured
def test_image_inputs_in_every_form_give_the_same_capture(vit, tmp_path):
    from PIL import Image

    arr = (random_images(2, 32, seed=9) * 255).round().astype(np.uint8)
    paths = []
    for i, a in enumerate(arr):
        p = tmp_path / f"im{i}.png"
        Image.fromarray(a).save(p)
        paths.append(str(p))
    import xarray as xr

    reference = vl.capture(vit, arr.astype(np.float32) / 255)["stage0"].attention.values
    forms = [
        arr,
        list(arr),
        paths,
        [Image.fromarray(a) for a in arr],
        xr.DataArray(arr.astype(np.float32) / 255, dims=("sample", "y", "x", "channel")),
        _normalise(arr.astype(np.float32) / 255, vit),
    ]
    for form in forms:
        got = vl.capture(vit, form)["stage0"].attention.values
        np.testing.assert_allclose(got, reference, atol=1e-5)
    single = vl.capture(vit, paths[0])
    assert single.image.shape == (1, 32, 32, 3)
    np.testing.assert_allclose(single.image.values[0], arr[0] / 255, atol=1e-6)


def test_xarray_input_keeps_its_sample_labels(vit, images32):
    import xarray as xr

    labelled = xr.DataArray(images32, dims=("sample", "y", "x", "channel"), coords={"sample": [7, 3, 11]})
    cap = vl.capture(vit, labelled)
    assert cap["sample"].values.tolist() == [7, 3, 11]
    assert cap["stage0"].attention["sample"].values.tolist() == [7, 3, 11]
    np.testing.assert_allclose(cap.image.sel(sample=3).values, images32[1], atol=1e-6)
    assert vl.explain(cap, "rollout")["sample"].values.tolist() == [7, 3, 11]
    # plain arrays (no labels) are numbered by position
    assert vl.capture(vit, images32)["sample"].values.tolist() == [0, 1, 2]


def test_grayscale_rgba_and_other_sizes_are_converted(vit):
    gray = np.random.default_rng(0).random((32, 32))
    rgba = np.random.default_rng(1).random((32, 32, 4))
    big = np.random.default_rng(2).random((80, 60, 3))
    cap = vl.capture(vit, [gray, rgba, big])
    assert cap.image.shape == (3, 32, 32, 3)
    np.testing.assert_allclose(cap.image.values[0, ..., 0], cap.image.values[0, ..., 2])
    np.testing.assert_allclose(cap.image.values[1], rgba[..., :3], atol=1e-6)


def test_targets_as_int_list_and_class_name(vit, images32):
    assert vl.capture(vit, images32, target=4).target.values.tolist() == [4, 4, 4]
    assert vl.capture(vit, images32, target=[0, 1, 2]).target.values.tolist() == [0, 1, 2]
    assert vl.capture(vit, images32, target="3").target.values.tolist() == [3, 3, 3]
    a = vl.capture(vit, images32, target=0)["stage0"].attention_grad
    b = vl.capture(vit, images32, target=1)["stage0"].attention_grad
    assert not np.allclose(a.values, b.values)


# -- round trips --------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".zarr", ".nc"])
@pytest.mark.parametrize("which", ["vit", "swin"])
def test_save_and_open_round_trip_exactly(which, suffix, vit, swin, images32, images64, tmp_path):
    cap = vl.capture(vit, images32) if which == "vit" else vl.capture(swin, images64)
    path = vl.save(cap, tmp_path / f"cap{suffix}")
    back = vl.open(path)
    assert back.attrs == cap.attrs
    # the same groups (a zarr store lists its groups in no fixed order), each identical
    assert sorted(p for p, _ in cap.subtree_with_keys) == sorted(p for p, _ in back.subtree_with_keys)
    for p1, n1 in cap.subtree_with_keys:
        a, b = n1.to_dataset(inherit=False), back[p1].to_dataset(inherit=False)
        assert a.identical(b), p1
        for name in a.variables:
            assert a[name].dtype == b[name].dtype, name


def test_open_lazily_with_chunks(vit, images32, tmp_path):
    cap = vl.capture(vit, images32)
    back = vl.open(vl.save(cap, tmp_path / "cap.zarr"), chunks={})
    assert back["stage0"].attention.chunks is not None
    np.testing.assert_array_equal(back["stage0"].attention.values, cap["stage0"].attention.values)
