"""AttnLRP / CP-LRP (issue 29): hand-computed rules, conservation, and agreement with the authors' ``lxt``."""

from __future__ import annotations

import importlib
import math
import os
import sys
import types
from contextlib import contextmanager

import numpy as np
import pytest
import timm
import torch
from torch import nn

import vitlens as vl
from vitlens.capture.attnlrp import RelevanceMode
from vitlens.capture.hooks import Recorder
from vitlens.capture.images import prepare
from vitlens.models import adapter_for
from vitlens.models.lrp_rules import uniform_product

from conftest import make_swin, make_vit, random_images
from family_checks import zero_biases

CONSERVATION_RTOL = 1e-3
EXTRA = ("all", "attnlrp", "attnlrp_cp")


def _relevance(fn, x: torch.Tensor, softmax: str = "cp") -> torch.Tensor:
    """``x ⊙ ∂y/∂x`` of ``y = fn(x)`` (summed) under the AttnLRP rules."""
    x = x.clone().requires_grad_(True)
    with RelevanceMode(softmax):
        y = fn(x).sum()
    (g,) = torch.autograd.grad(y, x)
    return (x * g).detach()


# -- the rules on cases small enough to do by hand ------------------------------------------------
def test_uniform_rule_gives_each_factor_half_of_a_product_of_two_activations():
    # y_i = a_i·b_i with a = x⊙(2, -1), b = x⊙(1, 3): x = (1, 2) gives a = (2, -2), b = (1, 6), y = (2, -12).
    # Each factor gets y_i/2 and both factors come from x_i, so x_i keeps y_i (plain gradient × input: 2·y_i).
    r = _relevance(lambda x: (x * torch.tensor([2.0, -1.0])) * (x * torch.tensor([1.0, 3.0])), torch.tensor([1.0, 2.0]))
    assert r.tolist() == [2.0, -12.0]
    # a matrix product of two activations: z = A @ v with A = x[:2] as a row, v = x[2:] as a column
    r = _relevance(lambda x: x[:2].reshape(1, 2) @ x[2:].reshape(2, 1), torch.tensor([1.0, 2.0, 3.0, -4.0]))
    # z = 1·3 + 2·(-4) = -5; the pair (x0, x2) carries 3, split 1.5/1.5, the pair (x1, x3) carries -8, -4/-4
    assert r.tolist() == [1.5, -4.0, 1.5, -4.0]
    a = torch.tensor([3.0], requires_grad=True)
    y = uniform_product(torch.mul, a, a * 1.0)
    (g,) = torch.autograd.grad(y, a)
    assert float((a * g).detach()) == 9.0  # a·a: the two halves of y = 9 meet at a


def test_epsilon_and_identity_rules_on_a_hand_computed_two_layer_net():
    first, second = nn.Linear(2, 2), nn.Linear(2, 1)
    with torch.no_grad():
        first.weight.copy_(torch.tensor([[1.0, 2.0], [-1.0, 1.0]]))
        first.bias.copy_(torch.tensor([0.5, -1.0]))
        second.weight.copy_(torch.tensor([[1.0, -2.0]]))
        second.bias.fill_(0.25)
    net = nn.Sequential(first, nn.GELU(), second).requires_grad_(False)
    r = _relevance(net, torch.tensor([[1.0, 3.0]]))[0]
    # h = W1·x + b1 = (7.5, 1); g = GELU(h); the output Linear's ε-rule: R_g = g ⊙ w2 (its bias keeps 0.25);
    # GELU: identity rule, R_h = R_g; the first Linear: R_x_i = Σ_j x_i·W1_ji·R_h_j / h_j (b1 keeps its share)
    gelu = [h * 0.5 * (1 + math.erf(h / math.sqrt(2))) for h in (7.5, 1.0)]
    r_h = [gelu[0] * 1.0, gelu[1] * -2.0]
    expected = [1.0 * 1.0 * r_h[0] / 7.5 + 1.0 * -1.0 * r_h[1] / 1.0,
                3.0 * 2.0 * r_h[0] / 7.5 + 3.0 * 1.0 * r_h[1] / 1.0]
    assert r.tolist() == pytest.approx(expected, rel=1e-5)
    y = float(net(torch.tensor([[1.0, 3.0]])))
    leak = 0.25 + r_h[0] * 0.5 / 7.5 + r_h[1] * -1.0 / 1.0  # what the two biases took
    assert float(r.sum()) == pytest.approx(y - leak, rel=1e-5)


