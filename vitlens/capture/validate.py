"""Checks that turn silent wrong results into clear errors before (and after) a capture runs.

The model's state (where its weights live, whether they can take a backward
pass), the device asked for, and the finiteness of what the model returned.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import CaptureError, DeviceError, ModelLoadError


def check_device(device: Any) -> torch.device:
    """``device`` as a torch device that exists on this machine (a :class:`DeviceError` otherwise).

    Examples
    --------
    >>> check_device("cpu")
    device(type='cpu')
    """
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise DeviceError(f"device={device!r} is not a torch device ({exc}); use 'cpu', 'cuda', 'cuda:1', 'mps'...") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(
            f"device={str(device)!r} but torch sees no CUDA GPU on this machine; use device='cpu' or leave "
            "device=None (the model's own device)."
        )
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise DeviceError(f"device={str(device)!r} but only {torch.cuda.device_count()} CUDA device(s) exist.")
    if device.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise DeviceError(f"device={str(device)!r} but the MPS backend is not available; use device='cpu'.")
    return device


def check_model(model: nn.Module, device: Any, grads: bool) -> torch.device:
    """The device to run on; refuses meta weights, inference tensors under ``grads``, absent GPUs.

    vitlens never moves the model: ``device`` must be where its parameters are.
    """
    params = list(model.parameters())
    param = params[0] if params else None
    if any(p.device.type == "meta" for p in params):
        raise ModelLoadError(
            "the model's weights are on the 'meta' device: it was built without data (torch.device('meta'), "
            "init_empty_weights…). Materialise and load its weights first, e.g. "
            "model.to_empty(device='cpu'); model.load_state_dict(state)."
        )
    if grads and any(p.is_inference() for p in params):
        raise ModelLoadError(
            "the model was created (or loaded) under torch.inference_mode(): its weights are inference tensors, "
            "which cannot take part in the backward pass that gradients and LRP need. Create or load the model "
            "outside inference_mode (or clone its weights: model.load_state_dict({k: v.clone() for k, v in "
            "model.state_dict().items()}) outside it), or pass grads=False."
        )
    if device is None:
        return param.device if param is not None else torch.device("cpu")
    device = check_device(device)
    if param is not None and not _same_device(param.device, device):
        raise DeviceError(
            f"device={str(device)!r} but the model's weights are on {str(param.device)!r}; vitlens never moves "
            f"your model: call model.to({str(device)!r}) first, or leave device=None."
        )
    return device


def _same_device(a: torch.device, b: torch.device) -> bool:
    if a.type != b.type:
        return False
    return a.index is None or b.index is None or a.index == b.index


def check_finite(arrays: Iterable[tuple[str, np.ndarray]]) -> None:
    """Refuse NaN/inf anywhere in what a capture would store (logits, attention, gradients…)."""
    for key, arr in arrays:
        if arr.dtype.kind != "f":
            continue
        step = max(1, 2**24 // max(arr[:1].size, 1))  # in blocks of rows: no full-size temporary
        samples: list[int] = []
        for i in range(0, len(arr), step):
            block = arr[i : i + step].reshape(len(arr[i : i + step]), -1)
            samples += (i + np.nonzero(~np.isfinite(block).all(1))[0]).tolist()
        if samples:
            hint = (
                "the model produced NaN/inf for these inputs: a tensor is taken as a ready, *normalised* batch, so "
                "check its scale (pass pictures as arrays in [0, 1] to let vitlens normalise them)"
                if key == "logits"
                else "NaN/inf inside the model (a float16 model or dtype='float16' may overflow: try float32)"
            )
            raise CaptureError(
                f"{key} holds non-finite values for image(s) {samples[:10]}{'…' if len(samples) > 10 else ''}; "
                f"{hint}. vitlens does not store NaN maps."
            )
