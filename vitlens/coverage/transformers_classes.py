"""Which ``transformers`` classes vitlens explains: build each tiny at random init and check it.

The classes come from the adapters (each :class:`~vitlens.models.hf_common.HFAdapter`
declares its ``classes`` and ``backbones``, each with a tiny configuration:
2 blocks per stage, 32 px input); :func:`check` builds one from it, captures two
images — for image–text models against three token-id prompts —, computes all seven maps and runs the LRP pass on a bias-free
copy to check conservation block by block and through the read-out, as
:func:`vitlens.coverage.timm_names.check` does for timm names. Used by
``benchmarks/coverage.py`` for the transformers rows of ``docs/COVERAGE.md``.

Examples
--------
>>> from vitlens.coverage import transformers_classes as hf_catalog
>>> hf_catalog.check("ViTForImageClassification").status
'explained'
"""

from __future__ import annotations

import copy
import time
import numpy as np
import torch
from torch import nn

from ..errors import UnsupportedModelError
from ..models.registry import adapter_for
from .timm_names import TOLERANCE, Result, relevance_leak

#: how a headless backbone given a head by :func:`vitlens.with_head` is named in the table
HEADED = " + vl.with_head"


def classes() -> list[str]:
    """Every transformers class an adapter declares, in registry order, then the headless backbones."""
    from ..models.hf_common import backbones, declared

    return [c.name for c in declared()] + [b + HEADED for b in backbones()]


def spread_weights(model: nn.Module, std: float = 0.3, bias_std: float = 0.1) -> nn.Module:
    """Redraw weight matrices with standard deviation ``std`` and biases with ``bias_std``, in place.

    transformers' 0.02-std initialisation makes every attention map nearly uniform and
    leaves biases at zero: tests and the coverage check want weights that make a difference.
    Draws from torch's global generator (seed it first).
    """
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if p.ndim >= 2:
                p.normal_(0.0, std)
            elif pname.endswith("bias"):
                p.normal_(0.0, bias_std)
    return model


def build(name: str, seed: int = 0) -> tuple[nn.Module, torch.Tensor | None]:
    """A tiny random ``name`` (weights drawn wide enough for non-uniform attention) and its prompts.

    ``"<backbone> + vl.with_head"`` is the headless backbone with a random Linear head on its default pool.
    """
    import transformers

    from ..models.hf_common import declaration

    torch.manual_seed(seed)
    backbone = name.removesuffix(HEADED)
    model = getattr(transformers, backbone)(declaration(backbone).tiny_config(transformers)).eval()
    if backbone != name:  # a linear probe on the default pool
        from ..models.families.hf_headed import with_head

        model = with_head(model, nn.Linear(int(model.config.hidden_size), 4))
    spread_weights(model)
    model.vitlens_image_processor = transformers.ViTImageProcessor(size={"height": 32, "width": 32})
    text = None
    if getattr(adapter_for(model), "needs_text", False):
        text = torch.randint(3, 100, (3, 6), generator=torch.Generator().manual_seed(seed))
    return model, text


def _bias_free(model: nn.Module) -> nn.Module:
    m = copy.deepcopy(model)
    with torch.no_grad():
        for mod in m.modules():
            for attr in ("bias", "in_proj_bias", "relative_position_bias_table"):
                p = getattr(mod, attr, None)
                if isinstance(p, nn.Parameter) and (attr != "bias" or isinstance(mod, (nn.Linear, nn.MultiheadAttention))):
                    p.zero_()
        for mod in m.modules():
            cpb = getattr(mod, "continuous_position_bias_mlp", None)
            if cpb is not None:  # Swinv2: 16·sigmoid(−100) ≈ 0
                cpb[0].weight.zero_()
                cpb[0].bias.fill_(1.0)
                cpb[2].weight.fill_(-100.0 / cpb[2].weight.shape[1])
    return m


def conservation_leak(model: nn.Module, text: torch.Tensor | None, x: torch.Tensor) -> float:
    """Largest relative relevance leak over blocks and the read-out, on a bias-free copy."""
    from ..capture.text import bind_text

    ad = bind_text(adapter_for(_bias_free(model)), text)
    return relevance_leak(ad, ad.logits, x)


def check(name: str, seed: int = 0) -> Result:
    """Build ``name`` tiny at random init and check capture, all seven maps and LRP conservation."""
    import vitlens as vl

    t0 = time.perf_counter()
    try:
        model, text = build(name, seed)
        images = np.random.default_rng(seed).random((2, 32, 32, 3)).astype(np.float32)
        cap = vl.capture(model, images, text=text)
        maps = vl.explain(cap, "all", per_layer=False)
        bad = [m for m in vl.methods.explainable_methods(cap) if not np.isfinite(maps[m].values).all()]
        if bad:
            return Result(name, "transformers", "failed", f"non-finite maps: {bad}", seconds=time.perf_counter() - t0)
        leak = conservation_leak(model, text, torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(seed)))
        status = "explained" if leak <= TOLERANCE else "failed"
        reason = "" if status == "explained" else f"LRP relevance not conserved (relative leak {leak:.2e})"
        return Result(name, "transformers", status, reason, leak=leak, config=cap.attrs["family"],
                      seconds=time.perf_counter() - t0)
    except UnsupportedModelError as exc:
        return Result(name, "transformers", "refused", str(exc), seconds=time.perf_counter() - t0)
    except Exception as exc:
        return Result(name, "transformers", "failed", f"{type(exc).__name__}: {exc}"[:300],
                      seconds=time.perf_counter() - t0)


def section() -> str:
    """The transformers rows of ``docs/COVERAGE.md`` (Markdown), or a line saying why there are none."""
    try:
        import transformers
    except ImportError:
        return "\n## transformers classes\n\nNot checked: transformers is not installed (`pip install \"vitlens[hf]\"`).\n"
    results = [check(name) for name in classes()]
    ok = sum(r.status == "explained" for r in results)
    lines = ["", "## transformers classes", "",
             f"Generated the same way by `vitlens.coverage.transformers_classes` (transformers {transformers.__version__}): "
             "each class every transformers adapter lists, and each headless backbone with a random Linear head "
             "(`vl.with_head`), built from a tiny config (2 blocks per stage, 32 px), "
             "random init; image-text models against three token-id prompts. "
             f"**{ok} of {len(results)} classes explained.**", "",
             "| class | family | status | LRP leak | reason |", "|---|---|---|---:|---|"]
    for r in results:
        reason = r.reason.replace("|", "\\|").replace("\n", " ")
        lines.append(f"| `{r.name}` | {r.config or '-'} | {r.status} | {r.leak:.1e} | {reason} |")
    return "\n".join(lines) + "\n"
