"""Targets beyond a class (issue 29): callables, ``vl.targets.similarity`` / ``patch_similarity``."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import vitlens as vl
from vitlens.capture.images import prepare

from conftest import make_swin, make_vit, random_images

EVERYTHING = ("all", "attnlrp", "attnlrp_cp", "legrad")


@pytest.mark.parametrize("build", [make_vit, pytest.param(make_swin, marks=pytest.mark.slow)], ids=["vit", "swin"])
def test_a_callable_equal_to_a_logit_gives_exactly_the_maps_of_that_class(build):
    model = build()
    size = vl.models.adapter_for(model).input_size[0]
    images = random_images(2, size, seed=2)
    by_class = vl.capture(model, images, target=1, keep=EVERYTHING)
    by_callable = vl.capture(model, images, target=lambda out: out[:, 1], keep=EVERYTHING)
    assert by_callable.attrs["target"] == "<lambda>" and (by_callable["target"].values == -1).all()
    np.testing.assert_array_equal(by_callable["target_score"].values, by_class["logits"].values[:, 1])
    a, b = vl.explain(by_class, "all"), vl.explain(by_callable, "all")
    assert sorted(a.data_vars) == sorted(vl.METHODS)
    for name in vl.METHODS:
        np.testing.assert_array_equal(b[name].values, a[name].values, err_msg=name)


@pytest.mark.slow
def test_a_callable_target_explains_what_it_computes(vit, images32):
    """A difference of two logits: its gradients are the difference of the two classes' gradients."""
    diff = vl.capture(vit, images32[:2], target=lambda out: out[:, 0] - out[:, 2])
    zero, two = vl.capture(vit, images32[:2], target=0), vl.capture(vit, images32[:2], target=2)
    np.testing.assert_allclose(diff["stage0"]["attention_grad"].values,
                               zero["stage0"]["attention_grad"].values - two["stage0"]["attention_grad"].values,
                               rtol=1e-5, atol=1e-7)
    with pytest.raises(vl.TargetError, match=r"shape \(2,\)"):
        vl.capture(vit, images32[:2], target=lambda out: out)
    with pytest.raises(vl.TargetError, match="without a gradient"):
        vl.capture(vit, images32[:2], target=lambda out: out[:, 0].detach())


def _dinov2():
    transformers = pytest.importorskip("transformers")
    from vitlens.coverage.transformers_classes import spread_weights

    torch.manual_seed(0)
    config = transformers.Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=2,
                                       image_size=32, patch_size=8)
    model = spread_weights(transformers.Dinov2Model(config)).eval()
    model.vitlens_image_processor = transformers.BitImageProcessor(
        size={"height": 32, "width": 32}, do_center_crop=False, image_mean=[0.5] * 3, image_std=[0.25] * 3)
    return model


@pytest.mark.slow
def test_similarity_on_a_headless_dinov2_gives_finite_class_specific_maps():
    model = _dinov2()
    images = random_images(4, 32, seed=7)
    references = vl.targets.embedding(model, images[:2])
    pixels = prepare(images[2:], vl.models.adapter_for(vl.models.embedding_model(model))).pixels
    with torch.no_grad():
        pooled = model(pixel_values=pixels).pooler_output  # DINOv2's own pooled vector: the normed CLS token
    caps = [vl.capture(model, images[2:], target=vl.targets.similarity(r), keep=EVERYTHING) for r in references]
    for ref, cap in zip(references, caps):
        assert cap.attrs["target"] == "similarity"
        expected = torch.nn.functional.cosine_similarity(pooled, ref[None], dim=-1)
        np.testing.assert_allclose(cap["target_score"].values, expected.numpy(), rtol=1e-5, atol=1e-6)
    maps = [vl.explain(cap, "all") for cap in caps]
    assert sorted(maps[0].data_vars) == sorted(vl.METHODS)
    for name, info in vl.methods.METHOD_INFO.items():
        assert np.isfinite(maps[0][name].values).all(), name
        if info.class_specific:  # another reference image, another map
            assert not np.allclose(maps[0][name].values, maps[1][name].values, rtol=1e-4, atol=0), name
        else:
            np.testing.assert_array_equal(maps[0][name].values, maps[1][name].values, err_msg=name)


def test_patch_similarity_scores_the_mean_cosine_of_one_patch_with_the_others():
    model = _dinov2()
    images = random_images(2, 32, seed=8)
    cap = vl.capture(model, images, target=vl.targets.patch_similarity(1, 2), keep=("all", "attnlrp_cp"))
    pixels = prepare(images, vl.models.adapter_for(vl.models.embedding_model(model))).pixels
    with torch.no_grad():
        tokens = model(pixel_values=pixels).last_hidden_state[:, 1:]  # after DINOv2's final norm, CLS left out
    unit = tokens / tokens.norm(dim=-1, keepdim=True)
    q = 1 * 4 + 2
    cos = (unit @ unit[:, q].unsqueeze(-1)).squeeze(-1)
    expected = (cos.sum(1) - cos[:, q]) / (cos.shape[1] - 1)
    np.testing.assert_allclose(cap["target_score"].values, expected.numpy(), rtol=1e-5)
    assert cap.attrs["target"] == "patch_similarity(1, 2)"
    assert np.isfinite(vl.explain(cap, "attnlrp").values).all()
    with pytest.raises(vl.TargetError, match="final grid is 4x4"):
        vl.capture(model, images, target=vl.targets.patch_similarity(4, 0))


def test_a_callable_target_streams_to_a_store(vit, images32, tmp_path):
    lazy = vl.capture(vit, images32[:3], target=lambda out: out[:, 2], store=str(tmp_path / "run.zarr"), batch_size=2,
                      keep=("all", "attnlrp_cp"), progress=False)
    eager = vl.capture(vit, images32[:3], target=2, keep=("all", "attnlrp_cp"))
    np.testing.assert_allclose(lazy["target_score"].values, eager["logits"].values[:, 2], rtol=1e-6)
    np.testing.assert_allclose(vl.explain(lazy, "attnlrp").values, vl.explain(eager, "attnlrp").values, rtol=1e-5,
                               atol=1e-7)
