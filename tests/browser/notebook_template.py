"""The notebook the browser tests serve: tiny random timm models, captures saved for the test.

Random-init models (seeded), procedural "shapes" images: no network, no weights.
The notebook writes each capture with ``vl.save`` next to itself, so the test
process opens the very data the widgets show and computes the expected maps.
"""

from __future__ import annotations

from pathlib import Path

import nbformat

SETUP = """\
import os
os.environ.setdefault("OMP_NUM_THREADS", "1")
import timm, torch
import vitlens as vl
from vitlens.datasets.shapes import CLASS_NAMES
from vitlens.widgets import Explorer, HeadGrid
torch.set_num_threads(1)
HERE = {here!r}
images = vl.datasets.shapes(2, seed=3, size=64).image.values
"""

VIT = """\
torch.manual_seed(0)
vit = timm.create_model("vit_tiny_patch16_224", img_size=64, patch_size=8, num_classes=8,
                        embed_dim=48, depth=4, num_heads=3).eval()
vit.vitlens_class_names = list(CLASS_NAMES)
vit_cap = vl.capture(vit, images)
vl.save(vit_cap, os.path.join(HERE, "vit.nc"), overwrite=True)
explorer = Explorer(vit_cap, vit)
explorer
"""

GRID = """\
HeadGrid(vit_cap, explorer=explorer)
"""

SWIN = """\
torch.manual_seed(1)
swin = timm.create_model("swin_tiny_patch4_window7_224", img_size=64, patch_size=4, window_size=4, num_classes=8,
                         embed_dim=24, depths=(2, 2), num_heads=(2, 4)).eval()
swin_cap = vl.capture(swin, images)
vl.save(swin_cap, os.path.join(HERE, "swin.nc"), overwrite=True)
Explorer(swin_cap)
"""

#: Files the notebook writes, in the order its cells run.
CAPTURES = ("vit.nc", "swin.nc")


def write_notebook(folder: Path, name: str = "explorer.ipynb") -> Path:
    """Write the test notebook into ``folder``; captures will be saved beside it."""
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [nbformat.v4.new_code_cell(src) for src in (SETUP.format(here=str(folder)), VIT, GRID, SWIN)]
    path = folder / name
    nbformat.write(nb, path)
    return path
