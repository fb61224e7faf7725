"""transformers Swinv2: a random timm SwinV2 copied into ``Swinv2ForImageClassification``, both explained.

Res-post-norm blocks, cosine attention with a learned logit scale and the
continuous (MLP) position bias; timm's SwinV2 capture is tested on its own
(tests/test_family_swinv2.py), and with the same weights the transformers
capture must agree with it; transformers' ``output_attentions`` (last block of
each stage) is a second reference.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
timm = pytest.importorskip("timm")

import vitlens as vl  # noqa: E402
from vitlens.capture.hooks import Recorder  # noqa: E402
from vitlens.capture.relevance import attention_relevance  # noqa: E402
from vitlens.models import adapter_for, hf_common  # noqa: E402
from family_checks import zero_hf_swin_biases  # noqa: E402

SIZE = 32
ARCH = dict(patch_size=2, window_size=4, embed_dim=16, depths=(2, 2), num_heads=(2, 4), mlp_ratio=2.0)


def timm_swinv2(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = timm.create_model("swinv2_tiny_window8_256", img_size=SIZE, num_classes=3, **ARCH).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "cpb_mlp" in name or "logit_scale" in name:
                continue
            p.add_(torch.randn_like(p) * (0.3 if p.ndim >= 2 else 0.1))
    return model


def hf_swinv2_from_timm(model: torch.nn.Module) -> torch.nn.Module:
    cfg = transformers.Swinv2Config(image_size=SIZE, patch_size=ARCH["patch_size"], embed_dim=ARCH["embed_dim"],
                                    depths=list(ARCH["depths"]), num_heads=list(ARCH["num_heads"]),
                                    window_size=ARCH["window_size"], mlp_ratio=ARCH["mlp_ratio"], num_labels=3,
                                    hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, drop_path_rate=0.0)
    hf = transformers.Swinv2ForImageClassification(cfg).eval()
    t = model.state_dict()
    out = {
        "swinv2.embeddings.patch_embeddings.projection.weight": t["patch_embed.proj.weight"],
        "swinv2.embeddings.patch_embeddings.projection.bias": t["patch_embed.proj.bias"],
        "swinv2.embeddings.norm.weight": t["patch_embed.norm.weight"],
        "swinv2.embeddings.norm.bias": t["patch_embed.norm.bias"],
        "swinv2.layernorm.weight": t["norm.weight"], "swinv2.layernorm.bias": t["norm.bias"],
        "classifier.weight": t["head.fc.weight"], "classifier.bias": t["head.fc.bias"],
    }
    for s, depth in enumerate(ARCH["depths"]):
        for b in range(depth):
            src, dst = f"layers.{s}.blocks.{b}.", f"swinv2.encoder.layers.{s}.blocks.{b}."
            for a, h in (("norm1", "layernorm_before"), ("norm2", "layernorm_after"),
                         ("attn.proj", "attention.output.dense"), ("mlp.fc1", "intermediate.dense"),
                         ("mlp.fc2", "output.dense")):
                for kind in ("weight", "bias"):
                    out[f"{dst}{h}.{kind}"] = t[f"{src}{a}.{kind}"]
            q, k, v = t[f"{src}attn.qkv.weight"].chunk(3, 0)
            att = f"{dst}attention.self."
            out.update({f"{att}query.weight": q, f"{att}key.weight": k, f"{att}value.weight": v,
                        f"{att}query.bias": t[f"{src}attn.q_bias"], f"{att}value.bias": t[f"{src}attn.v_bias"],
                        f"{att}logit_scale": t[f"{src}attn.logit_scale"]})
            for kind in ("0.weight", "0.bias", "2.weight"):
                out[f"{att}continuous_position_bias_mlp.{kind}"] = t[f"{src}attn.cpb_mlp.{kind}"]
        if s + 1 < len(ARCH["depths"]):
            for kind in ("norm.weight", "norm.bias", "reduction.weight"):
                out[f"swinv2.encoder.layers.{s}.downsample.{kind}"] = t[f"layers.{s + 1}.downsample.{kind}"]
    hf.load_state_dict(out, strict=True)
    hf.vitlens_image_processor = transformers.ViTImageProcessor(
        size={"height": SIZE, "width": SIZE}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    return hf


@pytest.fixture(scope="module")
def pair():
    model = timm_swinv2()
    return model, hf_swinv2_from_timm(model)


def _pixels(n=3, seed=1):
    return torch.randn(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def _corr(a, b):
    a, b = a.ravel() - a.mean(), b.ravel() - b.mean()
    return float(a @ b / np.sqrt((a @ a) * (b @ b)))


def test_converted_swinv2_gives_the_same_logits(pair):
    model, hf = pair
    x = _pixels()
    with torch.no_grad():
        a, b = model(x), hf(pixel_values=x).logits
    assert a.abs().max() > 0.1
    np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=1e-4, atol=1e-5)


def test_captures_and_all_seven_maps_agree_with_timm(pair):
    model, hf = pair
    x, target = _pixels(4, seed=2), [0, 2, 1, 1]
    cap_t, cap_h = (vl.capture(m, x, target=target, keep=vl.KEEP_GROUPS) for m in (model, hf))
    assert cap_h.attrs["family"] == "hf_swinv2" and list(cap_h.children) == ["stage0", "stage1"]
    for stage in ("stage0", "stage1"):
        for var in ("attention", "attention_grad", "ln_mean", "token_norm", "attn_value_norm", "mlp_out_norm"):
            np.testing.assert_allclose(cap_h[stage][var].values, cap_t[stage][var].values, rtol=1e-3, atol=1e-5,
                                       err_msg=f"{stage}/{var}")
        for i in range(4):  # LRP: compared as a whole per image (see tests/test_hf_swin.py)
            assert _corr(cap_h[stage].attention_relevance.values[i], cap_t[stage].attention_relevance.values[i]) > 0.999
    maps_t, maps_h = vl.explain(cap_t, "all"), vl.explain(cap_h, "all")
    worst = {}
    for name in vl.METHODS:
        corrs = [_corr(maps_t[name].values[i], maps_h[name].values[i]) for i in range(4)
                 if maps_t[name].values[i].std() > 0]
        assert len(corrs) >= 3, name
        worst[name] = min(corrs)
    print("worst per-image correlation timm SwinV2 vs transformers Swinv2:", worst)
    assert all(c > 0.999 for c in worst.values()), worst


def test_last_attention_of_each_stage_and_its_gradient_equal_transformers_own(pair):
    _, hf = pair
    x, target = _pixels(2), [1, 2]
    cap = vl.capture(hf, x, target=target)
    out = copy.deepcopy(hf)(pixel_values=x, output_attentions=True)
    grads = torch.autograd.grad(out.logits.gather(1, torch.tensor(target)[:, None]).sum(), out.attentions)
    for stage, a, g in zip(("stage0", "stage1"), out.attentions, grads):
        nw = a.shape[0] // 2
        a = a.detach().view(2, nw, *a.shape[1:]).transpose(1, 2).numpy()
        g = g.view(2, nw, *g.shape[1:]).transpose(1, 2).numpy()
        np.testing.assert_allclose(cap[stage].attention.values[:, -1], a, atol=1e-6)
        np.testing.assert_allclose(cap[stage].attention_grad.values[:, -1], g, rtol=1e-5, atol=1e-6)


def test_parts_describe_the_attention_the_model_computed(pair):
    _, hf = pair
    ad = adapter_for(hf)
    with Recorder(ad, keep_block_inputs=True) as rec, torch.no_grad():
        ad.logits(_pixels(2))
        for layer, part in enumerate(ad.parts):
            z = part.attn.logits(rec.attn_inputs[layer], rec.attn_ctx.get(layer, {}), rec.linears[layer])
            torch.testing.assert_close(z.softmax(-1), rec.attention[layer], atol=1e-5, rtol=1e-4)


def test_lrp_is_conserved_block_by_block_without_biases(pair):
    _, hf = pair
    model = zero_hf_swin_biases(copy.deepcopy(hf))
    ad = adapter_for(model)
    with Recorder(ad, keep_block_inputs=True) as rec:
        attention_relevance(ad, rec, ad.logits(_pixels(2)).argmax(-1), to_input=True)
    assert set(rec.relevance_totals) == {0, 1, 2, 3}
    for r_in, r_out in rec.relevance_totals.values():
        torch.testing.assert_close(r_in, r_out, rtol=1e-3, atol=1e-4)  # shifted windows: the -100 mask leaks a little


def test_capture_restores_the_model_after_an_exception(pair):
    _, hf = pair
    model = copy.deepcopy(hf)
    model.train()
    hooks = [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()]
    handle = model.swinv2.encoder.layers[1].blocks[0].register_forward_hook(
        lambda *a: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        vl.capture(model, _pixels(1))
    handle.remove()
    assert all(m.training for m in model.modules())
    assert [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()] == hooks
    assert len(hf_common._PROBES) == 0
