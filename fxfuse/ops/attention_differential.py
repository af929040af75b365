"""``torch.ops.fxfuse.attention_differential``: differential attention as one operator.

``out = attn(q1, k1, v) - lambda * attn(q2, k2, v)`` (Ye et al., Differential Transformer), where
``attn`` is the site's spec without ``differential`` (``halves``): both halves run the same score
steps on the same extra tensors (masks, biases) and share v. ``lam`` is a tensor that broadcasts to
the output as a scalar or one value per (batch, head): right-aligned, its last two dims are 1. With
``merge_heads`` the output is laid out in (B, Lq, H, Dv) memory order, as for ``fxfuse.attention``
(the halves' outputs were, so their difference was too).

Paths, as for ``fxfuse.attention``: on CUDA (or the CPU with interpretation asked for) the
generated kernel runs both online softmaxes over the same key tiles and reads each v tile once
(``fxfuse.codegen.attention_differential``); on the CPU the two halves take
``fxfuse.ops.attention.cpu_forward`` each (ATen's fused CPU attention where it computes the spec)
and are combined with the user's own two ATen ops, so the CPU site costs what the user's code cost
with each half fused. The operator returns ``(out, stats, halves)``: beside the output, what its
backward reads (each half's row max and sum from the kernel, NaN on the torch path; each half's
output, float32), which autograd saves, so the backward reruns no forward. The backward is an
operator of its own: on the kernel path the two differential backward kernels
(``fxfuse.codegen.attention_differential_backward``); otherwise (or for a bias needing its
gradient) each half's gradients by ``fxfuse.attention_backward`` (the second with ``-lambda *
dO``), dv their sum; ``dlambda = -sum(dO * o2)`` from the saved o2, reduced to lambda's shape.
The rewritten graph reads item 0.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import torch
from torch import Tensor

from fxfuse import config
from fxfuse.ops import attention as attention_op
from fxfuse.ops.optional_lists import listed
from fxfuse.runtime.arguments import output_buffer
from fxfuse.spec import to_dtype
from fxfuse.spec_attention import AttentionSpec


@functools.lru_cache(maxsize=256)
def _specs(text: str) -> tuple[AttentionSpec, AttentionSpec, str]:
    """(the differential spec, one half's spec, that half's JSON)."""
    spec = AttentionSpec.from_json(text)
    if not spec.differential:
        raise ValueError("fxfuse.attention_differential takes a spec with differential set; "
                         "use fxfuse.attention for one attention")
    half = dataclasses.replace(spec, differential=False)
    return spec, half, half.to_json()


def halves(spec: AttentionSpec) -> AttentionSpec:
    """The spec each of the two attentions computes."""
    return dataclasses.replace(spec, differential=False)


def lambda_4d(lam: Tensor, b: int, h: int) -> Tensor:
    """``lam`` as a (1|B, 1|H, 1, 1) tensor (how the kernel reads it); a clear error otherwise."""
    shape = (1,) * (4 - lam.dim()) + tuple(lam.shape) if lam.dim() <= 4 else None
    if shape is None or shape[2:] != (1, 1) or shape[0] not in (1, b) or shape[1] not in (1, h):
        raise ValueError(f"fxfuse.attention_differential: lambda of shape {list(lam.shape)} is not a scalar or one "
                         f"value per (batch, head) of a ({b}, {h}, L, D) output; give it shape (), (H, 1, 1) or "
                         "(B, H, 1, 1)")
    return lam.reshape(shape)


def combine(o1: Tensor, o2: Tensor, lam: Tensor) -> Tensor:
    """``o1 - lam * o2`` as the user's code computes it (two ATen ops, in the outputs' dtype)."""
    return o1 - lam * o2


def _check(spec: AttentionSpec, q1, k1, q2, k2, v, lam) -> None:
    attention_op._check_heads(spec, q1, k1, v)
    attention_op._check_heads(spec, q2, k2, v)
    if q1.shape != q2.shape or k1.shape != k2.shape:
        raise ValueError(f"fxfuse.attention_differential: the halves' shapes differ (q {list(q1.shape)} and "
                         f"{list(q2.shape)}, k {list(k1.shape)} and {list(k2.shape)}); both read the same keys")
    lambda_4d(lam, q1.shape[0], q1.shape[1])


def cpu_forward(spec: AttentionSpec, q1, k1, q2, k2, v, lam, extras, merge_heads: bool = False,
                autograd: bool = False) -> Tensor:
    """Each half by ``fxfuse.ops.attention.cpu_forward``, combined as the user's code did."""
    half = halves(spec)
    o1 = attention_op.cpu_forward(half, q1, k1, v, extras, merge_heads=merge_heads, autograd=autograd)
    o2 = attention_op.cpu_forward(half, q2, k2, v, extras, merge_heads=merge_heads, autograd=autograd)
    return attention_op._laid_out(combine(o1, o2, lam), merge_heads)


