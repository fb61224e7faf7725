"""Adapter for timm ``SwinTransformer`` (v1): windows, shifted windows, patch merging."""

from __future__ import annotations

from torch import nn

from ..errors import UnsupportedModelError
from .adapter import Adapter, StageInfo


def is_swin(model: nn.Module) -> bool:
    from timm.models.swin_transformer import SwinTransformer

    return isinstance(model, SwinTransformer)


class SwinAdapter(Adapter):
    """Tokens of a stage are its (rows × cols) grid in row-major order; no prefix tokens.

    Blocks hand tokens around as (B, H, W, C); :meth:`tokens` flattens them.
    The read-out is global average pooling over the last stage.
    """

    family = "swin"
    readout = "avg"

    def __init__(self, model: nn.Module):
        super().__init__(model)
        from timm.layers import Mlp
        from timm.models.swin_transformer import PatchMerging, SwinTransformerBlock, WindowAttention

        name = type(model).__name__
        pool = getattr(model.head, "global_pool", None)
        pool_type = getattr(pool, "pool_type", "avg")
        if pool_type != "avg":
            raise UnsupportedModelError(
                f"{name} pools with {pool_type!r}; vitlens explains Swin models read out "
                "by global average pooling (timm's default)."
            )
        img_h, img_w = self.input_size
        layer = 0
        for s, stage in enumerate(model.layers):
            if not isinstance(stage.downsample, (nn.Identity, PatchMerging)):
                raise UnsupportedModelError(
                    f"{name}: stage {s} downsamples with {type(stage.downsample).__name__}; "
                    "vitlens supports timm's PatchMerging."
                )
            blocks = list(stage.blocks)
            if not blocks:
                raise UnsupportedModelError(f"{name}: stage {s} has no blocks.")
            for b in blocks:
                if type(b) is not SwinTransformerBlock or type(b.attn) is not WindowAttention:
                    raise UnsupportedModelError(
                        f"{name}: stage {s} has {type(b).__name__}; vitlens explains Swin v1 "
                        "blocks (SwinTransformerBlock with WindowAttention)."
                    )
                if type(b.mlp) is not Mlp:
                    raise UnsupportedModelError(f"{name}: stage {s} has a {type(b.mlp).__name__} MLP.")
                if getattr(b, "dynamic_mask", False):
                    raise UnsupportedModelError(f"{name}: dynamic shift masks are not supported.")
            grid = tuple(int(r) for r in blocks[0].input_resolution)
            window = tuple(int(w) for w in blocks[0].window_size)
            if grid[0] % window[0] or grid[1] % window[1]:
                raise UnsupportedModelError(
                    f"{name}: stage {s} grid {grid} is not divisible by its window {window} "
                    "(padded windows are not supported); use an input size whose stage grids "
                    "are multiples of the window size."
                )
            self.stages.append(
                StageInfo(
                    index=s,
                    blocks=blocks,
                    layers=list(range(layer, layer + len(blocks))),
                    grid=grid,  # type: ignore[arg-type]
                    stride=(img_h // grid[0], img_w // grid[1]),
                    num_heads=blocks[0].attn.num_heads,
                    window=window,  # type: ignore[arg-type]
                    shifts=[tuple(int(v) for v in b.shift_size) for b in blocks],  # type: ignore[misc]
                )
            )
            layer += len(blocks)

    def merges(self) -> dict[int, nn.Module]:
        return {
            s: stage.downsample
            for s, stage in enumerate(self.model.layers)
            if not isinstance(stage.downsample, nn.Identity)
        }
