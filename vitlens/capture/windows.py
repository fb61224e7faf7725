"""Swin windows: where each window position sits in the stage grid, and the layout maps."""

from __future__ import annotations

import numpy as np
import torch


def window_tokens(grid: tuple[int, int], window: tuple[int, int], shift: tuple[int, int]) -> np.ndarray:
    """Global token index (row-major in the stage grid) of every window position.

    Returns an int array ``(num_windows, window_h * window_w)``: entry ``[w, p]`` is
    the token that sits at position ``p`` of window ``w`` after the cyclic shift by
    ``-shift`` (timm's ``torch.roll(x, -shift)`` followed by window partition).

    Examples
    --------
    >>> window_tokens((4, 4), (2, 2), (0, 0))[0].tolist()
    [0, 1, 4, 5]
    >>> window_tokens((4, 4), (2, 2), (1, 1))[0].tolist()
    [5, 6, 9, 10]
    """
    gh, gw = grid
    mh, mw = window
    ids = np.arange(gh * gw).reshape(gh, gw)
    rolled = np.roll(ids, shift=(-shift[0], -shift[1]), axis=(0, 1))
    blocks = rolled.reshape(gh // mh, mh, gw // mw, mw).transpose(0, 2, 1, 3)
    return blocks.reshape(-1, mh * mw)


def to_windows(x: torch.Tensor, window: tuple[int, int], shift: tuple[int, int]) -> torch.Tensor:
    """(B, H, W, C) → (B·nW, M², C) after the cyclic shift, as timm's Swin does.

    Examples
    --------
    >>> x = torch.arange(16.0).reshape(1, 4, 4, 1)
    >>> to_windows(x, (2, 2), (1, 1))[0, :, 0].tolist()
    [5.0, 6.0, 9.0, 10.0]
    """
    b, h, w, c = x.shape
    if any(shift):
        x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
    mh, mw = window
    x = x.reshape(b, h // mh, mh, w // mw, mw, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, mh * mw, c)


def from_windows(xw: torch.Tensor, window: tuple[int, int], shift: tuple[int, int], hw: tuple[int, int]) -> torch.Tensor:
    """Inverse of :func:`to_windows` (also its transpose: it is a permutation).

    Examples
    --------
    >>> x = torch.randn(2, 4, 4, 3)
    >>> bool(torch.equal(from_windows(to_windows(x, (2, 2), (1, 1)), (2, 2), (1, 1), (4, 4)), x))
    True
    """
    h, w = hw
    mh, mw = window
    c = xw.shape[-1]
    x = xw.reshape(-1, h // mh, w // mw, mh, mw, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, h, w, c)
    if any(shift):
        x = torch.roll(x, shifts=shift, dims=(1, 2))
    return x
