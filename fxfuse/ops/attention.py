"""``torch.ops.fxfuse.attention``: ``softmax(steps(q @ k^T)) @ v`` as one operator.

q, k, v are ``(B, H, L, D)`` (any strides; k and v may have H / kv_groups heads); the extra
tensors (boolean masks, additive masks and biases, factor tensors) broadcast to the scores'
``(B, H, Lq, Lk)`` the way they did in the user's code (aligned on the right); masks and biases
given as index expressions are evaluated (``fxfuse.index_expr``), with per-head inputs among the
extras. On CUDA, or on CPU
when interpretation is asked for, the generated Triton kernels run. Otherwise the CPU
implementation is ``F.scaled_dot_product_attention`` where SDPA computes exactly the spec (scalar
scales and at most one additive or -inf boolean mask, no casts; rows it leaves at zero where the
user's softmax gives NaN are set to NaN), else the plain torch reference of the spec. The backward
is a backward operator of its own (autograd is off inside custom operators): the Triton backward
kernels (which also give the gradients of additive biases) unless a factor tensor needs a
gradient, else an explicit torch formula; both recompute the probabilities.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fxfuse import config, index_expr
from fxfuse.spec import to_dtype
from fxfuse.spec_attention import AttentionSpec


def _spec(text: str) -> AttentionSpec:
    return AttentionSpec.from_json(text)


def causal_mask(lq: int, lk: int, device, window: int = 0) -> Tensor:
    """True where key j comes after query i, aligned bottom-right as the pass proved it, and with
    a ``window`` also where j is ``window`` or more keys before i."""
    i = torch.arange(lq, device=device)[:, None] + (lk - lq)
    j = torch.arange(lk, device=device)[None, :]
    return (j > i) | (j <= i - window) if window else j > i


def _expr_values(expr, extras: list[Tensor], shape4, device) -> Tensor:
    """An index expression's values, 4-d (1 along the axes it does not vary on)."""
    r = index_expr.evaluate(expr, index_expr.grids(shape4, device), extras)
    return r.reshape((1,) * (4 - r.dim()) + tuple(r.shape))


def _mask_of(step, extras: list[Tensor], shape4, device) -> Tensor:
    if step.expr is not None:
        return _expr_values(step.expr, extras, shape4, device)
    mask = causal_mask(*shape4[-2:], device, step.window) if step.input == -1 else extras[step.input]
    return ~mask if step.invert else mask


def _addend(step, extras: list[Tensor], shape4, device) -> Tensor:
    """What an "add" step adds: its bias tensor, or its index expression's values (in its dtype)."""
    if step.expr is not None:
        return _expr_values(step.expr, extras, shape4, device)
    return extras[step.input]


def _heads(kv: Tensor, spec: AttentionSpec) -> Tensor:
    """Keys or values with one head per query head (grouped-query attention repeats each)."""
    return kv.repeat_interleave(spec.kv_groups, dim=1) if spec.kv_groups > 1 else kv


def _check_heads(spec: AttentionSpec, q: Tensor, k: Tensor, v: Tensor) -> None:
    if q.shape[1] != k.shape[1] * spec.kv_groups or k.shape[1] != v.shape[1]:
        raise ValueError(f"fxfuse.attention: {q.shape[1]} query heads, {k.shape[1]} key and {v.shape[1]} value "
                         f"heads do not fit the site's {spec.kv_groups} query heads per key/value head")


def _scores(spec: AttentionSpec, q: Tensor, k: Tensor, extras: list[Tensor], acc: torch.dtype | None = None,
            record: list | None = None):
    """The scores after every step; with ``acc``, computed in that dtype without intermediate rounding.
    ``record`` receives each step's input (the backward needs them for factor tensors' gradients)."""
    k = _heads(k, spec)
    s = torch.matmul(q.to(acc) if acc else q, (k.to(acc) if acc else k).transpose(-1, -2))
    for step in spec.steps:
        if record is not None:
            record.append(s)
        if step.op in ("mul", "div"):
            factor = step.value if step.input == -1 else extras[step.input].to(acc) if acc else extras[step.input]
            s = s * factor if step.op == "mul" else s / factor
        elif step.op == "fill":
            s = s.masked_fill(_mask_of(step, extras, s.shape, s.device), step.value)
        elif step.op == "add":
            bias = _addend(step, extras, s.shape, s.device)
            s = s + (bias.to(acc) if acc else bias)
        elif step.op == "tanh":
            s = torch.tanh(s)
        if acc is None:
            s = s.to(to_dtype(step.dtype))
    return s


