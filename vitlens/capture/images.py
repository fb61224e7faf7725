"""Turn whatever the user holds into a model-ready batch.

Arrays and images already at the model's input size are only normalised (so maps
align with their pixels); anything else goes through timm's own eval transform
for the model (``resolve_data_config`` / ``create_transform``), or a Hugging Face
model's own image processor. A ready tensor is the model's input as it is; only
its picture needs the normalisation, and a Hugging Face model without an image
processor shows the tensor itself (see :func:`prepare`).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import ImageError, ImageProcessorWarning
from ..models.adapter import Adapter


@dataclass
class Batch:
    """Normalised model input and the [0, 1] picture it shows."""

    pixels: torch.Tensor  # (B, 3, H, W), normalised with mean/std
    display: np.ndarray  # (B, H, W, 3) float32 in [0, 1]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


def data_config(adapter: Adapter, required: bool = True) -> dict[str, Any] | None:
    """timm's data config with the model's *real* input size (not the pretrained one).

    A transformers model's comes from its image processor; without one, ``None``
    unless it is ``required`` (then an :class:`ImageError` says how to pass it).
    """
    if hasattr(adapter, "data_config"):  # e.g. from a transformers image processor
        return adapter.data_config(required=required)
    from timm.data import resolve_data_config

    h, w = adapter.input_size
    return resolve_data_config({"input_size": (3, h, w)}, model=adapter.model)


def _as_rgb_float(array: np.ndarray, where: str) -> np.ndarray:
    """(H, W[, C]) array → (H, W, 3) float32 in [0, 1]; checks values."""
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[-1] not in (1, 3, 4):
        raise ImageError(
            f"{where}: expected an image of shape (H, W, 3) (or (H, W), (H, W, 1), (H, W, 4)); "
            f"got shape {array.shape}. Channels go last."
        )
    if array.dtype == np.bool_:
        raise ImageError(f"{where}: boolean arrays are masks, not images.")
    if array.dtype == np.uint16:  # 16-bit pictures (PNG, TIFF): the dtype says the range
        out = array.astype(np.float32) / 65535.0
    elif np.issubdtype(array.dtype, np.integer):
        if array.min() < 0 or array.max() > 255:
            raise ImageError(
                f"{where}: integer images must hold values 0..255 (uint8) or 0..65535 (uint16); got values in "
                f"[{array.min()}, {array.max()}]. Convert to one of those, or to float in [0, 1]."
            )
        out = array.astype(np.float32) / 255.0
    elif np.issubdtype(array.dtype, np.floating):
        out = array.astype(np.float32)
        if not np.isfinite(out).all():
            raise ImageError(f"{where}: the image contains NaN or infinite pixels.")
        lo, hi = float(out.min()), float(out.max())
        if lo < -1e-4 or hi > 1 + 1e-4:
            raise ImageError(
                f"{where}: float images must lie in [0, 1]; got values in [{lo:.3g}, {hi:.3g}]. "
                "Divide uint8 pictures by 255 (or pass them as uint8)."
            )
        out = np.clip(out, 0.0, 1.0)
    else:
        raise ImageError(f"{where}: unsupported pixel type {array.dtype}.")
    if out.shape[-1] == 1:
        out = np.repeat(out, 3, axis=-1)
    elif out.shape[-1] == 4:
        out = out[..., :3]  # drop alpha, as PIL's convert("RGB") does
    return out


#: The file name endings read as images from a folder (case-insensitive).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif")

#: The ``source`` of an image that was not read from a file, in a capture that mixes files with
#: arrays or PIL images (a capture without any file has no ``source`` coordinate at all).
NO_SOURCE = ""


def folder_images(folder: str | os.PathLike) -> list[Path]:
    """The image files directly inside ``folder`` (:data:`IMAGE_SUFFIXES`), sorted by name.

    The one reader of a folder of images: ``vl.capture`` in memory and with
    ``store=``, and ``vitlens explain``, all take its files in this order.
    Subfolders are not searched.

    Raises
    ------
    ImageError
        The folder is empty, or holds no image file.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> for name in ("b.png", "a.JPG", "notes.txt"):
    ...     _ = (d / name).write_bytes(b"")
    >>> [p.name for p in folder_images(d)]
    ['a.JPG', 'b.png']
    """
    path = Path(folder)
    entries = sorted(path.iterdir())
    files = [p for p in entries if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()]
    if files:
        return files
    kinds = ", ".join(IMAGE_SUFFIXES)
    if not entries:
        raise ImageError(f"folder {str(folder)!r} is empty: it holds no image files. Put image files in it "
                         f"(vitlens reads {kinds}).")
    raise ImageError(
        f"folder {str(folder)!r} holds no image files: vitlens reads the files directly inside it that end in "
        f"{kinds} (any case), not subfolders; it holds {len(entries)} other entries (e.g. {entries[0].name!r})."
    )


def readable_name(name: str) -> str:
    """A file name as text that every format stores: undecodable bytes written as ``\\xNN``.

    Linux file names are bytes; Python reads the ones that are not UTF-8 with
    surrogates (PEP 383), which netCDF and zarr cannot write.

    Examples
    --------
    >>> readable_name("caf\\udce9.png")
    'caf\\\\xe9.png'
    """
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def image_sources(images: Any) -> list[str] | None:
    """The ``source`` of each image of ``images``, or ``None`` when no image comes from a file.

    A folder gives its files' names relative to it (:func:`folder_images`); a path
    or a list of paths gives each path as written; in a list that mixes files with
    arrays or PIL images, those have :data:`NO_SOURCE`. Arrays, PIL images,
    tensors, xarray objects and iterables of batches give ``None``.

    Examples
    --------
    >>> image_sources(["photos/cat.jpg", "dog.png"])
    ['photos/cat.jpg', 'dog.png']
    >>> import numpy as np
    >>> image_sources(np.zeros((2, 8, 8, 3))) is None
    True
    """
    if isinstance(images, (str, os.PathLike)):
        if Path(images).is_dir():
            return [readable_name(p.name) for p in folder_images(images)]
        return [readable_name(os.fspath(images))]
    if isinstance(images, (list, tuple)) and any(isinstance(i, (str, os.PathLike)) for i in images):
        return [readable_name(os.fspath(i)) if isinstance(i, (str, os.PathLike)) else NO_SOURCE for i in images]
    return None


def sample_sources(obj: Any) -> list[str] | None:
    """The ``source`` of each sample of a capture, map or table (``None`` if it has none).

    Examples
    --------
    >>> import xarray as xr
    >>> da = xr.DataArray([1, 2], dims="sample", coords={"source": ("sample", ["a.png", "b.png"])})
    >>> sample_sources(da)
    ['a.png', 'b.png']
    """
    coords = getattr(obj, "coords", {})
    if "source" not in coords:
        return None
    return [str(v) for v in np.atleast_1d(coords["source"].values).ravel()]


def _open(path: str | os.PathLike) -> Any:
    from PIL import Image, UnidentifiedImageError

    p = Path(path)
    if p.is_dir():
        raise ImageError(f"{str(p)!r} is a folder: pass it on its own (vl.capture(model, {str(p)!r})) to capture "
                         "every image in it; a list takes image files.")
    if not p.is_file():
        raise ImageError(f"{str(p)!r}: no such image file.")
    try:
        with Image.open(p) as im:
            _check_pixels(im, repr(str(p)))
            im.load()
            return pil_pixels(im, repr(str(p)))
    except Image.DecompressionBombError as exc:
        raise ImageError(_bomb_message(repr(str(p)), exc)) from exc
    except (UnidentifiedImageError, OSError) as exc:
        raise ImageError(f"{str(p)!r} is not a readable image ({exc}).") from exc


def _bomb_message(where: str, exc: Exception | None = None, pixels: int | None = None) -> str:
    from PIL import Image

    size = f"{pixels} pixels" if pixels is not None else str(exc)
    return (
        f"{where} is too large to decode safely ({size}; Pillow's limit PIL.Image.MAX_IMAGE_PIXELS is "
        f"{Image.MAX_IMAGE_PIXELS}): it may be a decompression bomb. Resize it first, or, if you trust the "
        "file, raise PIL.Image.MAX_IMAGE_PIXELS."
    )


def _check_pixels(im: Any, where: str) -> None:
    """Refuse a picture larger than twice Pillow's limit before its pixels are decoded."""
    from PIL import Image

    limit = Image.MAX_IMAGE_PIXELS
    pixels = im.size[0] * im.size[1]
    if limit and pixels > 2 * limit:
        raise ImageError(_bomb_message(where, pixels=pixels))


