"""transformers vision classifiers: capture, all seven maps, and the checks against transformers itself.

Every model is a tiny random-initialised config (never downloaded). The
independent reference for attention and its gradient is transformers' own
eager attention (``attn_implementation="eager"``, ``output_attentions=True``),
a code path vitlens' capture does not use.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

import vitlens as vl  # noqa: E402
from vitlens.capture.hooks import Recorder  # noqa: E402
from vitlens.capture.relevance import attention_relevance  # noqa: E402
from vitlens.models import adapter_for, hf_common  # noqa: E402

SIZE, PATCH = 32, 8
_COMMON = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, image_size=SIZE, patch_size=PATCH,
               num_labels=4, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def _config(kind: str):
    if kind in ("vit", "deit", "deit_teacher"):
        cls = transformers.ViTConfig if kind == "vit" else transformers.DeiTConfig
        return cls(intermediate_size=64, **_COMMON)
    if kind.startswith("beit"):
        return transformers.BeitConfig(intermediate_size=64, use_relative_position_bias=True,
                                       use_mean_pooling=kind == "beit", **_COMMON)
    extra = dict(mlp_ratio=2, **_COMMON)
    if kind == "dinov2_swiglu":
        extra["use_swiglu_ffn"] = True
    if kind == "dinov2_registers":
        return transformers.Dinov2WithRegistersConfig(num_register_tokens=2, **extra)
    return transformers.Dinov2Config(**extra)


_CLASSES = {
    "vit": "ViTForImageClassification",
    "deit": "DeiTForImageClassification",
    "deit_teacher": "DeiTForImageClassificationWithTeacher",
    "dinov2": "Dinov2ForImageClassification",
    "dinov2_swiglu": "Dinov2ForImageClassification",
    "dinov2_registers": "Dinov2WithRegistersForImageClassification",
    "beit": "BeitForImageClassification",
    "beit_cls": "BeitForImageClassification",
}
FAMILY = {k: "hf_beit" if k.startswith("beit") else "hf_vit" for k in _CLASSES}
READOUT = {k: "avg" if k == "beit" else "cls" for k in _CLASSES}
KINDS = list(_CLASSES)
PREFIX = {"vit": ["cls"], "deit": ["cls", "dist"], "deit_teacher": ["cls", "dist"], "dinov2": ["cls"],
          "dinov2_swiglu": ["cls"], "dinov2_registers": ["cls", "register", "register"], "beit": ["cls"],
          "beit_cls": ["cls"]}


def make_hf(kind: str, seed: int = 0, attn_implementation: str = "sdpa") -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = _config(kind)
    cfg._attn_implementation = attn_implementation
    model = getattr(transformers, _CLASSES[kind])(cfg).eval()
    with torch.no_grad():  # the 0.02-std init makes attention uniform: give the weights some spread,
        for name, p in model.named_parameters():  # and the (zero-initialised) biases a value
            if p.ndim >= 2:
                p.normal_(0, 0.3)
            elif name.endswith("bias"):
                p.normal_(0, 0.1)
    model.vitlens_image_processor = transformers.ViTImageProcessor(
        size={"height": SIZE, "width": SIZE}, image_mean=[0.4, 0.5, 0.6], image_std=[0.2, 0.25, 0.3])
    return model


@pytest.fixture(scope="module", params=KINDS)
def kind(request):
    return request.param


@pytest.fixture(scope="module")
def model(kind):
    return make_hf(kind)


def _images(n=2, seed=0):
    return np.random.default_rng(seed).random((n, SIZE, SIZE, 3)).astype(np.float32)


def _pixels(images):
    mean, std = np.array([0.4, 0.5, 0.6]), np.array([0.2, 0.25, 0.3])
    return torch.from_numpy(((images - mean) / std).transpose(0, 3, 1, 2)).float()


def _eager_reference(model, x, target):
    """transformers' own eager attention probabilities and their gradient for the target logit."""
    m = copy.deepcopy(model)
    m.set_attn_implementation("eager")
    out = m(pixel_values=x, output_attentions=True)
    y = out.logits.gather(1, torch.as_tensor(target)[:, None]).sum()
    grads = torch.autograd.grad(y, out.attentions)
    return out.logits.detach(), [a.detach() for a in out.attentions], grads