def saved_shapes(q1: Tensor, v: Tensor) -> tuple[tuple, tuple]:
    """The shapes of what the forward returns for its backward: each half's row max and sum, (2, 2,
    B*H, Lq) float32, and each half's output, (2, B, H, Lq, Dv) in ``halves_dtype``; contiguous."""
    b, h, lq = q1.shape[:3]
    return (2, 2, b * h, lq), (2, b, h, lq, v.shape[-1])


def halves_dtype(spec: AttentionSpec) -> torch.dtype:
    """float32 (the kernels' accumulators), float64 for a float64 site (the torch path's exact o2)."""
    return torch.float64 if spec.out_dtype == "float64" else torch.float32


def _not_saved(spec: AttentionSpec, q1: Tensor, o1: Tensor, o2: Tensor) -> tuple[Tensor, Tensor]:
    """The saved pair of a forward that ran no differential kernel: NaN statistics (which the
    backward reads as "recompute them") and the halves' outputs as computed."""
    stats_shape, _ = saved_shapes(q1, o1)
    return (q1.new_full(stats_shape, float("nan"), dtype=torch.float32),
            torch.stack([o1, o2]).to(halves_dtype(spec)))


# ``Tensor[]? extras``: a site without extra tensors reaches AOTInductor's runner as None (optional_lists).
@torch.library.custom_op("fxfuse::attention_differential", mutates_args=(), schema=(
    "(Tensor q1, Tensor k1, Tensor q2, Tensor k2, Tensor v, Tensor lam, Tensor[]? extras, str spec, "
    "bool merge_heads=False) -> (Tensor, Tensor, Tensor)"))
