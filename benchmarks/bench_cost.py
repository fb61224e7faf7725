"""Cost of capture against its honest baselines (issue #30.5), measured in one run:

- capture + the seven maps against the floor of exact αβ-LRP (a plain forward, the
  activation-gradient backward and the αβ rule of the Linear layers; target ≤ 1.15×),
- attention + rollout alone (a capture that keeps only what they read) against a plain
  forward (≤ 1.15×),
- the gradient methods without Transformer Attribution (Grad-CAM, generic attention,
  lnstat, TokenTM; a capture of what they read) against a plain forward+backward (≤ 1.15×),
- peak memory of each against a plain forward+backward (≤ 1.25×).

    python benchmarks/bench_cost.py [--batch 8] [--repeat 3] [--threads 1] [--splice benchmarks/RESULTS.md]

Random-init timm ViT-B/16, Swin-T and EVA02-S/14 at 224 px (no downloads). Each model's
timings are ``bench_methods.bench`` in a fresh process: interleaved rounds after a
warm-up round, medians of each round's own ratio, in wall time and in CPU time
(``time.process_time``: less disturbed by the other processes of a shared machine;
the load, from ``uptime``, is printed before and after). Peak memory: VmHWM of one
fresh process per (model, step). ``--splice`` writes the cost section of RESULTS.md
(``make_results.py --only-cost`` does the same).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

MODELS = (("vit_base_patch16_224", "ViT-B/16"), ("swin_tiny_patch4_window7_224", "Swin-T"),
          ("eva02_small_patch14_224", "EVA02-S/14"))
COST_START, COST_END = "<!-- cost:start -->", "<!-- cost:end -->"
MEMORY_TARGET = 1.25


def uptime() -> str:
    """The machine's load as ``uptime`` prints it."""
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "load %.2f, %.2f, %.2f" % os.getloadavg()


_BENCH_CHILD = r"""
import json, sys, torch
sys.path.insert(0, sys.argv[1])
torch.set_num_threads(int(sys.argv[5]))
from bench_methods import bench
print(json.dumps(bench(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), "cpu", references=False)))
"""


