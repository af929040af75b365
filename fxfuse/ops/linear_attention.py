"""``torch.ops.fxfuse.linear_attention``: linear attention in the linear-time order.

Where a model computes ``(phi(q) @ phi(k)^T) @ v`` (an (L, L) matrix), this computes
``phi(q) @ (phi(k)^T @ v)``: equal in real arithmetic, O(L D E) time and no (L, L) tensor. With a
causal mask on the (L, L) product it runs chunk by chunk: each chunk of C queries sees the prefix sum
of ``k_j^T v_j`` over the chunks before it (a (D, E) state) plus its own masked C x C block.
Without ``v`` it computes the normaliser, the product with a column of ones.

Backward is its own operator, written out (the chunked form's gradient: the states' suffix sums
plus the in-chunk blocks, recomputed), so it keeps only the inputs. Every result is contiguous, as
a bmm's is (real and fake layouts agree).

On CUDA tensors (and on the CPU when interpretation is asked for) both run the generated Triton
kernels (``fxfuse.codegen.linear_attention``: one pass over the sequence per batch and block of
E columns, the (D, E) state in registers). Elsewhere, and for float64 or feature dims the kernels
do not take, they run the torch ops below, with 16-bit inputs computed in float32 and rounded
once.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import Tensor

from fxfuse import config
from fxfuse.spec_linear_attention import SOFTMAX_MAPS, LinearAttentionSpec, softmax_dim


@functools.lru_cache(maxsize=64)
def _spec(text: str) -> LinearAttentionSpec:
    return LinearAttentionSpec.from_json(text)


def feature_map(kind: str, x: Tensor, side: str) -> Tensor:
    """phi(x) computed by the ATen ops the model's code runs, in x's dtype: the same values
    (``side``: "a" or "bt", the operand x is, which decides a softmax's dim)."""
    if kind in SOFTMAX_MAPS:
        return torch.softmax(x, softmax_dim(kind, side))
    if kind == "elu1":
        return torch.nn.functional.elu(x) + 1
    if kind == "relu":
        return torch.relu(x)
    if kind == "exp":
        return torch.exp(x)
    if kind == "sigmoid":
        return torch.sigmoid(x)
    if kind == "square":
        return x * x
    assert not kind, kind
    return x


def feature_map_derivative(kind: str, x: Tensor) -> Tensor:
    """phi'(x), in x's dtype (float32 here: the gradients are float32 until the last rounding);
    at 0, relu's is 0 and elu's 1, as torch's backward formulas give."""
    if kind == "elu1":
        return torch.where(x > 0, 1.0, torch.exp(x))
    if kind == "relu":
        return (x > 0).to(x.dtype)
    if kind == "exp":
        return torch.exp(x)
    if kind == "sigmoid":
        s = torch.sigmoid(x)
        return s * (1 - s)
    if kind == "square":
        return 2 * x
    raise AssertionError(kind)


def _prepared(a: Tensor, bt: Tensor, v: Optional[Tensor], spec: LinearAttentionSpec):
    """(N, L, D), (N, D, S), (N, S, E) in the compute dtype (float32 for 16-bit), v = ones if None;
    a and bt are the features (the spec's feature maps applied in the inputs' dtype, as the model's
    code rounds them)."""
    if a.dim() == 2:  # a single matrix product (mm): one batch of one
        a, bt, v = a[None], bt[None], v[None] if v is not None else None
    work = torch.float32 if a.dtype in (torch.float16, torch.bfloat16) else a.dtype
    a, bt = feature_map(spec.phi_a, a, "a").to(work), feature_map(spec.phi_b, bt, "bt").to(work)
    v = v.to(work) if v is not None else a.new_ones(bt.shape[0], bt.shape[-1], 1)
    return a, bt, v


def _chunks(t: Tensor, c: int) -> Tensor:
    """(N, L, X) -> (N, M, C, X), zero-padded: zero keys and values add nothing, padded rows are dropped."""
    pad = (-t.shape[1]) % c
    if pad:
        t = torch.nn.functional.pad(t, (0, 0, 0, pad))
    return t.reshape(t.shape[0], -1, c, t.shape[-1])


def _exclusive_prefix(t: Tensor) -> Tensor:
    """Along dim 1: the sum over the chunks before each one."""
    return torch.cat([torch.zeros_like(t[:, :1]), t[:, :-1].cumsum(1)], dim=1)


def _exclusive_suffix(t: Tensor) -> Tensor:
    """Along dim 1: the sum over the chunks after each one."""
    return torch.cat([t[:, 1:].flip(1).cumsum(1).flip(1), torch.zeros_like(t[:, :1])], dim=1)


def _lower(c: int, device) -> Tensor:
    return torch.ones(c, c, dtype=torch.bool, device=device).tril()


def _forward(a, bt, v, spec: LinearAttentionSpec) -> Tensor:
    if not spec.causal:
        return a @ (bt @ v)
    length, c = a.shape[1], min(spec.chunk, a.shape[1])
    a_, b_, v_ = _chunks(a, c), _chunks(bt.transpose(1, 2), c), _chunks(v, c)
    state = _exclusive_prefix(b_.transpose(-1, -2) @ v_)  # (N, M, D, E)
    block = (a_ @ b_.transpose(-1, -2)).masked_fill(~_lower(c, a.device), 0)  # (N, M, C, C)
    out = a_ @ state + block @ v_
    return out.reshape(a.shape[0], -1, v.shape[-1])[:, :length]


def _backward(g, a, bt, v, spec: LinearAttentionSpec):
    if not spec.causal:
        kv = bt @ v
        d_kv = a.transpose(1, 2) @ g
        return g @ kv.transpose(1, 2), d_kv @ v.transpose(1, 2), bt.transpose(1, 2) @ d_kv
    length, c = a.shape[1], min(spec.chunk, a.shape[1])
    a_, b_, v_, g_ = _chunks(a, c), _chunks(bt.transpose(1, 2), c), _chunks(v, c), _chunks(g, c)
    lower = _lower(c, a.device)
    state = _exclusive_prefix(b_.transpose(-1, -2) @ v_)
    later = _exclusive_suffix(a_.transpose(-1, -2) @ g_)  # d(state) summed over the chunks that see it
    d_block = (g_ @ v_.transpose(-1, -2)).masked_fill(~lower, 0)
    block = (a_ @ b_.transpose(-1, -2)).masked_fill(~lower, 0)
    d_a = g_ @ state.transpose(-1, -2) + d_block @ b_
    d_b = v_ @ later.transpose(-1, -2) + d_block.transpose(-1, -2) @ a_
    d_v = b_ @ later + block.transpose(-1, -2) @ g_

    def unchunk(t):
        return t.reshape(a.shape[0], -1, t.shape[-1])[:, :length]

    return unchunk(d_a), unchunk(d_b).transpose(1, 2), unchunk(d_v)


def chain_feature_maps(spec: LinearAttentionSpec, d_a: Tensor, d_bt: Tensor, a: Tensor, bt: Tensor):
    """The gradients of the features taken back through the feature maps the operator applied
    (d_x = d_phi * phi'(x), in d_phi's float32 before the one rounding to the inputs' dtype)."""
    return (_chain(spec.phi_a, d_a, a, "a") if spec.phi_a else d_a,
            _chain(spec.phi_b, d_bt, bt, "bt") if spec.phi_b else d_bt)


def _chain(kind: str, d_phi: Tensor, x: Tensor, side: str) -> Tensor:
    """d_x from d_phi = dL/dphi(x). An elementwise map's Jacobian is diagonal; a softmax's along its
    dim is diag(p) - p p^T (p = softmax(x), recomputed), so d_x = p * (d_phi - sum(p * d_phi)) per
    line: for softmax_keys each feature's row over all S keys of bt."""
    x = x.to(d_phi.dtype)
    if kind in SOFTMAX_MAPS:
        dim = softmax_dim(kind, side)
        p = torch.softmax(x, dim)
        return p * (d_phi - (p * d_phi).sum(dim, keepdim=True))
    return d_phi * feature_map_derivative(kind, x)


def _use_triton(a: Tensor, bt: Tensor, v: Optional[Tensor]) -> bool:
    from fxfuse.runtime.linear_attention import supports

    if not (a.is_cuda or (a.device.type == "cpu" and config.interpret_on_cpu())):
        return False
    return supports(a, bt, v) is None


@torch.library.custom_op("fxfuse::linear_attention", mutates_args=())
def linear_attention(a: Tensor, bt: Tensor, v: Optional[Tensor], spec: str) -> Tensor:
    if _use_triton(a, bt, v):
        from fxfuse.runtime import linear_attention as kernels

        return kernels.forward(_spec(spec), a, bt, v)
    out = _forward(*_prepared(a, bt, v, _spec(spec)), _spec(spec))
    return (out[0] if a.dim() == 2 else out).to(a.dtype).contiguous()


@linear_attention.register_fake
def _(a, bt, v, spec):
    return a.new_empty((*a.shape[:-1], v.shape[-1] if v is not None else 1))


@torch.library.custom_op("fxfuse::linear_attention_backward", mutates_args=())
def linear_attention_backward(grad: Tensor, a: Tensor, bt: Tensor, v: Optional[Tensor], spec: str) -> list[Tensor]:
    """[d_a, d_bt] (+ [d_v] when v is given)."""
    if _use_triton(a, bt, v) and grad.dtype == a.dtype:
        from fxfuse.runtime import linear_attention as kernels

        grads = kernels.backward(_spec(spec), grad, a, bt, v)
        d_a, d_bt = chain_feature_maps(_spec(spec), grads[0], grads[1], a, bt)
        return [d_a.to(a.dtype), d_bt.to(bt.dtype).contiguous(), *grads[2:]]
    g = grad[None] if a.dim() == 2 else grad
    parsed = _spec(spec)
    grads = _backward(g.to(torch.float32 if a.dtype in (torch.float16, torch.bfloat16) else a.dtype),
                      *_prepared(a, bt, v, parsed), parsed)
    grads = [t[0] if a.dim() == 2 else t for t in grads]
    grads[:2] = chain_feature_maps(parsed, grads[0], grads[1], a, bt)
    out = [grads[0].to(a.dtype).contiguous(), grads[1].to(bt.dtype).contiguous()]
    return out + ([grads[2].to(v.dtype).contiguous()] if v is not None else [])


@linear_attention_backward.register_fake
def _(grad, a, bt, v, spec):
    return [a.new_empty(a.shape), bt.new_empty(bt.shape)] + ([v.new_empty(v.shape)] if v is not None else [])


def _setup(ctx, inputs, output):
    a, bt, v, spec = inputs
    ctx.save_for_backward(a, bt, v)
    ctx.spec, ctx.interpret = spec, config.current.interpret


def _grad(ctx, grad):
    a, bt, v = ctx.saved_tensors
    with config.patch(interpret=ctx.interpret):
        grads = torch.ops.fxfuse.linear_attention_backward(grad, a, bt, v, ctx.spec)
    return grads[0], grads[1], grads[2] if v is not None else None, None


linear_attention.register_autograd(_grad, setup_context=_setup)