def attention_differential(q1: Tensor, k1: Tensor, q2: Tensor, k2: Tensor, v: Tensor, lam: Tensor,
                           extras: Optional[list[Tensor]], spec: str,
                           merge_heads: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """(out, stats, halves): the output, then what the backward reads instead of recomputing the
    forward (``saved_shapes``): the kernel's row statistics and float32 halves; on the torch path
    NaN statistics and the halves it computed (the backward takes lambda's gradient from o2)."""
    (s, half, half_json), extras = _specs(spec), listed(extras)
    _check(half, q1, k1, q2, k2, v, lam)
    if attention_op._use_triton(q1, half):
        from fxfuse.runtime import attention_differential as kernels

        if kernels.fused(s):
            return kernels.forward(s, q1, k1, q2, k2, v, lambda_4d(lam, *q1.shape[:2]), extras, merge_heads,
                                   save=True)
        o1 = torch.ops.fxfuse.attention(q1, k1, v, extras, half_json)
        o2 = torch.ops.fxfuse.attention(q2, k2, v, extras, half_json)
        return attention_op._laid_out(combine(o1, o2, lam), merge_heads), *_not_saved(s, q1, o1, o2)
    half_out = [attention_op.cpu_forward(half, q, k, v, extras, merge_heads=merge_heads) for q, k in ((q1, k1), (q2, k2))]
    out = attention_op._laid_out(combine(*half_out, lam), merge_heads)
    return out, *_not_saved(s, q1, *half_out)


@attention_differential.register_fake
def _(q1, k1, q2, k2, v, lam, extras, spec, merge_heads=False):
    shape4 = (*q1.shape[:-1], v.shape[-1])
    stats_shape, halves_shape = saved_shapes(q1, v)
    return (output_buffer(shape4, to_dtype(_specs(spec)[0].out_dtype), q1.device, merge_heads),
            q1.new_empty(stats_shape, dtype=torch.float32),
            q1.new_empty(halves_shape, dtype=halves_dtype(_specs(spec)[0])))


def _kernels_saved(stats: Tensor, spec: AttentionSpec) -> bool:
    """Whether the forward's differential kernel wrote ``stats``. On CUDA the operator's path is
    decided by the spec alone (no device sync); on the CPU interpretation may have been off in the
    forward, whose statistics are then NaN."""
    from fxfuse.runtime import attention_differential as kernels

    if not kernels.fused(spec) or stats.numel() == 0:
        return False
    return stats.is_cuda or not bool(torch.isnan(stats.reshape(-1)[0]))


@torch.library.custom_op("fxfuse::attention_differential_backward", mutates_args=())
def attention_differential_backward(grad_out: Tensor, q1: Tensor, k1: Tensor, q2: Tensor, k2: Tensor, v: Tensor,
                                    lam: Tensor, stats: Tensor, halves: Tensor, extras: list[Tensor],
                                    needs_grad: list[bool], spec: str) -> list[Tensor]:
    """[dq1, dk1, dq2, dk2, dv, dlambda, *d_extras]; ``needs_grad`` is lambda's flag, then one per
    extra (an unwanted gradient is an empty tensor); ``stats`` and ``halves`` are the forward's.

    On the kernel path, with no extra needing a gradient: the two differential backward kernels,
    from the forward's statistics (recomputed by one forward if it wrote none). Otherwise each
    half's gradients by the attention backward (whichever path it takes: kernels, ATen's fused CPU
    backward or the formula), the second with ``-lambda * dO``, and dv their sum. dlambda =
    -sum(dO * o2), o2 the forward's (float32), reduced to lambda's shape."""
    s, half, half_json = _specs(spec)
    lam4 = lambda_4d(lam, *q1.shape[:2])
    extra_flags = list(needs_grad[1:])
    wanted = [need and e.dtype.is_floating_point for e, need in zip(extras, extra_flags)]

    def reduced(dlam4: Tensor) -> Tensor:
        return dlam4.sum_to_size(lam4.shape).reshape(lam.shape).to(lam.dtype) if needs_grad[0] else lam.new_empty(0)

    if attention_op._use_triton(q1, half) and not any(wanted):
        from fxfuse.runtime import attention_differential as kernels

        if kernels.fused(s):  # both halves in two kernels
            saved = (stats, halves) if _kernels_saved(stats, s) else None
            *grads, dlam4 = kernels.backward(s, grad_out, q1, k1, q2, k2, v, lam4, extras, saved)
            return [*(attention_op._contiguous_strides(g) for g in grads), reduced(dlam4),
                    *(e.new_empty(0) for e in extras)]
    g2 = (-(lam4 * grad_out)).to(grad_out.dtype)  # d o2 = -lambda dO, in dO's dtype as the user's autograd
    dq1, dk1, dv1, *de1 = torch.ops.fxfuse.attention_backward(grad_out, q1, k1, v, extras, extra_flags, half_json)
    dq2, dk2, dv2, *de2 = torch.ops.fxfuse.attention_backward(g2, q2, k2, v, extras, extra_flags, half_json)
    dlam = reduced(-(grad_out.to(halves.dtype) * halves[1]).sum(-1, keepdim=True).sum(-2, keepdim=True))
    d_extras = [a + b if a.numel() else a for a, b in zip(de1, de2)]
    return [dq1, dk1, dq2, dk2, (dv1 + dv2).contiguous(), dlam, *d_extras]


@attention_differential_backward.register_fake
def _(grad_out, q1, k1, q2, k2, v, lam, stats, halves, extras, needs_grad, spec):
    dlam = lam.new_empty(lam.shape if needs_grad[0] else 0)
    d_extras = [e.new_empty(e.shape if need and e.dtype.is_floating_point else 0)
                for e, need in zip(extras, needs_grad[1:])]
    return [q1.new_empty(q1.shape), k1.new_empty(k1.shape), q2.new_empty(q2.shape), k2.new_empty(k2.shape),
            v.new_empty(v.shape), dlam, *d_extras]


def _setup(ctx, inputs, output):
    q1, k1, q2, k2, v, lam, extras, spec = inputs[:8]
    extras = listed(extras)
    ctx.save_for_backward(q1, k1, q2, k2, v, lam, output[1], output[2], *extras)
    ctx.mark_non_differentiable(output[1], output[2])
    ctx.spec, ctx.interpret = spec, config.current.interpret
    ctx.needs_grad = [lam.requires_grad, *(e.requires_grad for e in extras)]


def _backward(ctx, grad_out, _grad_stats, _grad_halves):
    q1, k1, q2, k2, v, lam, stats, halves, *extras = ctx.saved_tensors
    with config.patch(interpret=ctx.interpret):
        dq1, dk1, dq2, dk2, dv, dlam, *d_extras = torch.ops.fxfuse.attention_differential_backward(
            grad_out, q1, k1, q2, k2, v, lam, stats, halves, extras, ctx.needs_grad, ctx.spec)
    d_extras = [d if need and e.dtype.is_floating_point else None
                for d, e, need in zip(d_extras, extras, ctx.needs_grad[1:])]
    # One gradient per argument the call passed (the dispatcher drops a trailing default merge_heads).
    grads = (dq1, dk1, dq2, dk2, dv, dlam if ctx.needs_grad[0] else None, d_extras, None, None)
    return grads[:len(ctx.needs_input_grad)]


attention_differential.register_autograd(_backward, setup_context=_setup)
