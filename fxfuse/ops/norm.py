"""``torch.ops.fxfuse.norm``, ``torch.ops.fxfuse.add_norm`` and ``torch.ops.fxfuse.sum_norm``: fused
normalization operators (the latter two also take the residual sum that feeds the norm).

Each has a fake implementation (shapes for tracing), an autograd formula (through a backward
operator of its own), a CPU implementation that is the exact torch reference of the spec, and a
Triton implementation generated from the spec, used on CUDA and, when asked, on CPU through
Triton's interpreter.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import Tensor

from fxfuse import config
from fxfuse.lowering.norm import lower_norm
from fxfuse.ops.optional_lists import listed
from fxfuse.spec import NormSpec, to_dtype


@functools.lru_cache(maxsize=1024)
def _spec(text: str) -> NormSpec:
    return NormSpec.from_json(text)


def _use_triton(t: Tensor, spec: NormSpec) -> bool:
    from fxfuse.runtime.norm import MAX_ROW

    if t.shape[-1] > MAX_ROW:
        return False
    return t.is_cuda or (t.device.type == "cpu" and config.interpret_on_cpu())


def laid_out_like(out: Tensor, x: Tensor) -> Tensor:
    """``out`` with the strides of ``torch.empty_like(x)``, which the fake implementations promise:
    the input's own for a dense input (a channels-last or head-transposed activation), contiguous
    otherwise. As it is when it has them, else copied (the kernels write rows contiguously)."""
    if out.stride() == x.stride() and x.is_contiguous():  # empty_like keeps a dense x's strides
        return out
    want = torch.empty_like(x, device="meta").stride()
    if out.stride() == want:
        return out
    return torch.empty_like(x, dtype=out.dtype).copy_(out)


def _prepared(p: Tensor, prep) -> Tensor:
    p = p.reshape(-1).to(to_dtype(prep.dtype))
    return p + prep.offset if prep.offset else p


def reference(spec: NormSpec, src: Tensor, params: list[Tensor]) -> Tensor:
    """The site's computation in plain torch ops, in the dtypes the user's code used."""
    xc = src.to(to_dtype(spec.compute_dtype))
    if spec.inverse == "max_l2":  # F.normalize: the same ops, so the same roundings
        n = (xc / torch.linalg.vector_norm(xc, 2, -1, keepdim=True).clamp_min(spec.eps)).to(to_dtype(spec.norm_dtype))
        return _steps(spec, n * spec.scale if spec.scale != 1.0 else n, params)
    if spec.statistic == "var_mean":
        var, mean = torch.var_mean(xc, -1, keepdim=True, correction=0)
    elif spec.statistic == "var":
        # torch.var, as the user's code: a 16-bit input is accumulated wider, only the result rounds.
        var, mean = torch.var(xc, -1, keepdim=True, correction=0), xc.mean(-1, keepdim=True)
    centered = xc if spec.kind == "rms_norm" else xc - (mean if spec.statistic != "mean" else xc.mean(-1, keepdim=True))
    if spec.statistic == "mean":
        var = (centered * centered).mean(-1, keepdim=True)
    var = var + spec.eps
    # The user's code multiplies (or divides) in the promoted dtype of its operands, norm_dtype, which
    # is at least as wide as the statistic's (T5 normalizes bf16 x by a float32 rsqrt, in float32).
    nd = to_dtype(spec.norm_dtype)
    centered = centered.to(nd)
    n = centered * torch.rsqrt(var).to(nd) if spec.inverse == "rsqrt" else centered / torch.sqrt(var).to(nd)
    return _steps(spec, n, params)


def _steps(spec: NormSpec, v: Tensor, params: list[Tensor]) -> Tensor:
    for step in spec.steps:
        if step.op == "cast":
            v = v.to(to_dtype(step.dtype))
            continue
        if step.op == "scale":  # a Python scalar times v, as the user's code: in v's dtype (its opmath)
            v = (v * step.value).to(to_dtype(step.dtype))
            continue
        p = _prepared(params[step.param], spec.params[step.param])
        v = (v * p if step.op == "mul" else v + p).to(to_dtype(step.dtype))
    return v


def _reference_backward(spec: NormSpec, grad_y: Tensor, src: Tensor, params: list[Tensor]) -> list[Tensor]:
    """[d_src, *d_params], by the formulas the backward kernel uses (autograd is off inside ops)."""
    acc = torch.float64 if lower_norm(spec).acc == "float64" else torch.float32
    x = src.to(acc)
    centered = x if spec.kind == "rms_norm" else x - x.mean(-1, keepdim=True)
    if spec.inverse == "max_l2":
        # n = x / m, m = max(||x||, eps): dx = (g - [||x|| >= eps] n sum(g n)) / m (clamp_min passes
        # the gradient where the norm is not below eps, as torch's does).
        norm = torch.linalg.vector_norm(x, 2, -1, keepdim=True)
        rstd, through = 1.0 / norm.clamp_min(spec.eps), (norm >= spec.eps).to(acc)
    else:
        rstd = torch.rsqrt((centered * centered).mean(-1, keepdim=True) + spec.eps)
    n = centered * rstd
    preps = [_prepared(p, prep).to(acc) for p, prep in zip(params, spec.params)]
    values = [(n.to(to_dtype(spec.norm_dtype)).to(acc) * spec.scale).to(to_dtype(spec.norm_dtype)).to(acc)]
    for step in spec.steps:
        v = values[-1]
        if step.op == "scale":
            v = v * step.value
        elif step.op != "cast":
            v = v * preps[step.param] if step.op == "mul" else v + preps[step.param]
        values.append(v.to(to_dtype(step.dtype)).to(acc))
    g = grad_y.to(acc).reshape(-1, x.shape[-1])
    x_shape = x.shape
    n, rstd = n.reshape(g.shape), rstd.reshape(-1, 1)
    through = through.reshape(-1, 1) if spec.inverse == "max_l2" else None
    values = [v.reshape(g.shape) for v in values]
    rows = (0,)
    d_params = [torch.zeros_like(p, dtype=acc) for p in preps]
    for k in reversed(range(len(spec.steps))):
        step = spec.steps[k]
        if step.op == "mul":
            d_params[step.param] += (g * values[k]).sum(rows)
            g = g * preps[step.param]
        elif step.op == "add":
            d_params[step.param] += g.sum(rows)
        elif step.op == "scale":
            g = g * step.value
    g = g * spec.scale
    inner = (g * n).mean(-1, keepdim=True)
    if spec.inverse == "max_l2":
        d_x = rstd * (g - through * n * (g * n).sum(-1, keepdim=True))
    elif spec.kind == "rms_norm":
        d_x = rstd * (g - n * inner)
    else:
        d_x = rstd * (g - g.mean(-1, keepdim=True) - n * inner)
    return [d_x.reshape(x_shape).to(src.dtype), *(d.reshape(p.shape).to(p.dtype) for d, p in zip(d_params, params))]


# ---- forward operators ---------------------------------------------------------------------------

# ``Tensor[]? params``: a norm without parameters reaches AOTInductor's runner as None (optional_lists).
@torch.library.custom_op("fxfuse::norm", mutates_args=(), schema="(Tensor x, Tensor[]? params, str spec) -> Tensor")
def norm(x: Tensor, params: Optional[list[Tensor]], spec: str) -> Tensor:
    s, params = _spec(spec), listed(params)
    if _use_triton(x, s):
        from fxfuse.runtime import norm as kernels

        return laid_out_like(kernels.forward(s, x, None, params)[0], x)
    return cpu_norm(s, x, params)


def _aten_layer_norm_args(s: NormSpec, x: Tensor, params: list[Tensor]) -> tuple | None:
    """(weight, bias) when ``torch.layer_norm`` computes the spec exactly, else None: a layer norm
    whose statistics, normalization and affine steps are all in the input's own float32/float64
    (``F.layer_norm`` itself, or the same math written by hand), a weight multiplied and/or a
    bias added, nothing else. ATen's fused CPU kernel then does in one pass, forward and
    backward, what the reference does in eight ops (the same math and dtype; the reductions' order
    differs, as SDPA's does from a hand-written softmax)."""
    acc = x.dtype
    plan = _layer_norm_plan(s, acc)
    if plan is None:
        return None
    found = [None, None]
    for slot, index in plan:
        p = params[index]
        if p.numel() != x.shape[-1] or p.dtype != acc:
            return None
        found[slot] = p if p.dim() == 1 else p.reshape(-1)
    return found[0], found[1]


@functools.lru_cache(maxsize=256)
def _layer_norm_plan(s: NormSpec, acc: torch.dtype) -> tuple | None:
    """What of ``_aten_layer_norm_args``'s proof the spec and the input's dtype decide, once per
    spec (it ran every call, 5-10 us of a 50 us CPU norm): ((0 weight | 1 bias, param index), ...)
    or None."""
    if s.kind != "layer_norm" or s.inverse != "rsqrt" or s.scale != 1.0 or acc not in (torch.float32, torch.float64) \
            or to_dtype(s.compute_dtype) != acc or to_dtype(s.norm_dtype) != acc or len(s.steps) > 2:
        return None
    found: dict[str, int] = {}
    for step in s.steps:
        prep = s.params[step.param] if step.op in ("mul", "add") else None
        if prep is None or to_dtype(step.dtype) != acc or to_dtype(prep.dtype) != acc or prep.offset \
                or step.op in found or (step.op == "mul" and "add" in found):
            return None
        found[step.op] = step.param
    return tuple((0 if op == "mul" else 1, index) for op, index in found.items())


def cpu_norm(s: NormSpec, x: Tensor, params: list[Tensor], contiguous: bool = False) -> Tensor:
    """The CPU implementation (also called outside the operator, with autograd: fxfuse.cpu_calls);
    ``contiguous``: the output contiguous instead of in the operator's promised layout (for a site
    whose graph copies it to contiguous next: ``F.layer_norm`` on a transposed view)."""
    affine = _aten_layer_norm_args(s, x, params)
    y = reference(s, x, params) if affine is None else torch.layer_norm(x, (x.shape[-1],), *affine, s.eps)
    return y.contiguous() if contiguous else laid_out_like(y, x)


@norm.register_fake
def _(x, params, spec):
    return torch.empty_like(x, dtype=to_dtype(_spec(spec).out_dtype))


@torch.library.custom_op("fxfuse::add_norm", mutates_args=(),
                         schema="(Tensor x, Tensor residual, Tensor[]? params, str spec) -> (Tensor, Tensor)")
def add_norm(x: Tensor, residual: Tensor, params: Optional[list[Tensor]], spec: str) -> tuple[Tensor, Tensor]:
    s, params = _spec(spec), listed(params)
    if _use_triton(x, s):
        from fxfuse.runtime import norm as kernels

        y, total = kernels.forward(s, x, residual, params)
        return laid_out_like(y, x), laid_out_like(total, x)
    return cpu_add_norm(s, x, residual, params)


def cpu_add_norm(s: NormSpec, x: Tensor, residual: Tensor, params: list[Tensor]) -> tuple[Tensor, Tensor]:
    """The CPU implementation (also called outside the operator, with autograd: fxfuse.cpu_calls)."""
    total = (x + residual).to(to_dtype(s.sum_dtype))
    affine = _aten_layer_norm_args(s, total, params)
    y = reference(s, total, params) if affine is None else torch.layer_norm(total, (total.shape[-1],), *affine, s.eps)
    return laid_out_like(y, x), laid_out_like(total, x)


@add_norm.register_fake
def _(x, residual, params, spec):
    s = _spec(spec)
    return torch.empty_like(x, dtype=to_dtype(s.out_dtype)), torch.empty_like(x, dtype=to_dtype(s.sum_dtype))


@torch.library.custom_op("fxfuse::sum_norm", mutates_args=(),
                         schema="(Tensor[] terms, Tensor[]? params, str spec) -> (Tensor, Tensor)")
def sum_norm(terms: list[Tensor], params: Optional[list[Tensor]], spec: str) -> tuple[Tensor, Tensor]:
    """The norm of ``sum(c_i * terms[i])`` (the constants c_i are the spec's ``sum_scales``), and that sum.
    The terms the spec's ``sum_tensor_scales`` names are scaled by 0-d tensors instead, which follow
    the terms in ``terms``."""
    s, params = _spec(spec), listed(params)
    if _use_triton(terms[0], s):
        from fxfuse.runtime import norm as kernels

        y, total = kernels.forward_sum(s, terms, params)
        return laid_out_like(y, terms[0]), laid_out_like(total, terms[0])
    return cpu_sum_norm(s, terms, params)


def split_terms(s: NormSpec, terms: list) -> tuple[list, dict]:
    """(the terms, {term index: its 0-d tensor scale}) of ``fxfuse.sum_norm``'s ``terms`` argument."""
    k = len(s.sum_scales)
    return list(terms[:k]), dict(zip(s.sum_tensor_scales, terms[k:]))


def scaled_sum(s: NormSpec, terms: list[Tensor]) -> Tensor:
    """The user's sum, op by op: each term times its constant, added left to right (the same
    roundings as the user's code, whose products and partial sums all have the sum's dtype). Without
    autograd, the partial sums accumulate in place (the same roundings, one tensor less per term)."""
    in_place = not (torch.is_grad_enabled() and any(t.requires_grad for t in terms))
    terms, tensor = split_terms(s, terms)
    total = None
    for i, (t, c) in enumerate(zip(terms, s.sum_scales)):
        t = t * tensor[i] if i in tensor else t * c if c != 1.0 else t
        if total is None:
            total = t
        elif in_place and total._base is None and all(total is not u for u in terms):  # a tensor of our own
            total.add_(t)
        else:
            total = total + t
    return total.to(to_dtype(s.sum_dtype))


def cpu_sum_norm(s: NormSpec, terms: list[Tensor], params: list[Tensor]) -> tuple[Tensor, Tensor]:
    """The CPU implementation (also called outside the operator, with autograd: fxfuse.cpu_calls)."""
    total = scaled_sum(s, terms)
    affine = _aten_layer_norm_args(s, total, params)
    y = reference(s, total, params) if affine is None else torch.layer_norm(total, (total.shape[-1],), *affine, s.eps)
    return laid_out_like(y, terms[0]), laid_out_like(total, terms[0])


@sum_norm.register_fake
def _(terms, params, spec):
    s = _spec(spec)
    x = terms[0]
    return torch.empty_like(x, dtype=to_dtype(s.out_dtype)), torch.empty_like(x, dtype=to_dtype(s.sum_dtype))


# ---- backward operator ---------------------------------------------------------------------------

@torch.library.custom_op("fxfuse::norm_backward", mutates_args=())
def norm_backward(grad_y: Tensor, grad_sum: Optional[Tensor], src: Tensor, params: list[Tensor], spec: str) -> list[Tensor]:
    """Gradients [d_src, *d_params] of a norm whose input was ``src``; ``grad_sum`` adds to d_src."""
    s = _spec(spec)
    if _use_triton(src, s):
        from fxfuse.runtime import norm as kernels

        d_src, d_params = kernels.backward(s, grad_y, grad_sum, src, params)
    else:
        d_src, *d_params = _reference_backward(s, grad_y, src, params)
        if grad_sum is not None:
            d_src = d_src + grad_sum
    # In the layouts the fake promises: AOTAutograd plans the backward graph's views on them.
    return [laid_out_like(d_src, src), *(laid_out_like(d, p) for d, p in zip(d_params, params))]


@norm_backward.register_fake
def _(grad_y, grad_sum, src, params, spec):
    return [torch.empty_like(src), *(torch.empty_like(p) for p in params)]


# ---- autograd ------------------------------------------------------------------------------------

def _setup_norm(ctx, inputs, output):
    x, params, spec = inputs
    ctx.save_for_backward(x, *listed(params))
    ctx.spec, ctx.interpret = spec, config.current.interpret


def _backward_norm(ctx, grad_y):
    x, *params = ctx.saved_tensors
    with config.patch(interpret=ctx.interpret):
        d_x, *d_params = torch.ops.fxfuse.norm_backward(grad_y, None, x, params, ctx.spec)
    return d_x.to(x.dtype), d_params, None


def _setup_add_norm(ctx, inputs, output):
    x, residual, params, spec = inputs
    # Save the sum (an output anyway, kept alive by the residual stream) rather than both inputs.
    ctx.save_for_backward(output[1], *listed(params))
    ctx.spec, ctx.interpret = spec, config.current.interpret
    ctx.dtypes = (x.dtype, residual.dtype)


def _backward_add_norm(ctx, grad_y, grad_sum):
    total, *params = ctx.saved_tensors
    if grad_y is None:
        grad_y = torch.zeros_like(total, dtype=to_dtype(_spec(ctx.spec).out_dtype))
    with config.patch(interpret=ctx.interpret):
        d_total, *d_params = torch.ops.fxfuse.norm_backward(grad_y, grad_sum, total, params, ctx.spec)
    return d_total.to(ctx.dtypes[0]), d_total.to(ctx.dtypes[1]), d_params, None


def _setup_sum_norm(ctx, inputs, output):
    terms, params, spec = inputs
    s = _spec(spec)
    _, tensor = split_terms(s, terms)
    # The sum: one tensor, whatever the number of terms; with 0-d tensor scales also those scales and
    # their terms (alpha's gradient is sum(d_sum * x); x is the residual stream, alive anyway).
    scaled = [t for i in s.sum_tensor_scales for t in (terms[i], tensor[i])]
    ctx.save_for_backward(output[1], *scaled, *listed(params))
    ctx.spec, ctx.interpret = spec, config.current.interpret
    ctx.dtypes = [t.dtype for t in terms]
    ctx.n_scaled = len(scaled)


def _backward_sum_norm(ctx, grad_y, grad_sum):
    total, *rest = ctx.saved_tensors
    scaled, params = rest[:ctx.n_scaled], rest[ctx.n_scaled:]
    s = _spec(ctx.spec)
    if grad_y is None:
        grad_y = torch.zeros_like(total, dtype=to_dtype(s.out_dtype))
    with config.patch(interpret=ctx.interpret):
        d_total, *d_params = torch.ops.fxfuse.norm_backward(grad_y, grad_sum, total, params, ctx.spec)
    # A scaled term's gradient is the sum's times its scale, in the gradient's dtype (as eager's mul);
    # a 0-d tensor scale's is sum(d_sum * term), accumulated in float32 (float64 for float64).
    tensor = {i: scaled[2 * j + 1] for j, i in enumerate(s.sum_tensor_scales)}
    d_terms = [(d_total * tensor[i] if i in tensor else d_total * c if c != 1.0 else d_total).to(dt)
               for i, (c, dt) in enumerate(zip(s.sum_scales, ctx.dtypes))]
    for j in range(len(s.sum_tensor_scales)):
        term, alpha = scaled[2 * j], scaled[2 * j + 1]
        acc = torch.float64 if alpha.dtype == torch.float64 else torch.float32
        d_terms.append((d_total.to(acc) * term.to(acc)).sum().reshape(alpha.shape).to(alpha.dtype))
    return d_terms, d_params, None


norm.register_autograd(_backward_norm, setup_context=_setup_norm)
sum_norm.register_autograd(_backward_sum_norm, setup_context=_setup_sum_norm)
add_norm.register_autograd(_backward_add_norm, setup_context=_setup_add_norm)
