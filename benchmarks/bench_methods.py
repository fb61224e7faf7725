"""Cost of a default capture and of each explanation method, as ratios to one plain
forward+backward of the same model on the same batch (issue: all seven maps from
one capture ≤ 2.5×, goal 2×).

    python benchmarks/bench_methods.py [--batch 4] [--repeat 3] [--models vit_base_patch16_224 swin_tiny_patch4_window7_224]

Prints one table per model; every ratio is measured in the same run.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import numpy as np
import timm
import torch

import vitlens as vl


def timed(fn, repeat: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def bench(name: str, batch: int, repeat: int, device: str) -> list[tuple[str, float]]:
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval().to(device)
    size = model.patch_embed.img_size
    x = torch.randn(batch, 3, *size, device=device)
    target = torch.arange(batch, device=device) % model.num_classes

    def plain():
        model.zero_grad(set_to_none=True)
        logits = model(x)
        logits.gather(1, target[:, None]).sum().backward()
        if device == "cuda":
            torch.cuda.synchronize()

    cap_holder = {}

    def capture():
        cap_holder["cap"] = vl.capture(model, x, target=target.tolist(), progress=False)

    t_plain = timed(plain, repeat)
    t_capture = timed(capture, repeat)
    cap = cap_holder["cap"]
    rows = [("plain forward+backward", t_plain), ("vl.capture (default: grads + LRP)", t_capture)]
    total_methods = 0.0
    for method in vl.METHODS:
        t = timed(lambda: vl.explain(cap, method), repeat)
        total_methods += t
        rows.append((f"  explain {method}", t))
    rows.append(("  explain 'all'", timed(lambda: vl.explain(cap, "all"), repeat)))
    rows.append(("capture + all seven maps", t_capture + total_methods))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--models", nargs="+", default=["vit_base_patch16_224", "swin_tiny_patch4_window7_224"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
          f"device {args.device}, torch {torch.__version__}, batch {args.batch}, median of {args.repeat}")
    for name in args.models:
        rows = bench(name, args.batch, args.repeat, args.device)
        base = rows[0][1]
        print(f"\n{name} @ {args.batch} images")
        print(f"{'step':40s} {'seconds':>9s} {'× fwd+bwd':>10s}")
        for label, t in rows:
            print(f"{label:40s} {t:9.3f} {t / base:10.2f}")


if __name__ == "__main__":
    main()
