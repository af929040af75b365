"""``torch.ops.fxfuse.linear_attention``: linear attention in the linear-time order.

Where a model computes ``(phi(q) @ phi(k)^T) @ v`` (an (L, L) matrix), this computes
``phi(q) @ (phi(k)^T @ v)``: equal in real arithmetic, O(L D E) time and no (L, L) tensor. With a
causal mask on the (L, L) product it runs chunk by chunk: each chunk of C queries sees the prefix sum
of ``k_j^T v_j`` over the chunks before it (a (D, E) state) plus its own masked C x C block.

The operator is CompositeImplicitAutograd: it is these torch ops, so autograd differentiates them
(saving the features, the per-chunk states and C x C blocks: linear in L), make_fx and AOTAutograd
trace through it and Inductor compiles it. 16-bit inputs are computed in float32 and rounded once.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import Tensor

from fxfuse.spec_linear_attention import LinearAttentionSpec

_lib = torch.library.Library("fxfuse", "FRAGMENT")
_lib.define("linear_attention(Tensor a, Tensor bt, Tensor? v, str spec) -> Tensor")


@functools.lru_cache(maxsize=64)
def _spec(text: str) -> LinearAttentionSpec:
    return LinearAttentionSpec.from_json(text)


def _causal(a: Tensor, bt: Tensor, v: Tensor, chunk: int) -> Tensor:
    """out[:, i] = sum_{j <= i} (a_i . b_j) v_j for (N, L, D) a, (N, D, L) bt, (N, L, E) v."""
    n, length, d = a.shape
    e = v.shape[-1]
    c = min(chunk, length)
    pad = (-length) % c
    b = bt.transpose(1, 2)
    if pad:  # zero keys and values add nothing; the padded queries' rows are dropped
        a, b, v = (torch.nn.functional.pad(t, (0, 0, 0, pad)) for t in (a, b, v))
    m = (length + pad) // c
    a, b, v = a.reshape(n, m, c, d), b.reshape(n, m, c, d), v.reshape(n, m, c, e)
    kv = b.transpose(-1, -2) @ v  # (N, M, D, E): each chunk's k^T v
    # The state a chunk sees: the sum over the chunks before it (exclusive prefix sum).
    state = torch.cat([kv.new_zeros(n, 1, d, e), kv[:, :-1].cumsum(1)], dim=1)
    keep = torch.ones(c, c, dtype=torch.bool, device=a.device).tril()
    block = (a @ b.transpose(-1, -2)).masked_fill(~keep, 0)  # (N, M, C, C), the in-chunk part
    out = a @ state + block @ v
    return out.reshape(n, m * c, e)[:, :length]


def linear_attention(a: Tensor, bt: Tensor, v: Optional[Tensor], spec: str) -> Tensor:
    s = _spec(spec)
    if a.dim() == 2:  # a single matrix product (mm): one batch of one
        return linear_attention(a[None], bt[None], v[None] if v is not None else None, spec)[0]
    dtype = a.dtype
    if dtype in (torch.float16, torch.bfloat16):
        a, bt = a.float(), bt.float()
        v = v.float() if v is not None else None
    if v is None:  # the normaliser: the product with a column of ones
        if not s.causal:
            return (a @ bt.sum(-1, keepdim=True)).to(dtype)
        v = a.new_ones(bt.shape[0], bt.shape[-1], 1)
    out = _causal(a, bt, v, s.chunk) if s.causal else a @ (bt @ v)
    return out.to(dtype)


_lib.impl("linear_attention", linear_attention, "CompositeImplicitAutograd")
