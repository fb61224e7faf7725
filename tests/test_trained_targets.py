"""Two targets on briefly trained models of the newer timm families: each map points at its own object.

At random init the class-specific maps are partly degenerate
(``family_checks.assert_targets_differ`` says what holds there). Here a tiny EVA02
(rotary, SwiGLU), BEiT (relative position bias, LayerScale) and SwinV2 (cosine
attention, continuous position bias; windows of 3 on grids of 8 and 4, so timm pads
them) are trained for 300 steps on a three-class toy
task — a red bar somewhere in the left half is class 0, a blue bar in the right half
class 1, neither class 2 — until they are right on ≥ 95 % of held-out images. On
images that show both bars, the same image explained for target 0 and for target 1:

- every class-specific map differs between the targets, every class-agnostic one is
  identical;
- generic attention, lnstat and TokenTM put a larger share of their mass on the left
  half for target 0 than for target 1, on every image; Grad-CAM does on average.

Without the empty class, "no red bar" is evidence for class 1, and models that were
right on every held-out image gave maps leaning towards the *other* bar (BEiT's
generic attention on all four images in one run): the empty class makes each
target's evidence its own bar. Transformer Attribution differs between the targets
but does not reliably point at the target's bar on these tiny models (in six training
runs its mean lean was positive in five, and per image wrong in 5 of 24), so only
the difference is asserted for it.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import vitlens as vl

timm = pytest.importorskip("timm")

pytestmark = pytest.mark.slow

SIZE = 32
POINTING = ("generic_attention", "lnstat", "tokentm")


def toy_batch(n: int, rng: np.random.Generator, both: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Noise images with a red bar on the left (class 0), a blue bar on the right (class 1) or neither
    (class 2); ``both``: both bars. The empty class makes "no red bar" no evidence for class 1."""
    x = rng.random((n, SIZE, SIZE, 3)).astype(np.float32) * 0.3
    y = rng.integers(0, 3, n)
    for i in range(n):
        for side in (0, 1) if both else (int(y[i]),) if y[i] < 2 else ():
            r, c = int(rng.integers(4, 20)), int(rng.integers(2, 10)) + 16 * side
            x[i, r:r + 8, c:c + 6] = (1.0, 0.2, 0.2) if side == 0 else (0.2, 0.2, 1.0)
    return x, y


def make(family: str) -> torch.nn.Module:
    kw = dict(img_size=SIZE, num_classes=3)
    if family == "eva":
        return timm.create_model("eva02_tiny_patch14_224", patch_size=8, depth=2, embed_dim=32, num_heads=4, **kw)
    if family == "beit":
        return timm.create_model("beit_base_patch16_224", patch_size=8, depth=2, embed_dim=32, num_heads=4, **kw)
    # window 3 on the 8×8 and 4×4 grids: both stages attend in padded windows (timm pads them)
    return timm.create_model("swinv2_tiny_window8_256", patch_size=4, window_size=3, embed_dim=16, depths=(2, 2),
                             num_heads=(2, 4), **kw)


def trained(family: str, steps: int = 300, batch: int = 16) -> tuple[torch.nn.Module, float]:
    """A tiny ``family`` model trained on the toy task, and its held-out accuracy."""
    torch.manual_seed(0)
    model = make(family)
    cfg = model.pretrained_cfg
    mean, std = torch.tensor(cfg["mean"])[:, None, None], torch.tensor(cfg["std"])[:, None, None]

    def tensor(x: np.ndarray) -> torch.Tensor:
        return (torch.from_numpy(x).permute(0, 3, 1, 2) - mean) / std

    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    rng = np.random.default_rng(0)
    model.train()
    for _ in range(steps):
        x, y = toy_batch(batch, rng)
        loss = torch.nn.functional.cross_entropy(model(tensor(x)), torch.from_numpy(y))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    x, y = toy_batch(200, np.random.default_rng(1))
    with torch.no_grad():
        accuracy = float((model(tensor(x)).argmax(-1).numpy() == y).mean())
    return model, accuracy


@pytest.mark.parametrize("family", ["eva", "beit", "swinv2"])
def test_each_targets_map_points_at_its_own_object_on_a_trained_model(family):
    model, accuracy = trained(family)
    assert accuracy >= 0.95, f"{family}: the toy task was not learnt ({accuracy:.3f})"
    images, _ = toy_batch(4, np.random.default_rng(2), both=True)
    cap = vl.capture(model, np.concatenate([images, images]), target=[0] * 4 + [1] * 4)
    assert cap.attrs["family"] == {"eva": "eva", "beit": "beit", "swinv2": "swinv2"}[family]
    if family == "swinv2":  # the windows hang over both stages' grids: padding is part of this check
        assert all((cap[s].window_token.values < 0).any() for s in ("stage0", "stage1"))
    maps = vl.explain(cap, "all", per_layer=False)
    for name in maps.data_vars:
        v = vl.normalize(maps[name]).values  # (8, h, w), each map scaled to [0, 1]
        if not vl.methods.METHOD_INFO[name].class_specific:
            np.testing.assert_allclose(v[:4], v[4:], atol=1e-6, err_msg=name)
            continue
        differ = np.abs(v[:4] - v[4:]).max((1, 2))
        if name == "transformer_attribution":  # on some image it can nearly agree (swinv2: 0.05)
            assert differ.max() > 0.1, f"{family} {name}: the two targets' maps agree {np.round(differ, 2)}"
        else:
            assert differ.min() > 0.1, f"{family} {name}: the two targets' maps agree {np.round(differ, 2)}"
        half = v.shape[-1] // 2
        left = v[..., :half].sum((1, 2)) / v.sum((1, 2))
        towards = left[:4] - left[4:]  # > 0: target 0's map leans to the red bar, target 1's to the blue one
        if name in POINTING:
            assert (towards > 0).all(), f"{family} {name}: left share (target 0 − target 1) {np.round(towards, 2)}"
        elif name == "gradcam":
            assert towards.mean() > 0.1, f"{family} gradcam: left share (target 0 − target 1) {np.round(towards, 2)}"
