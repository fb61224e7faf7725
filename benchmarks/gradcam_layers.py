"""Which Grad-CAM should vitlens default to? Target layers and the heads-as-channels form, on both shipped models.

    python benchmarks/gradcam_layers.py [--images 120] [--seed 31337]

Every labelled object of ``--images`` held-out ``vl.datasets.shapes`` images (one- and
two-object, a seed no training, test or demo uses) is one item, explained for its own
class, and scored with the project's segmentation protocol (``vl.metrics.segmentation``:
pointing game, mIoU, mAP; docs/METHODS.md "Metrics"). Variants:

- ``attention``: vitlens ``gradcam(on="attention")``, the heads of the last block as channels
  (the read-out row of each head's attention, weighted by the mean of the same row of its
  gradient): Chefer et al.'s baseline under a CLS read-out, the mean of the query rows
  under an average read-out;
- ``features``: vitlens ``gradcam(on="features")`` on what the capture records (CLS: the last
  block's ``norm1`` output; average read-out: the final norm's output);
- ``<module>``: classic Grad-CAM on that module's output, computed here with hooks (the
  target layers pytorch-grad-cam's documentation picks for ViT, ``blocks[-1].norm1``, and
  for Swin, ``layers[-1].blocks[-1].norm1``; also ``norm2``).

Prints one table per model and the paired bootstrap interval (95 %) of each variant's
pointing game against the current default.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import xarray as xr

import vitlens as vl

HOOKED = {
    "vit-shapes": {"blocks[-1].norm1": lambda m: m.blocks[-1].norm1},
    "swin-shapes": {"norm (final)": lambda m: m.norm,
                    "layers[-1].blocks[-1].norm1": lambda m: m.layers[-1].blocks[-1].norm1,
                    "layers[-1].blocks[-1].norm2": lambda m: m.layers[-1].blocks[-1].norm2},
}


def items(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Images, classes, masks and object counts: one row per labelled object."""
    ds = vl.datasets.shapes(n, seed=seed, objects=(1, 2))
    pics, labels, masks, count = [], [], [], []
    for i in range(n):
        present = [k for k, c in enumerate(ds.label.values[i]) if c >= 0]
        for k in present:
            pics.append(ds.image.values[i])
            labels.append(int(ds.label.values[i, k]))
            masks.append(ds.mask.values[i, k])
            count.append(len(present))
    return np.stack(pics), np.asarray(labels), np.stack(masks), np.asarray(count)


def hooked_cam(model: torch.nn.Module, module: torch.nn.Module, x: torch.Tensor, labels: np.ndarray,
               grid: tuple[int, int]) -> np.ndarray:
    """Grad-CAM on ``module``'s output: channels weighted by the spatial mean of their gradient,
    summed, ReLU; on the module's own token grid, then bilinearly onto ``grid``."""
    seen = {}
    handle = module.register_forward_hook(lambda m, i, o: seen.__setitem__("a", o))
    try:
        logits = model(x)
    finally:
        handle.remove()
    a = seen["a"]
    (g,) = torch.autograd.grad(logits[torch.arange(len(labels)), torch.as_tensor(labels)].sum(), a)
    if a.ndim == 3:  # (B, N, C) tokens: drop the prefix, square grid
        n = a.shape[1]
        side = int(n**0.5)
        a, g = a[:, n - side * side :], g[:, n - side * side :]
        a, g = a.reshape(a.shape[0], side, side, -1), g.reshape(g.shape[0], side, side, -1)
    cam = (g.mean((1, 2), keepdim=True) * a).sum(-1).clamp(min=0)
    cam = torch.nn.functional.interpolate(cam[:, None], size=grid, mode="bilinear", align_corners=False)[:, 0]
    return cam.detach().numpy()


def scores(maps: dict[str, np.ndarray], masks: np.ndarray, size: tuple[int, int]) -> dict[str, xr.Dataset]:
    out = {}
    for name, values in maps.items():
        da = xr.DataArray(values, dims=("sample", "y", "x"), attrs={"input_size": [3, *size]})
        counts = vl.metrics.segmentation_counts(da, masks)
        out[name] = counts
    return out


def bootstrap(a: np.ndarray, b: np.ndarray, rounds: int = 2000, seed: int = 0) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(a), (rounds, len(a)))
    diff = (a[idx] - b[idx]).mean(1)
    return float(np.quantile(diff, 0.025)), float(np.quantile(diff, 0.975))


def run(name: str, pics, labels, masks, count, batch: int = 30) -> None:
    model = vl.load_model(name)
    start = time.perf_counter()
    maps: dict[str, list[np.ndarray]] = {}
    for lo in range(0, len(labels), batch):
        sl = slice(lo, lo + batch)
        cap = vl.capture(model, pics[sl], target=labels[sl], progress=False)
        for on in ("attention", "features"):
            maps.setdefault(on, []).append(vl.explain(cap, "gradcam", on=on).values)
        grid = tuple(int(g) for g in cap["stage0"].attrs["grid"])
        mean = np.asarray(cap.attrs["mean"], np.float32)
        std = np.asarray(cap.attrs["std"], np.float32)
        x = torch.from_numpy((cap["image"].values - mean) / std).permute(0, 3, 1, 2).float()
        for label, pick in HOOKED[name].items():
            maps.setdefault(label, []).append(hooked_cam(model, pick(model), x, labels[sl], grid))
    stacked = {k: np.concatenate(v) for k, v in maps.items()}
    size = masks.shape[1:]
    counts = scores(stacked, masks, size)
    default = vl.methods.METHOD_INFO["gradcam"].defaults_for({"readout": cap.attrs["readout"]}).get("on", "attention")
    base = counts[default].pointing.values
    print(f"\n{name} ({cap.attrs['readout']} read-out): {len(labels)} items "
          f"({(count == 1).sum()} one-object, {(count == 2).sum()} two-object), {time.perf_counter() - start:.0f} s")
    print(f"{'variant':32s} {'pointing':>8s} {'1-obj':>6s} {'2-obj':>6s} {'mIoU':>6s} {'mAP':>6s}  pointing − {default} [95 %]")
    for label, c in counts.items():
        s = vl.metrics.segmentation_scores(c)
        p = c.pointing.values
        lo, hi = bootstrap(p, base)
        print(f"{label:32s} {p.mean():8.3f} {p[count == 1].mean():6.3f} {p[count == 2].mean():6.3f} "
              f"{float(s.miou):6.3f} {float(s.mean_ap):6.3f}  {p.mean() - base.mean():+.3f} [{lo:+.3f}, {hi:+.3f}]")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=120)
    p.add_argument("--seed", type=int, default=31337)
    p.add_argument("--models", nargs="+", default=["vit-shapes", "swin-shapes"])
    args = p.parse_args()
    torch.set_grad_enabled(True)
    pics, labels, masks, count = items(args.images, args.seed)
    for name in args.models:
        run(name, pics, labels, masks, count)


if __name__ == "__main__":
    main()
