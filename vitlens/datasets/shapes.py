"""Procedural "shapes" images with exact object masks.

Every image shows one or more labelled objects (one of eight shape classes, flat
colour, random position / size / rotation) on a textured background with
unlabelled clutter (thin lines, small blobs).  Because each object is painted
through its own boolean mask, ``mask`` holds *exactly* the pixels of the object,
which makes the set a ground truth for scoring explanation maps.

Determinism
-----------
Image ``i`` is generated from its own child generator
``numpy.random.default_rng(numpy.random.SeedSequence(seed).spawn(n)[i])``, so it does
not depend on ``n``.  Geometry is evaluated with plain additions/multiplications
on pixel-centre grids (sines and cosines are computed once per object with
:mod:`math`), never with a rasteriser, so the output is the same on any machine.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import xarray as xr

from vitlens.errors import OptionError

__all__ = ["shapes", "CLASS_NAMES", "MAX_OBJECTS", "MIN_SIZE"]

#: Shape classes, in label order.  They differ by shape only (colour is random).
CLASS_NAMES: tuple[str, ...] = (
    "disk",
    "ring",
    "square",
    "triangle",
    "plus",
    "star",
    "hexagon",
    "crescent",
)

#: Largest number of labelled objects one image may hold.
MAX_OBJECTS = 3
#: Smallest image side accepted (objects must stay at least 7 px across).
MIN_SIZE = 32

# Object half-extent (radius of the circle every shape fits into) at size 64:
# 7..13 px, i.e. objects 14..26 px across.  Scaled linearly with ``size``.
_RADIUS_64 = (7.0, 13.0)
# Width of the ring, around an object's mask, whose mean is the "local background"
# the contrast floor is measured against (pixels, at any size).
CONTRAST_RING = 3


# --------------------------------------------------------------------------- masks
def _shape_mask(
    cls: int, xx: np.ndarray, yy: np.ndarray, cx: float, cy: float, r: float, theta: float
) -> np.ndarray:
    """Boolean mask of shape ``cls`` evaluated on pixel centres ``(xx, yy)``.

    Every shape fits inside the disc of radius ``r`` around ``(cx, cy)``; this is
    what placement relies on to keep objects apart.
    """
    c, s = math.cos(theta), math.sin(theta)
    dx = (xx - cx) / r
    dy = (yy - cy) / r
    # local coordinates (rotated by -theta): u along the shape's own axis
    u = c * dx + s * dy
    v = -s * dx + c * dy
    d2 = u * u + v * v
    name = CLASS_NAMES[cls]
    if name == "disk":
        return d2 <= 1.0
    if name == "ring":
        return (d2 <= 1.0) & (d2 >= 0.55 * 0.55)
    if name == "square":
        return (np.abs(u) <= 0.70) & (np.abs(v) <= 0.70)
    if name == "plus":
        arm, half = 0.95, 0.30
        return ((np.abs(u) <= arm) & (np.abs(v) <= half)) | (
            (np.abs(v) <= arm) & (np.abs(u) <= half)
        )
    if name == "triangle":
        # equilateral, circumradius 1: inside the three half-planes at distance 0.5
        return _half_planes(u, v, 3, 0.5, start=math.pi) == 0
    if name == "hexagon":
        # circumradius 1, apothem cos(30 deg)
        return _half_planes(u, v, 6, math.cos(math.pi / 6), start=0.0) == 0
    if name == "star":
        # pentagram {5/2}, outer radius 1: the five long edges lie on lines at
        # distance cos(72 deg) from the centre; the filled star is the set of points
        # outside at most one of those half-planes.
        return _half_planes(u, v, 5, math.cos(2 * math.pi / 5), start=0.0) <= 1
    if name == "crescent":
        bite = (u - 0.45) ** 2 + v * v
        return (d2 <= 1.0) & (bite > 0.80 * 0.80)
    raise AssertionError(f"unhandled class {name}")  # pragma: no cover


def _half_planes(u: np.ndarray, v: np.ndarray, k: int, dist: float, start: float) -> np.ndarray:
    """Count, per pixel, how many of ``k`` evenly rotated half-planes exclude it."""
    outside = np.zeros(u.shape, dtype=np.int8)
    for j in range(k):
        a = start + 2.0 * math.pi * j / k
        outside += (math.cos(a) * u + math.sin(a) * v > dist).astype(np.int8)
    return outside


def _dilate(mask: np.ndarray, width: int) -> np.ndarray:
    """Square (Chebyshev) dilation of a 2-D boolean mask by ``width`` pixels."""
    out = mask.copy()
    for _ in range(width):
        grown = out.copy()
        grown[1:, :] |= out[:-1, :]
        grown[:-1, :] |= out[1:, :]
        grown[:, 1:] |= out[:, :-1]
        grown[:, :-1] |= out[:, 1:]
        grown[1:, 1:] |= out[:-1, :-1]
        grown[1:, :-1] |= out[:-1, 1:]
        grown[:-1, 1:] |= out[1:, :-1]
        grown[:-1, :-1] |= out[1:, 1:]
        out = grown
    return out


# ---------------------------------------------------------------------- background
def _upsample(coarse: np.ndarray, size: int) -> np.ndarray:
    """Bilinear upsampling of a ``(g, g, 3)`` grid to ``(size, size, 3)``."""
    g = coarse.shape[0]
    pos = (np.arange(size) + 0.5) * ((g - 1) / size)
    i0 = np.minimum(pos.astype(np.int64), g - 2)
    t = pos - i0
    rows = coarse[i0] * (1.0 - t)[:, None, None] + coarse[i0 + 1] * t[:, None, None]
    return rows[:, i0] * (1.0 - t)[None, :, None] + rows[:, i0 + 1] * t[None, :, None]


def _background(
    rng: np.random.Generator, size: int, xx: np.ndarray, yy: np.ndarray, texture: float
) -> np.ndarray:
    """Smooth random texture: base colour + gradient + low-frequency noise + grain.

    ``texture`` scales everything but the base colour (0 gives a flat background).
    """
    base = rng.uniform(0.2, 0.8, size=3)
    angle = rng.uniform(0.0, 2.0 * math.pi)
    amp = rng.uniform(-0.2, 0.2, size=3)
    ramp = (math.cos(angle) * (xx / size - 0.5) + math.sin(angle) * (yy / size - 0.5))
    grid = int(rng.integers(3, 7))
    coarse = rng.uniform(-0.15, 0.15, size=(grid, grid, 3))
    grain = rng.uniform(-0.03, 0.03, size=(size, size, 3))
    img = base + texture * (ramp[..., None] * amp + _upsample(coarse, size) + grain)
    return np.clip(img, 0.0, 1.0)


def _clutter(rng: np.random.Generator, img: np.ndarray, xx: np.ndarray, yy: np.ndarray) -> None:
    """Blend thin lines and small blobs into ``img`` in place (never labelled).

    Clutter is semi-transparent (so it never has a flat colour like objects) and
    much smaller than objects: lines are one pixel wide, blobs at most ~5 px across
    at size 64.
    """
    size = img.shape[0]
    scale = size / 64.0
    for _ in range(int(rng.integers(3, 7))):
        colour = rng.uniform(0.0, 1.0, size=3)
        alpha = rng.uniform(0.5, 0.85)
        if rng.random() < 0.5:  # thin line segment
            x0, y0 = rng.uniform(0, size, size=2)
            length = rng.uniform(6.0, 16.0) * scale
            a = rng.uniform(0.0, 2.0 * math.pi)
            ex, ey = math.cos(a) * length, math.sin(a) * length
            t = ((xx - x0) * ex + (yy - y0) * ey) / (length * length)
            t = np.clip(t, 0.0, 1.0)
            px, py = xx - (x0 + t * ex), yy - (y0 + t * ey)
            sel = px * px + py * py <= 0.5 * 0.5
        else:  # small blob
            x0, y0 = rng.uniform(0, size, size=2)
            rad = rng.uniform(1.0, 2.5) * scale
            sel = (xx - x0) ** 2 + (yy - y0) ** 2 <= rad * rad
        img[sel] = (1.0 - alpha) * img[sel] + alpha * colour


# ------------------------------------------------------------------------- objects
def _place(
    rng: np.random.Generator, count: int, size: int, gap: float
) -> list[tuple[float, float, float]]:
    """Centres and radii of ``count`` discs inside the image, ``gap`` px apart."""
    rmin, rmax = (r * size / 64.0 for r in _RADIUS_64)
    margin = 1.0
    while True:  # shrink the size range only if placement keeps failing
        for _ in range(100):
            discs: list[tuple[float, float, float]] = []
            for _obj in range(count):
                r = rng.uniform(rmin, rmax)
                for _try in range(50):
                    cx, cy = rng.uniform(r + margin, size - r - margin, size=2)
                    if all(
                        (cx - ox) ** 2 + (cy - oy) ** 2 >= (r + orad + gap) ** 2
                        for ox, oy, orad in discs
                    ):
                        discs.append((float(cx), float(cy), float(r)))
                        break
                else:
                    break
            if len(discs) == count:
                return discs
        rmax = max(rmin, 0.9 * rmax)  # pragma: no cover - only for crowded settings


def _pick_colour(rng: np.random.Generator, local_mean: np.ndarray, floor: float) -> np.ndarray:
    """A random colour at least ``floor`` (RGB distance) away from ``local_mean``."""
    for _ in range(30):
        colour = rng.uniform(0.0, 1.0, size=3)
        if float(np.sqrt(np.sum((colour - local_mean) ** 2))) >= floor:
            return colour
    # fall back to the farthest corner of the RGB cube (always >= sqrt(3)/2 away)
    return (local_mean < 0.5).astype(np.float64)  # pragma: no cover


def _one_image(
    rng: np.random.Generator,
    size: int,
    counts: tuple[int, ...],
    slots: int,
    clutter: bool,
    texture: float,
    min_contrast: float,
    xx: np.ndarray,
    yy: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    count = int(counts[rng.integers(len(counts))])
    classes = rng.choice(len(CLASS_NAMES), size=count, replace=False)
    gap = max(2.0, size / 32.0)
    discs = _place(rng, count, size, gap)
    thetas = rng.uniform(0.0, 2.0 * math.pi, size=count)

    labels = np.full(slots, -1, dtype=np.int64)
    masks = np.zeros((slots, size, size), dtype=bool)
    for k in range(count):
        cx, cy, r = discs[k]
        labels[k] = classes[k]
        masks[k] = _shape_mask(int(classes[k]), xx, yy, cx, cy, r, float(thetas[k]))

    img = _background(rng, size, xx, yy, texture)
    if clutter:
        _clutter(rng, img, xx, yy)

    union = masks.any(axis=0)
    for k in range(count):
        ring = _dilate(masks[k], CONTRAST_RING) & ~union
        local_mean = img[ring].mean(axis=0)
        img[masks[k]] = _pick_colour(rng, local_mean, min_contrast)
    return img.astype(np.float32), labels, masks


def _as_counts(objects: int | Iterable[int]) -> tuple[int, ...]:
    if isinstance(objects, (bool, np.bool_)):
        raise OptionError(f"objects={objects!r} is not a count; pass e.g. objects=1 or objects=(1, 2).")
    if isinstance(objects, (int, np.integer)):
        values: Sequence[Any] = (int(objects),)
    else:
        try:
            values = tuple(objects)
        except TypeError:
            raise OptionError(
                f"objects={objects!r} is not understood; pass an int or a tuple of ints "
                f"between 1 and {MAX_OBJECTS}, e.g. objects=(1, 2)."
            ) from None
    if not values:
        raise OptionError("objects is empty; pass at least one count, e.g. objects=(1, 2).")
    counts = []
    for v in values:
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
            raise OptionError(f"objects contains {v!r}; object counts must be ints, e.g. objects=(1, 2).")
        if not 1 <= int(v) <= MAX_OBJECTS:
            raise OptionError(
                f"objects contains {int(v)}; each image can hold 1 to {MAX_OBJECTS} labelled "
                f"objects, e.g. objects=(1, 2)."
            )
        counts.append(int(v))
    return tuple(sorted(set(counts)))


# -------------------------------------------------------------------------- public
def shapes(
    n: int,
    seed: int = 0,
    size: int = 64,
    objects: int | Iterable[int] = (1, 2),
    *,
    clutter: bool = True,
    texture: float = 1.0,
    min_contrast: float = 0.4,
) -> xr.Dataset:
    """Generate ``n`` procedural shape images with labels and exact masks.

    Parameters
    ----------
    n : int
        Number of images (>= 1).
    seed : int, default 0
        Seed; the same seed gives identical arrays on any machine.  Image ``i`` does
        not depend on ``n``.
    size : int, default 64
        Image side in pixels (>= 32).  Object sizes scale with it (14-26 px across at
        64).
    objects : int or tuple of int, default (1, 2)
        Allowed numbers of labelled objects; each image draws its count uniformly
        from these.  ``1`` (or ``(1,)``) gives one object per image, ``(2,)`` always
        two.  Counts from 1 to 3 are supported.  Objects in one image have distinct
        classes and masks that keep a gap of at least two pixels.
    clutter : bool, default True
        Add unlabelled clutter (thin lines, small blobs) under the objects.
    texture : float, default 1.0
        Strength of the background texture (gradient, smooth noise, grain) in
        [0, 1]; 0 gives a flat background.  Objects and labels do not change.
    min_contrast : float, default 0.4
        Smallest RGB (Euclidean) distance between an object's colour and the mean of
        the image in a 3-pixel ring around it (outside every object), in [0, 0.8].

    Returns
    -------
    xarray.Dataset
        ``image (sample, y, x, channel)`` float32 in [0, 1]; ``label (sample,
        object)`` int64, -1 where an image has fewer objects; ``mask (sample, object,
        y, x)`` bool, all False for a missing object.  Attributes ``class_names``
        (list of str), ``seed``, ``size``, ``objects``.

    Raises
    ------
    vitlens.errors.OptionError
        For ``n < 1``, ``size < 32``, unknown object counts or a bad contrast floor.

    Examples
    --------
    >>> from vitlens.datasets import shapes
    >>> ds = shapes(4, seed=1)
    >>> ds.image.shape, ds.image.dtype.name
    ((4, 64, 64, 3), 'float32')
    >>> ds.class_names[:3]
    ['disk', 'ring', 'square']
    >>> bool((ds.mask.any(("y", "x")) == (ds.label >= 0)).all())
    True
    """
    if isinstance(n, (bool, np.bool_)) or not isinstance(n, (int, np.integer)) or n < 1:
        raise OptionError(f"n={n!r}: ask for at least one image, e.g. shapes(n=64).")
    if isinstance(size, (bool, np.bool_)) or not isinstance(size, (int, np.integer)) or size < MIN_SIZE:
        raise OptionError(
            f"size={size!r}: images must be at least {MIN_SIZE} px wide (objects are "
            f"scaled with the size); use e.g. size=64."
        )
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise OptionError(f"seed={seed!r}: use a non-negative int, e.g. seed=0.")
    if not isinstance(min_contrast, (int, float)) or not 0.0 <= float(min_contrast) <= 0.8:
        raise OptionError(
            f"min_contrast={min_contrast!r}: use a number between 0 and 0.8 (RGB distance); "
            f"the default 0.4 keeps every object clearly visible."
        )
    if not isinstance(texture, (int, float)) or not 0.0 <= float(texture) <= 1.0:
        raise OptionError(f"texture={texture!r}: use a number between 0 (flat) and 1 (default).")
    n, size, seed = int(n), int(size), int(seed)
    counts = _as_counts(objects)
    slots = max(counts)

    centres = np.arange(size, dtype=np.float64) + 0.5
    xx, yy = np.meshgrid(centres, centres)  # xx varies along x (columns)

    images = np.empty((n, size, size, 3), dtype=np.float32)
    labels = np.empty((n, slots), dtype=np.int64)
    masks = np.empty((n, slots, size, size), dtype=bool)
    for i, child in enumerate(np.random.SeedSequence(seed).spawn(n)):
        rng = np.random.default_rng(child)
        images[i], labels[i], masks[i] = _one_image(
            rng, size, counts, slots, bool(clutter), float(texture), float(min_contrast), xx, yy
        )

    return xr.Dataset(
        data_vars={
            "image": (("sample", "y", "x", "channel"), images),
            "label": (("sample", "object"), labels),
            "mask": (("sample", "object", "y", "x"), masks),
        },
        coords={
            "sample": np.arange(n),
            "object": np.arange(slots),
            "y": np.arange(size),
            "x": np.arange(size),
            "channel": ["r", "g", "b"],
        },
        attrs={
            "class_names": list(CLASS_NAMES),
            "seed": seed,
            "size": size,
            "objects": list(counts),
            "description": "vitlens procedural shapes: labelled objects with exact masks",
        },
    )