def reference(spec: AttentionSpec, q: Tensor, k: Tensor, v: Tensor, extras: list[Tensor]) -> Tensor:
    """The site in plain torch ops, in the dtypes (and so with the roundings) of the user's code."""
    p = torch.softmax(_scores(spec, q, k, extras), dim=-1)
    return torch.matmul(p.to(to_dtype(spec.prob_dtype)), _heads(v, spec))


def _sdpa_form(spec: AttentionSpec):
    """(scale, mask step) when SDPA computes the spec exactly, else None.

    SDPA computes softmax(q @ k^T * scale + mask) @ v in one dtype: the spec may hold scalar
    factors first, then at most one additive mask or one -inf boolean fill, and no cast.
    """
    dtypes = {spec.score_dtype, spec.prob_dtype, *(s.dtype for s in spec.steps)}
    if len(dtypes) != 1:
        return None
    scale, mask_step = 1.0, None
    for step in spec.steps:
        if step.op in ("mul", "div") and step.input == -1 and mask_step is None:
            scale = scale * step.value if step.op == "mul" else scale / step.value
        elif step.op == "add" and mask_step is None:
            mask_step = step
        elif step.op == "fill" and mask_step is None and step.value == float("-inf"):
            mask_step = step
        else:
            return None
    return scale, mask_step


def _sdpa(spec: AttentionSpec, form, q, k, v, extras) -> Tensor:
    scale, step = form
    mask, hidden = None, None
    if step is not None and step.op == "add":
        shape4 = (*q.shape[:2], q.shape[-2], k.shape[-2])
        mask = _addend(step, extras, shape4, q.device).to(q.dtype)  # exact: a wider bias would have widened the scores
        hidden = mask == float("-inf")
    elif step is not None:
        hidden = _mask_of(step, extras, (*q.shape[:2], q.shape[-2], k.shape[-2]), q.device)
        mask = ~hidden  # SDPA's boolean mask says which positions take part
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=spec.kv_groups > 1)
    if hidden is not None:
        # A row whose every score is -inf is NaN in the user's softmax; SDPA returns zeros there.
        out = out.masked_fill(hidden.all(-1, keepdim=True), float("nan"))
    return out


def _use_triton(q: Tensor, spec: AttentionSpec) -> bool:
    if "float64" in {spec.score_dtype, spec.prob_dtype}:
        return False  # tl.dot has no float64 on GPUs; the reference is exact
    return q.is_cuda or (q.device.type == "cpu" and config.interpret_on_cpu())


def _sum_to(t: Tensor, shape) -> Tensor:
    """Reduce a broadcast gradient back to the shape of the tensor that was broadcast."""
    lead = t.dim() - len(shape)
    t = t.sum(dim=tuple(range(lead))) if lead else t
    dims = tuple(i for i, n in enumerate(shape) if n == 1 and t.shape[i] != 1)
    return t.sum(dim=dims, keepdim=True) if dims else t


def reference_backward(spec: AttentionSpec, grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor,
                       extras: list[Tensor]) -> list[Tensor]:
    """[dq, dk, dv, *d_extras] (masks get an empty gradient), recomputing the probabilities.

    ``dS = P * (dP - rowsum(dP * P))`` with ``dP = dO @ v^T``, then back through the steps in
    reverse: factors scale it (a factor tensor gets ``dS * s_in``, reduced to its shape), fills zero
    it where they hid the score, adds pass it to their bias.
    """
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    step_inputs: list[Tensor] = []
    p = torch.softmax(_scores(spec, q, k, extras, acc, step_inputs), dim=-1)
    do = grad_out.to(acc)
    dv = torch.matmul(p.to(to_dtype(spec.prob_dtype)).to(acc).transpose(-1, -2), do)
    dp = torch.matmul(do, _heads(v, spec).to(acc).transpose(-1, -2))
    ds = p * (dp - (dp * p).sum(-1, keepdim=True))
    d_extras: list[Tensor | None] = [None] * len(extras)
    def accumulate(index: int, grad: Tensor) -> None:
        d = _sum_to(grad, extras[index].shape)
        d_extras[index] = d if d_extras[index] is None else d_extras[index] + d

    for step, s_in in zip(reversed(spec.steps), reversed(step_inputs)):
        if step.op in ("mul", "div") and step.input >= 0:
            t = extras[step.input].to(acc)
            accumulate(step.input, ds * s_in if step.op == "mul" else -ds * s_in / (t * t))
            ds = ds * t if step.op == "mul" else ds / t
        elif step.op == "mul":
            ds = ds * step.value
        elif step.op == "div":
            ds = ds / step.value
        elif step.op == "fill":
            ds = ds.masked_fill(_mask_of(step, extras, ds.shape, ds.device), 0.0)
        elif step.op == "add" and step.input >= 0:
            accumulate(step.input, ds)
        elif step.op == "tanh":
            ds = ds * (1 - torch.tanh(s_in) ** 2)
    dq = torch.matmul(ds, _heads(k, spec).to(acc))
    dk = torch.matmul(ds.transpose(-1, -2), q.to(acc))
    if spec.kv_groups > 1:  # each kv head's gradient sums over the query heads that read it
        dk, dv = (g.unflatten(1, (k.shape[1], spec.kv_groups)).sum(2) for g in (dk, dv))
    out = [dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)]
    for e, d in zip(extras, d_extras):
        if d is None:  # a boolean mask, or a per-head input of an expression (a constant: no gradient)
            out.append(torch.zeros_like(e) if e.dtype.is_floating_point else e.new_empty(0))
        else:
            out.append(d.reshape(e.shape).to(e.dtype))
    return out