def upright(im: Any) -> Any:
    """The picture as it is meant to be seen: its EXIF orientation applied (``ImageOps.exif_transpose``).

    A phone photo is stored as the sensor saw it and tagged with how to turn it;
    without this it would be explained lying on its side.

    Examples
    --------
    >>> from PIL import Image
    >>> im = Image.new("RGB", (4, 2)); exif = im.getexif(); exif[0x0112] = 6  # "rotate 90° clockwise"
    >>> im.info["exif"] = exif.tobytes()
    >>> upright(im).size
    (2, 4)
    """
    from PIL import ImageOps

    try:
        orientation = im.getexif().get(0x0112, 1)
    except Exception:  # unreadable EXIF: Pillow's own viewer ignores it too
        return im
    if orientation in (None, 1):
        return im
    return ImageOps.exif_transpose(im)


def pil_pixels(im: Any, where: str) -> np.ndarray:
    """A PIL image as an array with its real range, upright: 8-bit modes as uint8 RGB, 16-bit and ``I`` as
    uint16, ``F`` as float.

    ``Image.convert("RGB")`` clips 16-bit and float pixels to 0..255, which turns
    a 16-bit picture white and a float picture in [0, 1] black; these modes are
    read as arrays instead (then range-checked like any array). Mode ``I`` (32-bit
    integers; Pillow opens 16-bit PNGs so) is scaled by the 16-bit range, like
    ``I;16`` — never by the image's own maximum, which would make two pictures
    incomparable. The EXIF orientation is applied (see :func:`upright`).
    """
    _check_pixels(im, where)
    im = upright(im)
    mode = im.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N"):
        return np.asarray(im).astype(np.uint16)
    if mode == "I":
        arr = np.asarray(im)
        if arr.min() >= 0 and arr.max() <= 65535:
            return arr.astype(np.uint16)
        raise ImageError(f"{where}: 32-bit integer pixels in [{arr.min()}, {arr.max()}] have no known range; "
                         "convert the image to 8 or 16 bits.")
    if mode == "F":
        return np.asarray(im, dtype=np.float32)
    return np.asarray(im.convert("RGB"))


