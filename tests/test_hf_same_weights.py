"""Same weights, two implementations: a random timm ViT copied into transformers' ViT.

The two libraries name and lay out the weights differently (timm fuses q/k/v);
when the copy is right, both give the same logits — and every vitlens map of
the two captures must then agree too, the strongest check that the timm and
the transformers adapters describe the same computation.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
timm = pytest.importorskip("timm")

DEPTH, DIM, HEADS, PATCH, SIZE, CLASSES = 3, 32, 4, 8, 32, 5


def timm_vit(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = timm.create_model(
        "vit_tiny_patch16_224", img_size=SIZE, patch_size=PATCH, num_classes=CLASSES,
        depth=DEPTH, embed_dim=DIM, num_heads=HEADS, mlp_ratio=2.0,
    ).eval()
    with torch.no_grad():  # timm zero-initialises the head and some biases: make every weight count
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def hf_vit_from_timm(model: torch.nn.Module, **config) -> torch.nn.Module:
    """``ViTForImageClassification`` holding the timm model's weights."""
    dim = model.embed_dim
    cfg = transformers.ViTConfig(
        hidden_size=dim, num_hidden_layers=len(model.blocks), num_attention_heads=model.blocks[0].attn.num_heads,
        intermediate_size=model.blocks[0].mlp.fc1.out_features, image_size=SIZE, patch_size=PATCH,
        num_labels=model.num_classes, layer_norm_eps=model.norm.eps, hidden_act="gelu", qkv_bias=True,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **config,
    )
    hf = transformers.ViTForImageClassification(cfg).eval()
    t = model.state_dict()
    out = {
        "vit.embeddings.cls_token": t["cls_token"],
        "vit.embeddings.position_embeddings": t["pos_embed"],
        "vit.embeddings.patch_embeddings.projection.weight": t["patch_embed.proj.weight"],
        "vit.embeddings.patch_embeddings.projection.bias": t["patch_embed.proj.bias"],
        "vit.layernorm.weight": t["norm.weight"],
        "vit.layernorm.bias": t["norm.bias"],
        "classifier.weight": t["head.weight"],
        "classifier.bias": t["head.bias"],
    }
    for i in range(len(model.blocks)):
        src, dst = f"blocks.{i}.", f"vit.layers.{i}."
        for a, b in (("norm1", "layernorm_before"), ("norm2", "layernorm_after"), ("attn.proj", "attention.o_proj"),
                     ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2")):
            for kind in ("weight", "bias"):
                out[f"{dst}{b}.{kind}"] = t[f"{src}{a}.{kind}"]
        for kind in ("weight", "bias"):
            q, k, v = t[f"{src}attn.qkv.{kind}"].chunk(3, 0)
            for name, w in (("q_proj", q), ("k_proj", k), ("v_proj", v)):
                out[f"{dst}attention.{name}.{kind}"] = w
    hf.load_state_dict(out, strict=True)
    return hf


@pytest.fixture(scope="module")
def pair():
    model = timm_vit()
    return model, hf_vit_from_timm(model)


def _images(n: int = 3) -> torch.Tensor:
    return torch.randn(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_converted_vit_gives_the_same_logits(pair, attn_implementation):
    model, hf = pair
    hf.set_attn_implementation(attn_implementation)
    x = _images()
    with torch.no_grad():
        a = model(x)
        b = hf(pixel_values=x).logits
    assert a.abs().max() > 0.1  # a head that is not ~zero, so agreement means something
    np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=1e-4, atol=1e-5)


def test_conversion_is_sensitive_to_a_wrong_mapping(pair):
    """The harness can fail: swapping q and k in one block changes the logits."""
    model, hf = pair
    broken = hf_vit_from_timm(model)
    att = broken.vit.layers[1].attention
    with torch.no_grad():
        w = att.q_proj.weight.clone()
        att.q_proj.weight.copy_(att.k_proj.weight)
        att.k_proj.weight.copy_(w)
        x = _images()
        assert not torch.allclose(broken(pixel_values=x).logits, model(x), atol=1e-4)


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel() - a.mean(), b.ravel() - b.mean()
    return float(a @ b / np.sqrt((a @ a) * (b @ b)))


def test_all_seven_maps_agree_between_timm_and_transformers(pair):
    import vitlens as vl

    model, hf = pair
    hf.set_attn_implementation("sdpa")
    hf.vitlens_image_processor = transformers.ViTImageProcessor(
        size={"height": SIZE, "width": SIZE}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    x = _images(4)
    target = [0, 1, 2, 4]
    # every group: the new methods (AttnLRP, LeGrad) are compared too
    cap_timm, cap_hf = (vl.capture(m, x, target=target, keep=("all", *vl.methods.extra_groups())) for m in (model, hf))
    np.testing.assert_allclose(cap_hf.logits.values, cap_timm.logits.values, rtol=1e-4, atol=1e-5)
    for var in ("attention", "attention_grad", "attention_relevance", "ln_mean", "token_norm", "attn_value_norm"):
        np.testing.assert_allclose(cap_hf["stage0"][var].values, cap_timm["stage0"][var].values,
                                   rtol=1e-3, atol=1e-5, err_msg=var)
    maps_timm, maps_hf = vl.explain(cap_timm, "all"), vl.explain(cap_hf, "all")
    worst = {}
    for name in vl.METHODS:
        corrs = []
        for i in range(len(target)):
            a, b = maps_timm[name].values[i], maps_hf[name].values[i]
            if a.std() == 0:  # e.g. Grad-CAM's ReLU leaves nothing: then both maps must be that
                np.testing.assert_allclose(b, a, atol=1e-6, err_msg=f"{name} image {i}")
                continue
            corrs.append(_corr(a, b))
        assert len(corrs) >= len(target) - 1, name  # the comparison is not vacuous
        worst[name] = min(corrs)
    print("worst per-image correlation timm vs transformers:", worst)
    assert all(c > 0.999 for c in worst.values()), worst


def test_widgets_show_the_same_panels_for_both_implementations(pair):
    import vitlens as vl
    from vitlens.widgets import Compare, Explorer, HeadGrid

    model, hf = pair
    hf.vitlens_image_processor = transformers.ViTImageProcessor(
        size={"height": SIZE, "width": SIZE}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    x = _images(1)
    cap_timm, cap_hf = vl.capture(model, x), vl.capture(hf, x)
    ex_t, ex_h = Explorer(cap_timm, layer=1), Explorer(cap_hf, layer=1)
    for ex in (ex_t, ex_h):
        ex.select_patch(2, 1)
    maps_t, maps_h = ex_t.panel_maps(), ex_h.panel_maps()
    assert set(maps_t) == set(maps_h)
    for name in maps_t:
        np.testing.assert_allclose(maps_h[name], maps_t[name], rtol=1e-3, atol=1e-5, err_msg=name)
    HeadGrid(cap_hf, layer=2)
    Compare(cap_hf)


@pytest.mark.slow  # four captures, 28 maps, an Explorer and a recapture
def test_an_in_memory_model_takes_a_ready_tensor_and_an_image_processor(pair):
    """#30.1: ``vl.capture(ViTForImageClassification(config), pixel_values)`` with no processor at all,
    and ``processor=`` an image processor: the seven maps equal timm's on the same weights and the
    ``vitlens_image_processor`` path's; only the picture needs the processor (a one-line warning says how)."""
    import vitlens as vl

    model, _ = pair
    bare = hf_vit_from_timm(model)  # as built in a notebook: no processor attached, no directory
    assert getattr(bare, "vitlens_image_processor", None) is None and not bare.config._name_or_path
    processor = transformers.ViTImageProcessor(size={"height": SIZE, "width": SIZE}, image_mean=[0.5] * 3,
                                               image_std=[0.5] * 3)
    attached = hf_vit_from_timm(model)
    attached.vitlens_image_processor = processor
    x, target = _images(3), [0, 3, 1]
    with pytest.warns(vl.ImageProcessorWarning, match="processor=") as caught:
        cap_bare = vl.capture(bare, x, target=target)
    assert len(str(caught[0].message).splitlines()) == 1
    cap_given = vl.capture(bare, x, target=target, processor=processor)
    assert getattr(bare, "vitlens_image_processor", None) is None  # the user's model is left as it was
    cap_attached, cap_timm = vl.capture(attached, x, target=target), vl.capture(model, x, target=target)
    maps = {name: vl.explain(c, "all") for name, c in
            (("bare", cap_bare), ("given", cap_given), ("attached", cap_attached), ("timm", cap_timm))}
    for method in maps["timm"].data_vars:  # every method a default capture explains
        for name in ("bare", "given"):
            np.testing.assert_array_equal(maps[name][method].values, maps["attached"][method].values,
                                          err_msg=f"{name} {method}")
        for i in range(len(target)):
            a, b = maps["timm"][method].values[i], maps["bare"][method].values[i]
            if a.std() == 0:
                np.testing.assert_allclose(b, a, atol=1e-6, err_msg=f"{method} image {i}")
            else:
                assert _corr(a, b) > 0.999, (method, i)
    # the picture: true colours through the processor; without one, the tensor itself shown in [0, 1]
    np.testing.assert_allclose(cap_given["image"].values, cap_attached["image"].values)
    shown = cap_bare["image"].values
    assert shown.min() == pytest.approx(0.0, abs=1e-6) and shown.max() == pytest.approx(1.0, abs=1e-6)
    back = (shown - np.array(cap_bare.attrs["mean"])) / np.array(cap_bare.attrs["std"])  # recorded normalisation
    np.testing.assert_allclose(back, x.permute(0, 2, 3, 1).numpy(), atol=1e-5)
    # a class the capture did not explain: the Explorer recaptures from the picture and the recorded normalisation
    from vitlens.widgets import Explorer

    ex = Explorer(cap_bare, bare)
    recap = ex.classes._recapture(0, 2)
    direct = vl.capture(attached, x[:1], target=[2])
    np.testing.assert_allclose(recap["stage0"].attention_grad.values, direct["stage0"].attention_grad.values,
                               rtol=1e-4, atol=1e-6)
