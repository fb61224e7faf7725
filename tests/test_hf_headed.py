"""``vl.with_head``: headless transformers backbones (ViTModel, CLIPVisionModel, ...) with a user's head.

The strongest checks use the same weights twice: a ``ViTForImageClassification``
split into its ``ViTModel`` and classifier, and a ``SiglipModel`` whose vision
tower gets a :class:`~vitlens.SimilarityHead` of the same text embeddings,
must give the very captures and maps of the intact model.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

import vitlens as vl  # noqa: E402
from family_checks import model_state  # noqa: E402
from test_hf_models import SIZE, _images, _pixels, make_hf  # noqa: E402
from test_hf_siglip import IDS, make_siglip  # noqa: E402
from vitlens.capture.hooks import Recorder  # noqa: E402
from vitlens.capture.relevance import attention_relevance  # noqa: E402
from vitlens.models import adapter_for  # noqa: E402
from vitlens.coverage.transformers_classes import spread_weights  # noqa: E402
from vitlens.models.families.hf_clip import save_random_clip  # noqa: E402
from vitlens.models.families.hf_headed import head_relevance  # noqa: E402

CLASS_SPECIFIC = tuple(name for name, info in vl.methods.METHOD_INFO.items() if info.class_specific)


def _spread(module: nn.Module, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return spread_weights(module).eval()


def _processor():
    return transformers.ViTImageProcessor(size={"height": SIZE, "width": SIZE}, image_mean=[0.4, 0.5, 0.6],
                                          image_std=[0.2, 0.25, 0.3])


def _backbone(kind: str, seed: int = 0) -> nn.Module:
    tower = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, image_size=SIZE, patch_size=8)
    if kind in ("vit", "vit_pooler"):
        m = transformers.ViTModel(transformers.ViTConfig(intermediate_size=64, **tower),
                                  add_pooling_layer=kind == "vit_pooler")
    elif kind == "deit":
        m = transformers.DeiTModel(transformers.DeiTConfig(intermediate_size=64, **tower), add_pooling_layer=True)
    elif kind == "dinov2_registers":
        m = transformers.Dinov2WithRegistersModel(transformers.Dinov2WithRegistersConfig(
            mlp_ratio=2, num_register_tokens=2, **tower))
    elif kind == "clip":
        m = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(intermediate_size=64, **tower))
    else:
        m = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(intermediate_size=64, **tower))
    m = _spread(m, seed)
    m.vitlens_image_processor = _processor()
    return m


CASES = [("vit", "cls"), ("vit", "mean"), ("vit_pooler", "pooler"), ("deit", "mean"), ("deit", "pooler"),
         ("dinov2_registers", "cls"), ("dinov2_registers", "mean"), ("clip", "cls"), ("siglip", "pooler"),
         ("siglip", "mean")]


def _mlp_head(classes: int = 3, seed: int = 1) -> nn.Module:
    return _spread(nn.Sequential(nn.Linear(32, 16), nn.GELU(), nn.Dropout(0.1), nn.Linear(16, classes)), seed)


def test_a_split_vit_classifier_gives_the_intact_models_capture_and_maps():
    whole = make_hf("vit")
    split = vl.with_head(whole.vit, whole.classifier, class_names=list("abcd"),
                         image_processor=whole.vitlens_image_processor)
    images, target = _images(3), [1, 3, 0]
    a, b = vl.capture(whole, images, target=target, keep=("all", *vl.methods.extra_groups())), vl.capture(split, images, target=target, keep=("all", *vl.methods.extra_groups()))
    assert b.attrs["family"] == "hf_headed" and b.attrs["class_names"] == list("abcd")
    np.testing.assert_allclose(b.logits.values, a.logits.values, rtol=1e-6, atol=1e-6)
    for var in ("attention", "attention_grad", "attention_relevance"):
        np.testing.assert_allclose(b["stage0"][var].values, a["stage0"][var].values, rtol=1e-5, atol=1e-6, err_msg=var)
    maps_a, maps_b = vl.explain(a, "all"), vl.explain(b, "all")
    for name in vl.METHODS:
        np.testing.assert_allclose(maps_b[name].values, maps_a[name].values, rtol=1e-4, atol=1e-6, err_msg=name)


def test_siglip_tower_with_a_similarity_head_is_the_siglip_model_against_its_prompts():
    model = make_siglip()
    with torch.no_grad():
        t = model.get_text_features(input_ids=IDS)
        t = t if isinstance(t, torch.Tensor) else t.pooler_output
    head = vl.SimilarityHead(t, scale=model.logit_scale.exp(), bias=model.logit_bias)
    tower = model.vision_model
    split = vl.with_head(tower, head, image_processor=model.vitlens_image_processor)  # pool="pooler"
    x, target = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4)), [2, 0]
    a, b = vl.capture(model, x, text=IDS, target=target, keep=("all", *vl.methods.extra_groups())), vl.capture(split, x, target=target, keep=("all", *vl.methods.extra_groups()))
    assert b.attrs["readout"] == "map" and b.attrs["pool"] == "pooler"
    np.testing.assert_allclose(b.logits.values, a.logits.values, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(b["stage0"].readout_weights.values, a["stage0"].readout_weights.values, atol=1e-6)
    maps_a, maps_b = vl.explain(a, "all"), vl.explain(b, "all")
    for name in vl.METHODS:
        np.testing.assert_allclose(maps_b[name].values, maps_a[name].values, rtol=1e-4, atol=1e-6, err_msg=name)


def test_clip_tower_with_projection_and_similarity_head_has_clips_logits_and_gradients(tmp_path):
    clip = vl.load_model("hf:" + save_random_clip(tmp_path / "clip"), device="cpu")
    ids = torch.randint(2, 50, (3, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        t = clip.get_text_features(input_ids=ids)
        t = t if isinstance(t, torch.Tensor) else t.pooler_output
    head = nn.Sequential(clip.visual_projection, vl.SimilarityHead(t, scale=clip.logit_scale.exp()))
    split = vl.with_head(clip.vision_model, head, image_processor=clip.vitlens_image_processor)
    x, target = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)), [1, 2]
    a, b = vl.capture(clip, x, text=ids, target=target, keep=("all", *vl.methods.extra_groups())), vl.capture(split, x, target=target, keep=("all", *vl.methods.extra_groups()))
    np.testing.assert_allclose(b.logits.values, a.logits.values, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(b["stage0"].attention_grad.values, a["stage0"].attention_grad.values,
                               rtol=1e-4, atol=1e-6)
    # CLIP's adapter folds the projection into one Linear (scale·t̂·W_proj); here αβ runs through the two in
    # turn, a different (documented) rule: only the LRP relevance may differ, and it stays conserved.
    maps_a, maps_b = vl.explain(a, "all"), vl.explain(b, "all")
    for name in vl.METHODS:
        if name != "transformer_attribution":
            np.testing.assert_allclose(maps_b[name].values, maps_a[name].values, rtol=1e-4, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("kind,pool", CASES)
def test_every_backbone_and_pool_gives_all_seven_maps_and_the_heads_logits(kind, pool):
    backbone = _backbone(kind)
    head = _mlp_head()
    model = vl.with_head(backbone, head, pool=pool)
    images = _images(2)
    before = model_state(model)
    cap = vl.capture(model, images, target=[0, 2])
    assert model_state(model) == before
    with torch.no_grad():  # the logits are the head on the pooled vector the backbone's own outputs give
        out = backbone(pixel_values=_pixels(images))
        tokens = out.last_hidden_state
        prefix = {"vit": 1, "vit_pooler": 1, "deit": 2, "dinov2_registers": 3, "clip": 1, "siglip": 0}[kind]
        pooled = {"cls": tokens[:, 0], "mean": tokens[:, prefix:].mean(1), "pooler": out.pooler_output}[pool]
        if kind == "clip":
            pooled = out.pooler_output
        expected = head(pooled)
    np.testing.assert_allclose(cap.logits.values, expected.numpy(), rtol=1e-5, atol=1e-5)
    assert cap.attrs["readout"] == {"cls": "cls", "pooler": "map" if kind == "siglip" else "cls", "mean": "avg"}[pool]
    st = cap["stage0"]
    np.testing.assert_allclose(st.attention.sum("key").values, 1.0, atol=1e-5)
    maps = vl.explain(cap, "all")
    for name in maps.data_vars:
        assert np.isfinite(maps[name].values).all() and maps[name].values.std() > 0, name


@pytest.mark.parametrize("kind,pool", [("vit_pooler", "pooler"), ("deit", "mean"), ("clip", "cls"),
                                       ("siglip", "pooler")])
def test_lrp_is_conserved_through_the_blocks_the_pool_and_the_head(kind, pool):
    backbone = _backbone(kind, seed=2)
    head = nn.Sequential(nn.Linear(32, 16, bias=False), nn.ReLU(), nn.Linear(16, 4, bias=False))
    model = vl.with_head(backbone, _spread(head, seed=5), pool=pool)
    with torch.no_grad():
        for mod in model.modules():
            for attr in ("bias", "in_proj_bias"):
                p = getattr(mod, attr, None)
                if isinstance(p, nn.Parameter) and isinstance(mod, (nn.Linear, nn.MultiheadAttention)):
                    p.zero_()
    ad = adapter_for(model)
    x = _pixels(_images(2, seed=1))
    with Recorder(ad, keep_block_inputs=True) as rec:
        target = ad.logits(x).argmax(-1)
        attention_relevance(ad, rec, target, to_input=True)
    for layer, (r_in, r_out) in rec.relevance_totals.items():
        torch.testing.assert_close(r_in, r_out, rtol=1e-4, atol=1e-5, msg=f"block {layer}")
    with torch.no_grad():
        onehot = nn.functional.one_hot(target, ad.num_classes).float()
        total = ad.head.relevance(ad.tokens(rec.final_output), onehot).reshape(2, -1).sum(1)
    # ReLU units that are off take no relevance, but αβ hands all of a logit's relevance down
    torch.testing.assert_close(total, torch.ones(2), rtol=1e-4, atol=1e-5)


def _alphabeta_by_hand(x: np.ndarray, w: np.ndarray, r: np.ndarray) -> np.ndarray:
    """αβ (α=1, β=0) from its definition: R_i = Σ_j (x_i w_ji)⁺ / Σ_i' (x_i' w_ji')⁺ · R_j."""
    z = np.maximum(x[None, :] * w, 0.0)  # (out, in)
    return (z / np.where(z.sum(1, keepdims=True) > 0, z.sum(1, keepdims=True), 1.0) * r[:, None]).sum(0)


