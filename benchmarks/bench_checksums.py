"""What the integrity checks cost: open + explain of a capture with and without checksums.

    python benchmarks/bench_checksums.py [--images 8] [--rounds 5] [--method rollout]

One capture of a random-init ``vit_tiny_patch16_224`` (224 px, 197 tokens, 12
blocks) is written four ways: ``.zarr`` and ``.nc``, each as vitlens writes it
(a CRC32C per zarr chunk, verified by zarr on every read; a CRC32C of the whole
``.nc`` file in its user block, verified at every open) and without checksums
(zstd alone; no user block), which is how vitlens wrote captures before. The
same work is then timed on each, rounds interleaved so that the busy machine's
noise falls on both alike:

- eager: ``vl.explain(vl.open(path), method)``
- lazy: ``vl.explain(vl.open(path, chunks={}), method)`` (reads only what the method needs)
- ``vl.verify(path)`` (reads everything), for scale.

Times are CPU seconds of the process (all its threads: ``time.process_time``),
which a busy shared machine disturbs far less than wall time; the median of
``--rounds`` per row. The A/B difference is still noisy there, so the checksum
work is also measured directly in the same runs: the CPU time (``thread_time``
of the thread doing it) spent verifying — zarr's ``Crc32cCodec`` decode for
every chunk read, vitlens' whole-file check of a ``.nc`` — and its share of the
task's CPU time (target ≤ 5 %).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np


def _write(cap, path: Path, checked: bool) -> Path:
    import vitlens as vl
    from vitlens.capture import store

    if checked:
        return vl.save(cap, path)
    real_encoding, real_header = store.zarr_encoding, store._nc_header
    try:  # vitlens' own writer, minus the checksums
        from zarr.codecs import ZstdCodec

        store.zarr_encoding = lambda ds: {str(n): {"compressors": (ZstdCodec(),)} for n in ds.variables}
        if path.suffix == ".nc":
            encoded = store.for_disk(cap)
            path.write_bytes(bytes(encoded.to_netcdf(engine="h5netcdf")))
            return path
        return vl.save(cap, path)
    finally:
        store.zarr_encoding, store._nc_header = real_encoding, real_header


def _instrument() -> list[float]:
    """Count the CPU time spent verifying checksums (zarr's chunk CRC32C, vitlens' .nc file CRC32C)."""
    from zarr.codecs import Crc32cCodec

    from vitlens.capture import store

    spent = [0.0]

    def timed(fn):
        def wrapper(*a, **k):
            start = time.thread_time()
            try:
                return fn(*a, **k)
            finally:
                spent[0] += time.thread_time() - start
        return wrapper

    Crc32cCodec._decode_sync = timed(Crc32cCodec._decode_sync)
    store._check_nc = timed(store._check_nc)
    return spent


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--method", default="rollout")
    args = p.parse_args()
    import timm
    import torch

    import vitlens as vl

    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", num_classes=10).eval()
    images = np.random.default_rng(0).random((args.images, 224, 224, 3), dtype=np.float32)
    cap = vl.capture(model, images)
    tasks = {
        "open + explain (eager)": lambda path: vl.explain(vl.open(path), args.method).values,
        "open + explain (lazy)": lambda path: vl.explain(vl.open(path, chunks={}), args.method).values,
        "verify (reads everything)": lambda path: vl.verify(path),
    }
    with tempfile.TemporaryDirectory() as d:
        paths = {(suffix, checked): _write(cap, Path(d) / f"{'crc' if checked else 'plain'}{suffix}", checked)
                 for suffix in (".zarr", ".nc") for checked in (True, False)}
        sizes = {key: (sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() else p.stat().st_size)
                 for key, p in paths.items()}
        times: dict[tuple, list[float]] = {}
        inside: dict[tuple, list[float]] = {}
        spent = _instrument()
        for _ in range(args.rounds):
            for name, task in tasks.items():
                for key, path in paths.items():
                    os.sync()
                    spent[0] = 0.0
                    start = time.process_time()
                    task(path)
                    times.setdefault((name, *key), []).append(time.process_time() - start)
                    inside.setdefault((name, *key), []).append(spent[0])
    mib = cap["stage0"].attention.nbytes * 3 / 2**20
    print(f"vit_tiny_patch16_224, {args.images} images at 224 px (attention, its gradient and relevance: "
          f"{mib:.0f} MiB); method {args.method!r}; median of {args.rounds} interleaved rounds\n")
    print("| format | task | without checksums (CPU s) | with checksums (CPU s) | difference | "
          "verifying, measured inside (CPU s) | its share |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for suffix in (".zarr", ".nc"):
        for name in tasks:
            plain = statistics.median(times[(name, suffix, False)])
            crc = statistics.median(times[(name, suffix, True)])
            work = statistics.median(inside[(name, suffix, True)])
            print(f"| {suffix} | {name} | {plain:.3f} | {crc:.3f} | {100 * (crc - plain) / plain:+.1f} % | "
                  f"{work:.3f} | {100 * work / crc:.1f} % |")
    print("\nbytes on disk: " + ", ".join(f"{s}{' (crc)' if c else ''}: {sizes[(s, c)] / 2**20:.1f} MiB"
                                          for s, c in paths))


if __name__ == "__main__":
    main()
