"""CLIP: image–text similarities as logits, prompts as classes (tiny random CLIP, never downloaded)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

import vitlens as vl  # noqa: E402
from family_checks import assert_conserved, assert_parts_describe_the_attention  # noqa: E402
from vitlens.models import hf_common  # noqa: E402
from vitlens.models.families.hf_clip import save_random_clip  # noqa: E402

CLASS_SPECIFIC = tuple(name for name, info in vl.methods.METHOD_INFO.items() if info.class_specific)

PROMPTS = ["a photo of a dog", "a photo of a cat", "a drawing of a star"]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return save_random_clip(tmp_path_factory.mktemp("clip"), seed=0)


@pytest.fixture(scope="module")
def clip(clip_dir):
    return vl.load_model(f"hf:{clip_dir}", device="cpu")


def _pixels(n=2, seed=0):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _tokens(model, prompts=PROMPTS):
    return model.vitlens_text_processor(text=prompts, padding=True, return_tensors="pt")


def test_logits_are_the_models_own_logits_per_image(clip):
    x = _pixels()
    cap = vl.capture(clip, x, text=PROMPTS)
    with torch.no_grad():
        expected = clip(pixel_values=x, **_tokens(clip)).logits_per_image
    assert cap.logits.shape == (2, 3)
    np.testing.assert_allclose(cap.logits.values, expected.numpy(), rtol=1e-5, atol=1e-5)
    assert cap.attrs["class_names"] == PROMPTS and cap.attrs["family"] == "hf_clip"
    assert (cap.target.values == expected.argmax(-1).numpy()).all()


def test_token_ids_give_the_same_capture_and_decode_to_the_prompts(clip):
    x = _pixels()
    ids = _tokens(clip)["input_ids"]
    by_ids, by_text = vl.capture(clip, x, text=ids, target=1), vl.capture(clip, x, text=PROMPTS, target=1)
    np.testing.assert_allclose(by_ids.logits.values, by_text.logits.values, rtol=1e-5, atol=1e-6)
    assert by_ids.attrs["class_names"] == PROMPTS


def test_target_by_prompt_text_or_index(clip):
    x = _pixels()
    by_text = vl.capture(clip, x, text=PROMPTS, target="a drawing of a star")
    by_index = vl.capture(clip, x, text=PROMPTS, target=2)
    assert (by_text.target.values == 2).all()
    np.testing.assert_array_equal(by_text["stage0"].attention_grad.values, by_index["stage0"].attention_grad.values)
    with pytest.raises(vl.VitlensError, match="unknown class name"):
        vl.capture(clip, x, text=PROMPTS, target="a photo of a fox")


def test_prompt_a_and_prompt_b_give_different_maps_for_class_specific_methods(clip):
    x = _pixels(3, seed=4)
    maps_a = vl.explain(vl.capture(clip, x, text=PROMPTS, target=0, keep=("all", *vl.methods.extra_groups())), "all")
    maps_b = vl.explain(vl.capture(clip, x, text=PROMPTS, target=1, keep=("all", *vl.methods.extra_groups())), "all")
    for name in vl.METHODS:
        a, b = maps_a[name].values, maps_b[name].values
        assert np.isfinite(a).all() and a.std() > 0, name
        if name in CLASS_SPECIFIC:
            for i in range(3):
                assert np.abs(a[i] - b[i]).max() > 1e-3 * np.abs(a[i]).max(), (name, i)
        else:  # the class-agnostic methods (attention, rollout) do not depend on the prompt
            np.testing.assert_allclose(a, b, atol=1e-6, err_msg=name)


def test_attention_and_gradients_equal_transformers_eager(clip):
    x, target = _pixels(), [2, 0]
    cap = vl.capture(clip, x, text=PROMPTS, target=target)
    m = copy.deepcopy(clip)
    m.set_attn_implementation("eager")
    out = m(pixel_values=x, output_attentions=True, **_tokens(clip))
    attn = out.vision_model_output.attentions
    y = out.logits_per_image.gather(1, torch.tensor(target)[:, None]).sum()
    grads = torch.autograd.grad(y, attn)
    st = cap["stage0"]
    np.testing.assert_allclose(st.attention.sum("key").values, 1.0, atol=1e-5)
    for layer in range(2):
        np.testing.assert_allclose(st.attention.values[:, layer], attn[layer].detach().numpy(), atol=1e-6)
        # the capture embeds the prompts once, apart: float32 rounding of order 1e-6 on gradients of order 1
        np.testing.assert_allclose(st.attention_grad.values[:, layer], grads[layer].numpy(), rtol=1e-5, atol=1e-5)


def test_lrp_relevance_is_conserved_block_by_block_on_a_bias_free_clip(clip):
    assert_conserved(clip, _pixels(), PROMPTS)


def test_capture_restores_both_towers_after_an_exception(clip):
    model = copy.deepcopy(clip)
    model.train()
    text_impl, vision_impl = model.config.text_config._attn_implementation, model.config.vision_config._attn_implementation
    hooks = [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()]

    def explode(module, inputs, output):
        raise RuntimeError("boom")

    handle = model.vision_model.encoder.layers[1].register_forward_hook(explode)
    with pytest.raises(RuntimeError, match="boom"):
        vl.capture(model, _pixels(), text=PROMPTS)
    handle.remove()
    assert model.config.text_config._attn_implementation == text_impl
    assert model.config.vision_config._attn_implementation == vision_impl
    assert all(m.training for m in model.modules())
    assert [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()] == hooks
    assert len(hf_common._PROBES) == 0


def test_a_processor_can_be_passed_and_is_required_without_one(clip, clip_dir):
    model = copy.deepcopy(clip)
    del model.vitlens_text_processor
    model.config._name_or_path = ""
    with pytest.raises(vl.VitlensError, match="processor="):
        vl.capture(model, _pixels(), text=PROMPTS)
    processor = transformers.CLIPProcessor.from_pretrained(clip_dir)
    cap = vl.capture(model, _pixels(), text=PROMPTS, processor=processor)
    np.testing.assert_allclose(cap.logits.values, vl.capture(clip, _pixels(), text=PROMPTS).logits.values, atol=1e-6)


def test_text_errors_say_what_to_do(clip):
    with pytest.raises(vl.VitlensError, match="text="):
        vl.capture(clip, _pixels())
    with pytest.raises(vl.VitlensError, match="repeated"):
        vl.capture(clip, _pixels(), text=["a dog", "a dog"])
    with pytest.raises(vl.VitlensError, match="LongTensor"):
        vl.capture(clip, _pixels(), text=torch.ones(2, 3))
    vit = vl.load_model("vit_tiny_patch16_224", num_classes=3, img_size=32, patch_size=8, depth=1, device="cpu")
    with pytest.raises(vl.VitlensError, match="target="):
        vl.capture(vit, np.zeros((1, 32, 32, 3)), text=PROMPTS)


def test_images_go_through_the_clip_image_processor(clip):
    picture = np.random.default_rng(2).random((48, 40, 3)).astype(np.float32)
    cap = vl.capture(clip, picture, text=PROMPTS)
    from PIL import Image

    pil = Image.fromarray(np.round(picture * 255).astype(np.uint8))
    x = clip.vitlens_image_processor(images=pil, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        expected = clip(pixel_values=x, **_tokens(clip)).logits_per_image
    np.testing.assert_allclose(cap.logits.values, expected.numpy(), rtol=1e-5, atol=1e-5)
    assert cap.attrs["mean"] == list(clip.vitlens_image_processor.image_mean)


def test_explorer_lists_the_prompts_and_recaptures_for_another_prompt(clip):
    from vitlens.widgets.explorer import Explorer

    cap = vl.capture(clip, _pixels(1), text=PROMPTS)
    ex = Explorer(cap, clip)
    assert sorted(ex.class_names) == sorted(PROMPTS)
    assert {c for _, c in ex.class_select.options} == {0, 1, 2}
    other = [c for _, c in ex.class_select.options if c != ex.target][0]
    ex.class_select.value = other
    recap = ex.classes._recapture(0, other)
    assert recap.attrs["class_names"] == PROMPTS and int(recap.target.values[0]) == other
    direct = vl.capture(clip, cap.image.values, text=PROMPTS, target=other)
    np.testing.assert_allclose(recap["stage0"].attention_grad.values, direct["stage0"].attention_grad.values, atol=1e-6)


def test_parts_describe_the_attention_the_model_computed(clip):
    assert_parts_describe_the_attention(clip, _pixels(), PROMPTS)


def test_a_model_from_from_pretrained_finds_its_processors_beside_the_weights(clip, clip_dir):
    model = transformers.CLIPModel.from_pretrained(clip_dir).eval()  # not through vl.load_model
    assert not hasattr(model, "vitlens_text_processor") and not hasattr(model, "vitlens_image_processor")
    cap = vl.capture(model, _pixels(), text=PROMPTS)
    np.testing.assert_allclose(cap.logits.values, vl.capture(clip, _pixels(), text=PROMPTS).logits.values, atol=1e-6)
    assert cap.attrs["mean"] == list(clip.vitlens_image_processor.image_mean)


def test_prompts_that_a_tokenizer_maps_to_the_same_ids_are_refused_naming_it(clip_dir, tmp_path):
    """#32.7: a tokenizer without a vocabulary turns every prompt into unknown tokens, so every prompt
    got the same logits and maps, silently."""
    import shutil

    d = tmp_path / "clip"
    shutil.copytree(clip_dir, d)
    for f in d.iterdir():  # drop the saved tokenizer, keep the weights and the image processor
        if f.name.startswith(("vocab", "merges", "tokenizer", "special_tokens")):
            f.unlink()
    empty = transformers.CLIPTokenizer(vocab={"<|startoftext|>": 0, "<|endoftext|>": 1}, merges=[])
    empty.save_pretrained(d)
    model = vl.load_model(f"hf:{d}", device="cpu")
    with pytest.raises(vl.OptionError, match=r"CLIPTokenizer.*same token ids") as err:
        vl.capture(model, _pixels(), text=["a photo of a dog", "a photo of a cat"])
    assert "a photo of a dog" in str(err.value) and str(d) in str(err.value)
    with pytest.raises(vl.OptionError, match="same token ids"):
        vl.capture(model, _pixels(), text=torch.tensor([[0, 5, 1], [0, 5, 1]]))
