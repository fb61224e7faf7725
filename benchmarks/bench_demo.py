"""Wall and CPU time of ``vitlens demo`` in a fresh process, with no browser reachable.
Target: under a minute on an idle machine. On a machine others load, the wall time
says little: the CPU time (printed too) is the comparable number.

    python benchmarks/bench_demo.py [--eval 24] [--threads 1]

The demo runs in a subprocess whose PATH holds no browser and whose
BROWSER_PATH points nowhere, as on a fresh machine without Chromium.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--eval", type=int, default=None, help="images for the metrics step (default: the demo's)")
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of the demo process")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        empty = Path(tmp) / "bin"
        empty.mkdir()
        env = {**os.environ, "PATH": str(empty), "BROWSER_PATH": str(Path(tmp) / "none"),
               "OMP_NUM_THREADS": str(args.threads), "MPLBACKEND": "Agg",
               "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        cmd = [sys.executable, "-m", "vitlens.cli", "demo", "--out", str(Path(tmp) / "out")]
        if args.eval is not None:
            cmd += ["--eval", str(args.eval)]
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        run = subprocess.run(cmd, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if run.returncode:
            sys.exit(run.stderr[-3000:])
        written = sorted(q.name for q in (Path(tmp) / "out").iterdir())
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, load {load:.1f}; OMP_NUM_THREADS={args.threads}")
    print(f"vitlens demo: {wall:.1f} s wall, {cpu:.1f} s CPU, {len(written)} files, no browser on PATH")
    if load > 1.5:  # others share the cores: the wall time is not the idle machine's, the CPU time still is
        print(f"note: load {load:.1f} on {os.cpu_count()} cores: compare CPU times; the wall time on an idle "
              f"machine is about CPU / threads ({cpu / max(1, args.threads):.0f} s) plus the start-up.")


if __name__ == "__main__":
    main()