def _split(images: Any) -> list[Any]:
    """A list of single images (paths, PIL images, (H, W, C) arrays)."""
    import xarray as xr

    if isinstance(images, xr.DataArray):
        dims = images.dims
        if "sample" in dims or images.ndim == 4:
            order = [d for d in ("sample", "y", "x", "channel") if d in dims]
            arr = images.transpose(*order).values if len(order) == images.ndim else images.values
            return list(arr)
        return [images.values]
    if isinstance(images, xr.Dataset):
        if "image" not in images:
            raise ImageError("a Dataset of images needs an 'image' variable (sample, y, x, channel).")
        return _split(images["image"])
    if isinstance(images, (str, os.PathLike)):
        return list(folder_images(images)) if Path(images).is_dir() else [images]
    if isinstance(images, np.ndarray):
        if images.ndim == 4:
            return list(images)
        return [images]
    if isinstance(images, (list, tuple)):
        return list(images)
    try:
        from PIL import Image

        if isinstance(images, Image.Image):
            return [images]
    except ImportError:  # pragma: no cover - pillow is a dependency
        pass
    raise ImageError(
        f"cannot read images from a {type(images).__name__}; pass a path, a list of paths, "
        "PIL images, arrays (H, W, 3) / (sample, H, W, 3) in [0, 1] or uint8, or a tensor. "
        "To capture from a DataLoader or any iterable of batches, stream it to a "
        "store: vl.capture(model, images, store='run.zarr')."
    )


