"""The ImageNet-segmentation set (Guillaumin et al. 2014) as used by ViT explainability papers.

``gtsegs_ijcv.mat`` (MATLAB v7.3, an HDF5 file) holds 4,276 ImageNet validation
pictures with a foreground mask each. Its layout, as read by the reference
evaluation code of Chefer et al. (2021):

- ``value/img``: ``(N, 1)`` HDF5 object references; reference ``i`` points to a
  ``uint8`` array stored transposed, ``(3, W, H)`` (MATLAB is column-major), or
  ``(W, H)`` for a grey picture.
- ``value/gt``: ``(N, 1)`` references to MATLAB cells: each points to a ``(1, 1)``
  array of references whose one element points to the mask ``(W, H)`` (0/1).

Pictures are resized to ``size × size`` (bilinear, antialiased) and masks with
nearest neighbour, as the reference evaluation does (``Resize((224, 224))``);
the set carries no class labels (``label = -1``).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import xarray as xr

from ..errors import ImageError, OptionError

__all__ = ["imagenet_seg", "IMAGENET_SEG_SIZE"]

#: Number of pictures in the full ``gtsegs_ijcv.mat``.
IMAGENET_SEG_SIZE = 4276


def _deref(f, ref, what: str, i: int) -> np.ndarray:  # noqa: ANN001 - h5py objects
    """Follow references until a numeric array (a MATLAB cell is a (1, 1) array of references)."""
    import h5py

    obj = f[ref]
    for _ in range(3):
        if obj.dtype == h5py.ref_dtype or obj.dtype.kind == "O":
            obj = f[np.asarray(obj).reshape(-1)[0]]
            continue
        return np.asarray(obj)
    raise ImageError(f"{what} {i}: the references nest deeper than a MATLAB cell; is this gtsegs_ijcv.mat?")


def imagenet_seg(
    path: str | os.PathLike,
    n: int | None = None,
    *,
    size: int = 224,
    dtype: str = "float32",
    progress: bool | None = None,
) -> xr.Dataset:
    """Read ImageNet-segmentation pictures and masks from ``gtsegs_ijcv.mat``.

    Parameters
    ----------
    path
        The MATLAB v7.3 file ``gtsegs_ijcv.mat`` (HDF5; read with ``h5py``).
    n
        Read the first ``n`` pictures (default: all 4,276).
    size
        Side of the square pictures and masks returned (the model's input size;
        224 for ViT-B/16).
    dtype
        ``"float32"`` (pictures in [0, 1], as :func:`vitlens.datasets.shapes`) or
        ``"uint8"`` (a quarter of the memory: 4,276 float pictures at 224 take 2.6 GB).
    progress
        Show a progress bar (default: for more than 256 pictures).

    Returns
    -------
    xarray.Dataset
        ``image (sample, y, x, channel)``, ``label (sample, object)`` = -1
        (unknown), ``mask (sample, object, y, x)`` bool with one object; attrs
        ``source``, ``size``, ``class_names`` (empty).

    Raises
    ------
    vitlens.ImageError
        If the file is missing or not laid out as ``gtsegs_ijcv.mat``.

    Examples
    --------
    >>> from vitlens.datasets import imagenet_seg
    >>> ds = imagenet_seg("gtsegs_ijcv.mat", n=8)  # doctest: +SKIP
    >>> ds.image.shape, ds.mask.shape  # doctest: +SKIP
    ((8, 224, 224, 3), (8, 1, 224, 224))
    """
    try:
        import h5py
    except ImportError as exc:  # pragma: no cover - h5py is installed with vitlens[imagenet]
        raise ImageError("reading gtsegs_ijcv.mat needs h5py: pip install h5py") from exc
    from PIL import Image

    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 8:
        raise OptionError(f"size={size!r}: use the model's input side, e.g. size=224.")
    if dtype not in ("float32", "uint8"):
        raise OptionError(f"dtype={dtype!r}; choose 'float32' or 'uint8'.")
    p = Path(path)
    if not p.is_file():
        raise ImageError(
            f"{str(p)!r}: no such file. Download gtsegs_ijcv.mat (ImageNet-segmentation, Guillaumin et al.) "
            "and pass its path."
        )
    try:
        f = h5py.File(p, "r")
    except OSError as exc:
        raise ImageError(f"{str(p)!r} is not an HDF5 / MATLAB v7.3 file ({exc}); pass gtsegs_ijcv.mat.") from exc
    with f:
        if "value/img" not in f or "value/gt" not in f:
            raise ImageError(f"{str(p)!r} lacks value/img and value/gt; it is not gtsegs_ijcv.mat.")
        img_refs, gt_refs = f["value/img"], f["value/gt"]
        total = int(img_refs.shape[0])
        if n is None:
            n = total
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 1 <= n <= total:
            raise OptionError(f"n={n!r}: the file holds {total} pictures; use 1 <= n <= {total} or None.")
        n = int(n)
        images = np.empty((n, size, size, 3), dtype=np.uint8 if dtype == "uint8" else np.float32)
        masks = np.empty((n, 1, size, size), dtype=bool)
        from tqdm.auto import tqdm

        show = progress if progress is not None else n > 256
        for i in tqdm(range(n), desc="imagenet-seg", unit="image", disable=not show, leave=False):
            pic = _deref(f, img_refs[i, 0], "picture", i)
            if pic.ndim == 3:
                pic = pic.transpose(2, 1, 0)  # (3, W, H) -> (H, W, 3)
            elif pic.ndim == 2:
                pic = np.repeat(pic.T[..., None], 3, axis=-1)
            else:
                raise ImageError(f"picture {i} has shape {pic.shape}; expected (3, W, H) or (W, H).")
            gt = _deref(f, gt_refs[i, 0], "mask", i)
            if gt.ndim != 2 or gt.T.shape != pic.shape[:2]:
                raise ImageError(f"mask {i} has shape {gt.shape}; expected (W, H) = {pic.shape[1::-1]}.")
            rgb = Image.fromarray(np.ascontiguousarray(pic.astype(np.uint8))).convert("RGB")
            rgb = np.asarray(rgb.resize((size, size), Image.Resampling.BILINEAR))
            images[i] = rgb if dtype == "uint8" else rgb.astype(np.float32) / 255.0
            mask = Image.fromarray(np.ascontiguousarray((gt.T > 0).astype(np.uint8)))
            masks[i, 0] = np.asarray(mask.resize((size, size), Image.Resampling.NEAREST)) > 0

    return xr.Dataset(
        data_vars={
            "image": (("sample", "y", "x", "channel"), images),
            "label": (("sample", "object"), np.full((n, 1), -1, dtype=np.int64)),
            "mask": (("sample", "object", "y", "x"), masks),
        },
        coords={
            "sample": np.arange(n),
            "object": np.arange(1),
            "y": np.arange(size),
            "x": np.arange(size),
            "channel": ["r", "g", "b"],
        },
        attrs={
            "class_names": [],
            "source": str(p),
            "size": int(size),
            "description": "ImageNet-segmentation (gtsegs_ijcv.mat): pictures resized bilinearly, masks by "
            "nearest neighbour; no class labels (label = -1)",
        },
    )
