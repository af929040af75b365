"""PolyNorm on a CPU, float32/float64: the row statistics as dot products and the output
accumulated in place, so a call makes two row-sized tensors where eager makes about twenty (on a
CPU, eager's time goes into allocating and first touching those). Its backward keeps x alone and
computes the gradient in closed form (``_backward``). It reassociates the scalar factors
(``(w * r) * u`` for ``w * (u * r)``, ``||u||^2 / n`` for ``mean(u ** 2)``): within the tolerance table
of float32, not eager's bits, so 16-bit inputs (whose every rounding the user's code fixes) run the
reference instead (``fxfuse.ops.polynorm.reference``)."""
from __future__ import annotations

import torch
from torch import Tensor

from fxfuse.spec_polynorm import PolyNormSpec


def applies(x: Tensor, weights: list[Tensor], bias: Tensor) -> bool:
    return x.dtype in (torch.float32, torch.float64) and all(t.dtype == x.dtype for t in (*weights, bias)) \
        and x.device.type == "cpu"


def _powers(x: Tensor) -> dict[int, Tensor]:
    x2 = x * x
    return {1: x, 2: x2, 3: x2 * x}  # (x * x) * x: ATen's pow(x, 3) in float32 computes the same


def _factors(s: PolyNormSpec, us: dict[int, Tensor]) -> dict[int, Tensor]:
    """rsqrt(mean(u ** 2) + eps) per row, for each power (a (rows, 1) tensor)."""
    n = us[1].shape[-1]
    # ||u||^2 / n: one read of u and no temporary (vecdot and (u * u).sum make a row-sized one)
    return {p: torch.rsqrt(torch.linalg.vector_norm(us[p], dim=-1, keepdim=True).square_().div_(n).add_(s.eps))
            for p in s.powers}


def forward(s: PolyNormSpec, x: Tensor, weights: list[Tensor], bias: Tensor) -> Tensor:
    us = _powers(x)
    r = _factors(s, us)
    y = None
    for p, w in zip(s.powers, weights):
        c = r[p] * w
        if y is None:
            y = us[3].mul_(c) if p == 3 else us[p] * c  # x^3 is not needed again: its buffer is the output
        else:
            y.addcmul_(us[p], c)
    return y.add_(bias)


def _backward(s: PolyNormSpec, g: Tensor, x: Tensor, weights: list[Tensor], bias: Tensor) -> list[Tensor]:
    """[d_x, d_w..., d_bias]. With c = w r and n = u r: dL/dw = sum(g n) = sum(r (g . u)); du = c g - k u
    with k = w r^3 mean(g u) per row; dx = du_1 + 2 x du_2 + 3 x^2 du_3, gathered as
    g (c1 + 2 c2 x + 3 c3 x^2) - (k1 x + 2 k2 x^3 + 3 k3 x^5)."""
    us = _powers(x)
    r = _factors(s, us)
    n = x.shape[-1]
    c, k, d_w = {}, {}, []
    for p, w in zip(s.powers, weights):
        gu = torch.linalg.vecdot(g, us[p]).unsqueeze(-1)
        d_w.append((r[p] * gu).sum().reshape(w.shape))
        c[p], k[p] = r[p] * w, w * r[p] ** 3 * gu / n
    d_x = torch.addcmul(c[1], x, c[2], value=2.0).addcmul_(us[2], c[3], value=3.0).mul_(g)
    d_x.addcmul_(x, k[1], value=-1.0)
    d_x.sub_(torch.addcmul(2.0 * k[2], us[2], k[3], value=3.0).mul_(us[3]))
    return [d_x, *d_w, g.sum().reshape(bias.shape)]


class _PolyNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bias, spec, *weights):
        ctx.save_for_backward(x, bias, *weights)
        ctx.spec = spec
        return forward(spec, x, list(weights), bias)

    @staticmethod
    def backward(ctx, grad):
        x, bias, *weights = ctx.saved_tensors
        d_x, *rest = _backward(ctx.spec, grad.contiguous(), x, weights, bias)
        return d_x, rest[-1], None, *rest[:-1]


def call(s: PolyNormSpec, x: Tensor, weights: list[Tensor], bias: Tensor) -> Tensor:
    """The CPU path with autograd (fxfuse.cpu_calls): this form where it applies."""
    return _PolyNorm.apply(x, bias, s, *weights)
