"""Cost of a default capture and of each explanation method, as ratios to one plain
forward+backward of the same model on the same batch (issues: all seven maps from
one capture ≤ 2.5×, goal 2×; later goal 1.5×).

    python benchmarks/bench_methods.py [--batch 4] [--repeat 5] [--models vit_base_patch16_224 swin_tiny_patch4_window7_224]
        [--chefer DIR]

Prints one table per model; every ratio is measured in the same run. The same
rounds also time pytorch-grad-cam's ``GradCAM`` (one map, when the package is
installed: it is a test dependency) and, for ViT-B/16, Chefer et al.'s reference
Transformer Attribution (one map per image, their ``relprop``) when a copy of
their repository is given by ``--chefer`` or ``$VITLENS_CHEFER_REF`` (it needs
``einops``; it is never part of vitlens).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import statistics
import time

import timm
import torch

import vitlens as vl


def _gradcam(model: torch.nn.Module, x: torch.Tensor, target: torch.Tensor):
    """pytorch-grad-cam's GradCAM on the last block's first norm (one map per image), or None."""
    try:
        from pytorch_grad_cam import GradCAM
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    except ImportError:
        return None
    if hasattr(model, "layers"):  # Swin: the norm's output is already (B, H, W, C)
        layer, reshape = model.layers[-1].blocks[-1].norm1, lambda t: t.permute(0, 3, 1, 2)
    else:
        gh, gw = model.patch_embed.grid_size
        skip = model.num_prefix_tokens
        layer = model.blocks[-1].norm1
        reshape = lambda t: t[:, skip:].reshape(t.shape[0], gh, gw, -1).permute(0, 3, 1, 2)  # noqa: E731
    cam = GradCAM(model=model, target_layers=[layer], reshape_transform=reshape)
    targets = [ClassifierOutputTarget(int(t)) for t in target]
    return lambda: cam(input_tensor=x, targets=targets)


def _chefer(name: str, x: torch.Tensor, target: torch.Tensor, device: str):
    """Chefer et al.'s reference Transformer Attribution (their ViT-B/16 and ``relprop``), or None.

    Their ``LRP.generate_LRP`` calls ``.cuda()``; this runs the same steps on ``device``,
    one image at a time as their code does (random weights: only the time matters).
    """
    ref = os.environ.get("VITLENS_CHEFER_REF") if _CHEFER[0] is None else _CHEFER[0]
    if not ref or name != "vit_base_patch16_224":
        return None
    sys.path.insert(0, ref)
    from baselines.ViT.ViT_LRP import vit_base_patch16_224

    model = vit_base_patch16_224(pretrained=False).eval().to(device)

    def run() -> None:
        for i in range(x.shape[0]):
            out = model(x[i : i + 1])
            onehot = torch.zeros_like(out)
            onehot[0, int(target[i])] = 1
            model.zero_grad()
            (onehot * out).sum().backward(retain_graph=True)
            model.relprop(onehot, method="transformer_attribution", alpha=1)

    return run


_CHEFER: list[str | None] = [None]


def bench(name: str, batch: int, repeat: int, device: str) -> list[tuple[str, float]]:
    """Median seconds of each step over ``repeat`` rounds, after one warm-up round.

    The steps run interleaved, round by round (plain, capture, each method), so
    a slow spell of a shared machine hits all of them alike instead of one.
    The last row is the median over rounds of that round's capture + seven
    maps divided by its plain forward+backward, times the median plain time.
    """
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False)
    if not model.num_classes:  # a headless registry config (e.g. EVA02's MIM weights): give it ImageNet's
        model = timm.create_model(name, pretrained=False, num_classes=1000)
    model = model.eval().to(device)
    size = model.patch_embed.img_size
    x = torch.randn(batch, 3, *size, device=device)
    target = torch.arange(batch, device=device) % model.num_classes

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    def plain():
        model.zero_grad(set_to_none=True)
        logits = model(x)
        logits.gather(1, target[:, None]).sum().backward()
        sync()

    def forward():
        with torch.no_grad():
            model(x)
        sync()

    cap_holder = {}
    phases = {"backward": 0.0, "lrp": 0.0, "alphabeta": 0.0}

    def capture():
        with _phase_timers(phases, sync):
            cap_holder["cap"] = vl.capture(model, x, target=target.tolist(), progress=False)
        sync()

    capture_label = "vl.capture (default: grads + LRP)"
    steps = [("plain forward+backward", plain), ("plain forward alone (no autograd)", forward), (capture_label, capture)]
    steps += [(f"  explain {m}", lambda m=m: vl.explain(cap_holder["cap"], m)) for m in vl.METHODS]
    steps += [("  explain 'all'", lambda: vl.explain(cap_holder["cap"], "all"))]
    extra = _gradcam(model, x, target)
    if extra is not None:
        steps.append(("pytorch-grad-cam GradCAM (one map)", extra))
    extra = _chefer(name, x, target, device)
    if extra is not None:
        steps.append(("Chefer's reference TA (one map)", extra))
    times: dict[str, list[float]] = {label: [] for label, _ in steps}
    split = {label: [] for label in _PHASES.values()}
    for round_ in range(repeat + 1):  # round 0 is the warm-up
        for label, fn in steps:
            phases.update(backward=0.0, lrp=0.0, alphabeta=0.0)
            t = time.perf_counter()
            fn()
            if round_:
                times[label].append(time.perf_counter() - t)
                if fn is capture:
                    total = times[label][-1]
                    split[_PHASES["backward"]].append(phases["backward"])
                    split[_PHASES["lrp"]].append(phases["lrp"])
                    split[_PHASES["alphabeta"]].append(phases["alphabeta"])
                    split[_PHASES["rest"]].append(total - phases["backward"] - phases["lrp"])
    method_labels = [f"  explain {m}" for m in vl.METHODS]
    ratios = [
        (times[capture_label][r] + sum(times[m][r] for m in method_labels)) / times[steps[0][0]][r]
        for r in range(repeat)
    ]
    rows = [(label, statistics.median(ts)) for label, ts in times.items()]
    at = [label for label, _ in rows].index(capture_label) + 1  # the capture's parts, right below it
    rows[at:at] = [(label, statistics.median(ts)) for label, ts in split.items()]
    rows.append(("capture + all seven maps", statistics.median(ratios) * rows[0][1]))
    # what exact float32 LRP cannot go below: one forward, the activation-gradient backward, the αβ matmuls
    floor = [f + b + a for f, b, a in zip(times[steps[1][0]], split[_PHASES["backward"]], split[_PHASES["alphabeta"]])]
    rows.append(("floor: forward alone + backward + αβ rule", statistics.median(floor)))
    return rows


#: The capture's parts the bench times (indented under the capture row).
_PHASES = {"rest": "  of which forward with hooks, and the rest", "backward": "  of which activation-gradient backward",
           "lrp": "  of which LRP pass (storing each block as it goes)",
           "alphabeta": "    of which the αβ rule of the Linear layers"}


class _phase_timers:
    """Time ``torch.autograd.grad`` and the LRP pass inside one ``vl.capture`` (added to ``phases``)."""

    def __init__(self, phases: dict[str, float], sync):
        self.phases, self.sync = phases, sync

    def _timed(self, key: str, fn):
        def run(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.sync()
                self.phases[key] += time.perf_counter() - t
        return run

    def __enter__(self):
        from vitlens.capture import relevance

        from vitlens.models import parts

        self._saved = (torch.autograd.grad, relevance.attention_relevance, parts.linear_alphabeta)
        torch.autograd.grad = self._timed("backward", torch.autograd.grad)
        relevance.attention_relevance = self._timed("lrp", relevance.attention_relevance)
        parts.linear_alphabeta = self._timed("alphabeta", parts.linear_alphabeta)
        return self

    def __exit__(self, *exc):
        from vitlens.capture import relevance
        from vitlens.models import parts

        torch.autograd.grad, relevance.attention_relevance, parts.linear_alphabeta = self._saved


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--models", nargs="+", default=["vit_base_patch16_224", "swin_tiny_patch4_window7_224"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--chefer", default=None, help="a copy of hila-chefer/Transformer-Explainability (outside the repo)")
    args = p.parse_args()
    _CHEFER[0] = args.chefer
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
          f"device {args.device}, torch {torch.__version__}, batch {args.batch}, median of {args.repeat} interleaved rounds")
    for name in args.models:
        rows = bench(name, args.batch, args.repeat, args.device)
        base = rows[0][1]
        print(f"\n{name} @ {args.batch} images")
        print(f"{'step':52s} {'seconds':>9s} {'× fwd+bwd':>10s}")
        for label, t in rows:
            print(f"{label:52s} {t:9.3f} {t / base:10.2f}")


if __name__ == "__main__":
    main()