def test_the_head_rule_on_a_hand_computed_case():
    rng = np.random.default_rng(0)
    w1, w2, e = rng.normal(size=(4, 3)), rng.normal(size=(5, 4)), rng.normal(size=(2, 5))
    z, r_out = rng.normal(size=3), np.array([0.0, 1.0])
    lin1, lin2 = nn.Linear(3, 4, bias=False, dtype=torch.float64), nn.Linear(4, 5, dtype=torch.float64)
    with torch.no_grad():
        lin1.weight.copy_(torch.from_numpy(w1))
        lin2.weight.copy_(torch.from_numpy(w2))
        lin2.bias.normal_()
    sim = vl.SimilarityHead(torch.from_numpy(e), scale=7.0, bias=0.3)
    layers = [lin1, nn.Tanh(), lin2, nn.LayerNorm(5, dtype=torch.float64), sim]
    got = head_relevance(layers, torch.from_numpy(z)[None], torch.from_numpy(r_out)[None])
    h1 = np.tanh(w1 @ z)
    h2 = w2 @ h1 + lin2.bias.detach().double().numpy()
    h3 = layers[3](torch.from_numpy(h2)[None])[0].detach().numpy()
    e_hat = e / np.linalg.norm(e, axis=1, keepdims=True)
    r3 = _alphabeta_by_hand(h3, 7.0 * e_hat, r_out)  # the similarity as a Linear on h3 (scale-free rule)
    r1 = _alphabeta_by_hand(h1, w2, r3)  # LayerNorm and tanh pass relevance on
    expected = _alphabeta_by_hand(z, w1, r1)
    np.testing.assert_allclose(got[0].numpy(), expected, rtol=1e-10)


