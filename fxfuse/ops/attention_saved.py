"""Training on CPU under Inductor for a site whose mask is decided when it runs (``size_mask``).

At symbolic sizes the composed backend cannot inline such a site as ``is_causal`` SDPA (whether the
mask is the causal rule is known only per shape: fxfuse.ops.size_masks), so it keeps an operator.
``fxfuse::attention``'s backward reruns ATen's flash forward to get the row statistics it needs,
one attention forward more per step than Inductor's own SDPA (which saves them). This operator
returns them instead: ``(out, lse)``, saved for its backward, which calls ATen's flash backward
with them. Where this shape's mask is not the causal rule (or a value is not finite) both halves
take ``fxfuse::attention``'s exact paths.

The forward records which it took in the statistics it returns: NaN where the flash kernel did not
run. Where it ran, the first row sees a key and every operand is finite, so its statistic is finite
(but for a product that overflows, and then the backward takes the exact formula: sound either way).
The backward reads that one value instead of redoing the forward's checks (three reductions over q,
k and v).
"""
from __future__ import annotations

import torch
from torch import Tensor

from fxfuse.ops import attention as attention_op
from fxfuse.ops import size_masks

_aten = torch.ops.aten


def _flash_form(spec_text: str, q: Tensor, k: Tensor, v: Tensor, extras: list[Tensor], check_values: bool = True):
    """(spec, scale, causal) when ATen's flash kernels compute this call exactly (the mask resolved
    to the causal rule with Lq == Lk, or no mask step; one head size; finite operands), else None.
    ``check_values=False``: the operands' values are not read (the backward: the forward checked them)."""
    s, extras, _ = size_masks.resolve(attention_op._spec(spec_text), extras, q.shape[-2], k.shape[-2])
    form = attention_op._sdpa_form(s)
    if form is None or extras or q.shape[-1] != v.shape[-1] or not attention_op._every_row_sees_a_key(form, q, k):
        return None
    if check_values and not attention_op._sdpa_exact_on(form, q, k, v, extras):
        return None
    return s, form[0], form[1] is not None


def _flash_ran(lse: Tensor) -> bool:
    """Whether the forward ran ATen's flash kernel: its statistics are not the NaN it writes otherwise."""
    return lse.numel() > 0 and not bool(torch.isnan(lse.reshape(-1)[0]))


def _operands(s, q: Tensor, k: Tensor, v: Tensor):
    return tuple(t.contiguous() for t in (q, attention_op._heads(k, s), attention_op._heads(v, s)))


@torch.library.custom_op("fxfuse::attention_saved", mutates_args=())
def attention_saved(q: Tensor, k: Tensor, v: Tensor, extras: list[Tensor], spec: str) -> tuple[Tensor, Tensor]:
    """(out, lse): ``fxfuse.attention``'s output (contiguous) and, where ATen's flash kernel ran,
    its log-sum-exp per row (float32, (B, H, Lq)); NaN where it did not (read by the backward)."""
    b, h, lq = q.shape[:3]
    with torch.no_grad():
        found = _flash_form(spec, q, k, v, extras)
    if found is None:
        out = torch.ops.fxfuse.attention(q, k, v, extras, spec)
        return out.contiguous(), q.new_full((b, h, lq), float("nan"), dtype=torch.float32)
    s, scale, causal = found
    out, lse = _aten._scaled_dot_product_flash_attention_for_cpu(*_operands(s, q, k, v), 0.0, causal, scale=scale)
    return out.contiguous(), lse.float().contiguous()


@attention_saved.register_fake
def _(q, k, v, extras, spec):
    b, h, lq = q.shape[:3]
    out_dtype = attention_op.to_dtype(attention_op._spec(spec).out_dtype)
    return q.new_empty((b, h, lq, v.shape[-1]), dtype=out_dtype), q.new_empty((b, h, lq), dtype=torch.float32)


@torch.library.custom_op("fxfuse::attention_saved_backward", mutates_args=())
def attention_saved_backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                             extras: list[Tensor], spec: str) -> list[Tensor]:
    """[dq, dk, dv]: by ATen's flash backward from the saved statistics where the forward used it
    (as the statistics record, see the module's docstring), else by ``fxfuse.attention_backward``."""
    if not _flash_ran(lse):
        grads = torch.ops.fxfuse.attention_backward(grad_out, q, k, v, extras, [False] * len(extras), spec)
        return [g.contiguous() for g in grads[:3]]
    s, scale, causal = _flash_form(spec, q, k, v, extras, check_values=False)
    qc, kh, vh = _operands(s, q, k, v)
    dq, dk, dv = _aten._scaled_dot_product_flash_attention_for_cpu_backward(
        grad_out.to(out.dtype).contiguous(), qc, kh, vh, out, lse, 0.0, causal, scale=scale)
    if s.kv_groups > 1:  # each kv head's gradient sums over the query heads that read it
        dk, dv = (g.unflatten(1, (k.shape[1], s.kv_groups)).sum(2) for g in (dk, dv))
    return [g.contiguous() for g in (dq, dk, dv)]


@attention_saved_backward.register_fake
def _(grad_out, q, k, v, out, lse, extras, spec):
    return [q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)]


def _setup(ctx, inputs, output):
    q, k, v, extras, spec = inputs
    ctx.save_for_backward(q, k, v, *output, *extras)
    ctx.spec = spec


def _backward(ctx, grad_out, _grad_lse):
    q, k, v, out, lse, *extras = ctx.saved_tensors
    dq, dk, dv = torch.ops.fxfuse.attention_saved_backward(grad_out, q, k, v, out, lse, extras, ctx.spec)
    return (dq, dk, dv, [None] * len(extras), None)[:len(ctx.needs_input_grad)]


attention_saved.register_autograd(_backward, setup_context=_setup)