def prepare(images: Any, adapter: Adapter) -> Batch:
    """Model-ready batch for ``images`` (see :func:`vitlens.capture`).

    A tensor is the model's input as it is. Its picture undoes the model's
    normalisation; a transformers model without an image processor has none to
    undo, so the picture is the tensor rescaled to [0, 1] as a whole, recorded as
    its ``mean``/``std`` (normalising the picture with them gives the tensor back),
    with an :class:`~vitlens.errors.ImageProcessorWarning`.
    """
    if isinstance(images, torch.Tensor):
        return _ready_tensor(images, adapter)
    cfg = data_config(adapter)
    assert cfg is not None
    mean = tuple(float(m) for m in cfg["mean"])
    std = tuple(float(s) for s in cfg["std"])
    h, w = adapter.input_size
    mean_t = torch.tensor(mean).view(1, 3, 1, 1)
    std_t = torch.tensor(std).view(1, 3, 1, 1)

    items = _split(images)
    if not items:
        raise ImageError("empty batch: pass at least one image.")
    transform = None
    pixels, displays = [], []
    for i, item in enumerate(items):
        where = f"image {i}"
        if isinstance(item, (str, os.PathLike)):
            where = f"image {i} ({item})"
            item = _open(item)
        if isinstance(item, torch.Tensor):
            item = item.detach().cpu().numpy()
        if not isinstance(item, np.ndarray):
            from PIL import Image

            if not isinstance(item, Image.Image):
                raise ImageError(f"{where}: cannot read a {type(item).__name__} as an image.")
            item = pil_pixels(item, where)
        rgb = _as_rgb_float(np.asarray(item), where)
        if rgb.shape[:2] == (h, w):
            t = (torch.from_numpy(rgb).permute(2, 0, 1).unsqueeze(0) - mean_t) / std_t
            pixels.append(t)
            displays.append(rgb[None])
            continue
        else:
            if transform is None and hasattr(adapter, "eval_transform"):
                transform = adapter.eval_transform()
            if transform is None:
                from timm.data import create_transform

                transform = create_transform(**cfg, is_training=False)
            from PIL import Image

            pil = Image.fromarray(np.round(rgb * 255).astype(np.uint8))
            t = transform(pil).unsqueeze(0).float()
        pixels.append(t)
        displays.append((t * std_t + mean_t).clamp(0, 1).permute(0, 2, 3, 1).numpy())
    x = torch.cat(pixels)
    return Batch(x, np.ascontiguousarray(np.concatenate(displays), dtype=np.float32), mean, std)


def _ready_tensor(images: torch.Tensor, adapter: Adapter) -> Batch:
    h, w = adapter.input_size
    x = images.detach()
    if x.is_complex() or x.dtype == torch.bool or not x.is_floating_point():
        raise ImageError(
            f"a tensor is taken as a ready, normalised float batch (B, 3, {h}, {w}); got dtype {x.dtype}. "
            "Pass real float pixels normalised for the model, or pictures as numpy arrays (H, W, 3) in "
            "[0, 1] / uint8 for vitlens to normalise."
        )
    if x.ndim == 3:
        x = x.unsqueeze(0)
    if x.ndim != 4 or x.shape[1] != 3:
        raise ImageError(
            f"a tensor is taken as a ready, normalised batch (B, 3, {h}, {w}); got shape "
            f"{tuple(images.shape)}."
        )
    if x.shape[0] == 0:
        raise ImageError("empty batch: pass at least one image.")
    if tuple(x.shape[-2:]) != (h, w) and not adapter.dynamic_size:  # dynamic: any size
        raise ImageError(
            f"this model takes {h}×{w} inputs; the tensor is {x.shape[-2]}×{x.shape[-1]}. "
            "Resize it, or pass the picture as an array or PIL image so vitlens applies "
            "the model's own transform."
        )
    x = x.float().cpu()
    if not torch.isfinite(x).all():
        raise ImageError("the input tensor contains NaN or infinite values.")
    cfg = data_config(adapter, required=False)
    if cfg is None:  # picture = (x - lo) / span, i.e. the normalisation mean = -lo / span, std = 1 / span
        lo, span = float(x.min()), float(x.max() - x.min()) or 1.0
        mean, std = (-lo / span,) * 3, (1.0 / span,) * 3
        warnings.warn(
            f"{type(adapter.model).__name__} has no image processor: the maps are exact, but the picture is the "
            "input tensor rescaled to [0, 1], not its true colours; for those, pass the processor that made it: "
            "vl.capture(model, pixel_values, processor=image_processor).",
            ImageProcessorWarning, stacklevel=4,
        )
    else:
        mean = tuple(float(m) for m in cfg["mean"])
        std = tuple(float(s) for s in cfg["std"])
    mean_t = torch.tensor(mean).view(1, 3, 1, 1)
    std_t = torch.tensor(std).view(1, 3, 1, 1)
    display = (x * std_t + mean_t).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    return Batch(x, np.ascontiguousarray(display, dtype=np.float32), mean, std)