def test_similarity_head_is_the_scaled_cosine_similarity():
    e = torch.randn(3, 6, generator=torch.Generator().manual_seed(0))
    x = torch.randn(2, 6, generator=torch.Generator().manual_seed(1))
    head = vl.SimilarityHead(e * 5, scale=2.5, bias=-1.0)
    expected = 2.5 * nn.functional.cosine_similarity(x[:, None], e[None], dim=-1) - 1.0
    torch.testing.assert_close(head(x), expected)
    assert not list(head.parameters())  # fixed embeddings: nothing to train or to freeze
    with pytest.raises(vl.OptionError, match="non-zero"):
        vl.SimilarityHead(torch.zeros(2, 3))
    with pytest.raises(vl.OptionError, match="positive"):
        vl.SimilarityHead(e, scale=-1.0)


def test_bad_input_is_refused_with_what_to_do():
    backbone = _backbone("vit")
    with pytest.raises(vl.UnsupportedModelError, match="already has logits: pass it to vl.capture"):
        vl.with_head(make_hf("vit"), nn.Linear(32, 2))
    with pytest.raises(vl.UnsupportedModelError, match="headless transformers backbone"):
        vl.with_head(nn.Linear(3, 3), nn.Linear(3, 2))
    with pytest.raises(vl.OptionError, match="pool='cls' or 'mean' or 'pooler'"):
        vl.with_head(backbone, nn.Linear(32, 2), pool="max")
    with pytest.raises(vl.OptionError, match="without its pooler"):
        vl.with_head(backbone, nn.Linear(32, 2), pool="pooler")
    with pytest.raises(vl.OptionError, match="takes 16 features, but the ViTModel's pooled vector has 32"):
        vl.with_head(backbone, nn.Linear(16, 2))
    with pytest.raises(vl.UnsupportedModelError, match="Conv1d in the head has no LRP rule"):
        vl.with_head(backbone, nn.Sequential(nn.Linear(32, 8), nn.Conv1d(8, 2, 1)))
    with pytest.raises(vl.OptionError, match="no nn.Linear"):
        vl.with_head(backbone, nn.ReLU())
    with pytest.raises(vl.OptionError, match="3 class names for a head with 2 outputs"):
        vl.with_head(backbone, nn.Linear(32, 2), class_names=["a", "b", "c"])


def test_a_bare_backbone_is_refused_pointing_at_with_head():
    with pytest.raises(vl.UnsupportedModelError, match=r"vl\.with_head"):
        vl.capture(_backbone("vit"), _images(1))


def test_a_saved_backbone_loads_and_gets_a_head(tmp_path):
    backbone = _backbone("dinov2_registers")
    backbone.save_pretrained(tmp_path / "dino")
    _processor().save_pretrained(tmp_path / "dino")
    loaded = vl.load_model("hf:" + str(tmp_path / "dino"), device="cpu")
    assert type(loaded).__name__ == "Dinov2WithRegistersModel"
    head = _mlp_head(classes=2)
    model = vl.with_head(loaded, head, pool="mean", class_names=["left", "right"])
    cap = vl.capture(model, _images(1))
    assert cap.attrs["class_names"] == ["left", "right"] and cap.attrs["mean"] == [0.4, 0.5, 0.6]
    assert cap.attrs["backbone"] == "Dinov2WithRegistersModel"
    assert list(cap["stage0"].kind.values[:3]) == ["cls", "register", "register"]
    assert model.backbone is loaded and model.head is head  # shared, not copied
