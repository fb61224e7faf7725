"""The precision of the αβ LRP pass (Transformer Attribution's relevance): ``capture(lrp_dtype=...)``.

The αβ rules divide by sums that can nearly cancel (the residual rescaling divides a
branch's relevance by the branch's raw total), so float32 rounding can move
Transformer Attribution's map on some images (docs/METHODS.md, "Sensitivity to
rounding"). :func:`lrp_precision` runs the pass in float64: the model's floating
parameters and buffers and the batch's records are cast for its duration and put
back exactly (float32 → float64 → float32 is lossless), so the user's model is left
as it was.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from ..models.adapter import Adapter
from .hooks import Recorder

#: ``capture(lrp_dtype=...)``: the dtype of the αβ LRP pass
LRP_DTYPES = {"float32": torch.float32, "float64": torch.float64}

#: Below this ``lrp_condition`` a float32 pass's Transformer Attribution map is taken to depend on
#: rounding (docs/METHODS.md, "Sensitivity to rounding", gives the measurements it comes from).
RELIABLE_CONDITION = 1e-4


def unreliable(condition: Any, lrp_dtype: str) -> Any:
    """Which samples' maps depend on rounding: ``condition < RELIABLE_CONDITION`` under a float32 pass.

    Examples
    --------
    >>> import numpy as np
    >>> unreliable(np.array([0.2, 3e-6]), "float32").tolist(), unreliable(np.array([3e-6]), "float64").tolist()
    ([False, True], [False])
    """
    import numpy as np

    condition = np.asarray(condition, dtype=float)
    return (condition < RELIABLE_CONDITION) & (lrp_dtype == "float32")

def unreliable_samples(tree: Any) -> list:
    """The samples of a capture (or a reduced capture's run) whose float32 Transformer Attribution
    depends on rounding, from its per-sample ``lrp_condition`` ([] when it has none).

    Examples
    --------
    >>> import numpy as np, xarray as xr
    >>> cap = xr.DataTree(xr.Dataset({"lrp_condition": ("sample", [0.3, 2e-6, 1e-5])}, coords={"sample": [7, 8, 9]}))
    >>> unreliable_samples(cap)
    [8, 9]
    """
    from .layout import capture_options

    root = tree.to_dataset(inherit=False) if hasattr(tree, "to_dataset") else tree
    if "lrp_condition" not in root or "sample" not in root["lrp_condition"].dims:
        return []
    bad = unreliable(root["lrp_condition"].values, str(capture_options(tree).get("lrp_dtype", "float32")))
    return [v.item() if hasattr(v, "item") else v for v in root["sample"].values[bad]]


def warn_unreliable(samples: list, stacklevel: int = 2) -> None:
    """One :class:`~vitlens.PrecisionWarning` naming ``samples`` (the first 20, then how many more)."""
    import warnings

    from ..errors import PrecisionWarning

    if not samples:
        return
    shown = ", ".join(map(str, samples[:20])) + (f", ... ({len(samples) - 20} more)" if len(samples) > 20 else "")
    warnings.warn(f"transformer_attribution: the float32 LRP pass divided by nearly cancelling sums on "
                  f"{len(samples)} sample(s) [{shown}] (lrp_condition < {RELIABLE_CONDITION:g}), so their maps "
                  "depend on rounding; capture them again with vl.capture(..., lrp_dtype='float64').",
                  PrecisionWarning, stacklevel=stacklevel + 1)


def settle_unreliable(tree: Any) -> list:
    """Set ``lrp_unreliable`` on each stored map that carries it (a reduced capture's ``/maps``) to the
    whole run's :func:`unreliable_samples`, where each batch's answer had named its own; return them.

    A reduced capture computes its maps batch by batch, and the attributes it stores are one batch's:
    the samples one batch found unreliable are not the run's.
    """
    node = tree.children.get("maps") if hasattr(tree, "children") else None
    if node is None:
        return []
    ds = node.to_dataset(inherit=False)
    marked = [name for name in ds.data_vars if "lrp_unreliable" in ds[name].attrs]
    if not marked:  # no map that reads the relevance: lrp_condition is not read at all
        return []
    samples = unreliable_samples(tree)
    for name in marked:
        ds[name].attrs["lrp_unreliable"] = list(samples)
    node.dataset = ds
    return samples


#: the batch records the LRP pass reads (:class:`~vitlens.capture.hooks.BatchRecords`)
_READ = ("attention", "final_input", "final_output", "block_inputs", "block_outputs", "mlp_inputs", "attn_inputs",
         "attn_ctx", "linears", "merge_inputs", "grads", "scores")


def _cast(value: Any, dtype: torch.dtype) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().to(dtype) if value.is_floating_point() else value
    if isinstance(value, dict):
        return _cast_dict(value, dtype)
    if isinstance(value, (tuple, list)):
        return type(value)(_cast(v, dtype) for v in value)
    return value


def _cast_dict(value: dict, dtype: torch.dtype) -> dict:
    for key in list(value):
        value[key] = _cast(value[key], dtype)
    return value


@contextmanager
def lrp_precision(adapter: Adapter, rec: Recorder, dtype: str) -> Iterator[None]:
    """Run what is inside (the LRP walk) with the model and the batch's records in ``dtype``."""
    target = LRP_DTYPES[dtype]
    model = adapter.model
    tensors = [t for t in (*model.parameters(), *model.buffers()) if t.is_floating_point() and t.dtype != target]
    if not tensors:
        yield
        return
    saved = [(t, t.data) for t in tensors]
    batch = rec.batch
    kept = {name: getattr(batch, name) for name in ("final_input", "final_output")}  # read again after the walk
    try:
        for t in tensors:
            t.data = t.data.to(target)
        for name in _READ:
            setattr(batch, name, _cast(getattr(batch, name), target))
        yield
    finally:
        for t, data in saved:
            t.data = data
        for name, value in kept.items():
            setattr(batch, name, value)
