"""What a capture explains: a class, or any scalar of the model's output (``vl.targets``).

``target=`` in :func:`vitlens.capture` takes a class (index or name, one or one
per image), or a callable ``f(model_output) -> (batch,)`` tensor: the gradients,
the LRP passes and every class-specific method then explain ``f`` instead of a
logit. A plain callable receives the logits ``(batch, classes)``, so
``lambda out: out[:, k]`` is the same as ``target=k``. A :class:`Target`
(``vl.targets.similarity``, ``vl.targets.patch_similarity``, or your own
subclass) receives :class:`Outputs` — the logits, the final tokens and the
pooled embedding — and also works on a headless backbone (DINOv2, a SigLIP
tower), which has no logits of its own.

Examples
--------
>>> import numpy as np, timm, torch, vitlens as vl
>>> model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=3)
>>> images = np.random.default_rng(0).random((2, 32, 32, 3))
>>> reference = vl.targets.embedding(model, images[:1])[0]      # the pooled embedding of image 0
>>> cap = vl.capture(model, images, target=vl.targets.similarity(reference))
>>> cap.attrs["target"], cap["target_score"].shape
('similarity', (2,))
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..errors import TargetError
from ..models.adapter import Adapter


@dataclass
class Outputs:
    """What a :class:`Target` reads of one forward pass (every tensor keeps its graph).

    Attributes
    ----------
    logits
        ``(batch, classes)``; for a headless backbone, the pooled embedding itself.
    tokens
        ``(batch, tokens, channels)``: the final tokens after the final norm (last stage).
    pooled
        ``(batch, channels)``: the embedding the head reads (CLS token, token mean, attention pool).
    num_prefix
        Prefix tokens (CLS, registers) ahead of the patch grid in ``tokens``.
    grid
        ``(rows, cols)`` of the last stage's patch grid.
    """

    logits: torch.Tensor
    tokens: torch.Tensor
    pooled: torch.Tensor
    num_prefix: int
    grid: tuple[int, int]


class Target:
    """A scalar per image to explain: subclass and implement :meth:`__call__` (``Outputs -> (batch,)``).

    ``name`` is recorded in the capture's attrs (``attrs["target"]``) and shown as the class.
    """

    name = "target"

    def __call__(self, out: Outputs) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def describe(self) -> str:
        """One line for attrs and captions."""
        return self.name


class similarity(Target):
    """Cosine similarity of the pooled embedding with ``reference`` (``(channels,)`` or one per image).

    "Why are these two images similar?": ``reference`` is the other image's embedding
    (:func:`embedding`), e.g. for DINOv2 retrieval.

    Examples
    --------
    >>> t = similarity(torch.tensor([1.0, 0.0]))
    >>> out = Outputs(torch.zeros(1, 1), torch.zeros(1, 2, 2), torch.tensor([[3.0, 4.0]]), 1, (1, 1))
    >>> float(t(out))
    0.6000000238418579
    """

    name = "similarity"

    def __init__(self, reference: Any):
        ref = torch.as_tensor(np.asarray(reference) if not isinstance(reference, torch.Tensor) else reference)
        if ref.ndim not in (1, 2) or not ref.is_floating_point() or not torch.isfinite(ref).all():
            raise TargetError(f"similarity(reference): pass a finite float embedding (channels,) or (images, "
                              f"channels); got shape {tuple(ref.shape)}, dtype {ref.dtype}.")
        self.reference = ref.detach()

    def __call__(self, out: Outputs) -> torch.Tensor:
        e = out.pooled
        ref = self.reference.to(e.device, e.dtype)
        if ref.shape[-1] != e.shape[-1]:
            raise TargetError(f"similarity: the reference has {ref.shape[-1]} channels, the model's pooled "
                              f"embedding {e.shape[-1]}; compute it with vl.targets.embedding(model, images).")
        ref = ref.expand_as(e) if ref.ndim == 1 else ref
        return ((e / e.norm(dim=-1, keepdim=True)) * (ref / ref.norm(dim=-1, keepdim=True))).sum(-1)


class patch_similarity(Target):
    """Mean cosine similarity of the final patch token at ``(row, col)`` with the other patch tokens.

    "What makes this patch like the rest of its image?" (last stage's grid; prefix tokens left out).
    """

    name = "patch_similarity"

    def __init__(self, row: int, col: int):
        self.row, self.col = int(row), int(col)

    def describe(self) -> str:
        return f"patch_similarity({self.row}, {self.col})"

    def __call__(self, out: Outputs) -> torch.Tensor:
        gh, gw = out.grid
        if not (0 <= self.row < gh and 0 <= self.col < gw):
            raise TargetError(f"patch_similarity({self.row}, {self.col}): the final grid is {gh}x{gw}.")
        patches = out.tokens[:, out.num_prefix:]
        unit = patches / patches.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        q = self.row * gw + self.col
        cos = (unit * unit[:, q : q + 1]).sum(-1)  # (B, patches)
        return (cos.sum(-1) - cos[:, q]) / max(cos.shape[1] - 1, 1)


def is_callable_target(target: Any) -> bool:
    """Whether ``target`` is a callable (a :class:`Target` or ``f(logits)``), not a class."""
    return callable(target) and not isinstance(target, (str, bytes))


def describe(target: Any) -> str:
    """The name recorded for a callable target."""
    if isinstance(target, Target):
        return target.describe()
    return getattr(target, "__name__", type(target).__name__)


def final_tokens(adapter: Adapter, x: Any) -> torch.Tensor:
    """The final tokens (B, N, C) from the final norm's output (or the last block's, if that is the final module)."""
    return adapter.tokens(x[0] if isinstance(x, tuple) else x)


def outputs_of(adapter: Adapter, logits: torch.Tensor, final: Any) -> Outputs:
    """:class:`Outputs` of a forward pass: its logits and what the final norm returned."""
    assert adapter.head is not None
    tokens = final_tokens(adapter, final)
    last = adapter.stages[-1]
    return Outputs(logits, tokens, adapter.head.pooled(tokens), last.num_prefix, tuple(last.grid))


def score(target: Any, out: Outputs, classes: torch.Tensor | None) -> torch.Tensor:
    """The per-image scalar to explain (B,): ``classes`` picks logits; a callable is evaluated."""
    if not is_callable_target(target):
        assert classes is not None
        return out.logits.gather(1, classes[:, None]).squeeze(1)
    value = target(out) if isinstance(target, Target) else target(out.logits)
    if not isinstance(value, torch.Tensor) or value.shape != (out.logits.shape[0],):
        shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise TargetError(f"target {describe(target)!r} returned {shape}; a target returns one value per "
                          f"image, a tensor of shape ({out.logits.shape[0]},).")
    if not value.requires_grad:
        raise TargetError(f"target {describe(target)!r} returned a tensor without a gradient: compute it from "
                          "the model output it is given (torch operations only, no .detach() or numpy).")
    return value


class FinalTokens:
    """Keep the final norm's output (with its graph) during one forward pass (a context manager)."""

    def __init__(self, adapter: Adapter):
        self.adapter, self.output = adapter, None

    def __enter__(self) -> "FinalTokens":
        self._handle = self.adapter.final_norm().register_forward_hook(self._hook)
        return self

    def _hook(self, module: Any, inputs: Any, output: Any) -> None:
        self.output = output

    def __exit__(self, *exc: Any) -> None:
        self._handle.remove()


def embedding(model: Any, images: Any) -> torch.Tensor:
    """The pooled embedding (images, channels) of ``images``: the vector :class:`similarity` compares.

    The model's own preprocessing is applied as in :func:`vitlens.capture`; a headless
    ``transformers`` backbone gives its pooled vector (CLS after the final norm for DINOv2).
    """
    from ..models import adapter_for, embedding_model
    from .images import prepare

    model = embedding_model(model) or model
    adapter = adapter_for(model)
    batch = prepare(images, adapter)
    param = next(model.parameters())
    with torch.no_grad(), FinalTokens(adapter) as final:
        was = model.training
        model.eval()
        try:
            x = batch.pixels.to(param.device, param.dtype)
            adapter.logits(x) if hasattr(adapter, "logits") else model(x)
        finally:
            model.train(was)
        assert adapter.head is not None
        return adapter.head.pooled(final_tokens(adapter, final.output)).detach().cpu()
