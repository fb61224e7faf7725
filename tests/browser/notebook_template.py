"""The notebook the browser tests serve: tiny random timm models, captures saved for the test.

Random-init models (seeded), procedural "shapes" images: no network, no weights.
The notebook writes each capture with ``vl.save`` next to itself, so the test
process opens the very data the widgets show and computes the expected maps.
Cells: the ViT Explorer (two classes side by side), a HeadGrid, a ModelView and
TokenCurves linked to it, Compare, and a Swin Explorer (at a size whose windows timm pads).

:func:`write_readme_notebook` writes the notebook behind the README screenshot:
the shipped trained ``vit-shapes`` model; :func:`write_atlas_notebook` the head atlas's
(a ViT's atlas over 12 images, linked to an Explorer of one of them).
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
explorer = vl.Explorer(vit_cap, vit, compare_class=True)
explorer
"""

GRID = """\
grid = vl.HeadGrid(vit_cap)
links = vl.widgets.link(explorer, grid)
grid
"""

MODEL_VIEW = """\
vl.ModelView(vit_cap, explorer=explorer, tile=48)
"""

CURVES = """\
vl.TokenCurves(vit_cap, explorer=explorer)
"""

COMPARE = """\
vl.Compare(vit_cap, vit)
"""

SWIN = """\
torch.manual_seed(1)
# 56 px: grids of 14 and 7 tokens in windows of 4, which timm pads (to 16 and 8)
swin = timm.create_model("swin_tiny_patch4_window7_224", img_size=56, patch_size=4, window_size=4, num_classes=8,
                         embed_dim=24, depths=(2, 2), num_heads=(2, 4)).eval()
swin_cap = vl.capture(swin, images)
vl.save(swin_cap, os.path.join(HERE, "swin.nc"), overwrite=True)
vl.Explorer(swin_cap)
"""

#: Files the notebook writes, in the order its cells run.
CAPTURES = ("vit.nc", "swin.nc")

README = """\
import os
os.environ.setdefault("OMP_NUM_THREADS", "1")
import vitlens as vl
model = vl.load_model("vit-shapes")
ds = vl.datasets.shapes(4, seed=11, objects=(1, 2))
cap = vl.capture(model, ds.image)
vl.Explorer(cap, model)
"""


#: The README's ablate-mode screenshot: the image of 200 where head 1 of block 2 (the most important head
#: of notebook 08) matters most, shown at block 2 with Transformer Attribution; the screenshot script
#: then clicks that head's switch in the page.
README_ABLATE = """\
import os
os.environ.setdefault("OMP_NUM_THREADS", "1")
import numpy as np
import vitlens as vl
model = vl.load_model("vit-shapes")
ds = vl.datasets.shapes(200, seed=7, objects=(1,))
clean = vl.capture(model, ds.image, grads=False, keep=["ln"], progress=False)
off = vl.capture(model, ds.image, grads=False, keep=["ln"], progress=False, ablate={2: [1]})
p = lambda c: np.exp(c.logits.values - c.logits.values.max(1, keepdims=True))
drop = [p(clean)[i, t] / p(clean)[i].sum() - p(off)[i, t] / p(off)[i].sum() for i, t in enumerate(clean.target.values)]
i = int(np.argmax(drop))
cap = vl.capture(model, ds.image[i:i + 1])
vl.Explorer(cap, model, ablate=True, layer=2, method="transformer_attribution")
"""


#: Class names that are markup: shown literally, never run (issue 31.1).
HOSTILE_NAMES = ["<img src=x onerror=alert(1)>", "<script>alert(2)</script>", '"><svg onload=alert(3)>',
                 "<b>bold</b>", "a & b", "<i>x", "plain", "<style>*{display:none}</style>"]

HOSTILE = """\
torch.manual_seed(0)
vit = timm.create_model("vit_tiny_patch16_224", img_size=64, patch_size=8, num_classes={n},
                        embed_dim=48, depth=4, num_heads=3).eval()
vit.vitlens_class_names = {names!r}
cap = vl.capture(vit, images)
explorer = vl.Explorer(cap, vit, compare_class=True)
explorer
"""

HOSTILE_OTHERS = """\
grid = vl.HeadGrid(cap, explorer=explorer)
grid
""", """\
vl.ModelView(cap, explorer=explorer, tile=48)
""", """\
vl.TokenCurves(cap, explorer=explorer)
""", """\
vl.Compare(cap, vit)
"""


ATLAS = """\
torch.manual_seed(2)
vit = timm.create_model("vit_tiny_patch16_224", img_size=64, patch_size=8, num_classes=8,
                        embed_dim=48, depth=4, num_heads=3).eval()
vit.vitlens_class_names = list(CLASS_NAMES)
cap = vl.capture(vit, vl.datasets.shapes(12, seed=5, size=64).image.values, grads=False)
vl.save(cap, os.path.join(HERE, "atlas.nc"), overwrite=True)
explorer = vl.Explorer(cap.isel(sample=[0]), vit)
explorer
"""

ATLAS_VIEW = """\
atlas = vl.HeadAtlas(cap, vit, stat="attention_distance", head=(3, 0), k=3, explorer=explorer)
atlas
"""

NO_CARRIER = """\
import plotly.graph_objects as go
from vitlens.widgets.figure import as_widget
as_widget(go.Figure()).close()  # the figure that carried plotly's bundle is gone: the page asks the kernel
"""


def write_notebook(folder: Path, name: str = "explorer.ipynb", carrier: bool = True) -> Path:
    """Write the test notebook into ``folder``; captures will be saved beside it.

    ``carrier=False`` closes the first figure (the one carrying plotly's bundle)
    before any widget is shown, so the page must ask the kernel for the bundle.
    """
    setup = SETUP.format(here=str(folder)) + ("" if carrier else NO_CARRIER)
    cells = (setup, VIT, GRID, MODEL_VIEW, CURVES, COMPARE, SWIN)
    return _write(folder / name, cells)


def write_hostile_notebook(folder: Path, name: str = "hostile.ipynb") -> Path:
    """Every widget on a capture whose class names are markup (see :data:`HOSTILE_NAMES`)."""
    setup = SETUP.format(here=str(folder))
    return _write(folder / name, (setup, HOSTILE.format(n=len(HOSTILE_NAMES), names=HOSTILE_NAMES), *HOSTILE_OTHERS))


def write_readme_notebook(folder: Path, name: str = "readme.ipynb", ablate: bool = False) -> Path:
    """The notebook of the README screenshot (the shipped, trained ``vit-shapes``); ``ablate``: of the
    ablate-mode screenshot."""
    return _write(folder / name, (README_ABLATE if ablate else README,))


def write_atlas_notebook(folder: Path, name: str = "atlas.ipynb") -> Path:
    """The head atlas of a ViT over 12 images, linked to an Explorer of one of them."""
    return _write(folder / name, (SETUP.format(here=str(folder)), ATLAS, ATLAS_VIEW))


def _write(path: Path, cells) -> Path:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [nbformat.v4.new_code_cell(src) for src in cells]
    nbformat.write(nb, path)
    return path
