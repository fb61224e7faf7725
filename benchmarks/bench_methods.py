"""Cost of a default capture and of each explanation method, as ratios to one plain
forward+backward of the same model on the same batch (issues: all seven maps from
one capture ≤ 2.5×, goal 2×; #30.5: within 1.15× of the exact αβ-LRP floor, and the
attention/rollout and gradient-method captures within 1.15× of a plain forward /
forward+backward — ``benchmarks/bench_cost.py`` prints those targets).

    python benchmarks/bench_methods.py [--batch 4] [--repeat 5] [--models vit_base_patch16_224 swin_tiny_patch4_window7_224]
        [--chefer DIR]

Prints one table per model (wall and CPU seconds); every ratio is measured in the same
run. The same rounds also time pytorch-grad-cam's ``GradCAM`` (one map, when the package is
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


#: The method subsets whose cost is held to a target (issue #30.5): a label, the methods, the
#: step they are measured against and the target ratio. Each subset's capture keeps only the
#: groups its methods read (their registered ``needs`` for the model's family and read-out),
#: so it runs only the passes those groups need.
SUBSETS = (
    ("attention + rollout", ("attention", "rollout"), "plain forward alone (no autograd)", 1.15),
    ("gradient methods without Transformer Attribution", ("gradcam", "generic_attention", "lnstat", "tokentm"),
     "plain forward+backward", 1.15),
)
#: The seven maps a default capture explains (AttnLRP and LeGrad need passes of their own,
#: kept only when asked for; they are not part of "capture + seven maps").
SEVEN = ("attention", "rollout", "gradcam", "transformer_attribution", "generic_attention", "lnstat", "tokentm")
#: Capture + all seven maps is held to the floor of exact αβ-LRP.
SEVEN_TARGET = 1.15


def keep_for(methods: tuple[str, ...], attrs: dict) -> tuple[str, ...]:
    """The capture groups ``methods`` read with their default options for a capture with ``attrs``."""
    from vitlens.methods import METHOD_INFO

    return tuple(sorted(set().union(*(METHOD_INFO[m].groups(attrs) for m in methods))))


def bench(name: str, batch: int, repeat: int, device: str, references: bool = True) -> dict:
    """Median wall and CPU seconds of each step over ``repeat`` rounds, after one warm-up round.

    The steps run interleaved, round by round (plain, capture, each method, the
    capture of each method subset), so a slow spell of a shared machine hits all
    of them alike instead of one. CPU time is ``time.process_time`` (all threads of
    this process), less disturbed by other processes than wall time.

    ``references=False`` leaves out pytorch-grad-cam's and Chefer's reference code.

    Returns ``{"rows": [(label, wall, cpu)], "targets": [(label, baseline, wall ratio,
    cpu ratio, target)], "keep": {subset: groups}}``: each ratio is the median over
    rounds of that round's own ratio; the "capture + all seven maps" row is that
    median ratio times the median plain time.
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
    phases: dict[str, float] = {}

    def capture():
        with _phase_timers(phases, sync):
            cap_holder["cap"] = vl.capture(model, x, target=target.tolist(), progress=False)
        sync()

    keeps: dict[str, tuple[str, ...]] = {}

    def subset(label: str, methods: tuple[str, ...]):
        def run():
            if label not in keeps:  # the family and read-out come from the default capture (run before)
                keeps[label] = keep_for(methods, dict(cap_holder["cap"].attrs))
            cap = vl.capture(model, x, target=target.tolist(), keep=keeps[label], progress=False)
            for m in methods:
                vl.explain(cap, m)
            sync()
        return run

    plain_label, forward_label = "plain forward+backward", "plain forward alone (no autograd)"
    capture_label = "vl.capture (default: grads + LRP)"
    steps = [(plain_label, plain), (forward_label, forward), (capture_label, capture)]
    steps += [(f"  explain {m}", lambda m=m: vl.explain(cap_holder["cap"], m)) for m in SEVEN]
    steps += [("  explain 'all'", lambda: vl.explain(cap_holder["cap"], "all"))]
    steps += [(f"capture + {label} (keep= what they read)", subset(label, methods)) for label, methods, _, _ in SUBSETS]
    extra = _gradcam(model, x, target) if references else None
    if extra is not None:
        steps.append(("pytorch-grad-cam GradCAM (one map)", extra))
    extra = _chefer(name, x, target, device) if references else None
    if extra is not None:
        steps.append(("Chefer's reference TA (one map)", extra))
    wall: dict[str, list[float]] = {label: [] for label, _ in steps}
    cpu: dict[str, list[float]] = {label: [] for label, _ in steps}
    split_wall: dict[str, list[float]] = {key: [] for key in _PHASES}
    split_cpu: dict[str, list[float]] = {key: [] for key in _PHASES}
    for round_ in range(repeat + 1):  # round 0 is the warm-up
        for label, fn in steps:
            phases.clear()
            t, c = time.perf_counter(), time.process_time()
            fn()
            if round_:
                wall[label].append(time.perf_counter() - t)
                cpu[label].append(time.process_time() - c)
                if fn is capture:
                    for key, into, total in (("", split_wall, wall[label][-1]), ("_cpu", split_cpu, cpu[label][-1])):
                        for part in ("backward", "lrp", "alphabeta", "lrp0", "rebuild", "store"):
                            into[part].append(phases.get(part + key, 0.0))
                        into["rest"].append(total - into["backward"][-1] - into["lrp"][-1])
    method_labels = [f"  explain {m}" for m in SEVEN]

    def seven(times: dict[str, list[float]], r: int) -> float:
        return times[capture_label][r] + sum(times[m][r] for m in method_labels)

    # what exact float32 LRP cannot go below: one forward, the activation-gradient backward, the αβ matmuls
    floor = {kind: [times[forward_label][r] + split["backward"][r] + split["alphabeta"][r] for r in range(repeat)]
             for kind, times, split in (("wall", wall, split_wall), ("cpu", cpu, split_cpu))}
    rows = [(label, statistics.median(wall[label]), statistics.median(cpu[label])) for label, _ in steps]
    at = [label for label, *_ in rows].index(capture_label) + 1  # the capture's parts, right below it
    rows[at:at] = [(_PHASES[key], statistics.median(split_wall[key]), statistics.median(split_cpu[key]))
                   for key in _PHASES]

    def ratio(top, bottom) -> tuple[float, float]:
        """Median over rounds of each round's ratio, for wall and CPU time."""
        return tuple(statistics.median(top(kind, times, r) / bottom(kind, times, r) for r in range(repeat))
                     for kind, times in (("wall", wall), ("cpu", cpu)))  # type: ignore[return-value]

    vs_plain = ratio(lambda k, t, r: seven(t, r), lambda k, t, r: t[plain_label][r])
    rows.append(("capture + all seven maps", vs_plain[0] * rows[0][1], vs_plain[1] * rows[0][2]))
    rows.append(("floor: forward alone + backward + αβ rule", statistics.median(floor["wall"]),
                 statistics.median(floor["cpu"])))
    targets = [("capture + all seven maps", "floor", *ratio(lambda k, t, r: seven(t, r),
                                                            lambda k, t, r: floor[k][r]), SEVEN_TARGET)]
    for label, methods, baseline, goal in SUBSETS:
        step = f"capture + {label} (keep= what they read)"
        targets.append((label, baseline, *ratio(lambda k, t, r, s=step: t[s][r],
                                                lambda k, t, r, b=baseline: t[b][r]), goal))
    return {"rows": rows, "targets": targets, "keep": {label: list(keeps[label]) for label, *_ in SUBSETS}}


