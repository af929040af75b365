"""Fast CPU paths of ``fxfuse.attention`` for specs that are SDPA's but for one thing ATen's fused
CPU attention does not take, which is moved outside it:

- **attention sinks** (gpt-oss): ATen's flash CPU attention gives the output without the sink and
  each row's log-sum-exp ``lse``; the sink ``c`` only rescales the row, by the keys' share of the
  sum, ``l / (l + e^c) = sigmoid(lse - c)`` (forward only: the backward is the torch formula);
- **factor tensors that act per query row** (SSMax's ``log(n)``, a per-head temperature), given as
  ``(.., Lq|1, 1)`` tensors and applied before any mask or bias: ``(q k^T) * f = (q * f) k^T`` row by
  row, so SDPA runs on ``q * f`` (or ``q / f``), and the backward's dq is SDPA's times ``f``.

Each returns None where it does not apply (the operator then runs the torch reference). Moving a
factor onto q rounds ``q * f`` once in q's dtype where the user's code rounded ``s * f``: the same
error size, checked against float64 in tests/passes/test_attention_variant_kernels.py.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from fxfuse.ops.attention import _addend, _heads, _mask_of, _sdpa, _sdpa_backward, _sdpa_exact_on, _sdpa_form
from fxfuse.spec import to_dtype
from fxfuse.spec_attention import AttentionSpec


def _sinks_form(spec: AttentionSpec):
    """(scale, mask step) when the spec is SDPA's with a sink column as its last input."""
    if spec.sinks < 0 or spec.sinks != len(spec.inputs) - 1 or spec.safe_softmax or spec.normalizer != "softmax":
        return None
    return _sdpa_form(dataclasses.replace(spec, sinks=-1, inputs=spec.inputs[:-1]))


def sdpa_sinks(spec: AttentionSpec, form, q, k, v, extras) -> Tensor:
    """The site with sinks from ATen's flash CPU attention and its log-sum-exp. A row whose every
    key is hidden is 0 there, as in the user's softmax over the joined row (the sink takes it all)."""
    scale, step = form
    shape4 = (*q.shape[:2], q.shape[-2], k.shape[-2])
    mask, causal = None, False
    if step is not None and step.op == "add":
        mask = _addend(step, extras, shape4, q.device).to(q.dtype)
    elif step is not None and step.causal and not step.window and not step.invert and q.shape[-2] == k.shape[-2]:
        causal = True
    elif step is not None:
        hidden = _mask_of(step, extras, shape4, q.device)
        mask = torch.zeros(hidden.shape, dtype=q.dtype, device=q.device).masked_fill(hidden, float("-inf"))
    if mask is not None and mask.dim() < 2:
        mask = mask.reshape((1,) * (2 - mask.dim()) + tuple(mask.shape))
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, _heads(k, spec), _heads(v, spec), 0.0, causal, attn_mask=mask, scale=scale)
    share = torch.sigmoid(lse.unsqueeze(-1) - extras[spec.sinks].float())  # the keys' share of the row's sum
    return (out.float() * share).to(out.dtype)


def _row_factors(spec: AttentionSpec, extras: list[Tensor]):
    """(the spec without its row factors, [(op, factor)]) when every factor tensor step comes
    before any mask, bias or tanh, acts per query row (last dim 1, or 0-dim), has the scores'
    dtype and is finite, and the rest is SDPA's form; else None."""
    factors, rest, before = [], [], True
    for step in spec.steps:
        if step.op in ("mul", "div") and step.input >= 0:
            t = extras[step.input]
            if not before or (t.dim() and t.shape[-1] != 1) or t.dtype != to_dtype(spec.score_dtype) or \
                    not torch.isfinite(t).all():
                return None
            factors.append((step.op, t))
        else:
            before = before and step.op in ("mul", "div", "cast")
            rest.append(step)
    if not factors or spec.sinks >= 0 or spec.normalizer != "softmax":
        return None
    spec = dataclasses.replace(spec, steps=tuple(rest))
    return (spec, factors) if _sdpa_form(spec) is not None else None


def _scaled_q(q: Tensor, factors) -> Tensor:
    for op, t in factors:
        q = q * t if op == "mul" else q / t
    return q


def forward(spec: AttentionSpec, q, k, v, extras) -> Tensor | None:
    """The output by one of the fast paths above, or None."""
    if q.device.type != "cpu":
        return None
    form = _sinks_form(spec)
    if form is not None:
        if _sdpa_exact_on(form, q, k, v, extras) and torch.isfinite(extras[spec.sinks]).all():
            return sdpa_sinks(spec, form, q, k, v, extras)
        return None
    rows = _row_factors(spec, extras)
    if rows is None:
        return None
    rest, factors = rows
    q = _scaled_q(q, factors)
    form = _sdpa_form(rest)
    return _sdpa(rest, form, q, k, v, extras) if _sdpa_exact_on(form, q, k, v, extras) else None


def backward(spec: AttentionSpec, grad_out, q, k, v, extras) -> list[Tensor] | None:
    """[dq, dk, dv, *empty] for per-row factors that need no gradient, by ATen's fused CPU backward
    on the scaled q; None where it does not apply."""
    rows = _row_factors(spec, extras)
    if rows is None:
        return None
    rest, factors = rows
    grads = _sdpa_backward(rest, grad_out, _scaled_q(q, factors), k, v, extras, [False] * len(extras))
    if grads is None:
        return None
    grads[0] = _scaled_q(grads[0], factors)  # d(q * f)/dq = f, d(q / f)/dq = 1 / f
    return grads
