"""LeGrad (issue 29): agreement with torchcam's LeGrad on the same weights, families, Swin windows."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import vitlens as vl
from vitlens.capture.images import prepare
from vitlens.models import adapter_for

from conftest import make_swin, make_vit, random_images
from test_attnlrp import _correlations, _spread, _torchvision_copy

KEEP = ("all", "legrad")


def _torchcam_maps(tv, x: torch.Tensor, target: list[int], projection=None) -> np.ndarray:
    from torchcam.methods import LeGrad

    with LeGrad(tv, list(tv.encoder.layers), score_projection=projection) as extractor:
        scores = tv(x)
        cams = extractor(target, scores, normalized=False)
    return cams[0].detach().numpy().reshape(len(target), -1)


@pytest.mark.parametrize("score", ["mean", "readout"])
def test_legrad_agrees_with_torchcam_on_the_same_weights(score):
    pytest.importorskip("torchcam")
    model = _spread(make_vit(depth=3, embed_dim=48, num_heads=3))
    images, target = random_images(3, 32, seed=5), [4, 0, 2]
    cap = vl.capture(model, images, target=target, keep=KEEP)
    ours = vl.explain(cap, "legrad", score=score).values.reshape(3, -1)
    tv = _torchvision_copy(model)
    x = prepare(images, adapter_for(model)).pixels
    # torchcam reads a layer out as the authors' code does (heads(ln(mean of tokens))); the model's own
    # read-out of a CLS ViT is its head on the normalised CLS token, which torchcam takes as a projection
    projection = None if score == "mean" else (lambda t: tv.heads(tv.encoder.ln(t[:, 0])))
    theirs = _torchcam_maps(tv, x, target, projection)
    corr = _correlations(ours, theirs)
    assert min(corr) >= 0.99, corr
    np.testing.assert_allclose(ours, theirs, rtol=1e-3, atol=1e-5 * np.abs(theirs).max())


@pytest.mark.slow
def test_legrad_reads_swin_windows_as_an_independent_autograd_does(swin):
    """On Swin, each key token's value is the mean over the stage's queries of the clamped gradient
    of the layer's score at the block's windowed attention, gathered through ``window_token``."""
    images = random_images(2, 64, seed=1)
    cap = vl.capture(swin, images, target=1, keep=KEEP)
    per_layer = vl.explain(cap, "legrad", per_layer=True)
    last = cap["stage1"]
    assert list(per_layer["layer"].values) == list(last["layer"].values)  # the blocks the head can read
    # independently: timm's explicit attention path, its probabilities and block outputs by module hooks
    model = swin
    blocks = [b for stage in model.layers for b in stage.blocks][-len(last["layer"]):]
    probs, outs, handles, fused = {}, {}, [], [b.attn.fused_attn for b in blocks]
    for i, block in enumerate(blocks):
        block.attn.fused_attn = False
        handles.append(block.attn.attn_drop.register_forward_hook(lambda m, a, o, i=i: probs.__setitem__(i, o)))
        handles.append(block.register_forward_hook(lambda m, a, o, i=i: outs.__setitem__(i, o)))
    try:
        x = prepare(images, adapter_for(model)).pixels.requires_grad_(True)
        model(x)
        window_token = last["window_token"].values
        for i, layer in enumerate(last["layer"].values):
            score = model.head.fc(model.norm(outs[i].mean((1, 2))))[:, 1]
            (g,) = torch.autograd.grad(score.sum(), probs[i], retain_graph=True)
            g = g.clamp_min(0).sum(-2).reshape(2, -1, *g.shape[1:2], g.shape[-1]).numpy()  # (B, nW, H, M²)
            n = last.sizes["token"]
            expected = np.zeros((2, g.shape[2], n))
            for w in range(g.shape[1]):
                for p in range(g.shape[3]):
                    expected[:, :, window_token[i, w, p]] += g[:, w, :, p] / n
            np.testing.assert_allclose(last["legrad_mean"].sel(layer=layer).values, expected, rtol=1e-4, atol=1e-9)
    finally:
        for h in handles:
            h.remove()
        for block, flag in zip(blocks, fused):
            block.attn.fused_attn = flag
    assert np.isfinite(per_layer.values).all() and per_layer.values.max() > 0
    with pytest.raises(vl.OptionError, match="head cannot read"):
        vl.explain(cap, "legrad", layers=[0])


@pytest.mark.slow
def test_legrad_is_class_specific_and_heads_select(vit, images32):
    a = vl.capture(vit, images32[:2], target=0, keep=KEEP)
    b = vl.capture(vit, images32[:2], target=3, keep=KEEP)
    assert not np.allclose(vl.explain(a, "legrad"), vl.explain(b, "legrad"))
    one = vl.explain(a, "legrad", heads=[1], layers=[2]).values
    g = a["stage0"]["legrad_mean"].sel(layer=2).values[:, 1, 1:].reshape(2, 4, 4)
    np.testing.assert_allclose(one, g, rtol=1e-6)
    with pytest.raises(vl.CaptureFormatError, match=r"keep=\('all', 'legrad'\)"):
        vl.explain(vl.capture(vit, images32[:1]), "legrad")