#: The capture's parts the bench times (indented under the capture row).
_PHASES = {"rest": "  of which forward with hooks, and the rest", "backward": "  of which activation-gradient backward",
           "lrp": "  of which LRP pass (storing each block as it goes)",
           "alphabeta": "    of which the αβ rule of the Linear layers",
           "lrp0": "    of which the attention products' LRP-0 (Q·Kᵀ and A·V)",
           "rebuild": "    of which the probabilities and their gradient, rebuilt after fused attention",
           "store": "    of which writing each block's three (B, heads, N, N) arrays out"}


class _phase_timers:
    """Time ``torch.autograd.grad`` and the LRP pass inside one ``vl.capture`` (wall seconds added to
    ``phases[part]``, CPU seconds to ``phases[part + "_cpu"]``)."""

    def __init__(self, phases: dict[str, float], sync):
        self.phases, self.sync = phases, sync

    def _timed(self, key: str, fn):
        def run(*a, **k):
            t, c = time.perf_counter(), time.process_time()
            try:
                return fn(*a, **k)
            finally:
                self.sync()
                self.phases[key] = self.phases.get(key, 0.0) + time.perf_counter() - t
                self.phases[key + "_cpu"] = self.phases.get(key + "_cpu", 0.0) + time.process_time() - c
        return run

    def __enter__(self):
        from vitlens.capture import api, hooks, relevance
        from vitlens.models import parts

        self._saved = (torch.autograd.grad, relevance.attention_relevance, parts.linear_alphabeta, parts.matmul_lrp0,
                       hooks.Recorder.probs, hooks.Recorder.probs_grad, api._Buffers.put_layer)
        torch.autograd.grad = self._timed("backward", torch.autograd.grad)
        relevance.attention_relevance = self._timed("lrp", relevance.attention_relevance)
        parts.linear_alphabeta = self._timed("alphabeta", parts.linear_alphabeta)
        parts.matmul_lrp0 = self._timed("lrp0", parts.matmul_lrp0)
        hooks.Recorder.probs = self._timed("rebuild", hooks.Recorder.probs)
        hooks.Recorder.probs_grad = self._timed("rebuild", hooks.Recorder.probs_grad)
        api._Buffers.put_layer = self._timed("store", api._Buffers.put_layer)
        return self

    def __exit__(self, *exc):
        from vitlens.capture import api, hooks, relevance
        from vitlens.models import parts

        (torch.autograd.grad, relevance.attention_relevance, parts.linear_alphabeta, parts.matmul_lrp0,
         hooks.Recorder.probs, hooks.Recorder.probs_grad, api._Buffers.put_layer) = self._saved


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
        result = bench(name, args.batch, args.repeat, args.device)
        rows = result["rows"]
        base, base_cpu = rows[0][1], rows[0][2]
        print(f"\n{name} @ {args.batch} images")
        print(f"{'step':60s} {'seconds':>9s} {'× fwd+bwd':>10s} {'CPU s':>9s} {'× (CPU)':>8s}")
        for label, t, c in rows:
            print(f"{label:60s} {t:9.3f} {t / base:10.2f} {c:9.3f} {c / base_cpu:8.2f}")
        for label, baseline, w, c, goal in result["targets"]:
            print(f"target: {label} ≤ {goal}× {baseline}: {w:.2f}× wall, {c:.2f}× CPU")

if __name__ == "__main__":
    main()
