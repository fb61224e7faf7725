"""Checking and converting what the metrics receive: maps, masks, labels, pictures.

Every metric works on numpy arrays inside; the public functions accept labeled
xarray objects (and plain arrays) and return labeled results. What they share
lives here, so that each check is written once and says the same thing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import xarray as xr
from torch import nn

from ..errors import ImageError, OptionError, UnsupportedModelError


def map_arrays(maps: xr.DataArray | xr.Dataset, what: str = "maps") -> dict[str | None, xr.DataArray]:
    """``{method: DataArray (sample, y, x)}``; a single DataArray is keyed ``None``."""
    if isinstance(maps, xr.Dataset):
        if not maps.data_vars:
            raise OptionError(f"{what} is an empty Dataset; pass vl.explain(cap, 'all') or one map DataArray.")
        out = {str(name): maps[name] for name in maps.data_vars}
    elif isinstance(maps, xr.DataArray):
        out = {None: maps}
    elif isinstance(maps, np.ndarray):
        if maps.ndim != 3:
            raise OptionError(f"{what} as an array must be (sample, y, x); got shape {maps.shape}.")
        out = {None: xr.DataArray(maps, dims=("sample", "y", "x"))}
    else:
        raise OptionError(
            f"{what} must be an xarray DataArray (sample, y, x) from vl.explain, or a Dataset of them; "
            f"got {type(maps).__name__}."
        )
    for name, da in out.items():
        label = f"{what}[{name!r}]" if name is not None else what
        if "layer" in da.dims:
            raise OptionError(f"{label} has a 'layer' dimension (per_layer=True); select one layer with .sel(layer=...).")
        if set(da.dims) != {"sample", "y", "x"}:
            raise OptionError(f"{label} must have dimensions (sample, y, x); got {da.dims}.")
        if da.sizes["sample"] == 0:
            raise OptionError(f"{label} holds no samples; pass at least one map.")
    return out


def pixel_maps(maps: xr.DataArray, size: tuple[int, int]) -> np.ndarray:
    """(sample, H, W) float32: bilinear upsampling to ``size``, then min-max per map.

    Constant maps become zeros and NaNs become 0, as in the reference evaluation.
    """
    from ..methods import minmax, to_pixels

    maps = maps.transpose("sample", "y", "x")
    if (maps.sizes["y"], maps.sizes["x"]) != tuple(size):
        maps = to_pixels(maps, size)
    values = np.asarray(maps.values, dtype=np.float64)  # min-max in float64: keeps a tiny class-specific part
    values = np.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0)
    return minmax(values).astype(np.float32)


def mask_array(masks: Any, n: int) -> np.ndarray:
    """(sample, H, W) bool; checks the sample count against ``n`` maps."""
    if isinstance(masks, xr.DataArray):
        if "object" in masks.dims:
            raise OptionError(
                "masks has an 'object' dimension; pick one object per sample (e.g. masks.isel(object=0)) "
                "or score the whole dataset with vl.evaluate, which scores every (image, object) pair."
            )
        order = [d for d in ("sample", "y", "x") if d in masks.dims]
        if len(order) != 3 or masks.ndim != 3:
            raise OptionError(f"masks must have dimensions (sample, y, x); got {masks.dims}.")
        masks = masks.transpose(*order).values
    arr = np.asarray(masks)
    if arr.ndim != 3:
        raise OptionError(f"masks must be (sample, y, x); got shape {arr.shape}.")
    if arr.shape[0] != n:
        raise OptionError(
            f"got {n} maps but {arr.shape[0]} masks; pass one mask per map sample (same order)."
        )
    if arr.dtype != np.bool_:
        if not np.isin(np.unique(arr), (0, 1)).all():
            raise OptionError("masks must be boolean (or 0/1); threshold them first, e.g. masks > 0.")
        arr = arr.astype(bool)
    return arr


def label_array(labels: Any, n: int, what: str = "labels") -> np.ndarray:
    """(sample,) int64 class indices; -1 marks an unknown label."""
    if isinstance(labels, xr.DataArray):
        labels = labels.values
    arr = np.asarray(labels)
    if arr.ndim == 0:
        arr = np.full(n, int(arr))
    if arr.ndim != 1 or arr.shape[0] != n:
        raise OptionError(f"got {arr.shape[0] if arr.ndim == 1 else arr.shape} {what} for {n} maps; pass one int per sample.")
    if not np.issubdtype(arr.dtype, np.integer):
        raise OptionError(f"{what} must be integer class indices (-1 = unknown); got dtype {arr.dtype}.")
    return arr.astype(np.int64)


def with_sources(ds: xr.Dataset, maps: xr.DataArray, dim: str = "sample") -> xr.Dataset:
    """``ds`` (one row per map sample along ``dim``) with the maps' ``source``: the image files they explain.

    Examples
    --------
    >>> import numpy as np, xarray as xr
    >>> maps = xr.DataArray(np.zeros((1, 2, 2)), dims=("sample", "y", "x"), coords={"source": ("sample", ["a.png"])})
    >>> with_sources(xr.Dataset({"ap": ("sample", [0.5])}), maps).source.values.tolist()
    ['a.png']
    """
    if "source" not in maps.coords or dim not in ds.dims:
        return ds
    return ds.assign_coords(source=(dim, np.atleast_1d(maps["source"].values)))


def per_method(maps: xr.DataArray | xr.Dataset, score: Callable[[xr.DataArray], xr.Dataset], what: str = "maps") -> xr.Dataset:
    """Apply ``score`` to one map DataArray, or to each variable of a Dataset (→ ``method`` dim)."""
    arrays = map_arrays(maps, what)
    if list(arrays) == [None]:
        return score(arrays[None])
    parts = [score(da).expand_dims(method=[name]) for name, da in arrays.items()]
    out = xr.concat(parts, dim="method", combine_attrs="drop_conflicts")
    return out


# ------------------------------------------------------------------ model input
@dataclass
class Pictures:
    """Unnormalised model-input pictures in [0, 1] and the normalisation the model expects."""

    pictures: Any  # (B, H, W, 3) float32 in [0, 1]: a numpy array, or a dask array (lazy capture)
    mean: tuple[float, ...]
    std: tuple[float, ...]
    blocks: list[tuple[int, int]] | None = None  # sample chunks of a lazy capture

    @property
    def lazy(self) -> bool:
        return self.blocks is not None

    @property
    def size(self) -> tuple[int, int]:
        return int(self.pictures.shape[1]), int(self.pictures.shape[2])

    def __len__(self) -> int:
        return int(self.pictures.shape[0])


def pictures_for(model: nn.Module, images: Any) -> Pictures:
    """The [0, 1] pictures the model sees for ``images`` and its mean/std.

    A capture (DataTree) gives its root ``image`` and ``mean``/``std`` attrs. For
    models vitlens explains, anything :func:`vitlens.capture` accepts goes through
    the same preparation (arrays at the input size are only normalised). Other
    classifiers take (sample, H, W, 3) arrays in [0, 1], normalised with timm's
    data config for the model.
    """
    if isinstance(images, xr.DataTree):
        root = images.to_dataset(inherit=False) if hasattr(images, "to_dataset") else images.ds
        if "image" not in root or "mean" not in root.attrs:
            raise ImageError("this DataTree is not a vitlens capture (no root 'image' / 'mean'); pass vl.capture(...)'s result.")
        image = root["image"].transpose("sample", "y", "x", "channel")
        mean, std = tuple(root.attrs["mean"]), tuple(root.attrs["std"])
        if image.chunks is not None:  # dask-backed (vl.open(..., chunks={})): load chunk by chunk later
            edges = np.cumsum((0, *image.variable.chunksizes["sample"]))
            blocks = [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])]
            return Pictures(image.data.astype(np.float32), mean, std, blocks)
        return Pictures(np.asarray(image.values, dtype=np.float32), mean, std)
    from ..models import adapter_for

    try:
        adapter = adapter_for(model)
    except UnsupportedModelError:
        adapter = None
    if adapter is not None:
        from ..capture.images import prepare

        batch = prepare(images, adapter)
        return Pictures(batch.display, batch.mean, batch.std)
    from timm.data import resolve_data_config

    cfg = resolve_data_config({}, model=model)
    if isinstance(images, xr.Dataset):
        images = images["image"]
    if isinstance(images, xr.DataArray):
        images = images.transpose("sample", "y", "x", "channel").values
    arr = np.asarray(images)
    if arr.ndim != 4 or arr.shape[-1] != 3:
        raise ImageError(
            f"for a model vitlens does not adapt ({type(model).__name__}) pass pictures as an array "
            f"(sample, H, W, 3) in [0, 1]; got shape {arr.shape}."
        )
    if np.issubdtype(arr.dtype, np.integer):
        arr = arr.astype(np.float32) / 255.0
    arr = arr.astype(np.float32)
    if arr.min() < -1e-4 or arr.max() > 1 + 1e-4:
        raise ImageError("pictures must lie in [0, 1] (unnormalised); divide uint8 pictures by 255.")
    return Pictures(np.clip(arr, 0.0, 1.0), tuple(cfg["mean"]), tuple(cfg["std"]))


def model_device(model: nn.Module, device: str | torch.device | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def progress_bar(total: int, desc: str, enabled: bool | None, unit: str = "image") -> Any:
    """A tqdm bar (or a silent stand-in) that the caller ``update``s and ``close``s."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, leave=False)
