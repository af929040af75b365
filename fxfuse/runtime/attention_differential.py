"""Launching the differential-attention kernels (``fxfuse.codegen.attention_differential``): the
one-kernel forward and the two backward kernels (``fxfuse.codegen.attention_differential_backward``)."""
from __future__ import annotations

import functools

import torch
import triton

from fxfuse.runtime import functions
from fxfuse.runtime.arguments import extra_4d, output_buffer
from fxfuse.runtime.attention import _grid_meta, _pick, tiles
from fxfuse.spec import to_dtype
from fxfuse.spec_attention import AttentionSpec


@functools.lru_cache(maxsize=None)
def fused(spec: AttentionSpec) -> bool:
    """Whether the one-kernel forward renders ``spec`` (else the halves run their own kernels)."""
    from fxfuse.codegen.attention_differential import renders

    return renders(spec) is None


def forward(spec: AttentionSpec, q1, k1, q2, k2, v, lam4, extras, merge_heads: bool = False, save: bool = False,
            rounded: bool = True):
    """Launch the forward; ``lam4`` is lambda as a (1|B, 1|H, 1, 1) tensor. Returns (B, H, Lq, Dv)
    in the spec's output dtype, contiguous or with ``merge_heads`` in (B, Lq, H, Dv) memory order.

    ``save`` also returns ``(stats, halves)`` for the backward kernels: each half's row max and sum,
    (2, 2, B*H, Lq) float32 (half, then max/sum), and each half's output before its rounding,
    (2, B, H, Lq, Dv) float32. ``rounded`` False turns the user's roundings of the scores off (the
    backward's recomputation, which its kernels then follow: see ``fxfuse.runtime.attention.backward``)."""
    kernel = functions(spec)["forward"]
    b, h, lq, d = q1.shape
    lk, dv = k1.shape[2], v.shape[3]
    out = output_buffer((b, h, lq, dv), to_dtype(spec.out_dtype), q1.device, merge_heads)
    stats = torch.empty((2, 2, b * h, lq) if save else (2, 1), dtype=torch.float32, device=q1.device)
    halves = torch.empty((2, b, h, lq, dv) if save else (2, 1), dtype=torch.float32, device=q1.device)
    es = [extra_4d(e, (b, h, lq, lk)) for e in extras]
    lam = lam4.expand(b, h, 1, 1)

    def run(c) -> None:
        kernel[(triton.cdiv(lq, c.BLOCK_M), b * h)](
            q1, k1, q2, k2, v, lam, out, stats[0], stats[1], halves[0], halves[1], *es,
            *tiles(spec, (b, h, lq, lk), c, q1.device)[:3],
            *q1.stride(), *k1.stride(), *q2.stride(), *k2.stride(), *v.stride(), *out.stride(),
            lam.stride(0), lam.stride(1), *(s for e in es for s in e.stride()), h,
            spec.kv_groups, lq, lk, d, dv, ROUND=rounded, SAVE=save, **_grid_meta(c, d, dv, q1.is_cuda))

    if out.numel():
        _pick(spec, "forward", q1, k1, v, run, None)
    return (out, stats, halves) if save else out


def backward(spec: AttentionSpec, grad_out, q1, k1, q2, k2, v, lam4, extras, saved=None) -> list[torch.Tensor]:
    """[dq1, dk1, dq2, dk2, dv, dlambda4]: the dK/dV kernel (each key tile of k1, k2, v read once
    for both halves) and the dQ kernel, from ``saved``, the forward's ``(stats, halves)`` (when
    None, one forward recomputes them). ``dlambda4`` = -sum(dO * o2) per (batch, head), (B, H, 1,
    1) float32; the caller reduces it to lambda's shape. Gradients in the operands' shapes and dtypes.

    The kernels recompute the scores with the roundings the statistics were taken with: the
    user's (``ROUND``) from the operator's forward, none from the recomputation."""
    b, h, lq, d = q1.shape
    hkv, lk, dv_dim = k1.shape[1], k1.shape[2], v.shape[3]
    rounded = saved is not None
    stats, halves = saved if rounded else forward(spec, q1, k1, q2, k2, v, lam4, extras, save=True,
                                                        rounded=False)[1:]
    rows = (grad_out.float().unsqueeze(0) * halves).sum(-1)  # (2, B, H, Lq): rowsum(dO * o1), rowsum(dO * o2)
    delta = rows.reshape(2, b * h, lq).contiguous()
    dlam4 = -rows[1].sum(-1, keepdim=True).unsqueeze(-1)
    grads = {n: torch.empty(shape, dtype=torch.float32, device=q1.device) for n, shape in (
        ("dq1", (b, h, lq, d)), ("dq2", (b, h, lq, d)), ("dk1", (b, h, lk, d)), ("dk2", (b, h, lk, d)),
        ("dv", (b, h, lk, dv_dim)))}
    es = [extra_4d(e, (b, h, lq, lk)) for e in extras]
    lam = lam4.expand(b, h, 1, 1)
    kernels = functions(spec)

    def common(c) -> tuple:
        return (q1, k1, q2, k2, v, grad_out, lam, stats[0], stats[1], delta[0], delta[1], *es,
                *tiles(spec, (b, h, lq, lk), c, q1.device),
                *q1.stride(), *k1.stride(), *q2.stride(), *k2.stride(), *v.stride(), *grad_out.stride(),
                lam.stride(0), lam.stride(1), *(s for e in es for s in e.stride()), h,
                spec.kv_groups, lq, lk, d, dv_dim)

    def run_dkdv(c) -> None:
        kernels["backward_dkdv"][(triton.cdiv(lk, c.BLOCK_N), b * h)](
            *common(c), grads["dk1"], grads["dk2"], grads["dv"], ROUND=rounded, **_grid_meta(c, d, dv_dim, q1.is_cuda))

    def run_dq(c) -> None:
        kernels["backward_dq"][(triton.cdiv(lq, c.BLOCK_M), b * h)](
            *common(c), grads["dq1"], grads["dq2"], ROUND=rounded, **_grid_meta(c, d, dv_dim, q1.is_cuda))

    if q1.numel() and k1.numel() and dv_dim:
        _pick(spec, "backward_dkdv", q1, k1, v, run_dkdv, None)
        _pick(spec, "backward_dq", q1, k1, v, run_dq, None)
    else:
        for g in grads.values():
            g.zero_()
    dk1, dk2, dv = grads["dk1"], grads["dk2"], grads["dv"]
    if spec.kv_groups > 1:  # a kv head's gradient sums over the query heads that read it
        dk1, dk2, dv = (g.unflatten(1, (hkv, spec.kv_groups)).sum(2) for g in (dk1, dk2, dv))
    return [grads["dq1"].to(q1.dtype), dk1.to(k1.dtype), grads["dq2"].to(q2.dtype), dk2.to(k2.dtype), dv.to(v.dtype),
            dlam4]
