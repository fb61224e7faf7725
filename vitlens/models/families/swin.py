"""Adapter for timm ``SwinTransformer`` (v1): windows, shifted windows, patch merging."""

from __future__ import annotations

from torch import nn

from ...errors import UnsupportedModelError
from ..adapter import Adapter, StageInfo
from ..parts import AttentionPart, BlockPart, LinearPart, MergePart, Readout
from ..registry import register_adapter, timm_class
from .vit import mlp_part

is_swin = timm_class("swin_transformer", "SwinTransformer")


def swin_bias(attn: nn.Module):
    """Relative position bias plus the shift mask (passed as ``mask=``): (nW or 1, heads, N, N)."""

    def bias(ctx: dict):
        b = attn._get_rel_pos_bias()[0]  # (heads, N, N)
        mask = ctx.get("mask")  # (nW, N, N) or None
        return b.unsqueeze(0) if mask is None else b.unsqueeze(0) + mask.unsqueeze(1)

    return bias


def window_stage(s: int, blocks: list[nn.Module], parts: list[BlockPart], first_layer: int,
                 stride: tuple[int, int]) -> StageInfo:
    """Stage ``s`` of a timm Swin (v1 or v2): its token grid, windows and per-block shifts.

    ``stride``: input pixels per token of this stage (the patch size times 2 per
    merging so far; a merged odd grid hangs over the image edge by one token).
    A grid that is not a multiple of the window is padded, as timm pads it (see
    :mod:`vitlens.models.windows`).
    """
    return StageInfo(
        index=s,
        parts=parts,
        layers=list(range(first_layer, first_layer + len(blocks))),
        grid=tuple(int(r) for r in blocks[0].input_resolution),  # type: ignore[arg-type]
        stride=stride,
        num_heads=parts[0].attn.num_heads,
        window=tuple(int(w) for w in blocks[0].window_size),  # type: ignore[arg-type]
        shifts=[tuple(int(v) for v in b.shift_size) for b in blocks],  # type: ignore[misc]
    )


def stage_strides(model: nn.Module) -> list[tuple[int, int]]:
    """Input pixels per token of each stage of a timm Swin: the patch size, doubled at each merging."""
    sy, sx = (int(p) for p in model.patch_embed.patch_size)
    out = []
    for stage in model.layers:
        if not isinstance(stage.downsample, nn.Identity):
            sy, sx = 2 * sy, 2 * sx
        out.append((sy, sx))
    return out


@register_adapter
class SwinAdapter(Adapter):
    """Tokens of a stage are its (rows × cols) grid in row-major order; no prefix tokens.

    Blocks hand tokens around as (B, H, W, C); :meth:`tokens` flattens them.
    The read-out is global average pooling over the last stage.
    """

    family = "swin"
    timm_modules = ("swin_transformer",)

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return is_swin(model)

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
        layer = 0
        strides = stage_strides(model)
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
            parts = [self._block(b) for b in blocks]
            self.stages.append(window_stage(s, blocks, parts, layer, strides[s]))
            layer += len(blocks)

        self.final = model.norm
        self.head = Readout("avg", model.head.fc, start=0)

    @staticmethod
    def _block(b: nn.Module) -> BlockPart:
        attn = b.attn
        part = AttentionPart(
            module=attn,
            probs=attn.attn_drop,
            num_heads=int(attn.num_heads),
            proj=LinearPart(attn.proj),
            qkv=LinearPart(attn.qkv),
            scale=float(attn.scale),
            position_bias=swin_bias(attn),
        )
        return BlockPart(module=b, norm1=b.norm1, attn=part, norm2=b.norm2, mlp=mlp_part(b.mlp, "Swin block"))

    def merges(self) -> dict[int, MergePart]:
        return {
            s: MergePart(stage.downsample, stage.downsample.reduction, stage.downsample.norm, norm_first=True)
            for s, stage in enumerate(self.model.layers)
            if not isinstance(stage.downsample, nn.Identity)
        }
