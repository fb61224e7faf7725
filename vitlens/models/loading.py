"""``load_model``: shipped models, timm names (with local checkpoints) and modules."""

from __future__ import annotations

import contextlib
import difflib
import os
import socket
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn

from ..errors import ModelLoadError, RandomWeightsWarning, UnsupportedModelError
from .registry import adapter_for


def load_model(
    name_or_module: str | nn.Module,
    *,
    pretrained: bool | None = None,
    checkpoint: str | os.PathLike | None = None,
    num_classes: int | None = None,
    device: str | torch.device | None = None,
    **timm_kwargs,
) -> nn.Module:
    """Load a model vitlens can explain, in eval mode.

    Parameters
    ----------
    name_or_module
        A shipped model (``"vit-shapes"``, ``"swin-shapes"``; see
        ``vl.models.available()``), any timm model name of a supported family
        (ViT, DeiT, EVA, BEiT, Swin v1-v2; ``docs/COVERAGE.md``), ``"hf:<repo id or directory>"`` for a Hugging Face
        ``transformers`` model (see :mod:`vitlens.models.hf_loading`; a headless
        backbone such as ``ViTModel`` loads too, to be given a head with
        :func:`vitlens.with_head`), or an ``nn.Module`` (checked and returned as it is).
    pretrained
        For timm names: ``True`` loads timm's pretrained weights (needs a
        network or a filled Hugging Face cache; without a network it fails
        within seconds, saying how to pass a local file). ``False`` creates
        random weights on purpose. Left out (and no ``checkpoint``), the model
        gets random weights with a loud :class:`~vitlens.RandomWeightsWarning`:
        its maps would explain an untrained network.
    checkpoint
        For timm names: a local weights file (``.safetensors``, ``.pth``, ``.bin``),
        loaded through timm's own pretrained-weights path (so original-format
        checkpoints are converted as timm does). Works offline.
    num_classes
        For timm names: size of the classifier head.
    device
        Where to put a loaded model (default: CUDA when available, else CPU).
        A module passed in stays where it is.

    Examples
    --------
    >>> import vitlens as vl
    >>> model = vl.load_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=32)
    >>> type(model).__name__
    'VisionTransformer'
    """
    if isinstance(name_or_module, nn.Module):
        adapter_for(name_or_module)
        return name_or_module
    if not isinstance(name_or_module, str):
        raise ModelLoadError(
            f"load_model takes a model name or an nn.Module; got {type(name_or_module).__name__}"
        )
    name = name_or_module
    if name.startswith("hf:"):  # Hugging Face transformers (optional extra)
        from .hf_common import backbones
        from .hf_loading import load_hf_model

        model = load_hf_model(name, num_classes=num_classes, **timm_kwargs)
        if type(model).__name__ not in backbones():  # a headless backbone is explained once it has a head: vl.with_head
            adapter_for(model)
        return model.to(_device(device))
    from .. import zoo

    shipped = zoo.available()
    if name in shipped:
        if checkpoint is not None or pretrained:
            raise _error(f"{name!r} is shipped with vitlens with its trained weights; pass no pretrained=/checkpoint=.",
                         f"--model {name} is shipped with vitlens with its trained weights; drop --checkpoint/--pretrained.")
        return zoo.load_shipped(name).to(_device(device))

    import timm

    if not timm.is_model(name):
        from .registry import registry_names

        known = list(shipped) + [n for names in registry_names().values() for n in names]  # every family vitlens explains
        close = difflib.get_close_matches(name, known, n=3)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        raise ModelLoadError(
            f"unknown model {name!r}: not shipped ({', '.join(shipped) or 'none'}) and not a timm "
            f"model name.{hint}"
        )
    kwargs = dict(timm_kwargs)
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    if checkpoint is not None:
        path = Path(checkpoint)
        if not path.is_file():
            raise ModelLoadError(f"checkpoint {str(path)!r} does not exist or is not a file.")
        # timm's pretrained path reads the local file, applies the model's
        # checkpoint filter (original-format weights) and adapts the head.
        overlay = dict(file=str(path), hf_hub_id=None, url=None)
        if num_classes is not None:
            # the file's head already has num_classes outputs: don't let timm drop it
            overlay["num_classes"] = num_classes
        kwargs["pretrained_cfg_overlay"] = overlay
        pretrained = True
    elif pretrained is None:
        warnings.warn(
            f"vl.load_model({name!r}) has RANDOM weights (no pretrained= or checkpoint= given): its maps explain "
            f"an untrained network. Pass checkpoint='path/to/weights.safetensors', pretrained=True (network or "
            "Hugging Face cache), or pretrained=False to say random weights are intended.",
            RandomWeightsWarning, stacklevel=2,
        )
    download = bool(pretrained) and checkpoint is None
    offline = download and not hub_reachable()
    try:
        with _hub_offline(offline):
            model = timm.create_model(name, pretrained=bool(pretrained), **kwargs)
    except UnsupportedModelError:
        raise
    except Exception as exc:  # hub / network / state-dict errors come in many types
        if checkpoint is not None:
            raise ModelLoadError(
                f"could not load checkpoint {str(checkpoint)!r} into {name!r}: {exc}"
            ) from exc
        if download:
            why = (f"no connection to {_hub_host()[0]} and the weights are not in the local Hugging Face cache"
                   if offline else f"{type(exc).__name__}: {exc}")
            raise _error(
                f"could not fetch pretrained weights for {name!r} ({why}). Download the weights elsewhere "
                f"and pass the file: vl.load_model({name!r}, checkpoint='path/to/model.safetensors'); or use a "
                "shipped model such as vl.load_model('vit-shapes').",
                f"could not fetch pretrained weights for {name!r} ({why}). Download the weights elsewhere and "
                f"pass the file: --model {name} --checkpoint path/to/model.safetensors; or use a shipped model "
                "(--model vit-shapes).",
            ) from exc
        raise ModelLoadError(f"timm could not create {name!r}: {exc}") from exc
    adapter_for(model)
    if not pretrained:  # random weights (warned above, or asked for): captures and figures say "untrained"
        model.vitlens_weights = "random"
    return model.eval().to(_device(device))


