"""Fault injection: kill a streaming capture at many points; nothing committed is ever lost.

A forked child runs ``vl.capture(..., store=..., batch_size=3)`` and dies at a
chosen write step (``VITLENS_FAULT_POINT=N`` makes the writer ``os._exit`` there,
as abruptly as SIGKILL: no cleanup, no ``finally``), or is SIGKILLed at a random
moment. After every kill:

- ``vl.open`` opens exactly the committed images (or, before the first commit,
  says how to resume);
- ``resume=True`` finishes the run, and the store equals an in-memory capture.

A handful of kill points run in CI (the first batch, the root-group write, the
consolidation, both sides of the commit-marker rename); ``-m slow`` sweeps every
step. ``benchmarks/bench_kills.py`` runs the same loop ≥ 50 times.
"""

from __future__ import annotations

import os
import signal
import time
import warnings

import numpy as np
import pytest
import xarray as xr
from conftest import assert_same_capture, make_vit, random_images, run_spawned

import vitlens as vl
from vitlens.capture import stream

N_IMAGES, BATCH = 10, 3


def _images() -> np.ndarray:
    return random_images(N_IMAGES, 32, seed=5)


def _run(store: str, fault: int | None = None, log: str | None = None, delay: float = 0.0,
         resume: bool = False) -> None:
    for key, value in ((stream.FAULT_ENV, fault), (stream.FAULT_LOG_ENV, log)):
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = str(value)
    model, imgs = make_vit(), _images()
    if delay:
        def slow():
            for i in range(0, N_IMAGES, BATCH):
                time.sleep(delay)
                yield imgs[i : i + BATCH]

        source = slow()
    else:
        source = imgs
    vl.capture(model, source, store=store, batch_size=BATCH, progress=False, resume=resume)
    os._exit(0)


def run_child(store, fault=None, log=None, delay=0.0, kill_after=None, resume=False) -> int:
    """Exit code of a spawned child running the capture (``-9`` if SIGKILLed after ``kill_after`` s)."""
    return run_spawned(_run, str(store), fault, log, delay, resume, kill_after=kill_after)


@pytest.fixture(scope="module")
def trace(tmp_path_factory) -> list[str]:
    """Every write step of one uninterrupted run, in order (step i+1 is trace[i])."""
    d = tmp_path_factory.mktemp("trace")
    log = d / "steps.txt"
    assert run_child(d / "run.zarr", log=str(log)) == 0
    return [line.split("\t", 1)[1] for line in log.read_text().splitlines()]


@pytest.fixture(scope="module")
def reference() -> xr.DataTree:
    return vl.capture(make_vit(), _images())


def check_after_kill(store, reference) -> int:
    """The invariants after a kill; returns the number of images that were committed."""
    done = stream.committed(store) if store.exists() else 0
    if done:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "unfinished capture" is the point here
            partial = vl.open(store, chunks={})
        assert partial["sample"].size == done
        assert_same_capture(reference, partial, done)
    elif store.exists():
        with pytest.raises(vl.CaptureFormatError, match="resume=True"):
            vl.open(store)
    resumed = vl.capture(make_vit(), _images(), store=store, batch_size=BATCH, resume=True, progress=False)
    assert resumed["sample"].values.tolist() == list(range(N_IMAGES))
    assert_same_capture(reference, resumed)
    assert_same_capture(reference, vl.open(store))
    return done


def test_the_trace_covers_every_group_the_root_write_and_the_commit(trace):
    batches = N_IMAGES // BATCH + 1
    assert trace.count("group / begins") == batches
    assert trace.count("group /stage0 begins") == batches
    assert trace.count("commit marker written, not yet renamed") == batches + 2  # creation, batches, completion
    assert any(step.startswith("set logits/") for step in trace)


def _ci_points(trace: list[str]) -> dict[str, int]:
    """Named kill points (1-based steps) spread over the write path."""
    def nth(label: str, k: int) -> int:
        return [i for i, s in enumerate(trace) if s == label][k] + 1

    root2 = nth("group / begins", 1)
    return {
        "creating the store": 1,
        "first batch, mid /stage0": nth("group /stage0 begins", 0) + 20,
        "second batch, mid /stage0": nth("group /stage0 begins", 1) + 10,
        "second batch, /stage0 done, root not begun": root2,
        "second batch, mid root write": root2 + 5,
        "second batch, consolidating": nth("consolidate", 1),
        "second batch, marker written not renamed": nth("commit marker written, not yet renamed", 2),
        "second batch, marker renamed": nth("commit marker renamed", 2),
        "last batch, mid root write": nth("group / begins", 3) + 3,
        "completion marker": len(trace) - 1,
    }


@pytest.mark.parametrize("point", [  # two points in the fast lane, every point in CI (-m slow too)
    pytest.param('creating the store', marks=pytest.mark.slow),
    pytest.param('first batch, mid /stage0', marks=pytest.mark.slow),
    pytest.param('second batch, /stage0 done, root not begun', marks=pytest.mark.slow),
    'second batch, mid root write',
    pytest.param('second batch, consolidating', marks=pytest.mark.slow),
    'second batch, marker written not renamed',
    pytest.param('second batch, marker renamed', marks=pytest.mark.slow),
    pytest.param('last batch, mid root write', marks=pytest.mark.slow),
    pytest.param('completion marker', marks=pytest.mark.slow),
])
def test_a_kill_at_a_write_step_loses_nothing_and_resumes(point, trace, reference, tmp_path):
    step = _ci_points(trace)[point]
    store = tmp_path / "run.zarr"
    assert run_child(store, fault=step) == stream.FAULT_EXIT
    done = check_after_kill(store, reference)
    if "marker renamed" in point:
        assert done == 6  # the batch that was renamed in counts
    if "marker written not renamed" in point:
        assert done == 3


@pytest.mark.slow
def test_kills_at_every_step_sweep(trace, reference, tmp_path):
    """Every 7th write step of the whole run (CI keeps the named points above)."""
    if os.environ.get("VITLENS_FULL_SWEEP") != "1":
        steps = range(1, len(trace) + 1, 37)
    else:
        steps = range(1, len(trace) + 1, 7)
    for step in steps:
        store = tmp_path / f"s{step}.zarr"
        assert run_child(store, fault=step) == stream.FAULT_EXIT, step
        check_after_kill(store, reference)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_time_sigkills_lose_nothing(seed, reference, tmp_path):
    store = tmp_path / "run.zarr"
    kill_after = 0.3 + np.random.default_rng(seed).random() * 1.2
    code = run_child(store, delay=0.25, kill_after=kill_after)
    assert code in (-signal.SIGKILL, 0)
    check_after_kill(store, reference)


@pytest.mark.parametrize("resume_step", [pytest.param(1, marks=pytest.mark.slow), 3, pytest.param(20, marks=pytest.mark.slow)])
def test_a_kill_during_the_resume_itself_loses_nothing(resume_step, trace, reference, tmp_path):
    """The resume trims, re-consolidates and appends: killing it there too changes nothing committed."""
    store = tmp_path / "run.zarr"
    mid_second_batch = [i for i, s in enumerate(trace) if s == "group / begins"][1] + 3
    assert run_child(store, fault=mid_second_batch) == stream.FAULT_EXIT
    assert stream.committed(store) == 3
    assert run_child(store, fault=resume_step, resume=True) == stream.FAULT_EXIT
    assert stream.committed(store) in (3, 6)
    check_after_kill(store, reference)
