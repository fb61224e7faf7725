"""Where each window position of a (shifted) Swin window sits in the stage grid."""

from __future__ import annotations

import numpy as np


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
