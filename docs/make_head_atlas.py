"""Regenerate docs/head_atlas.png, the README's head-atlas figure (python docs/make_head_atlas.py).

The shipped swin-shapes model over 256 procedural images: its mean attention distance
per block and head (left), against depth (right: the zigzag of unshifted and shifted
windows, stage 1's 8-pixel tokens reaching twice as far as stage 0's), and the block-6
head that looks farthest, with the images where it looks farthest and nearest.
"""

from __future__ import annotations

from pathlib import Path

import vitlens as vl

model = vl.load_model("swin-shapes")
images = vl.datasets.shapes(256, seed=2027).image
cap = vl.capture(model, images, grads=False, keep=["attention"], progress=False)
fig = vl.figures.head_atlas(cap, "attention_distance", head=(6, 3), k=4)
vl.figures.save(fig, Path(__file__).with_name("head_atlas.png"), dpi=90)
