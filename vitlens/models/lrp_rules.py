"""LRP rules as pure tensor functions: Chefer, Gur & Wolf (CVPR 2021) and their extensions.

These are the primitive rules the model parts of :mod:`vitlens.models.parts` apply
(each part's rule is defined next to the part); the walk over a model lives in
:mod:`vitlens.capture.relevance`. Every rule conserves relevance: what enters a rule
sums (per image) to what leaves it, up to the safe-division leak where a
denominator is exactly zero. ``vitlens.methods.lrp`` re-exports this module.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

EPS = 1e-9


def safe_div(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """``num / den`` with ``|den|`` clamped to at least 1e-9 and 0 where ``den == 0``.

    When no ``|den|`` is below 1e-9 (the usual case) that is the plain quotient, bit for bit
    (a NaN takes the careful path too), written contiguously whatever the operands' layout
    (the attention rules multiply it with matrices next).
    """
    if den.numel() and den.abs().amin() >= EPS:
        out = num.new_empty(torch.broadcast_shapes(num.shape, den.shape), dtype=torch.result_type(num, den))
        return torch.div(num, den, out=out)
    d = den.abs().clamp_min_(EPS).copysign_(den)
    if d.shape == torch.broadcast_shapes(num.shape, d.shape) and d.dtype == torch.result_type(num, d):
        out = torch.div(num, d, out=d)  # the one temporary takes the quotient (no second allocation)
    else:
        out = num / d
    return out.masked_fill_(den == 0, 0.0)


def linear_alphabeta(
    x: torch.Tensor,
    weight: torch.Tensor,
    relevance: torch.Tensor,
    out: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """αβ rule with α=1, β=0 for ``y = x Wᵀ (+ b)``; the bias takes no relevance.

    ``Z = W⁺x⁺ + W⁻x⁻``; ``R_in = x⁺⊙W⁺ᵀ(R/Z) + x⁻⊙W⁻ᵀ(R/Z)``.

    Computed with the identities ``W⁺x⁺ + W⁻x⁻ = (Wx + |W||x|)/2`` and
    ``x⁺⊙W⁺ᵀS + x⁻⊙W⁻ᵀS = (x⊙WᵀS + |x|⊙|W|ᵀS)/2`` (the two halves cancel).
    Pass the layer's recorded output ``out`` (and its ``bias``) to save the
    forward matmul. ``S = R/Z`` where ``Z > 0`` and 0 elsewhere: ``Z ≥ 0`` (up to
    rounding), and a ``Z = 0`` has only zero terms, so nothing is lost there.

    Examples
    --------
    >>> x = torch.tensor([[1.0, -2.0]])
    >>> w = torch.tensor([[1.0, 1.0], [2.0, -1.0], [-1.0, 0.5]])
    >>> linear_alphabeta(x, w, torch.tensor([[1.0, 1.0, 1.0]]))
    tensor([[1.5000, 0.5000]])
    """
    w_abs = weight.abs()
    x_abs = x.abs()
    z = x_abs @ w_abs.T
    if out is None:
        z.add_(x @ weight.T)
    else:
        z.add_(out)
        if bias is not None:
            z.sub_(bias)
    # z = 2·(W⁺x⁺ + W⁻x⁻); R/0 is ±inf or nan, set to 0 in the same pass
    s = torch.div(relevance, z.clamp_min_(0.0), out=z).nan_to_num_(0.0, 0.0, 0.0)
    return (s @ weight).mul_(x).addcmul_(x_abs, s @ w_abs)


def matmul_lrp0(a: torch.Tensor, b: torch.Tensor, relevance: torch.Tensor, z: torch.Tensor | None = None):
    """LRP-0 for the bilinear ``Z = a @ b``, each operand's share halved.

    ``z`` may be given when the product feeds an addition of constants (Swin's
    relative-position bias and shift mask): the relevance those constants would
    take is then dropped (a documented leak). It may also be ``a @ b`` as the
    model computed it (the attention's recorded output), which saves the product.
    Returns ``(R_a, R_b)``.
    """
    s = safe_div(relevance, a @ b if z is None else z)
    if s.numel() < a.numel() + b.numel():  # (A·V: s is the small one) halving it halves both shares, exactly
        s.mul_(0.5)
        return (s @ b.transpose(-2, -1)).mul_(a), (a.transpose(-2, -1) @ s).mul_(b)
    r_a = (s @ b.transpose(-2, -1)).mul_(a).mul_(0.5)
    r_b = (a.transpose(-2, -1) @ s).mul_(b).mul_(0.5)
    return r_a, r_b


def _per_image_sum(r: torch.Tensor) -> torch.Tensor:
    return r.reshape(r.shape[0], -1).sum(1).reshape(-1, *([1] * (r.ndim - 1)))


#: While a :func:`conditioning` block runs: the per-image conditioning of every residual rescaling.
_CONDITIONING: list[torch.Tensor] | None = None


@contextmanager
def conditioning() -> Iterator[list[torch.Tensor]]:
    """Collect, for every :func:`residual_add` run inside, each image's conditioning (B,): the smaller
    over the two branches of ``|Σ r| / Σ |r|`` — how far a branch's raw relevance total, which the
    rescaling divides by, cancels. Near 0 the division amplifies rounding: ``1e-5`` turns float32's
    ``6e-8`` into about ``1e-2`` of the branch's relevance.

    Examples
    --------
    >>> a, b = torch.tensor([[1.0, -0.999]]), torch.tensor([[1.0, 1.0]])
    >>> with conditioning() as seen:   # relevance a + b at the sum: each branch's raw share is itself
    ...     _ = residual_add(a, b, a + b)
    >>> round(float(seen[0][0]), 4)   # branch a: 1 − 0.999 of a mass 1.999
    0.0005
    """
    global _CONDITIONING
    outer, _CONDITIONING = _CONDITIONING, []
    try:
        yield _CONDITIONING
    finally:
        _CONDITIONING = outer


def _relative_total(r: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    mass = torch.linalg.vector_norm(r.reshape(r.shape[0], -1), 1, dim=1).reshape(total.shape)  # Σ|r|, one pass
    return torch.where(mass > 0, total.abs() / mass.clamp_min(torch.finfo(mass.dtype).tiny), 1.0).flatten()


def residual_add(a: torch.Tensor, b: torch.Tensor, relevance: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Relevance of ``out = a + b``: LRP-0 shares, rescaled per image.

    Each branch keeps its share of ``|Σ|`` and together they conserve the
    incoming total of *each image* (images of a batch never mix).
    """
    s = safe_div(relevance, a + b)
    r_a = a * s
    r_b = s.mul_(b) if s.shape == b.shape and s.dtype == torch.result_type(s, b) else b * s
    sa, sb, total = _per_image_sum(r_a), _per_image_sum(r_b), _per_image_sum(relevance)
    if _CONDITIONING is not None:
        _CONDITIONING.append(torch.minimum(_relative_total(r_a, sa), _relative_total(r_b, sb)))
    frac_a = safe_div(sa.abs(), sa.abs() + sb.abs())
    frac_b = safe_div(sb.abs(), sa.abs() + sb.abs())
    return r_a.mul_(safe_div(frac_a * total, sa)), r_b.mul_(safe_div(frac_b * total, sb))


def mean_lrp0(x: torch.Tensor, relevance: torch.Tensor, dim: int) -> torch.Tensor:
    """LRP-0 through a mean over ``dim`` (global average pooling)."""
    z = x.mean(dim, keepdim=True)
    return (x / x.shape[dim]) * safe_div(relevance.unsqueeze(dim), z)


def product_half(relevance: torch.Tensor, out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Elementwise product ``z = a ⊙ b`` (a GLU gate times its value): each factor gets half.

    LRP-0 for a bilinear product gives each factor ``a·b·R/z / 2 = R/2`` wherever
    ``z ≠ 0`` (and nothing is lost where ``z = 0``: the product then carries no
    relevance in a conserving pass either, since its output is 0). This is the rule
    :func:`matmul_lrp0` applies to ``Q·Kᵀ`` and ``A·V``, for one element.

    ``out`` (``(..., 2·C)`` for a ``(..., C)`` relevance) takes the two halves side by side, as a
    packed GLU's first Linear lays out gate and value; its two views are returned.

    Examples
    --------
    >>> product_half(torch.tensor([2.0, -1.0]))
    (tensor([ 1.0000, -0.5000]), tensor([ 1.0000, -0.5000]))
    >>> packed = torch.empty(4)
    >>> _ = product_half(torch.tensor([2.0, -1.0]), out=packed); packed
    tensor([ 1.0000, -0.5000,  1.0000, -0.5000])
    """
    if out is None:
        half = relevance * 0.5
        return half, half.clone()
    first, second = out.chunk(2, dim=-1)
    torch.mul(relevance, 0.5, out=first)
    second.copy_(first)
    return first, second


# -- AttnLRP / CP-LRP (Achtibat et al., ICML 2024; Ali et al., ICML 2022) -----------------------------
# These rules run inside one modified backward pass: relevance is gradient × input, and each rule
# changes only how the gradient crosses one operation, so that ``x ⊙ ∂y/∂x`` at any tensor is the
# relevance the rule gives it. Linear maps (and sums, rotations, scales by constants) need no change:
# gradient × input through them is the ε-rule with the bias taking its share (ε → 0; divisions by
# zero cannot occur because nothing is divided). :mod:`vitlens.capture.attnlrp` applies these to
# the torch operations a model calls.

class _ScaleGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, factor: float) -> torch.Tensor:  # type: ignore[override]
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return grad * ctx.factor, None


def scale_gradient(x: torch.Tensor, factor: float) -> torch.Tensor:
    """``x`` unchanged in the forward pass; its gradient multiplied by ``factor``."""
    return _ScaleGradient.apply(x, factor)


def uniform_product(op, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The uniform rule for a product of two activations ``op(a, b)`` (``@`` or ``*``): each operand
    gets half of the product's relevance (AttnLRP, Eq. 7).

    A product is homogeneous of degree 2, so gradient × input gives each operand the *whole*
    relevance (the two shares sum to twice the product's); halving both gradients makes the
    shares sum to it exactly.

    Examples
    --------
    >>> a = torch.tensor([2.0], requires_grad=True); b = torch.tensor([3.0], requires_grad=True)
    >>> y = uniform_product(torch.mul, a, b); y.backward()
    >>> (a * a.grad).item(), (b * b.grad).item()   # each gets half of y = 6
    (3.0, 3.0)
    """
    return op(scale_gradient(a, 0.5), scale_gradient(b, 0.5))


class _IdentityRule(torch.autograd.Function):
    @staticmethod
    def forward(ctx, fn, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        y = fn(x)
        ctx.save_for_backward(safe_div(y.detach().clone(), x.detach()))
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        (ratio,) = ctx.saved_tensors
        return None, grad * ratio


def identity_rule(fn, x: torch.Tensor) -> torch.Tensor:
    """``fn(x)`` for an element-wise function, with the identity rule: ``R_x = R_y`` (AttnLRP, Eq. 9).

    In gradient × input the gradient crossing ``fn`` becomes ``∂y · y/x`` (0 where ``x = 0``).

    Examples
    --------
    >>> x = torch.tensor([-1.0, 2.0], requires_grad=True)
    >>> y = identity_rule(torch.nn.functional.gelu, x); y.sum().backward()
    >>> torch.allclose(x * x.grad, y.detach())   # each element keeps its output's relevance
    True
    """
    return _IdentityRule.apply(fn, x)


def held_layer_norm(x: torch.Tensor, normalized_shape, weight=None, bias=None, eps: float = 1e-5) -> torch.Tensor:
    """LayerNorm with its standard deviation held constant: the identity rule for the division;
    the centring is a linear map (gradient × input). The value equals ``F.layer_norm``.

    Examples
    --------
    >>> x = torch.randn(2, 5)
    >>> torch.allclose(held_layer_norm(x, (5,)), torch.nn.functional.layer_norm(x, (5,)), atol=1e-6)
    True
    """
    dims = tuple(range(-len(normalized_shape), 0))
    centred = x - x.mean(dims, keepdim=True)
    std = (centred.detach().pow(2).mean(dims, keepdim=True) + eps).sqrt()
    y = centred / std
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y


def held_rms_norm(x: torch.Tensor, normalized_shape, weight=None, eps: float | None = None) -> torch.Tensor:
    """RMSNorm with its root-mean-square held constant (identity rule); the value equals ``F.rms_norm``."""
    dims = tuple(range(-len(normalized_shape), 0))
    eps = torch.finfo(x.dtype).eps if eps is None else eps
    y = x / (x.detach().pow(2).mean(dims, keepdim=True) + eps).sqrt()
    return y if weight is None else y * weight


def held_normalize(x: torch.Tensor, p: float = 2.0, dim: int = 1, eps: float = 1e-12) -> torch.Tensor:
    """``x / ‖x‖`` with the norm held constant (cosine attention, cosine similarities): identity rule.

    Gradient × input through a scale-invariant map is zero, so without holding the norm every
    relevance crossing it would be lost.
    """
    return x / x.detach().norm(p=p, dim=dim, keepdim=True).clamp_min(eps)