def test_capture_has_the_timm_layout_with_prefix_tokens(kind, model):
    cap = vl.capture(model, _images())
    st = cap["stage0"]
    assert cap.attrs["family"] == FAMILY[kind] and cap.attrs["readout"] == READOUT[kind]
    assert st.attention.dims == ("sample", "layer", "head", "query", "key")
    assert list(st.kind.values[: len(PREFIX[kind])]) == PREFIX[kind]
    assert (st.kind.values[len(PREFIX[kind]):] == "patch").all()
    assert st.attention.shape == (2, 2, 4, len(PREFIX[kind]) + 16, len(PREFIX[kind]) + 16)
    assert cap.attrs["mean"] == [0.4, 0.5, 0.6] and cap.attrs["std"] == [0.2, 0.25, 0.3]


def test_all_seven_maps_are_finite_and_not_constant(kind, model):
    every = vl.explain(vl.capture(model, _images(), keep=("all", *vl.methods.extra_groups())), "all")
    assert set(every.data_vars) == set(vl.METHODS)
    for name in vl.METHODS:
        values = every[name].values
        assert values.shape == (2, 4, 4), name
        assert np.isfinite(values).all(), name
        assert values.std() > 0, name


def test_logits_attention_and_gradients_equal_transformers_eager(kind, model):
    x, target = _pixels(_images()), [1, 3]
    cap = vl.capture(model, x, target=target)  # a ready tensor: both see the very same input
    logits, attn, grads = _eager_reference(model, x, target)
    np.testing.assert_allclose(cap.logits.values, logits.numpy(), rtol=1e-4, atol=1e-5)
    st = cap["stage0"]
    np.testing.assert_allclose(st.attention.sum("key").values, 1.0, atol=1e-5)
    for layer in range(2):
        np.testing.assert_allclose(st.attention.values[:, layer], attn[layer].numpy(), atol=1e-6)
        np.testing.assert_allclose(st.attention_grad.values[:, layer], grads[layer].numpy(), rtol=1e-5, atol=1e-6)


def test_lrp_relevance_is_conserved_block_by_block_on_a_bias_free_variant(kind):
    model = make_hf(kind, seed=3)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Linear) and m.bias is not None:
                m.bias.zero_()
            if hasattr(m, "relative_position_bias_table"):  # BEiT: its share is the documented leak
                m.relative_position_bias_table.zero_()
    ad = adapter_for(model)
    x = _pixels(_images())
    with Recorder(ad, keep_block_inputs=True) as rec:
        logits = ad.logits(x)
        attention_relevance(ad, rec, logits.argmax(-1), to_input=True)
    totals = rec.relevance_totals
    assert set(totals) == {0, 1}
    for layer, (r_in, r_out) in totals.items():
        torch.testing.assert_close(r_in, r_out, rtol=1e-4, atol=1e-5)
    # the head's rule hands on all of the logit's relevance (two heads for DeiT with teacher, CLS+mean for DINOv2)
    torch.testing.assert_close(totals[1][1], torch.ones(2), rtol=1e-4, atol=1e-5)


def _state(model):
    return (
        [(n, m.training) for n, m in model.named_modules()],
        [(len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks)) for m in model.modules()],
        [(n, p.requires_grad, p.grad) for n, p in model.named_parameters()],
        model.config._attn_implementation,
    )


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_capture_restores_attention_implementation_mode_and_hooks(implementation):
    model = make_hf("vit", attn_implementation=implementation)
    model.train()
    before = _state(model)
    assert before[-1] == implementation
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    vl.capture(model, _images())
    assert _state(model) == before
    assert len(hf_common._PROBES) == 0
    for k, v in model.state_dict().items():
        assert torch.equal(v, weights[k]), k


def test_capture_restores_the_model_after_an_exception(kind):
    model = make_hf(kind)
    model.train()
    before = _state(model)

    def explode(module, inputs, output):
        assert module.config._attn_implementation == hf_common.CAPTURE_ATTENTION  # switched while capturing
        raise RuntimeError("boom")

    handle = adapter_for(model).parts[1].attn.module.register_forward_hook(explode)
    with pytest.raises(RuntimeError, match="boom"):
        vl.capture(model, _images())
    handle.remove()
    assert _state(model) == before and before[-1] == "sdpa"
    assert len(hf_common._PROBES) == 0


