"""``load_model``: shipped models, timm names (with local checkpoints) and modules."""

from __future__ import annotations

import difflib
import os
from pathlib import Path

import torch
from torch import nn

from ..errors import ModelLoadError, UnsupportedModelError
from .registry import adapter_for


def load_model(
    name_or_module: str | nn.Module,
    *,
    pretrained: bool = False,
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
        ``vl.models.available()``), any timm model name of the ViT/DeiT/Swin
        families, ``"hf:<repo id or directory>"`` for a Hugging Face
        ``transformers`` model (see :mod:`vitlens.models.hf_loading`), or an
        ``nn.Module`` (checked and returned as it is).
    pretrained
        For timm names: load timm's pretrained weights (needs a network or a
        filled Hugging Face cache).
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
    >>> model = vl.load_model("vit_tiny_patch16_224", num_classes=10, img_size=32)
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
        from .hf_loading import load_hf_model

        model = load_hf_model(name, num_classes=num_classes, **timm_kwargs)
        adapter_for(model)
        return model.to(_device(device))
    from .. import zoo

    shipped = zoo.available()
    if name in shipped:
        if checkpoint is not None or pretrained:
            raise ModelLoadError(f"{name!r} is shipped with vitlens; pass no pretrained=/checkpoint=.")
        return zoo.load_shipped(name).to(_device(device))

    import timm

    if not timm.is_model(name):
        known = list(shipped) + timm.list_models("vit_*") + timm.list_models("deit*") + timm.list_models("swin_*")
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
    try:
        model = timm.create_model(name, pretrained=pretrained, **kwargs)
    except UnsupportedModelError:
        raise
    except Exception as exc:  # hub / network / state-dict errors come in many types
        if checkpoint is not None:
            raise ModelLoadError(
                f"could not load checkpoint {str(checkpoint)!r} into {name!r}: {exc}"
            ) from exc
        if pretrained:
            raise ModelLoadError(
                f"could not fetch pretrained weights for {name!r} ({type(exc).__name__}: {exc}). "
                "Without a network, download the weights elsewhere and pass the file: "
                f"vl.load_model({name!r}, checkpoint='path/to/model.safetensors'); or use a "
                "shipped model such as vl.load_model('vit-shapes')."
            ) from exc
        raise ModelLoadError(f"timm could not create {name!r}: {exc}") from exc
    adapter_for(model)
    return model.eval().to(_device(device))


def _device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)
