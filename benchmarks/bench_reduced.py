"""A store of answers (#27.1): bytes per image, images/s and memory of a reduced capture.

    python benchmarks/bench_reduced.py [--n 1] [--speed-n 64] [--stream-n 2000] [--splice]

Three tables, every number measured in this run (random-init timm models, no
download; the shipped ``vit-shapes`` for the stream):

1. Bytes per image of a streamed store, ViT-B/16 and Swin-T at 224 px: the full
   capture (float32, every raw group) against a reduced one (``maps="all",
   stats="all"``, ``keep="none"``: every registered map and head statistic,
   logits, targets), counted as the chunks of the store's sample-indexed arrays
   per image (what a dataset pays per image; zarr metadata and labels are a
   fixed cost). Target (issue #27): ≤ 64 KB per image for ViT-B/16.
2. Images/s of reduced captures against a plain forward and a plain
   forward+backward pass of the same images (``vit-shapes``, in memory).
3. Peak memory over one long reduced stream (``vit-shapes``, the seven original
   maps and the statistics without ablation_effect, images made batch by batch
   so the source holds none): the
   process's peak RSS during each tenth of the stream. Flat means the store,
   not the process, grows. ``--stream-n`` images (2,000 by default, the
   issue's count), however long they take.

``--splice`` writes the tables between the ``reduced`` markers of
benchmarks/RESULTS.md (atomically), with the machine and its load (``uptime``).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import resource
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import timm
import torch

import vitlens as vl

MODELS = {"ViT-B/16": "vit_base_patch16_224", "Swin-T": "swin_tiny_patch4_window7_224"}
TARGET_KB = 64


def du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def peak_rss_mb(reset: bool = False) -> float:
    """The process's peak resident memory (MB) since the last reset (Linux: VmHWM, reset through clear_refs)."""
    status = Path("/proc/self/status")
    if not status.exists():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # the lifetime peak (kilobytes on Linux)
    peak = next(int(line.split()[1]) for line in status.read_text().splitlines() if line.startswith("VmHWM"))
    if reset:
        Path("/proc/self/clear_refs").write_text("5")  # the peak starts again from the current RSS
    return peak / 1024


def load() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def per_image_bytes(store: Path) -> float:
    """Bytes per image of a store: the chunks of its ``sample``-indexed arrays over the images (each
    image's own share; what the store grows by per image), without the fixed metadata and labels."""
    total, n = 0, None
    for meta in store.rglob("zarr.json"):
        info = json.loads(meta.read_text())
        dims = info.get("dimension_names") or []
        if info.get("node_type") == "array" and dims[:1] == ["sample"]:
            total += du(meta.parent / "c") if (meta.parent / "c").exists() else 0
            n = info["shape"][0]
    return total / n


def bytes_table(args, tmp: Path) -> list[str]:
    rows = ["| model | store | KB/image | full / reduced | s/img to write |", "|---|---|---:|---:|---:|"]
    for label, name in MODELS.items():
        torch.manual_seed(0)
        model = timm.create_model(name, pretrained=False).eval()
        images = torch.randn(args.n, 3, 224, 224)
        sizes = {}
        for kind, kw in (("full", {}), ("reduced", {"maps": "all", "stats": "all"})):
            path = tmp / f"{kind}.zarr"
            t = time.perf_counter()
            vl.capture(model, images, store=path, batch_size=1, progress=False, **kw)
            sizes[kind] = per_image_bytes(path), (time.perf_counter() - t) / args.n
            shutil.rmtree(path)
        (full, t_full), (small, t_small) = sizes["full"], sizes["reduced"]
        ok = "meets" if small <= TARGET_KB * 1e3 else "MISSES"
        rows.append(f"| {label} | full (float32, every raw group) | {full / 1e3:,.0f} | | {t_full:.1f} |")
        rows.append(f"| {label} | reduced: maps='all', stats='all', logits ({ok} ≤ {TARGET_KB} KB) | "
                    f"{small / 1e3:.1f} | {full / max(small, 1):,.0f}× | {t_small:.1f} |")
        print(rows[-2], rows[-1], sep="\n", flush=True)
    return rows


