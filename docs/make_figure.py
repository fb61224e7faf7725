"""Regenerate docs/methods.png, the README figure (python docs/make_figure.py).

Row 1: a one-object image; rows 2–3: one two-object image explained once for each
of its labelled classes (class-specific methods move, the others do not).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

import vitlens as vl

model = vl.load_model("vit-shapes")
one = vl.datasets.shapes(8, seed=777000001, objects=1)
two = vl.datasets.shapes(8, seed=777000002, objects=2)
i, j = 0, 1
images = np.stack([one.image.values[i], two.image.values[j], two.image.values[j]])
targets = [int(one.label.values[i, 0]), int(two.label.values[j, 0]), int(two.label.values[j, 1])]
cap = vl.capture(model, images, target=targets, keep=("all", *vl.methods.extra_groups()))  # every group: all nine methods
fig = vl.figures.grid(cap, cell=1.6)
vl.figures.save(fig, Path(__file__).with_name("methods.png"), dpi=110)
