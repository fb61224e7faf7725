"""SigLIP: similarities with a logit bias, an attention-pool read-out (tiny random SigLIP, token ids as prompts)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

import vitlens as vl  # noqa: E402
from vitlens.capture.relevance import attention_relevance  # noqa: E402
from family_checks import assert_conserved, assert_parts_describe_the_attention  # noqa: E402
from vitlens.models import hf_common  # noqa: E402
from vitlens.coverage.transformers_classes import spread_weights  # noqa: E402

CLASS_SPECIFIC = tuple(name for name, info in vl.methods.METHOD_INFO.items() if info.class_specific)



def make_siglip(seed: int = 0) -> torch.nn.Module:
    tower = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    cfg = transformers.SiglipConfig(text_config=dict(vocab_size=100, max_position_embeddings=16, bos_token_id=1,
                                                     eos_token_id=2, pad_token_id=0, **tower),
                                    vision_config=dict(image_size=32, patch_size=8, **tower))
    torch.manual_seed(seed)
    model = spread_weights(transformers.SiglipModel(cfg).eval())
    model.vitlens_image_processor = transformers.SiglipImageProcessor(size={"height": 32, "width": 32})
    return model


IDS = torch.randint(3, 100, (3, 8), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def siglip():
    return make_siglip()


def _pixels(n=2, seed=0):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_logits_are_logits_per_image_with_the_bias(siglip):
    x = _pixels()
    cap = vl.capture(siglip, x, text=IDS)
    with torch.no_grad():
        expected = siglip(input_ids=IDS, pixel_values=x).logits_per_image
    np.testing.assert_allclose(cap.logits.values, expected.numpy(), rtol=1e-5, atol=1e-5)
    assert cap.attrs["family"] == "hf_siglip" and cap.attrs["readout"] == "map"
    assert cap.attrs["class_names"] == ["prompt 0", "prompt 1", "prompt 2"]  # no tokenizer to decode ids
    assert (cap["stage0"].kind.values == "patch").all() and cap["stage0"].attention.shape[-1] == 16


def test_readout_row_is_the_pools_own_attention(siglip):
    x = _pixels()
    cap = vl.capture(siglip, x, text=IDS)
    vision = siglip.vision_model
    with torch.no_grad():
        tokens = vision(pixel_values=x).last_hidden_state  # after post_layernorm
        _, weights = vision.head.attention(vision.head.probe.repeat(2, 1, 1), tokens, tokens, need_weights=True)
    np.testing.assert_allclose(cap["stage0"].readout_weights.values, weights[:, 0].numpy(), atol=1e-6)


def test_attention_and_gradients_equal_transformers_eager(siglip):
    x, target = _pixels(), [2, 0]
    cap = vl.capture(siglip, x, text=IDS, target=target)
    m = copy.deepcopy(siglip)
    m.set_attn_implementation("eager")
    out = m(input_ids=IDS, pixel_values=x, output_attentions=True)
    attn = out.vision_model_output.attentions
    grads = torch.autograd.grad(out.logits_per_image.gather(1, torch.tensor(target)[:, None]).sum(), attn)
    for layer in range(2):
        np.testing.assert_allclose(cap["stage0"].attention.values[:, layer], attn[layer].detach().numpy(), atol=1e-6)
        np.testing.assert_allclose(cap["stage0"].attention_grad.values[:, layer], grads[layer].numpy(),
                                   rtol=1e-5, atol=1e-5)


def test_all_seven_maps_and_prompt_a_differs_from_prompt_b(siglip):
    x = _pixels(3, seed=3)
    cap_a, cap_b = (vl.capture(siglip, x, text=IDS, target=t, keep=("all", *vl.methods.extra_groups())) for t in (0, 1))
    maps_a, maps_b = vl.explain(cap_a, "all"), vl.explain(cap_b, "all")
    for name in vl.METHODS:
        a, b = maps_a[name].values, maps_b[name].values
        assert np.isfinite(a).all() and a.std() > 0, name
        if name == "transformer_attribution":
            # Under the attention-pool read-out this map is r·Π(I + Ē) with the pool's prompt-independent
            # row r, and on this random model the identity terms swamp Ē (the pooled read-out issue of the
            # methods): the map moves with the prompt by ~1e-5 of its size only. Its class-specific
            # ingredient, the relevance-weighted gradient Ē, does depend on the prompt:
            ea = (cap_a["stage0"].attention_grad * cap_a["stage0"].attention_relevance).clip(min=0).values
            eb = (cap_b["stage0"].attention_grad * cap_b["stage0"].attention_relevance).clip(min=0).values
            for i in range(3):
                assert np.abs(ea[i] - eb[i]).max() > 1e-2 * np.abs(ea[i]).max(), i
        elif name in CLASS_SPECIFIC:
            for i in range(3):
                assert np.abs(a[i] - b[i]).max() > 1e-3 * np.abs(a[i]).max(), (name, i)
        else:
            np.testing.assert_allclose(a, b, atol=1e-6, err_msg=name)


def test_lrp_is_conserved_block_by_block_and_through_the_attention_pool():
    assert_conserved(make_siglip(seed=2), _pixels(), IDS)


def test_capture_restores_the_model_after_an_exception(siglip):
    model = copy.deepcopy(siglip)
    model.train()
    impl = model.config.vision_config._attn_implementation
    hooks = [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()]
    handle = model.vision_model.encoder.layers[0].register_forward_hook(
        lambda *a: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        vl.capture(model, _pixels(), text=IDS)
    handle.remove()
    assert model.config.vision_config._attn_implementation == impl
    assert all(m.training for m in model.modules())
    assert [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()] == hooks
    assert len(hf_common._PROBES) == 0


def test_parts_describe_the_attention_the_model_computed(siglip):
    assert_parts_describe_the_attention(siglip, _pixels(), IDS)
