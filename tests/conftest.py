"""Shared fixtures: tiny random-initialised timm models and images (no network)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

# Tests never touch the network: make the Hugging Face hub fail fast and offline.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import numpy as np
import pytest
import timm
import torch
import xarray as xr

# Under pytest-xdist (`make test` runs two workers on two cores) each worker computes on one
# thread, so that two workers do not fight over the same cores.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


def make_vit(**kw):
    torch.manual_seed(kw.pop("seed", 0))
    args = dict(img_size=32, patch_size=8, num_classes=5, embed_dim=48, depth=3, num_heads=3)
    args.update(kw)
    return timm.create_model("vit_tiny_patch16_224", **args).eval()


def make_swin(**kw):
    torch.manual_seed(kw.pop("seed", 0))
    args = dict(img_size=64, patch_size=4, window_size=4, num_classes=4, embed_dim=24, depths=(2, 2), num_heads=(2, 4))
    args.update(kw)
    return timm.create_model("swin_tiny_patch4_window7_224", **args).eval()


@pytest.fixture(scope="session")
def vit():
    return make_vit()


@pytest.fixture(scope="session")
def swin():
    return make_swin()


@pytest.fixture(scope="session")
def deit_distilled():
    torch.manual_seed(1)
    return timm.create_model(
        "deit_tiny_distilled_patch16_224", img_size=32, patch_size=8, num_classes=5, embed_dim=48, depth=2, num_heads=3
    ).eval()


@pytest.fixture(scope="session")
def vit_registers():
    return make_vit(reg_tokens=2, seed=2)


@pytest.fixture(scope="session")
def vit_avg():
    return make_vit(global_pool="avg", class_token=False, seed=3)


def assert_same_capture(reference: xr.DataTree, tree: xr.DataTree, n: int | None = None) -> None:
    """``tree`` (e.g. opened from a store) equals the first ``n`` images of ``reference`` (all by
    default): the same attributes, nodes and variables; floats to float32 rounding, the rest exactly."""
    ref = reference if n is None else reference.isel(sample=slice(0, n))
    assert tree.attrs == ref.attrs
    for path, node in ref.subtree_with_keys:
        a, b = node.to_dataset(inherit=False), tree[path].to_dataset(inherit=False).load()
        assert set(a.variables) == set(b.variables), path
        for name in a.variables:
            if a[name].dtype.kind == "f":
                np.testing.assert_allclose(a[name].values, b[name].values, rtol=1e-4, atol=1e-6, err_msg=f"{path}/{name}")
            else:
                np.testing.assert_array_equal(a[name].values, b[name].values, err_msg=f"{path}/{name}")


def random_images(n: int, size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, size, size, 3)).astype(np.float32)


@pytest.fixture
def images32():
    return random_images(3, 32)


@pytest.fixture
def images64():
    return random_images(2, 64)


def run_spawned(target: Callable[..., None], *args: object, kill_after: float | None = None,
                timeout: float = 120) -> int:
    """Exit code of ``target(*args)`` run in a spawned child process (a fork of a pytest process that
    ran the browser tests can hang); ``-9`` if SIGKILLed after ``kill_after`` s. Fails the test if the
    child is still running ``timeout`` s later."""
    import multiprocessing

    proc = multiprocessing.get_context("spawn").Process(target=target, args=args)
    proc.start()
    if kill_after is not None:
        proc.join(kill_after)
        if proc.is_alive():
            os.kill(proc.pid, signal.SIGKILL)
    proc.join(timeout)
    assert not proc.is_alive(), "the capture child hung"
    return proc.exitcode


def kill_when(script: Path, ready: Callable[[], bool], *, timeout: float, poll: float, never: str) -> None:
    """Run ``script`` in a child Python (one thread) and SIGKILL it as soon as ``ready()`` holds;
    ``pytest.fail(never)`` if the child exits or ``timeout`` seconds pass first (it is killed either way)."""
    proc = subprocess.Popen([sys.executable, str(script)], env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.time() + timeout
        while time.time() < deadline and proc.poll() is None:
            if ready():
                break
            time.sleep(poll)
        else:
            pytest.fail(never)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