def timings(name: str, batch: int, repeat: int, threads: int) -> dict:
    """``bench_methods.bench`` in a fresh process (no allocator state carried over from another model)."""
    out = subprocess.run([sys.executable, "-c", _BENCH_CHILD, str(HERE), name, str(batch), str(repeat), str(threads)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


# VmHWM (this process's own high-water mark): ru_maxrss would carry over the parent's
# peak into a child spawned from it, since Linux keeps it across fork/exec.
_MEMORY_CHILD = r"""
import sys, timm, torch, vitlens as vl
sys.path.insert(0, sys.argv[1])
from bench_methods import SEVEN, SUBSETS, keep_for
torch.manual_seed(0)
torch.set_num_threads(int(sys.argv[5]))
name, mode, b = sys.argv[2], sys.argv[3], int(sys.argv[4])
model = timm.create_model(name, pretrained=False)
if not model.num_classes:
    model = timm.create_model(name, pretrained=False, num_classes=1000)
model = model.eval()
x = torch.randn(b, 3, 224, 224)
target = [i % model.num_classes for i in range(b)]
if mode == "plain":
    model(x).gather(1, torch.tensor(target)[:, None]).sum().backward()
elif mode == "forward":
    with torch.no_grad():
        model(x)
elif mode != "model":
    methods = SEVEN if mode == "seven" else dict((label, m) for label, m, *_ in SUBSETS)[mode]
    ad = vl.models.adapter_for(model)
    keep = "all" if mode == "seven" else keep_for(methods, {"family": ad.family, "readout": ad.readout})
    cap = vl.capture(model, x, target=target, keep=keep, progress=False)
    maps = [vl.explain(cap, m) for m in methods]
peak = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]
print(int(peak) / 1024)
"""


def peak(name: str, mode: str, batch: int, threads: int) -> float:
    """Peak resident MiB of a fresh process that builds ``name`` and runs ``mode``."""
    out = subprocess.run([sys.executable, "-c", _MEMORY_CHILD, str(HERE), name, mode, str(batch), str(threads)],
                         capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def section(batch: int, repeat: int, threads: int, memory_batch: int, spliced: bool = False,
            models: tuple[tuple[str, str], ...] = MODELS) -> list[str]:
    """The cost section of RESULTS.md: the targets, peak memory, then every step per model."""
    from bench_methods import SUBSETS
    from make_results import machine

    MODELS = models  # noqa: N806 (a smoke run measures other models)
    before = uptime()
    results = {name: timings(name, batch, repeat, threads) for name, _ in MODELS}
    modes = ("model", "plain", "seven", *(label for label, *_ in SUBSETS))
    peaks = {name: {mode: peak(name, mode, memory_batch, threads) for mode in modes} for name, _ in MODELS}
    after = uptime()
    out = [COST_START, "## Cost", ""]
    out += [f"Generated by `python benchmarks/bench_cost.py --splice` (or `make_results.py --only-cost`) on "
            f"{_dt.date.today().isoformat()}{' (spliced into this file; the sections above may be older)' if spliced else ''}. "
            f"Machine: {machine()}; torch threads: {threads}. Load before the run: `{before}`; after: `{after}` "
            "(the machine is shared: wall times are disturbed by the other processes, CPU times much less).", ""]
    out += [f"Random-init timm models at 224×224, batch {batch}, median of {repeat} interleaved rounds after a warm-up "
            "round (`benchmarks/bench_methods.py`'s `bench()`, one fresh process per model). *Seven maps*: attention, "
            "rollout, gradcam, transformer_attribution, generic_attention, lnstat, tokentm (AttnLRP and LeGrad need "
            "passes of their own and are not part of a default capture). The subset rows capture with `keep=` only the "
            "groups their methods read (their registered `needs`), so they run only the passes those need.", ""]
    out += ["### Against the floor and the plain passes (targets of #30.5)", "",
            "Each ratio is the median over rounds of that round's own ratio, in wall time and in CPU time "
            "(three decimals: a target is met only at or below it).", "",
            "| model | what | against | wall × | CPU × | target | met (wall / CPU) |", "|---|---|---|---:|---:|---:|---|"]
    for name, title in MODELS:
        for label, baseline, wall, cpu, goal in results[name]["targets"]:
            met = " / ".join("yes" if v <= goal else "no" for v in (wall, cpu))
            out.append(f"| {title} | {label} | {baseline} | {wall:.3f} | {cpu:.3f} | ≤ {goal:.2f} | {met} |")
    out += ["", "Kept groups of the subset captures: " + "; ".join(
        f"{title}: " + ", ".join(f"{label} → `{', '.join(groups)}`" for label, groups in results[name]["keep"].items())
        for name, title in MODELS) + ".", ""]
    out += over_the_floor(results, MODELS)
    out += [f"### Peak memory, batch {memory_batch}", "",
            "VmHWM of a fresh process per step (import, build the model, run the step); the ratio is the step's peak "
            f"above the model-only process over plain forward+backward's (target ≤ {MEMORY_TARGET}×).", "",
            "| model | step | peak RSS (MiB) | above model-only (MiB) | × plain fwd+bwd |", "|---|---|---:|---:|---:|"]
    labels = {"model": "import + build model", "plain": "plain forward+backward", "forward": "plain forward (no autograd)",
              "seven": "capture + seven maps", **{label: f"capture + {label}" for label, *_ in SUBSETS}}
    for name, title in MODELS:
        base, plain = peaks[name]["model"], peaks[name]["plain"] - peaks[name]["model"]
        for mode in modes:
            above = peaks[name][mode] - base
            ratio = "" if mode == "model" else f"{above / max(plain, 1e-9):.2f}"
            out.append(f"| {title} | {labels[mode]} | {peaks[name][mode]:.0f} | {above:.0f} | {ratio} |")
    for name, title in MODELS:
        rows = results[name]["rows"]
        (_, base, base_cpu) = rows[0]
        out += ["", f"### {title}: every step", "",
                "| step | seconds | × plain fwd+bwd | CPU seconds | × (CPU) |", "|---|---:|---:|---:|---:|"]
        out += [f"| {label.strip()} | {t:.3f} | {t / base:.2f} | {c:.3f} | {c / base_cpu:.2f} |" for label, t, c in rows]
    out += ["", COST_END]
    return out


def over_the_floor(results: dict, models: tuple[tuple[str, str], ...]) -> list[str]:
    """Where capture + seven maps spends its CPU seconds above the floor, from the timed parts of the capture."""
    from bench_methods import _PHASES, SEVEN

    out = ["### Where capture + seven maps exceeds the floor (CPU seconds)", "",
           "The floor counts a forward without autograd, the activation-gradient backward and the αβ rule of the "
           "Linear layers. What the capture does beyond that, from the same rounds (medians of each part, so the "
           "parts need not add up exactly to the difference). The attention products' LRP-0, TokenTM's value path "
           "(in the forward), writing the arrays out and the maps themselves are work the seven maps need whatever "
           "the implementation; rebuilding the probabilities is what fused attention costs in exchange for not "
           "keeping them in the autograd graph.", "",
           "| model | capture + seven maps | floor | over the floor | forward with hooks and the rest, over a forward alone "
           "| attention products' LRP-0 | rebuilt probabilities and gradient | writing the arrays out "
           "| the LRP pass's other rules | the seven `explain` calls |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, title in models:
        cpu = {label.strip(): c for label, _, c in results[name]["rows"]}

        def part(key: str) -> float:
            return cpu[_PHASES[key].strip()]

        seven, floor = cpu["capture + all seven maps"], cpu["floor: forward alone + backward + αβ rule"]
        forward = part("rest") - cpu["plain forward alone (no autograd)"]
        other = part("lrp") - part("alphabeta") - part("lrp0") - part("rebuild") - part("store")
        explain = sum(cpu[f"explain {m}"] for m in SEVEN)
        cells = [seven, floor, seven - floor, forward, part("lrp0"), part("rebuild"), part("store"), other, explain]
        out.append(f"| {title} | " + " | ".join(f"{v:.2f}" for v in cells) + " |")
    return out + [""]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch threads of each measuring process (1: the runs in RESULTS.md)")
    p.add_argument("--memory-batch", type=int, default=8)
    p.add_argument("--splice", default=None, help="also write the section into this RESULTS.md")
    p.add_argument("--models", nargs="+", default=None, help="timm names instead of the three (a smoke run)")
    args = p.parse_args()
    sys.path.insert(0, str(HERE))
    models = MODELS if args.models is None else tuple((m, m) for m in args.models)
    lines = section(args.batch, args.repeat, args.threads, args.memory_batch, spliced=bool(args.splice), models=models)
    print("\n".join(lines))
    if args.splice:
        from make_results import splice

        splice(Path(args.splice), lines, COST_START, COST_END, replaces="\n## Cost")


if __name__ == "__main__":
    main()
