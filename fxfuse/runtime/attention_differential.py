"""Launching the differential-attention forward (``fxfuse.codegen.attention_differential``)."""
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


def forward(spec: AttentionSpec, q1, k1, q2, k2, v, lam4, extras, merge_heads: bool = False) -> torch.Tensor:
    """Launch the forward; ``lam4`` is lambda as a (1|B, 1|H, 1, 1) tensor. Returns (B, H, Lq, Dv)
    in the spec's output dtype, contiguous or with ``merge_heads`` in (B, Lq, H, Dv) memory order."""
    kernel = functions(spec)["forward"]
    b, h, lq, d = q1.shape
    lk, dv = k1.shape[2], v.shape[3]
    out = output_buffer((b, h, lq, dv), to_dtype(spec.out_dtype), q1.device, merge_heads)
    es = [extra_4d(e, (b, h, lq, lk)) for e in extras]
    lam = lam4.expand(b, h, 1, 1)

    def run(c) -> None:
        kernel[(triton.cdiv(lq, c.BLOCK_M), b * h)](
            q1, k1, q2, k2, v, lam, out, *es, *tiles(spec, (b, h, lq, lk), c, q1.device)[:3],
            *q1.stride(), *k1.stride(), *q2.stride(), *k2.stride(), *v.stride(), *out.stride(),
            lam.stride(0), lam.stride(1), *(s for e in es for s in e.stride()), h,
            spec.kv_groups, lq, lk, d, dv, ROUND=True, **_grid_meta(c, d, dv, q1.is_cuda))

    if out.numel():
        _pick(spec, "forward", q1, k1, v, run, None)
    return out
