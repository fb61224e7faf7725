"""``vitlens demo`` on a machine without a browser."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]

# Runs the demo in a fresh interpreter and proves no browser machinery was even imported.
SCRIPT = """
import sys
from vitlens.cli import main
code = main(["demo", "--out", sys.argv[1], "--images", "2", "--eval", "4"])
loaded = sorted(m for m in ("kaleido", "choreographer", "playwright") if m in sys.modules)
assert not loaded, f"browser machinery imported: {loaded}"
sys.exit(code)
"""


@pytest.mark.slow
def test_demo_writes_its_figures_with_no_browser_reachable(tmp_path):
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BROWSER", "CHROM", "KALEIDO"))}
    env.update(PATH=str(empty), BROWSER_PATH=str(tmp_path / "no-chromium"), BROWSER=str(tmp_path / "no-browser"),
               PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]), OMP_NUM_THREADS="1",
               HF_HUB_OFFLINE="1", MPLBACKEND="Agg")
    out = tmp_path / "demo"
    run = subprocess.run([sys.executable, "-c", SCRIPT, str(out)], env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    for model in ("vit-shapes", "swin-shapes"):
        for name, magic in ((f"{model}-methods.png", b"\x89PNG"), (f"{model}-methods.pdf", b"%PDF"),
                            (f"{model}-lnstat-by-layer.png", b"\x89PNG")):
            data = (out / name).read_bytes()
            assert data.startswith(magic) and len(data) > 10_000, name
        assert (out / f"{model}-capture.nc").stat().st_size > 0
    page = (out / "index.html").read_text()
    assert "vit-shapes-methods.png" in page and "<table" in page
    printed = run.stdout
    assert "ms/img" in printed and "pos.label↓" in printed and "0-80 %" in printed  # the AUC scale is stated
    assert "evaluate" in run.stderr  # the metrics step shows a progress bar


def test_demo_metrics_table_shows_explain_time_in_milliseconds():
    import numpy as np
    import xarray as xr

    from vitlens.demo import metrics_frame

    table = xr.Dataset({"pixel_accuracy": ("method", [0.5]), "positive_auc_label": ("method", [13.75]),
                        "seconds_per_image": ("method", [0.00042])}, coords={"method": ["rollout"]})
    frame = metrics_frame(table)
    assert frame.columns.tolist() == ["pix.acc", "pos.label↓", "ms/img"]
    assert frame["ms/img"].iloc[0] == pytest.approx(0.4) and np.isfinite(frame.values).all()


def test_demo_and_bench_name_and_scale_their_columns_alike():
    import xarray as xr

    from vitlens.demo import metrics_frame
    from vitlens.metrics.bench import COLUMNS, format_table

    rng = np.random.default_rng(0)
    table = xr.Dataset({name: ("method", rng.random(2) * (0.01 if name == "seconds_per_image" else 50))
                        for name, _, _ in COLUMNS}, coords={"method": ["rollout", "tokentm"]})
    frame = metrics_frame(table)
    printed = format_table(table).splitlines()
    header = printed[0].split()
    assert set(frame.columns) < set(header)  # the demo prints a subset of the bench's columns, named alike
    for r, method in enumerate(["rollout", "tokentm"]):
        row = dict(zip(header, printed[1 + r].split(), strict=True))
        assert row["method"] == method
        for column in frame.columns:  # the same numbers in the same unit
            assert float(row[column]) == pytest.approx(frame.loc[method, column], abs=1e-9), column


def test_demo_refuses_a_file_as_its_output_folder(tmp_path, capsys):
    from vitlens.cli import main

    (tmp_path / "f").write_text("mine")
    assert main(["demo", "--out", str(tmp_path / "f")]) == 2
    assert "is a file" in capsys.readouterr().err and (tmp_path / "f").read_text() == "mine"


def test_demo_table_says_which_baselines_are_expected_to_be_weak_and_why():
    import vitlens as vl
    from vitlens.demo import weak_baselines

    lines = weak_baselines(list(vl.METHODS))
    assert [line.split(":")[0] for line in lines] == ["attention", "rollout", "gradcam"]
    assert all("expected to be weak: " in line and len(line.split("expected to be weak: ")[1]) > 40 for line in lines)
    assert "two-object" in lines[0] and "single-layer" in lines[2]