def test_off_size_images_go_through_the_models_own_image_processor():
    model = make_hf("vit")
    picture = np.random.default_rng(5).random((40, 56, 3)).astype(np.float32)
    cap = vl.capture(model, picture)
    proc = model.vitlens_image_processor
    from PIL import Image

    pil = Image.fromarray(np.round(picture * 255).astype(np.uint8))
    expected = proc(images=pil, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        np.testing.assert_allclose(cap.logits.values, model(pixel_values=expected).logits.numpy(), rtol=1e-4, atol=1e-5)


def test_a_model_without_an_image_processor_is_refused_with_what_to_do():
    model = make_hf("vit")
    del model.vitlens_image_processor
    with pytest.raises(vl.VitlensError, match=r"processor=AutoImageProcessor"):
        vl.capture(model, _images())


def test_class_names_come_from_id2label():
    model = make_hf("vit")
    model.config.id2label = {0: "cat", 1: "dog", 2: "fox", 3: "owl"}
    cap = vl.capture(model, _images(), target="fox")
    assert cap.attrs["class_names"] == ["cat", "dog", "fox", "owl"]
    assert (cap.target.values == 2).all()


def test_load_model_hf_directory_gives_an_explainable_model(tmp_path):
    model = make_hf("deit_teacher")
    model.save_pretrained(tmp_path)
    model.vitlens_image_processor.save_pretrained(tmp_path)
    loaded = vl.load_model(f"hf:{tmp_path}", device="cpu")
    cap = vl.capture(loaded, _images())
    assert cap.attrs["model"] == f"hf:{tmp_path}"
    np.testing.assert_allclose(cap.logits.values, vl.capture(model, _images()).logits.values, rtol=1e-5, atol=1e-6)


def test_parts_describe_the_attention_the_model_computed(kind, model):
    """The LRP pass splits the logits of the model's real attention: recomputed from the adapter's
    description (q/k/v maps, scale, position bias) they give the recorded probabilities."""
    ad = adapter_for(model)
    with Recorder(ad, keep_block_inputs=True) as rec, torch.no_grad():
        ad.logits(_pixels(_images()))
        for layer, part in enumerate(ad.parts):
            z = part.attn.logits(rec.attn_inputs[layer], rec.attn_ctx.get(layer, {}), rec.linears[layer])
            torch.testing.assert_close(z.softmax(-1), rec.attention[layer], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("cell", [(0, 0), (3, 1), (2, 3)])
def test_a_bright_patch_lights_its_own_token_and_pixels(cell):
    """Token geometry: the token whose embedding changes most is the one at the lit cell's centre."""
    model = make_hf("dinov2_registers")
    black = np.zeros((1, SIZE, SIZE, 3), np.float32)
    st = vl.capture(model, black, grads=False)["stage0"]
    tok = int(np.flatnonzero((st.row.values == cell[0]) & (st.col.values == cell[1]))[0])
    cy, cx = st.center_y.values[tok], st.center_x.values[tok]
    img = black.copy()
    img[:, int(cy) - PATCH // 2:int(cy) + PATCH // 2, int(cx) - PATCH // 2:int(cx) + PATCH // 2] = 1.0
    lit = vl.capture(model, img, grads=False)["stage0"]
    change = np.abs(lit.token_norm.values[0, 0] - st.token_norm.values[0, 0])
    change[st.kind.values != "patch"] = -1
    assert int(change.argmax()) == tok


def test_any_attention_implementation_is_switched_for_the_capture_and_restored():
    """flash attention needs its kernel (and a GPU) to run; capture never calls it: the config's
    implementation is swapped for vitlens' explicit one and put back."""
    model = make_hf("vit")
    reference = vl.capture(model, _images()).logits.values
    model.config._attn_implementation_internal = "flash_attention_2"
    cap = vl.capture(model, _images())
    assert model.config._attn_implementation == "flash_attention_2"
    np.testing.assert_allclose(cap.logits.values, reference, rtol=1e-6, atol=1e-6)