def test_layer_norm_holds_its_scale_and_gives_the_bias_its_share():
    norm = nn.LayerNorm(3).requires_grad_(False)
    with torch.no_grad():
        norm.weight.copy_(torch.tensor([1.0, 2.0, -1.0]))
        norm.bias.copy_(torch.tensor([0.1, 0.0, 0.2]))
    x = torch.tensor([[1.0, 2.0, 6.0]])
    r = _relevance(norm, x)[0]
    y = norm(x)[0]
    # σ held: the map is γ ⊙ (x − mean(x))/σ + β, linear in x; the centred input's relevance is
    # x_i·(c_i − mean(c)) with c = γ/σ, and the outputs minus the biases sum to the same total
    std = float(((x - x.mean()) ** 2).mean().add(1e-5).sqrt())
    c = torch.tensor([1.0, 2.0, -1.0]) / std
    assert r.tolist() == pytest.approx((x[0] * (c - c.mean())).tolist(), rel=1e-5)
    assert float(r.sum()) == pytest.approx(float((y - norm.bias).sum()), rel=1e-5)


# -- conservation ----------------------------------------------------------------------------------
def _per_layer_totals(cap, softmax: str) -> np.ndarray:
    """(sample, layer) total relevance entering every block, in global block order."""
    name = "attnlrp_cp_relevance" if softmax == "cp" else "attnlrp_relevance"
    return np.concatenate([cap[s][name].values.sum(-1) for s in sorted(cap.children)], axis=1)


@pytest.mark.parametrize("build", [make_vit, make_swin, lambda: make_vit(global_pool="avg", class_token=False)],
                         ids=["vit", "swin", "vit-avg"])
def test_cp_lrp_sums_to_the_target_logit_block_by_block_on_a_bias_free_copy(build):
    model = zero_biases(build())
    size = adapter_for(model).input_size[0]
    cap = vl.capture(model, random_images(2, size), target=1, keep=EXTRA)
    totals = _per_layer_totals(cap, "cp")
    logit = cap["logits"].values[:, 1:2]
    np.testing.assert_allclose(totals, np.broadcast_to(logit, totals.shape), rtol=CONSERVATION_RTOL)
    prefix = cap["stage0"].attrs["num_prefix_tokens"]  # the CLS token entering block 0 is a parameter, not a patch
    on_prefix = cap["stage0"]["attnlrp_cp_relevance"].values[:, 0, :prefix].sum(-1)
    vl_map = vl.explain(cap, "attnlrp")  # the patches' share, spread over the first-stage grid
    np.testing.assert_allclose(vl_map.sum(("y", "x")).values + on_prefix, logit[:, 0], rtol=CONSERVATION_RTOL)


def _softmax_deficit(probs: torch.Tensor) -> torch.Tensor:
    """What AttnLRP's softmax rule does not pass on, per image: Σ rows (Σ R_out − Σ R_in).

    With R_out = p ⊙ ∂y/∂p and R_in = x ⊙ ∂y/∂x at the logits x (x = log p + c per row, and the
    softmax's input gradient sums to 0 over a row, so c drops out): computed from p and its gradient.
    """
    p, g = probs.detach().double(), probs.grad.double()
    r_out = (p * g).sum(-1)
    grad_in = p * (g - (p * g).sum(-1, keepdim=True))
    r_in = (torch.log(p) * grad_in).sum(-1)
    return (r_out - r_in).reshape(p.shape[0], -1).sum(1)


def test_attnlrp_is_conserved_block_by_block_up_to_the_softmax_rule_of_the_paper():
    model = zero_biases(make_vit(depth=3))
    adapter = adapter_for(model)
    x = prepare(random_images(2, 32), adapter).pixels.requires_grad_(True)
    inputs, probs = {}, []
    hooks = [part.module.register_forward_pre_hook(lambda m, a, l=l: inputs.__setitem__(l, a[0]))
             for l, part in enumerate(adapter.parts)]

    def keep(p):
        p.retain_grad()
        probs.append(p)

    try:
        with Recorder(adapter, param_grads=False, fused=False) as rec:
            rec.paused = True
            with RelevanceMode("attnlrp", on_probs=keep):
                y = model(x)[:, 1]
            for t in inputs.values():
                t.retain_grad()
            y.sum().backward()
    finally:
        for h in hooks:
            h.remove()
    totals = [(inputs[l] * inputs[l].grad).sum((1, 2)).double() for l in range(3)] + [y.detach().double()]
    deficits = [_softmax_deficit(probs[l]) for l in range(3)]
    for l in range(3):
        torch.testing.assert_close(totals[l], totals[l + 1] - deficits[l], rtol=CONSERVATION_RTOL, atol=1e-6)
    # the term is there and not negligible: without it the totals would not match
    assert (sum(d.abs() for d in deficits) > 0.05 * totals[-1].abs()).all()


