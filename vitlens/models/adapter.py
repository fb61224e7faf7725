"""The one surface vitlens sees of a model.

Capture and the LRP pass talk to models only through an :class:`Adapter`; the
timm-specific knowledge (module names, token layout, windows) lives in
``models/vit.py`` and ``models/swin.py``. Nothing outside ``models/`` and
``capture/`` knows timm's module names.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn


@dataclass
class StageInfo:
    """One stage of blocks that share a token grid.

    ViT has a single stage; Swin has one per resolution.
    """

    index: int
    blocks: list[nn.Module]
    layers: list[int]  # global block indices
    grid: tuple[int, int]  # (rows, cols) of the patch-token grid
    stride: tuple[int, int]  # pixels per token along (y, x)
    num_heads: int
    num_prefix: int = 0
    prefix_kinds: list[str] = field(default_factory=list)
    window: tuple[int, int] | None = None  # Swin window size
    shifts: list[tuple[int, int]] = field(default_factory=list)  # Swin shift per block

    @property
    def num_tokens(self) -> int:
        return self.num_prefix + self.grid[0] * self.grid[1]

    @property
    def name(self) -> str:
        return f"stage{self.index}"

    def token_coords(self) -> dict[str, tuple[str, np.ndarray]]:
        """Per-token coordinates: grid row/col, kind, pixel centre."""
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

    Subclasses fill in the attributes below and the few methods that differ
    between families. ``model`` is the user's module, never modified except by
    :mod:`vitlens.capture` (which restores it).
    """

    family: str = ""
    readout: str = "cls"  # "cls" (first prefix token) or "avg" (mean of patch tokens)

    def __init__(self, model: nn.Module):
        self.model = model
        self.stages: list[StageInfo] = []

    # -- geometry (timm's common surface) -----------------------------------------
    @property
    def input_size(self) -> tuple[int, int]:
        """The model's real input size (its patch embedding's, not the pretrained config's)."""
        size = self.model.patch_embed.img_size
        return (int(size[0]), int(size[1]))

    @property
    def patch_size(self) -> tuple[int, int]:
        p = self.model.patch_embed.patch_size
        return (int(p[0]), int(p[1]))

    @property
    def num_classes(self) -> int:
        return int(self.model.num_classes)

    @property
    def blocks(self) -> list[nn.Module]:
        return [b for s in self.stages for b in s.blocks]

    def stage_of_layer(self, layer: int) -> StageInfo:
        for stage in self.stages:
            if layer in stage.layers:
                return stage
        raise IndexError(layer)

    # -- modules the hooks attach to --------------------------------------------
    def attention_module(self, block: nn.Module) -> nn.Module:
        return block.attn

    def attention_probs_module(self, block: nn.Module) -> nn.Module:
        """The module whose *output* is the post-softmax attention (its dropout)."""
        return block.attn.attn_drop

    def final_norm(self) -> nn.Module:
        return self.model.norm

    def feature_module(self) -> nn.Module:
        """Whose output Grad-CAM on features uses: normalised tokens that reach the logits."""
        return self.final_norm()

    def merges(self) -> dict[int, nn.Module]:
        """Patch-merging module at the start of each stage that has one (Swin)."""
        return {}

    # -- token layout -----------------------------------------------------------
    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """A block's input/output as (B, N, C) tokens in the stage's order."""
        return x.reshape(x.shape[0], -1, x.shape[-1])

    def value_path(self, block: nn.Module, normed: torch.Tensor) -> torch.Tensor:
        """Each token's value vector after the output projection, W_O·concat_h(v_j^h).

        Token-wise (no attention mixing), without the projection bias, as
        docs/METHODS.md defines the MSA transformation of a token for tokentm.
        """
        attn = self.attention_module(block)
        h = self.tokens(normed)
        dim = attn.qkv.out_features // 3
        w_v = attn.qkv.weight[2 * dim:]
        b_v = attn.qkv.bias[2 * dim:] if attn.qkv.bias is not None else None
        v = nn.functional.linear(h, w_v, b_v)
        return nn.functional.linear(v, attn.proj.weight)

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
