"""The one surface vitlens sees of a model.

Capture and the LRP pass talk to models only through an :class:`Adapter`, which
describes the model in the vocabulary of :mod:`vitlens.models.parts` (blocks,
attention, MLPs, merges, read-out) and its token geometry in :class:`StageInfo`.
Each family is one module in ``vitlens/models/`` that registers its adapter with
:func:`vitlens.models.registry.register_adapter`; the timm-specific knowledge
(module names, token layout, windows) lives there and nowhere else.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from .parts import BlockPart, MergePart, Readout


@dataclass
class StageInfo:
    """One stage of blocks that share a token grid.

    ViT has a single stage; Swin has one per resolution.
    """

    index: int
    parts: list[BlockPart]
    layers: list[int]  # global block indices
    grid: tuple[int, int]  # (rows, cols) of the patch-token grid
    stride: tuple[int, int]  # pixels per token along (y, x)
    num_heads: int
    num_prefix: int = 0
    prefix_kinds: list[str] = field(default_factory=list)
    window: tuple[int, int] | None = None  # Swin window size
    shifts: list[tuple[int, int]] = field(default_factory=list)  # Swin shift per block
    pad_first: bool = False  # Swin: a grid is padded to whole windows before the shift (transformers), not after (timm)

    @property
    def blocks(self) -> list[nn.Module]:
        return [p.module for p in self.parts]

    @property
    def embed_dim(self) -> int:
        return self.parts[0].embed_dim

    @property
    def num_tokens(self) -> int:
        return self.num_prefix + self.grid[0] * self.grid[1]

    @property
    def name(self) -> str:
        return f"stage{self.index}"

    def token_coords(self) -> dict[str, tuple[str, np.ndarray]]:
        """Per-token coordinates: grid row/col, kind, pixel centre (in input pixels)."""
        gh, gw = self.grid
        rows = np.concatenate([np.full(self.num_prefix, -1), np.repeat(np.arange(gh), gw)])
        cols = np.concatenate([np.full(self.num_prefix, -1), np.tile(np.arange(gw), gh)])
        kinds = np.array(list(self.prefix_kinds) + ["patch"] * (gh * gw), dtype=object).astype(str)
        sy, sx = self.stride
        cy = np.where(rows >= 0, (rows + 0.5) * sy, np.nan)
        cx = np.where(cols >= 0, (cols + 0.5) * sx, np.nan)
        return {
            "row": ("token", rows.astype(np.int64)),
            "col": ("token", cols.astype(np.int64)),
            "kind": ("token", kinds),
            "center_y": ("token", cy),
            "center_x": ("token", cx),
        }


class Adapter:
    """Common surface of a supported model family.

    Subclasses set :attr:`family`, implement :meth:`matches` and, in
    ``__init__``, fill :attr:`stages` (with their :class:`~vitlens.models.parts.BlockPart`),
    :attr:`head` (a :class:`~vitlens.models.parts.Readout`) and :attr:`final`
    (the module between the last block and the read-out; may be ``nn.Identity``),
    or raise :class:`~vitlens.errors.UnsupportedModelError` naming the block or
    head they cannot explain. ``model`` is the user's module, never modified
    except by :mod:`vitlens.capture` (which restores it).
    """

    family: str = ""
    #: timm modules whose registered model names this family covers (for the coverage table)
    timm_modules: tuple[str, ...] = ()

    def __init__(self, model: nn.Module):
        self.model = model
        self.stages: list[StageInfo] = []
        self.head: Readout | None = None
        self.final: nn.Module = nn.Identity()

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        """Whether this adapter is the one for ``model`` (it may still refuse a variant)."""
        return False

    @classmethod
    def explains(cls) -> dict[str, list[str]]:
        """What this adapter explains, by kind, for messages: a timm family by its name."""
        return {"timm families" if cls.timm_modules else "other registered families": [cls.family]}

    # -- geometry (timm's common surface) -----------------------------------------
    @property
    def input_size(self) -> tuple[int, int]:
        """The model's real input size (its patch embedding's, not the pretrained config's)."""
        override = getattr(self, "_input_size", None)
        if override is not None:
            return override
        size = self.model.patch_embed.img_size
        return (int(size[0]), int(size[1]))

    @property
    def dynamic_size(self) -> bool:
        """Whether the model takes other input sizes as they are (timm's ``dynamic_img_size``)."""
        return bool(getattr(self.model, "dynamic_img_size", False)) and len(self.stages) == 1

    @property
    def patch_size(self) -> tuple[int, int]:
        """Input pixels per first-stage token along (y, x)."""
        return self.stages[0].stride if self.stages else tuple(int(p) for p in self.model.patch_embed.patch_size)  # type: ignore[return-value]

    @property
    def num_classes(self) -> int:
        return int(self.model.num_classes)

    @property
    def readout(self) -> str:
        """``"cls"``, ``"avg"``, ``"avg_with_prefix"`` or ``"map"`` (see :class:`~vitlens.models.parts.Readout`)."""
        assert self.head is not None
        return self.head.kind

    @property
    def parts(self) -> list[BlockPart]:
        return [p for s in self.stages for p in s.parts]

    @property
    def blocks(self) -> list[nn.Module]:
        return [p.module for p in self.parts]

    def stage_of_layer(self, layer: int) -> StageInfo:
        for stage in self.stages:
            if layer in stage.layers:
                return stage
        raise IndexError(layer)

    # -- modules the hooks attach to --------------------------------------------
    def final_norm(self) -> nn.Module:
        """The module whose input is the last block's output and whose output the read-out takes."""
        return self.final

    def features(self) -> tuple[nn.Module, str]:
        """Where Grad-CAM on features reads: (module, ``"input"`` or ``"output"``).

        Normalised tokens whose patch part reaches the logits: after a CLS
        read-out only the last block's attention input does; otherwise the final norm's output.
        """
        if self.readout == "cls":
            return self.parts[-1].attn.module, "input"
        return self.final, "output"

    def merges(self) -> dict[int, MergePart]:
        """Patch merging at the start of each stage that has one (Swin)."""
        return {}

    # -- token layout -----------------------------------------------------------
    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """A block's input/output as (B, N, C) tokens in the stage's order."""
        return x.reshape(x.shape[0], -1, x.shape[-1])

    def with_tokens(self, x: torch.Tensor, index: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """A copy of the block input ``x`` whose tokens ``index`` (stage order, as :meth:`tokens`
        numbers them) are ``values`` (B or 1, k, C); the other tokens keep their autograd graph."""
        out = torch.clone(x, memory_format=torch.contiguous_format)
        flat = out.view(out.shape[0], -1, out.shape[-1])
        flat[:, index] = values.to(flat.dtype).expand(flat.shape[0], -1, -1)
        return out

    def for_input(self, size: tuple[int, int]) -> "Adapter":
        """The adapter for an input of ``size`` (H, W) pixels; refuses sizes the model cannot take.

        A model built with ``dynamic_img_size=True`` takes any size whose sides are
        multiples of its token stride: the token grid follows the input.
        """
        from ..errors import ImageError

        size = (int(size[0]), int(size[1]))
        if size == tuple(self.input_size):
            return self
        if not self.dynamic_size:
            raise ImageError(
                f"{type(self.model).__name__} takes {self.input_size[0]}x{self.input_size[1]} inputs; "
                f"got {size[0]}x{size[1]}."
            )
        sy, sx = self.stages[0].stride
        if size[0] % sy or size[1] % sx:
            raise ImageError(
                f"{type(self.model).__name__} places one token per {sy}x{sx} pixels; an input of "
                f"{size[0]}x{size[1]} is not a multiple of that. Resize it to a multiple."
            )
        import copy

        other = copy.copy(self)
        other._input_size = size  # type: ignore[attr-defined]
        other.stages = [copy.copy(s) for s in self.stages]
        other.stages[0].grid = (size[0] // sy, size[1] // sx)
        return other

    # -- metadata ---------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        return {
            "family": self.family,
            "readout": self.readout,
            "patch_size": list(self.patch_size),
            "input_size": [3, *self.input_size],
            "num_stages": len(self.stages),
            "num_layers": len(self.blocks),
        }