def speed_table(args) -> list[str]:
    model = vl.load_model("vit-shapes")
    size = vl.models.adapter_for(model).input_size[-1]
    n = args.speed_n
    images = torch.from_numpy(np.random.default_rng(1).random((n, size, size, 3), dtype=np.float32))
    pixels = (images.permute(0, 3, 1, 2) - 0.5) / 0.5

    def forward():
        with torch.no_grad():
            model(pixels)

    def forward_backward():
        model.zero_grad(set_to_none=True)
        model(pixels.clone().requires_grad_(True)).max(1).values.sum().backward()

    def capture(**kw):
        return lambda: vl.capture(model, images.numpy(), batch_size=n, progress=False, **kw)

    forward()  # warm-up: the model, and every code path of a capture (imports, first calls) on two images
    vl.capture(model, images[:2].numpy(), maps="all", stats="all", progress=False)
    runs = [("plain forward (no_grad)", forward), ("plain forward+backward", forward_backward),
            ("reduced: maps=['attention', 'rollout'] (no backward pass)", capture(maps=["attention", "rollout"])),
            ("reduced: the seven original maps + the four statistics without ablation_effect",
             capture(maps=list(vl.METHODS[:7]), stats=[s for s in vl.HEAD_STATS if s != "ablation_effect"])),
            ("reduced: maps='all', stats='all'", capture(maps="all", stats="all")),
            ("full capture in memory (keep='all')", capture())]
    times = {}
    for label, fn in runs:  # CPU time of this process (its threads): what a loaded, shared machine distorts least
        t, c = time.perf_counter(), time.process_time()
        fn()
        times[label] = time.process_time() - c, time.perf_counter() - t
        print(f"{label}: {n / times[label][0]:.1f} img/CPU-s, {n / times[label][1]:.1f} img/s wall", flush=True)
    fb = times["plain forward+backward"][0]
    rows = [f"| vit-shapes ({size} px), one batch of {n} | images per CPU-second | × plain fwd+bwd (CPU) | "
            "images/s (wall) |", "|---|---:|---:|---:|"]
    rows += [f"| {label} | {n / c:.1f} | {c / fb:.2f} | {n / w:.1f} |" for label, (c, w) in times.items()]
    return rows