# -- agreement with lxt ----------------------------------------------------------------------------
def _lxt():
    """lxt 2.1's efficient rules and patches, without importing its transformers-4 BERT copy.

    ``lxt.efficient``'s package __init__ imports every supported model, and its BERT module
    needs a name transformers 5 removed; the modules the tests use do not.
    """
    lxt = pytest.importorskip("lxt")
    root = os.path.join(os.path.dirname(lxt.__file__), "efficient")
    for name, path in (("lxt.efficient", root), ("lxt.efficient.models", os.path.join(root, "models"))):
        if name not in sys.modules:
            pkg = types.ModuleType(name)
            pkg.__path__ = [path]
            sys.modules[name] = pkg
    return (importlib.import_module("lxt.efficient.patches"),
            importlib.import_module("lxt.efficient.models.vit_torch"))


@contextmanager
def _patched(classes):
    """lxt patches classes (torch's own LayerNorm, GELU, MultiheadAttention): put them back afterwards."""
    saved = [(c, c.forward, c.__dict__.get("original_forward")) for c in classes]
    try:
        yield
    finally:
        for c, forward, original in saved:
            c.forward = forward
            if original is None and "original_forward" in c.__dict__:
                del c.original_forward


def _torchvision_copy(model: nn.Module) -> nn.Module:
    """torchvision's VisionTransformer with the timm ViT's weights (the ViT lxt patches)."""
    from torchvision.models.vision_transformer import VisionTransformer

    cfg = model.patch_embed
    tv = VisionTransformer(image_size=cfg.img_size[0], patch_size=cfg.patch_size[0], num_layers=len(model.blocks),
                           num_heads=model.blocks[0].attn.num_heads, hidden_dim=model.embed_dim,
                           mlp_dim=model.blocks[0].mlp.fc1.out_features, num_classes=model.num_classes).eval()
    with torch.no_grad():
        tv.conv_proj.load_state_dict(model.patch_embed.proj.state_dict())
        tv.class_token.copy_(model.cls_token)
        tv.encoder.pos_embedding.copy_(model.pos_embed)
        for block, layer in zip(model.blocks, tv.encoder.layers):
            layer.ln_1.load_state_dict(block.norm1.state_dict())
            layer.ln_2.load_state_dict(block.norm2.state_dict())
            layer.self_attention.in_proj_weight.copy_(block.attn.qkv.weight)
            layer.self_attention.in_proj_bias.copy_(block.attn.qkv.bias)
            layer.self_attention.out_proj.load_state_dict(block.attn.proj.state_dict())
            layer.mlp[0].load_state_dict(block.mlp.fc1.state_dict())
            layer.mlp[3].load_state_dict(block.mlp.fc2.state_dict())
        tv.encoder.ln.load_state_dict(model.norm.state_dict())
        tv.heads.head.load_state_dict(model.head.state_dict())
    return tv


