"""Exceptions raised by vitlens.

Every error vitlens raises on purpose is a :class:`VitlensError`, so that a
notebook can catch them all with one ``except`` and so that each message can say
what went wrong *and* what to do about it.
"""

from __future__ import annotations

__all__ = [
    "VitlensError",
    "UnsupportedModelError",
    "ImageError",
    "TargetError",
    "CaptureFormatError",
    "ModelLoadError",
    "OptionError",
    "ExportError",
    "PrecisionWarning",
    "RandomWeightsWarning",
    "ImageProcessorWarning",
    "CaptureError",
    "DeviceError",
    "ResumeError",
    "StorageError",
    "StoreLockedError",
    "ShardError",
]


class VitlensError(Exception):
    """Base class of every error vitlens raises deliberately."""


class UnsupportedModelError(VitlensError, TypeError):
    """The model is not a Vision Transformer family vitlens can explain."""


class ImageError(VitlensError, ValueError):
    """Images cannot be read or do not fit the model (size, values, layout)."""


class TargetError(VitlensError, ValueError):
    """The class(es) to explain are missing, out of range or of the wrong count."""


class CaptureFormatError(VitlensError, ValueError):
    """A stored file or object is not a vitlens capture (or lacks what is needed)."""


class ModelLoadError(VitlensError, RuntimeError):
    """A model or its weights could not be loaded."""


class OptionError(VitlensError, ValueError):
    """An option has a value vitlens does not know (method name, variant, selection)."""


class ExportError(VitlensError, RuntimeError):
    """A figure could not be written to an image file (missing exporter or browser)."""


class PrecisionWarning(UserWarning):
    """A map rests on a float32 LRP pass that divided by nearly cancelling sums on some images.

    ``vl.explain(cap, "transformer_attribution")`` warns with this class when the
    capture's ``lrp_condition`` of a sample is below
    :data:`vitlens.capture.precision.RELIABLE_CONDITION`; capture those images
    again with ``lrp_dtype="float64"`` for a map that does not depend on rounding.
    """


class RandomWeightsWarning(UserWarning):
    """A model was created with random weights: its maps explain an untrained network.

    ``vl.load_model("vit_small_patch16_224")`` without ``pretrained=`` or
    ``checkpoint=`` warns with this class; pass ``pretrained=False`` to say that
    random weights are what you want (no warning).
    """


class ImageProcessorWarning(UserWarning):
    """A Hugging Face model was captured from a ready tensor without its image processor.

    The maps do not depend on it, but the picture is then drawn from the tensor
    itself (rescaled to [0, 1], not in its true colours); ``processor=`` (the image
    processor that made the tensor) gives the true colours.
    """


class CaptureError(VitlensError, RuntimeError):
    """The model ran but produced something vitlens will not store (NaN/inf logits or maps)."""


class DeviceError(VitlensError, RuntimeError):
    """The requested device is not available, or does not match where the model lives."""


class ResumeError(VitlensError, ValueError):
    """``resume=True`` was asked of a store that this run must not continue or modify."""


class StorageError(VitlensError, OSError):
    """A capture could not be written (disk full, I/O error); nothing saved before was lost."""


class StoreLockedError(StorageError):
    """Another live process is writing the same store."""


class ShardError(VitlensError, RuntimeError):
    """A capture sharded over dask workers could not go on (workers disagree, keep dying, or are gone).

    The batches committed before are intact: fix the cause the message names, then
    continue with ``vl.capture(..., store=..., resume=True, client=client)``.
    """
