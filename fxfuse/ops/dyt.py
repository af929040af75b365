"""``torch.ops.fxfuse.dyt``: Dynamic Tanh, ``tanh(alpha * x) * weight + bias``, whose backward
recomputes ``tanh(alpha * x)`` from x instead of keeping it (one activation less per layer).

Forward and backward run the ops eager runs, in its dtypes (gradients reduced with
``sum_to_size`` and cast to each input's dtype, as autograd does), so results are eager's."""
from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import Tensor

from fxfuse.spec_dyt import DyTSpec


@functools.lru_cache(maxsize=64)
def _spec(text: str) -> DyTSpec:
    return DyTSpec.from_json(text)


def _forward(x, alpha, weight, bias):
    t = torch.tanh(alpha * x)
    y = t * weight if weight is not None else t
    return (y + bias if bias is not None else y), t


@torch.library.custom_op("fxfuse::dyt", mutates_args=())
def dyt(x: Tensor, alpha: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], spec: str) -> Tensor:
    return _forward(x, alpha, weight, bias)[0].contiguous()


@dyt.register_fake
def _(x, alpha, weight, bias, spec):
    return x.new_empty(x.shape, dtype=getattr(torch, _spec(spec).out_dtype))


@torch.library.custom_op("fxfuse::dyt_backward", mutates_args=())
def dyt_backward(grad: Tensor, x: Tensor, alpha: Tensor, weight: Optional[Tensor], spec: str) -> list[Tensor]:
    """[d_x, d_alpha] (+ [d_weight]); the bias's gradient needs none of the saved tensors."""
    t = torch.tanh(alpha * x)
    out = []
    d_t = grad * weight if weight is not None else grad
    d_u = torch.ops.aten.tanh_backward(d_t, t)
    d_x = (d_u * alpha).sum_to_size(x.shape).to(x.dtype)
    d_alpha = (d_u * x).sum_to_size(alpha.shape).to(alpha.dtype)
    out = [d_x.contiguous(), d_alpha.contiguous()]
    if weight is not None:
        out.append((grad * t).sum_to_size(weight.shape).to(weight.dtype).contiguous())
    return out


@dyt_backward.register_fake
def _(grad, x, alpha, weight, spec):
    return [x.new_empty(x.shape), alpha.new_empty(alpha.shape)] + ([weight.new_empty(weight.shape)] if weight is not None else [])


def _setup(ctx, inputs, output):
    x, alpha, weight, bias, spec = inputs
    ctx.save_for_backward(x, alpha, weight)  # not the bias: its gradient is a sum of grad alone
    ctx.spec = spec
    ctx.bias = None if bias is None else (bias.shape, bias.dtype)


def _backward(ctx, grad):
    x, alpha, weight = ctx.saved_tensors
    grads = torch.ops.fxfuse.dyt_backward(grad, x, alpha, weight, ctx.spec)
    d_x, d_alpha = grads[0], grads[1]
    d_w = grads[2] if weight is not None else None
    d_b = grad.sum_to_size(ctx.bias[0]).to(ctx.bias[1]) if ctx.bias is not None else None
    return d_x, d_alpha, d_w, d_b, None


dyt.register_autograd(_backward, setup_context=_setup)