def _spread(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights far from timm's near-zero init (so attention is not uniform), biases included."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2 and "pos" not in name and "token" not in name:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
            elif p.ndim == 1:
                p.copy_(torch.randn(p.shape, generator=g) * (0.1 if name.endswith("bias") else 0.2) +
                        (1.0 if name.endswith("weight") else 0.0))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model


def _token_relevance_of(model: nn.Module, blocks: nn.Module, x: torch.Tensor, target: list[int]) -> np.ndarray:
    """Relevance at the tokens entering the first block, by gradient × input (lxt's way of reading it)."""
    seen = {}
    handle = blocks.register_forward_pre_hook(lambda m, a: seen.__setitem__("t", a[0]))
    try:
        x = x.clone().requires_grad_(True)
        out = model(x)
        out = out.logits if hasattr(out, "logits") else out
        tokens = seen["t"]
        (g,) = torch.autograd.grad(out.gather(1, torch.tensor(target)[:, None]).sum(), tokens)
    finally:
        handle.remove()
    return (tokens * g).sum(-1)[:, 1:].detach().numpy()


def _correlations(a: np.ndarray, b: np.ndarray) -> list[float]:
    return [float(np.corrcoef(p.ravel(), q.ravel())[0, 1]) for p, q in zip(a, b)]


def test_cp_lrp_agrees_with_lxt_on_torchvision_vit_with_the_same_weights():
    patches, vit_torch = _lxt()
    model = _spread(make_vit(depth=3, embed_dim=48, num_heads=3))
    images, target = random_images(3, 32, seed=3), [0, 2, 4]
    cap = vl.capture(model, images, target=target, keep=("all", "attnlrp_cp"))
    ours = vl.explain(cap, "attnlrp").values.reshape(3, -1)
    tv = _torchvision_copy(model)
    x = prepare(images, adapter_for(model)).pixels
    np.testing.assert_allclose(tv(x).detach().numpy(), cap["logits"].values, rtol=1e-4, atol=1e-4)
    with _patched(list(vit_torch.cp_LRP)):
        for cls, patch in vit_torch.cp_LRP.items():  # lxt's own map for torchvision's ViT (monkey_patch does this)
            assert patch(cls)
        theirs = _token_relevance_of(tv, tv.encoder.layers, x, target)
    corr = _correlations(ours, theirs)
    assert min(corr) >= 0.99, corr
    np.testing.assert_allclose(ours, theirs, rtol=1e-3, atol=1e-4 * np.abs(theirs).max())


@pytest.mark.parametrize("softmax", ["cp", "attnlrp"])
@pytest.mark.slow
def test_attnlrp_agrees_with_lxt_attention_rules_on_a_transformers_vit(softmax):
    transformers = pytest.importorskip("transformers")
    patches, _ = _lxt()
    from transformers.activations import GELUActivation
    from transformers.models.vit import modeling_vit

    torch.manual_seed(0)
    config = transformers.ViTConfig(hidden_size=48, num_hidden_layers=3, num_attention_heads=3, intermediate_size=96,
                                    image_size=32, patch_size=8, num_labels=5, attn_implementation="eager")
    model = _spread(transformers.ViTForImageClassification(config).eval())
    model.vitlens_image_processor = transformers.ViTImageProcessor(size={"height": 32, "width": 32})
    images, target = random_images(3, 32, seed=4), [1, 3, 0]
    group = "attnlrp_cp" if softmax == "cp" else "attnlrp"
    cap = vl.capture(model, images, target=target, keep=("all", group))
    ours = vl.explain(cap, "attnlrp", softmax=softmax).values.reshape(3, -1)
    x = prepare(images, adapter_for(model)).pixels
    wrap = patches.cp_wrap_attention_forward if softmax == "cp" else patches.wrap_attention_forward
    original = modeling_vit.eager_attention_forward
    with _patched([nn.LayerNorm, GELUActivation]):
        try:  # lxt's rules for transformers models: its LayerNorm, activation and attention patches
            patches.patch_method(patches.layer_norm_forward, nn.LayerNorm)
            patches.patch_method(patches.non_linear_forward, GELUActivation, keep_original=True)
            modeling_vit.eager_attention_forward = wrap(original)
            theirs = _token_relevance_of(model, model.vit.layers[0], x, target)
        finally:
            modeling_vit.eager_attention_forward = original
    corr = _correlations(ours, theirs)
    assert min(corr) >= 0.99, corr
    np.testing.assert_allclose(ours, theirs, rtol=1e-3, atol=1e-4 * np.abs(theirs).max())


# -- families ----------------------------------------------------------------------------------------
FAMILIES = {
    "eva": lambda: timm.create_model("eva02_tiny_patch14_224", img_size=28, patch_size=14, num_classes=4, depth=2,
                                     embed_dim=32, num_heads=2).eval(),
    "beit": lambda: timm.create_model("beit_base_patch16_224", img_size=32, patch_size=16, num_classes=4, depth=2,
                                      embed_dim=32, num_heads=2).eval(),
    "swinv2": lambda: timm.create_model("swinv2_tiny_window8_256", img_size=32, patch_size=4, window_size=4,
                                        embed_dim=16, depths=(2, 2), num_heads=(2, 2), num_classes=4).eval(),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.slow
def test_cp_lrp_is_conserved_and_both_maps_finite_on_every_timm_family(family):
    torch.manual_seed(0)
    model = zero_biases(FAMILIES[family]())
    size = adapter_for(model).input_size[0]
    cap = vl.capture(model, random_images(2, size), target=2, keep=EXTRA + ("legrad",))
    totals = _per_layer_totals(cap, "cp")
    logit = cap["logits"].values[:, 2:3]
    np.testing.assert_allclose(totals, np.broadcast_to(logit, totals.shape), rtol=CONSERVATION_RTOL)
    for softmax in ("cp", "attnlrp"):
        assert np.isfinite(vl.explain(cap, "attnlrp", softmax=softmax, per_layer=True).values).all()
    assert np.isfinite(vl.explain(cap, "legrad").values).all()


@pytest.mark.slow
def test_two_targets_give_different_attnlrp_maps_and_the_error_names_the_missing_pass(vit, images32):
    a = vl.capture(vit, images32[:2], target=0, keep=EXTRA)
    b = vl.capture(vit, images32[:2], target=3, keep=EXTRA)
    for softmax in ("cp", "attnlrp"):
        assert not np.allclose(vl.explain(a, "attnlrp", softmax=softmax), vl.explain(b, "attnlrp", softmax=softmax))
    plain = vl.capture(vit, images32[:1])
    with pytest.raises(vl.CaptureFormatError, match=r"keep=\('all', 'attnlrp_cp'\)"):
        vl.explain(plain, "attnlrp")
    assert "attnlrp" not in vl.explain(plain, "all")  # "all": what the capture can explain
    assert "attnlrp" in vl.explain(a, "all")
