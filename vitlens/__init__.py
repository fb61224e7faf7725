"""vitlens — open Vision Transformers up inside Jupyter.

Capture a vision transformer's internals into labeled xarray data (timm ViT, DeiT,
EVA, BEiT, Swin v1-v2; transformers ViT, DeiT, DINOv2, BEiT, Swin, CLIP, SigLIP),
compute explanation maps from that one capture, and explore them live.

Examples
--------
>>> import vitlens as vl
>>> vl.METHODS[:2]
('attention', 'rollout')
"""

from __future__ import annotations

from ._version import __version__

from . import datasets, figures, methods, metrics, models, registry, widgets
from .capture import KEEP_GROUPS, capture, open, save  # noqa: A004
from .figures import plot
from .errors import (
    CaptureError,
    CaptureFormatError,
    DeviceError,
    ExportError,
    ImageError,
    ImageProcessorWarning,
    ModelLoadError,
    OptionError,
    RandomWeightsWarning,
    ResumeError,
    StorageError,
    StoreLockedError,
    TargetError,
    UnsupportedModelError,
    VitlensError,
)
from .methods import METHODS, explain, normalize, to_pixels
from .metrics import evaluate
from .models import load_model
from .models.families.hf_headed import SimilarityHead, with_head
from .widgets import Compare, Explorer, HeadGrid, ModelView, TokenCurves

__all__ = [
    "Compare",
    "Explorer",
    "HeadGrid",
    "ModelView",
    "TokenCurves",
    "KEEP_GROUPS",
    "METHODS",
    "CaptureError",
    "CaptureFormatError",
    "DeviceError",
    "ExportError",
    "ImageError",
    "ImageProcessorWarning",
    "ModelLoadError",
    "OptionError",
    "RandomWeightsWarning",
    "SimilarityHead",
    "ResumeError",
    "StorageError",
    "StoreLockedError",
    "TargetError",
    "UnsupportedModelError",
    "VitlensError",
    "capture",
    "datasets",
    "evaluate",
    "explain",
    "figures",
    "methods",
    "normalize",
    "to_pixels",
    "with_head",
    "widgets",
    "load_model",
    "metrics",
    "models",
    "open",
    "plot",
    "registry",
    "save",
]