# ---- operators -----------------------------------------------------------------------------------

@torch.library.custom_op("fxfuse::attention", mutates_args=())
def attention(q: Tensor, k: Tensor, v: Tensor, extras: list[Tensor], spec: str) -> Tensor:
    s = _spec(spec)
    _check_heads(s, q, k, v)
    if _use_triton(q, s):
        from fxfuse.codegen import attention as kernels

        return kernels.forward(s, q, k, v, extras)[0]
    form = _sdpa_form(s)
    out = _sdpa(s, form, q, k, v, extras) if form is not None else reference(s, q, k, v, extras)
    # Contiguous, as the fake implementation promises (SDPA's CPU kernel returns (B, L, H, D) strides).
    return out.contiguous()


@attention.register_fake
def _(q, k, v, extras, spec):
    return q.new_empty((*q.shape[:-1], v.shape[-1]), dtype=to_dtype(_spec(spec).out_dtype))


def _only_added(spec: AttentionSpec, index: int) -> bool:
    """Whether extra ``index`` is a bias: used by "add" steps and nothing else."""
    uses = [step.op for step in spec.steps if step.input == index]
    return bool(uses) and all(op == "add" for op in uses)


@torch.library.custom_op("fxfuse::attention_backward", mutates_args=())
def attention_backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, extras: list[Tensor],
                       needs_grad: list[bool], spec: str) -> list[Tensor]:
    """[dq, dk, dv, *d_extras]; an extra's gradient is computed only where ``needs_grad`` says so
    (a floating-point bias or factor that requires grad), else it is an empty tensor."""
    s = _spec(spec)
    wanted = [need and e.dtype.is_floating_point for e, need in zip(extras, needs_grad)]
    if _use_triton(q, s) and all(_only_added(s, i) for i, w in enumerate(wanted) if w):
        # The kernels compute dq, dk, dv and the biases' gradients (from the dS the dq kernel
        # writes); a factor tensor's gradient also needs each step's input, so it keeps the
        # torch formula.
        from fxfuse.codegen import attention as kernels

        dq, dk, dv, *d_extras = kernels.backward(s, grad_out, q, k, v, extras, wanted)
        grads = [dq, dk, dv, *(d if w else e.new_empty(0) for d, e, w in zip(d_extras, extras, wanted))]
    else:
        grads = reference_backward(s, grad_out, q, k, v, extras)
        grads[3:] = [d if w else e.new_empty(0) for d, e, w in zip(grads[3:], extras, wanted)]
    # Contiguous whatever the inputs' strides, as the fake implementation promises: the compiled
    # backward graph plans its views on the fake strides.
    return [g.contiguous() for g in grads]


@attention_backward.register_fake
def _(grad_out, q, k, v, extras, needs_grad, spec):
    d_extras = [e.new_empty(e.shape if need and e.dtype.is_floating_point else 0) for e, need in zip(extras, needs_grad)]
    return [q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), *d_extras]


def _setup(ctx, inputs, output):
    q, k, v, extras, spec = inputs
    ctx.save_for_backward(q, k, v, *extras)
    ctx.spec, ctx.interpret = spec, config.current.interpret
    ctx.needs_grad = [e.requires_grad for e in extras]


def _backward(ctx, grad_out):
    q, k, v, *extras = ctx.saved_tensors
    with config.patch(interpret=ctx.interpret):
        dq, dk, dv, *d_extras = torch.ops.fxfuse.attention_backward(grad_out, q, k, v, extras, ctx.needs_grad,
                                                                    ctx.spec)
    d_extras = [d if need and e.dtype.is_floating_point else None
                for d, e, need in zip(d_extras, extras, ctx.needs_grad)]
    return dq, dk, dv, d_extras, None


attention.register_autograd(_backward, setup_context=_setup)
