"""``torch.ops.fxfuse.polynorm``: PolyNorm's three RMS norms of x, x^2 and x^3, weighted and
summed, in one operator: its Triton kernel reads the row once and computes the three statistics
together, forward and backward (the backward recomputes them from x: nothing but x is saved).

On a CPU, float32/float64 run ``fxfuse.ops.polynorm_cpu`` (two row-sized tensors a call, a
closed-form backward), other dtypes the spec's reference: the user's ops in the user's order and
dtype, so they compute what eager computes, bit for bit."""
from __future__ import annotations

import functools

import torch
from torch import Tensor

from fxfuse import config
from fxfuse.ops import polynorm_cpu
from fxfuse.spec import to_dtype
from fxfuse.spec_polynorm import PolyNormSpec


@functools.lru_cache(maxsize=256)
def _spec(text: str) -> PolyNormSpec:
    return PolyNormSpec.from_json(text)


def _use_triton(x: Tensor) -> bool:
    from fxfuse.runtime.norm import MAX_ROW

    if x.shape[-1] > MAX_ROW:
        return False
    return x.is_cuda or (x.device.type == "cpu" and config.interpret_on_cpu())


def reference(s: PolyNormSpec, x: Tensor, weights: list[Tensor], bias: Tensor) -> Tensor:
    """The user's computation: each power normalized over the last dim, weighted, added in order.
    Without autograd the temporaries are reused in place (the same ops, so the same roundings, and
    a third of eager's allocations)."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in (x, *weights, bias)):
        return differentiable_reference(s, x, weights, bias)
    y = None
    for p, w in zip(s.powers, weights):
        u = x if p == 1 else x.pow(p)
        ms = u.pow(2).mean(-1, keepdim=True).add_(s.eps)
        n = u * ms.rsqrt_() if s.inverse == "rsqrt" else u / ms.sqrt_()
        n = torch.mul(w, n, out=n) if n.dtype == torch.result_type(w, n) else w * n
        y = n if y is None else y.add_(n)
    return y.add_(bias) if y.dtype == torch.result_type(y, bias) else y + bias


def differentiable_reference(s: PolyNormSpec, x: Tensor, weights: list[Tensor], bias: Tensor) -> Tensor:
    """``reference`` with out-of-place ops only: what autograd differentiates. The form the backend
    traces for AOTAutograd (fxfuse.inductor) on fake tensors, whose requires_grad does not say
    whether a gradient will flow (``reference``'s in-place ``out=`` branch crashed AOTAutograd)."""
    y = None
    for p, w in zip(s.powers, weights):
        u = x if p == 1 else x.pow(p)
        ms = u.pow(2).mean(-1, keepdim=True) + s.eps
        n = u * torch.rsqrt(ms) if s.inverse == "rsqrt" else u / torch.sqrt(ms)
        y = w * n if y is None else y + w * n
    return y + bias


def reference_backward(s: PolyNormSpec, grad: Tensor, x: Tensor, weights: list[Tensor], bias: Tensor) -> list[Tensor]:
    """[d_x, d_w for each term, d_bias] by the formulas the backward kernel uses, in its accumulator."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    xa, g = x.to(acc), grad.to(acc)
    d_x = torch.zeros_like(xa)
    d_w = []
    for p, w in zip(s.powers, weights):
        u = xa ** p
        r = torch.rsqrt(u.pow(2).mean(-1, keepdim=True) + s.eps)
        n = u * r
        d_w.append((g * n).sum().reshape(w.shape).to(w.dtype))
        gn = g * w.to(acc)
        d_u = r * (gn - n * (gn * n).mean(-1, keepdim=True))
        d_x = d_x + (d_u if p == 1 else d_u * p * xa ** (p - 1))
    return [d_x.to(x.dtype), *d_w, g.sum().reshape(bias.shape).to(bias.dtype)]


def _check(s: PolyNormSpec, x: Tensor, weights: list[Tensor], bias: Tensor) -> None:
    if len(weights) != len(s.powers) or any(w.numel() != 1 for w in [*weights, bias]):
        raise ValueError(f"fxfuse.polynorm takes {len(s.powers)} one-element weights and a one-element bias; got "
                         f"shapes {[list(w.shape) for w in weights]} and {list(bias.shape)}")


@torch.library.custom_op("fxfuse::polynorm", mutates_args=())
def polynorm(x: Tensor, weights: list[Tensor], bias: Tensor, spec: str) -> Tensor:
    s = _spec(spec)
    _check(s, x, weights, bias)
    if _use_triton(x):
        from fxfuse.runtime import polynorm as kernels

        return kernels.forward(s, x, weights, bias)
    if polynorm_cpu.applies(x, weights, bias):
        return polynorm_cpu.forward(s, x.contiguous(), weights, bias)
    return reference(s, x, weights, bias).contiguous()


@polynorm.register_fake
def _(x, weights, bias, spec):
    return torch.empty(x.shape, dtype=to_dtype(_spec(spec).dtype), device=x.device)


@torch.library.custom_op("fxfuse::polynorm_backward", mutates_args=())
def polynorm_backward(grad: Tensor, x: Tensor, weights: list[Tensor], bias: Tensor, spec: str) -> list[Tensor]:
    s = _spec(spec)
    if _use_triton(x):
        from fxfuse.runtime import polynorm as kernels

        return kernels.backward(s, grad, x, weights, bias)
    if polynorm_cpu.applies(x, weights, bias):
        return polynorm_cpu._backward(s, grad.contiguous(), x.contiguous(), weights, bias)
    return [t.contiguous() for t in reference_backward(s, grad, x, weights, bias)]


@polynorm_backward.register_fake
def _(grad, x, weights, bias, spec):
    return [torch.empty(x.shape, dtype=x.dtype, device=x.device), *(torch.empty_like(w) for w in weights),
            torch.empty_like(bias)]


def _setup(ctx, inputs, output):
    x, weights, bias, spec = inputs
    ctx.save_for_backward(x, bias, *weights)  # x alone of the activations: the statistics are recomputed
    ctx.spec, ctx.interpret = spec, config.current.interpret


def _backward(ctx, grad):
    x, bias, *weights = ctx.saved_tensors
    with config.patch(interpret=ctx.interpret):
        d_x, *rest = torch.ops.fxfuse.polynorm_backward(grad.contiguous(), x, weights, bias, ctx.spec)
    return d_x, rest[:-1], rest[-1], None


polynorm.register_autograd(_backward, setup_context=_setup)
