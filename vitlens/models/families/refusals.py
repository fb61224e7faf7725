"""Vision transformers vitlens recognises but does not explain, and what to use instead.

Each refusal names the block or head that no adapter describes; the message never
asks to change a pretrained model's architecture.

Examples
--------
>>> import timm, vitlens as vl
>>> model = timm.create_model("cait_xxs24_224", img_size=32, patch_size=8, depth=1, depth_token_only=1)
>>> try:
...     vl.models.adapter_for(model)
... except vl.UnsupportedModelError as err:
...     print(str(err).split(":")[0])
Cait
"""

from __future__ import annotations

from ..registry import register_refusal, timm_class

_REFUSED = [
    ("levit", "Levit", "LeViT's convolutional attention stages (attention with downsampling and attention biases "
     "over a shrinking grid)", "deit_* or vit_* models"),
    ("pit", "PoolingVisionTransformer", "PiT's pooling layers between transformer stages (depth-wise "
     "convolution pooling of the token grid)", "deit_* or swin_* models"),
    ("mvitv2", "MultiScaleVit", "MViTv2's pooling attention (keys and values pooled by convolutions)",
     "swin_* or swinv2_* models"),
    ("maxxvit", "MaxxVit", "MaxViT/CoAtNet's MBConv and grid attention blocks", "swin_* or swinv2_* models"),
    ("twins", "Twins", "Twins' locally-grouped and sub-sampled global attention", "swin_* models"),
    ("tnt", "TNT", "TNT's inner (pixel) transformer inside each patch", "vit_* models"),
    ("nest", "Nest", "NesT's nested block aggregation", "swin_* models"),
    ("vision_transformer_sam", "VisionTransformerSAM", "SAM ViT's windowed attention with relative position "
     "embeddings and its neck (it has no class logits)", "vit_* or eva02_* models"),
    ("vision_transformer_relpos", "VisionTransformerRelPos", "RelPosAttention (relative position MLP/bias "
     "inside timm's vit_relpos_* blocks)", "beit_* models (relative position bias) or vit_* models"),
    ("swin_transformer_v2_cr", "SwinTransformerV2Cr", "SwinV2-CR's blocks (its own window attention and "
     "stage layout)", "swinv2_* models (SwinTransformerV2)"),
    ("hiera", "Hiera", "Hiera's mask-unit attention with pooling", "swin_* or vit_* models"),
    ("crossvit", "CrossVit", "CrossViT's two-branch cross-attention", "vit_* models"),
    ("volo", "VOLO", "VOLO's outlooker attention", "vit_* models"),
    ("coat", "CoaT", "CoaT's conv-attention with factorised attention", "vit_* models"),
    ("efficientformer", "EfficientFormer", "EfficientFormer's pooling mixer and meta blocks", "deit_* models"),
]

for module, cls, missing, instead in _REFUSED:
    register_refusal(timm_class(module, cls), missing, instead)