def stream_table(args, tmp: Path) -> list[str]:
    model = vl.load_model("vit-shapes")
    size = vl.models.adapter_for(model).input_size[-1]
    batch = args.stream_batch
    rng = np.random.default_rng(0)

    def batches(count: int, marks: list[float] | None = None):
        for _ in range(count):
            if marks is not None:  # the peak while the previous batch was captured and written
                marks.append(peak_rss_mb(reset=True))
            yield rng.random((batch, size, size, 3), dtype=np.float32)

    # the seven original maps and the four statistics without ablation_effect (one forward per head)
    maps, stats = list(vl.METHODS[:7]), [s for s in vl.HEAD_STATS if s != "ablation_effect"]
    count = max(10, -(-args.stream_n // batch))  # whole batches, at least ten (one per tenth)
    marks: list[float] = []
    t = time.perf_counter()
    vl.capture(model, batches(count, marks), store=tmp / "stream.zarr", maps=maps, stats=stats, progress=False)
    seconds = time.perf_counter() - t
    marks.append(peak_rss_mb())
    marks = marks[1:]  # marks[i]: the peak during batch i
    images = count * batch
    assert vl.open(tmp / "stream.zarr")["sample"].size == images
    kb = du(tmp / "stream.zarr") / images / 1e3
    shutil.rmtree(tmp / "stream.zarr")
    tenths = [max(marks[round(i * count / 10) : max(round((i + 1) * count / 10), round(i * count / 10) + 1)])
              for i in range(10)]
    rows = [f"vit-shapes, {images} images ({count} batches of {batch}, {size} px) streamed in {seconds:.0f} s "
            f"({images / seconds:.1f} img/s), the seven original maps and {', '.join(stats)}, {kb:.1f} KB/image on "
            "disk; the process's peak RSS during each tenth of the stream:", "",
            "| images up to | " + " | ".join(f"{round(i * images / 10)}" for i in range(1, 11)) + " |",
            "|---|" + "---:|" * 10,
            "| peak RSS (MB) | " + " | ".join(f"{m:.0f}" for m in tenths) + " |", "",
            # the first tenth also holds the warm-up (the first batches' allocations, the store's creation)
            f"Growth from the second tenth to the end: {tenths[-1] - tenths[1]:+.0f} MB "
            f"({(tenths[-1] - tenths[1]) / (images * 0.8) * 1e3:+.2f} KB per image); the first tenth, "
            f"with the warm-up, peaked at {tenths[0]:.0f} MB."]
    print("\n".join(rows), flush=True)
    return rows


def splice(path: Path, lines: list[str]) -> None:
    """Replace the text between the reduced markers of ``path`` (or append them), atomically."""
    start, end = "<!-- reduced:start -->", "<!-- reduced:end -->"
    text = path.read_text(encoding="utf-8")
    block = "\n".join([start, *lines, end])
    if start in text:
        head, rest = text.split(start, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1, help="images per store in the bytes table (one chunk each)")
    p.add_argument("--speed-n", type=int, default=64, help="images (one batch) for the images/s table")
    p.add_argument("--stream-n", type=int, default=2000, help="images in the memory stream (whole batches)")
    p.add_argument("--stream-batch", type=int, default=32)
    p.add_argument("--splice", action="store_true", help="write the tables into benchmarks/RESULTS.md")
    p.add_argument("--only", choices=("bytes", "speed", "stream"), default=None, help="print one table alone")
    args = p.parse_args()
    before = load()
    machine = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} "
               f"with {torch.get_num_threads()} thread(s), no GPU used")
    print(f"{machine}\nload at start: {before}\nhead statistics: {list(vl.HEAD_STATS)}; maps: {list(vl.METHODS)}")
    tmp = Path(tempfile.mkdtemp())
    start = time.perf_counter()
    try:
        if args.only:
            table = {"bytes": lambda: bytes_table(args, tmp), "speed": lambda: speed_table(args),
                     "stream": lambda: stream_table(args, tmp)}[args.only]()
            print("\n".join(table))
            return
        sizes = bytes_table(args, tmp)
        speed = speed_table(args)
        stream = stream_table(args, tmp)
    finally:
        shutil.rmtree(tmp)
    after = load()
    lines = ["## A store of answers (reduced capture)", "",
             f"Generated by `python benchmarks/bench_reduced.py --splice` on {_dt.date.today().isoformat()} "
             f"in {(time.perf_counter() - start) / 60:.1f} min (spliced into this file). Machine: {machine}. "
             f"Load (`uptime`) at the start: `{before}`; at the end: `{after}` — the machine is shared, so "
             "times are slower than on an idle one; sizes do not depend on it.", "",
             f"Bytes per image of a streamed store (random init, 224 px, {args.n} image(s), batch 1: the chunks of "
             f"its sample-indexed arrays per image, what the store grows by; maps='all' is {len(vl.METHODS)} "
             f"maps, stats='all' the {len(vl.HEAD_STATS)} statistics, ablation_effect's one forward per head "
             "included):", "", *sizes, "",
             "Speed (in memory, one batch, one run each after a warm-up forward and a warm-up capture of two "
             "images; CPU time of the process, which the machine's load distorts least, and wall time):", "",
             *speed, "",
             "Memory over a long reduced stream:", "", *stream]
    print("\n" + "\n".join(lines))
    if args.splice:
        splice(Path(__file__).with_name("RESULTS.md"), lines)


if __name__ == "__main__":
    main()