HUB_CHECK_SECONDS = 3.0  # how long load_model(pretrained=True) waits to learn whether the hub is reachable


def _error(message: str, cli_message: str) -> ModelLoadError:
    """A ModelLoadError that also carries the command line's wording of the same advice."""
    exc = ModelLoadError(message)
    exc.cli_message = cli_message  # read by vitlens.cli
    return exc


def _hub_host() -> tuple[str, int]:
    try:
        from huggingface_hub import constants

        endpoint = constants.ENDPOINT
    except ImportError:
        endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    url = urlparse(endpoint)
    return url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)


def hub_reachable(timeout: float = HUB_CHECK_SECONDS) -> bool:
    """Whether the Hugging Face hub answers a TCP connection within ``timeout`` seconds.

    False at once in offline mode (``HF_HUB_OFFLINE=1``). The check runs in a
    thread so that a hanging name lookup cannot stall the caller.
    """
    try:
        from huggingface_hub import constants

        if constants.is_offline_mode():
            return False
    except ImportError:
        pass
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return False
    host, port = _hub_host()
    result: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result.append(True)
        except OSError:
            result.append(False)

    worker = threading.Thread(target=probe, daemon=True)
    worker.start()
    worker.join(timeout)
    return bool(result and result[0])


@contextlib.contextmanager
def _hub_offline(offline: bool) -> Iterator[None]:
    """Hugging Face hub offline mode for one call: cached weights load, others fail at once (no retries)."""
    if not offline:
        yield
        return
    try:
        from huggingface_hub import constants
    except ImportError:
        yield
        return
    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before


def _device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)
