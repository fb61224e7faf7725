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

from . import datasets, figures, methods, metrics, models, registry, stats, widgets
from .capture import KEEP_GROUPS, Verification, capture, head_importance, open, patch, save, verify  # noqa: A004
from .capture import targets
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
    PrecisionWarning,
    RandomWeightsWarning,
    ResumeError,
    ShardError,
    StorageError,
    StoreLockedError,
    TargetError,
    UnsupportedModelError,
    VitlensError,
)
from .methods import METHODS, explain, normalize, to_pixels
from .stats import HEAD_STATS, head_stats
from .metrics import evaluate
from .models import load_model
from .models.families.hf_headed import SimilarityHead, with_head
from .widgets import Compare, Explorer, HeadAtlas, HeadGrid, ModelView, TokenCurves

__all__ = [
    "Compare",
    "Explorer",
    "HeadAtlas",
    "HeadGrid",
    "ModelView",
    "TokenCurves",
    "KEEP_GROUPS",
    "METHODS",
    "HEAD_STATS",
    "CaptureError",
    "CaptureFormatError",
    "DeviceError",
    "ExportError",
    "ImageError",
    "ImageProcessorWarning",
    "ModelLoadError",
    "OptionError",
    "PrecisionWarning",
    "RandomWeightsWarning",
    "SimilarityHead",
    "ResumeError",
    "ShardError",
    "StorageError",
    "StoreLockedError",
    "TargetError",
    "UnsupportedModelError",
    "VitlensError",
    "capture",
    "datasets",
    "evaluate",
    "explain",
    "head_stats",
    "figures",
    "head_importance",
    "methods",
    "normalize",
    "to_pixels",
    "with_head",
    "widgets",
    "load_model",
    "metrics",
    "models",
    "open",
    "patch",
    "plot",
    "verify",
    "Verification",
    "registry",
    "save",
    "stats",
    "targets",
]
