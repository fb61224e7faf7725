"""Swin windows: where each window position sits in the stage grid, and the layout maps.

A grid that is not a multiple of the window is padded at the bottom and right:
after the cyclic shift in timm (roll, then pad, then partition), before it in
transformers (``pad_first=True``: pad, then roll the padded grid). Padded
positions hold no token: :func:`window_tokens` marks them :data:`PAD`,
:func:`to_windows` fills them with zeros and :func:`from_windows` drops them.

:func:`window_stages` builds the stages of a Swin (timm's and transformers', v1
and v2) once: each family only says how one of its blocks is described.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UnsupportedModelError
from .adapter import StageInfo
from .parts import BlockPart

#: ``window_token`` entry of a padded window position (no token of the grid).
PAD = -1


def padded_size(grid: tuple[int, int], window: tuple[int, int]) -> tuple[int, int]:
    """The grid rounded up to whole windows.

    Examples
    --------
    >>> padded_size((14, 7), (4, 7))
    (16, 7)
    """
    return (-(-grid[0] // window[0]) * window[0], -(-grid[1] // window[1]) * window[1])


def window_tokens(grid: tuple[int, int], window: tuple[int, int], shift: tuple[int, int],
                  pad_first: bool = False) -> np.ndarray:
    """Global token index (row-major in the stage grid) of every window position.

    Returns an int array ``(num_windows, window_h * window_w)``: entry ``[w, p]`` is
    the token that sits at position ``p`` of window ``w`` after the cyclic shift by
    ``-shift`` (timm's ``torch.roll(x, -shift)`` followed by window partition), or
    :data:`PAD` where the window hangs over the grid's bottom or right edge
    (``pad_first``: the grid is padded before the roll, as transformers does).

    Examples
    --------
    >>> window_tokens((4, 4), (2, 2), (0, 0))[0].tolist()
    [0, 1, 4, 5]
    >>> window_tokens((4, 4), (2, 2), (1, 1))[0].tolist()
    [5, 6, 9, 10]
    >>> window_tokens((3, 3), (2, 2), (0, 0))[3].tolist()
    [8, -1, -1, -1]
    >>> window_tokens((3, 3), (2, 2), (1, 1), pad_first=True)[0].tolist()
    [4, 5, 7, 8]
    """
    gh, gw = grid
    mh, mw = window
    ph, pw = padded_size(grid, window)
    ids = np.arange(gh * gw).reshape(gh, gw)
    if pad_first:
        ids = np.pad(ids, ((0, ph - gh), (0, pw - gw)), constant_values=PAD)
    ids = np.roll(ids, shift=(-shift[0], -shift[1]), axis=(0, 1))
    if not pad_first:
        ids = np.pad(ids, ((0, ph - gh), (0, pw - gw)), constant_values=PAD)
    blocks = ids.reshape(ph // mh, mh, pw // mw, mw).transpose(0, 2, 1, 3)
    return blocks.reshape(-1, mh * mw)


def to_windows(x: torch.Tensor, window: tuple[int, int], shift: tuple[int, int],
               pad_first: bool = False) -> torch.Tensor:
    """(B, H, W, C) → (B·nW, M², C) after the cyclic shift and zero padding, as timm's Swin does
    (``pad_first``: padding first, as transformers' Swin does).

    Examples
    --------
    >>> x = torch.arange(16.0).reshape(1, 4, 4, 1)
    >>> to_windows(x, (2, 2), (1, 1))[0, :, 0].tolist()
    [5.0, 6.0, 9.0, 10.0]
    >>> to_windows(torch.ones(1, 3, 3, 1), (2, 2), (0, 0))[3, :, 0].tolist()
    [1.0, 0.0, 0.0, 0.0]
    """
    b, h, w, c = x.shape
    mh, mw = window
    ph, pw = padded_size((h, w), window)
    if pad_first and (ph, pw) != (h, w):
        x = F.pad(x, (0, 0, 0, pw - w, 0, ph - h))
    if any(shift):
        x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
    if not pad_first and (ph, pw) != (h, w):
        x = F.pad(x, (0, 0, 0, pw - w, 0, ph - h))
    x = x.reshape(b, ph // mh, mh, pw // mw, mw, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, mh * mw, c)


def from_windows(xw: torch.Tensor, window: tuple[int, int], shift: tuple[int, int], hw: tuple[int, int],
                 pad_first: bool = False) -> torch.Tensor:
    """Inverse of :func:`to_windows` on the grid's own positions (also its transpose:
    a permutation of the tokens, with the padded positions dropped).

    Examples
    --------
    >>> x = torch.randn(2, 4, 4, 3)
    >>> bool(torch.equal(from_windows(to_windows(x, (2, 2), (1, 1)), (2, 2), (1, 1), (4, 4)), x))
    True
    >>> y = torch.randn(1, 5, 3, 2)
    >>> bool(torch.equal(from_windows(to_windows(y, (2, 2), (1, 1)), (2, 2), (1, 1), (5, 3)), y))
    True
    >>> w = to_windows(y, (2, 2), (1, 1), pad_first=True)
    >>> bool(torch.equal(from_windows(w, (2, 2), (1, 1), (5, 3), pad_first=True), y))
    True
    """
    h, w = hw
    mh, mw = window
    ph, pw = padded_size(hw, window)
    c = xw.shape[-1]
    x = xw.reshape(-1, ph // mh, pw // mw, mh, mw, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, ph, pw, c)
    if not pad_first and (ph, pw) != (h, w):
        x = x[:, :h, :w]
    if any(shift):
        x = torch.roll(x, shifts=shift, dims=(1, 2))
    if pad_first and (ph, pw) != (h, w):
        x = x[:, :h, :w]
    return x


class WindowBlock(NamedTuple):
    """One Swin block as a family describes it: its parts, window and shift (rows, cols)."""

    part: BlockPart
    window: tuple[int, int]
    shift: tuple[int, int]


def window_stages(name: str, stages: Sequence[tuple[Sequence[nn.Module], tuple[int, int], tuple[int, int]]],
                  block: Callable[[nn.Module, tuple[int, int], str], WindowBlock], *,
                  pad_first: bool = False) -> list[StageInfo]:
    """The :class:`StageInfo` of each ``(blocks, grid, stride)`` of a Swin model named ``name``.

    ``block(module, grid, where)`` describes one block at its stage's token ``grid``
    (``where`` names it in messages). Layers are numbered across stages; a stage
    without blocks, or whose blocks do not share one window, is refused.

    Examples
    --------
    >>> window_stages("Empty", [([], (4, 4), (8, 8))], block=None)
    Traceback (most recent call last):
    ...
    vitlens.errors.UnsupportedModelError: Empty: stage 0 has no blocks.
    """
    out: list[StageInfo] = []
    first = 0
    for s, (modules, grid, stride) in enumerate(stages):
        modules = list(modules)
        if not modules:
            raise UnsupportedModelError(f"{name}: stage {s} has no blocks.")
        described = [block(m, grid, f"{name} stage {s} block {b}") for b, m in enumerate(modules)]
        for b, d in enumerate(described):
            if d.window != described[0].window:
                raise UnsupportedModelError(f"{name} stage {s} block {b}: its window differs from the stage's "
                                            "first block's.")
        parts = [d.part for d in described]
        out.append(StageInfo(index=s, parts=parts, layers=list(range(first, first + len(parts))), grid=grid,
                             stride=stride, num_heads=parts[0].attn.num_heads, window=described[0].window,
                             shifts=[d.shift for d in described], pad_first=pad_first))
        first += len(parts)
    return out
