"""``torch.ops.fxfuse.attention_rope``: attention whose q and/or k are rotated (RoPE) first.

``attention_rope(q, k, v, extras, tables, spec)`` is ``attention(rope(q), rope(k), v, extras, spec)``
with q and k the *unrotated* operands: the spec's ``rope_q``/``rope_k`` say which are rotated and
how, and ``tables`` holds (cos, sin) for each rotated operand, q's first, each (1|B, 1|L, D) in
that operand's dtype (float32 for a style ending in "/float32": the rotation of a 16-bit operand is
computed in float32 and rounded once, as Meta's complex RoPE does). ``rope(x) = x * cos + rotate(x) * sin`` (``rotate`` = ``rotate_half``,
cat(-x2, x1) of the head dim's halves, or the same on pairs (2j, 2j+1) for "interleaved"),
computed in x's dtype as the user's code computed it.

On the Triton path the kernels rotate q and k as they load them and rotate the gradients back
(``fxfuse.codegen.attention_rope``) where a tile holds the whole head dim; otherwise, and on the
CPU torch path, the operands are rotated in torch and ``fxfuse.attention`` runs on them (its fast
CPU path included), and the backward takes the gradients of the rotated operands from
``fxfuse.attention_backward`` and rotates them back (``g * cos + rotate^T(g * sin)``). Tables that
require grad get theirs (``sum(g * x)`` and ``sum(g * rotate(x))`` over the heads) on that path.

With QK-norm (``norm_q``/``norm_k``, see fxfuse.ops.attention_qk_norm) q and/or k are normalised over
the head dim first, then rotated (or not, without RoPE); the norms' parameters follow the tables.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from torch import Tensor

from fxfuse import config
from fxfuse.ops import attention as attention_op
from fxfuse.ops import attention_qk_norm as qk_norm
from fxfuse.ops import size_masks
from fxfuse.ops.optional_lists import listed
from fxfuse.ops.attention import _contiguous_strides, _kernel_grad, _laid_out, _spec, _sum_to, _use_triton
from fxfuse.runtime.arguments import output_buffer
from fxfuse.spec import to_dtype
from fxfuse.spec_attention import AttentionSpec

STYLES = ("half", "interleaved")
IN_FLOAT32 = "/float32"  # a style's suffix: rotated in float32 and rounded once to x's dtype


def base_style(style: str) -> str:
    return style.removesuffix(IN_FLOAT32)


def in_float32(style: str) -> bool:
    """Whether the rotation runs in float32 on a 16-bit x and rounds once (Meta's complex RoPE:
    ``xq.float()`` rotated, then ``type_as(xq)``)."""
    return style.endswith(IN_FLOAT32)


def rotate(x: Tensor, style: str) -> Tensor:
    """``rotate_half(x)`` (cat(-x2, x1)), or for "interleaved" (-x1, x0) on each pair: exact."""
    if base_style(style) == "half":
        half = x.shape[-1] // 2
        return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    pairs = x.unflatten(-1, (-1, 2))
    return torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)


def rotate_transposed(g: Tensor, style: str) -> Tensor:
    """The transpose of ``rotate``: cat(g2, -g1), or (g1, -g0) on each pair."""
    return -rotate(g, style)


def _heads_view(table: Tensor) -> Tensor:
    return table.unsqueeze(1)  # (1|B, 1, 1|L, D): broadcast over the heads


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor, style: str) -> Tensor:
    """``x * cos + rotate(x) * sin``, each op in the dtypes (so with the roundings) of the user's code:
    x's own, or for a float32 style float32 (the tables are float32 then) rounded once to x's."""
    if in_float32(style):
        xf = x.float()
        return (xf * _heads_view(cos) + rotate(xf, style) * _heads_view(sin)).to(x.dtype)
    return x * _heads_view(cos) + rotate(x, style) * _heads_view(sin)


def rotated_operands(spec: AttentionSpec, q: Tensor, k: Tensor, tables: list[Tensor]) -> tuple[Tensor, Tensor]:
    """q and k as the attention reads them: normalised (QK-norm), then rotated, each as the spec says."""
    by, params = qk_norm.split_tables(spec, tables)
    q, k = qk_norm.normalised(spec, q, k, params)
    if "q" in by:
        q = apply_rope(q, *by["q"], spec.rope_q)
    if "k" in by:
        k = apply_rope(k, *by["k"], spec.rope_k)
    return q, k


def without_rope(spec: AttentionSpec) -> AttentionSpec:
    return dataclasses.replace(spec, rope_q="", rope_k="", norm_q="", norm_k="")


def without_norms(spec: AttentionSpec) -> AttentionSpec:
    return dataclasses.replace(spec, norm_q="", norm_k="")


def reference(spec: AttentionSpec, q, k, v, extras, tables, keep=None) -> Tensor:
    """The site in plain torch: the rotation as the user wrote it, then the attention reference."""
    qr, kr = rotated_operands(spec, q, k, tables)
    return attention_op.reference(without_rope(spec), qr, kr, v, extras, keep)


def kernel_rotates(d: int) -> bool:
    """Whether the kernels rotate in their loads at head size ``d``: a tile then holds exactly the
    head dim (a power of two, at least 16, the launcher's smallest BLOCK_D), so its halves (pairs)
    are the tile's (fxfuse.codegen.attention_rope). Otherwise the operator rotates in torch first."""
    return d >= 16 and d & (d - 1) == 0


def _in_kernel(spec: AttentionSpec, q: Tensor, k: Tensor) -> bool:
    return _use_triton(q, spec) and kernel_rotates(q.shape[-1]) and qk_norm.kernel_normalises(spec, q, k)


# ``Tensor[]? extras``: a site without extra tensors reaches AOTInductor's runner as None (optional_lists).
@torch.library.custom_op("fxfuse::attention_rope", mutates_args=(), schema=(
    "(Tensor q, Tensor k, Tensor v, Tensor[]? extras, Tensor[] tables, str spec, Tensor? seed=None, "
    "bool merge_heads=False) -> Tensor"))
def attention_rope(q: Tensor, k: Tensor, v: Tensor, extras: Optional[list[Tensor]], tables: list[Tensor], spec: str,
                   seed: Tensor | None = None, merge_heads: bool = False) -> Tensor:
    s, extras = _spec(spec), listed(extras)
    attention_op._check_heads(s, q, k, v)
    s, extras, _ = size_masks.resolve(s, extras, q.shape[-2], k.shape[-2])
    if _in_kernel(s, q, k):
        from fxfuse.runtime import attention as kernels

        out = kernels.forward(s, q, k, v, extras, seed=seed, merge_heads=merge_heads, tables=tables)[0]
        return _laid_out(out, merge_heads)
    qr, kr = rotated_operands(s, q, k, tables)
    return torch.ops.fxfuse.attention(qr, kr, v, extras, without_rope(s).to_json(), seed, merge_heads)


@attention_rope.register_fake
def _(q, k, v, extras, tables, spec, seed=None, merge_heads=False):
    shape4 = (*q.shape[:-1], v.shape[-1])
    return output_buffer(shape4, to_dtype(_spec(spec).out_dtype), q.device, merge_heads)


def _table_grads(style: str, x: Tensor, g: Tensor, cos: Tensor, sin: Tensor) -> list[Tensor]:
    """d cos = sum(g * x), d sin = sum(g * rotate(x)), over what the tables broadcast along."""
    g = g.float()
    shape = _heads_view(cos).shape
    dcos = _sum_to(g * x.float(), shape).reshape(cos.shape)
    dsin = _sum_to(g * rotate(x, style).float(), shape).reshape(sin.shape)
    return [dcos.to(cos.dtype), dsin.to(sin.dtype)]


def _unrotate(style: str, g: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """The gradient of x from that of ``x * cos + rotate(x) * sin`` (in float32)."""
    g = g.float()
    return g * _heads_view(cos).float() + rotate_transposed(g * _heads_view(sin).float(), style)


@torch.library.custom_op("fxfuse::attention_rope_backward", mutates_args=())
def attention_rope_backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, extras: list[Tensor],
                            tables: list[Tensor], needs_grad: list[bool], table_grads: bool, spec: str,
                            seed: Tensor | None = None) -> list[Tensor]:
    """[dq, dk, dv, *d_extras, *d_tables]: the cos/sin tables' gradients only with ``table_grads``
    (else empty tensors), the norm parameters' always, the extras' as ``fxfuse.attention_backward``
    gives them."""
    s, given = _spec(spec), extras
    s, extras, dropped = size_masks.resolve(s, extras, q.shape[-2], k.shape[-2])
    needs_grad = size_masks.without(needs_grad, dropped)
    wanted = [need and e.dtype.is_floating_point for e, need in zip(extras, needs_grad)]
    by, params = qk_norm.split_tables(s, tables)
    norms = qk_norm.norm_specs(s)
    if _in_kernel(s, q, k) and not table_grads and all(_kernel_grad(s, i) for i, w in enumerate(wanted) if w):
        from fxfuse.runtime import attention as kernels

        # The kernels normalise and rotate as they load: dq and dk are the normalised operands'.
        dq, dk, dv, *d_extras = kernels.backward(s, grad_out, q, k, v, extras, wanted, seed=seed, tables=tables)
        d_extras = [d if w else e.new_empty(0) for d, e, w in zip(d_extras, extras, wanted)]
        d_tables = [t.new_empty(0) for pair in by.values() for t in pair]
    else:
        qn, kn = qk_norm.normalised(s, q, k, params)
        qr, kr = rotated_operands(without_norms(s), qn, kn, [t for pair in by.values() for t in pair])
        dq, dk, dv, *d_extras = torch.ops.fxfuse.attention_backward(grad_out, qr, kr, v, extras, needs_grad,
                                                                    without_rope(s).to_json(), seed)
        d_tables = []
        for name, x, g, style in (("q", qn, dq, s.rope_q), ("k", kn, dk, s.rope_k)):
            if name in by:
                if table_grads:
                    d_tables += _table_grads(style, x, g, *by[name])
                else:
                    d_tables += [t.new_empty(0) for t in by[name]]
        dq = _unrotate(s.rope_q, dq, *by["q"]).to(qn.dtype) if "q" in by else dq
        dk = _unrotate(s.rope_k, dk, *by["k"]).to(kn.dtype) if "k" in by else dk
    # Back through the norms: the raw operands' gradients and the norm parameters'.
    if "q" in norms:
        dq, d_params = qk_norm.through_norm(norms["q"], q, dq, params["q"])
        d_tables += d_params
    if "k" in norms:
        dk, d_params = qk_norm.through_norm(norms["k"], k, dk, params["k"])
        d_tables += d_params
    grads = [_contiguous_strides(g) for g in (dq, dk, dv, *d_extras)] + d_tables
    return size_masks.with_empty_grad(grads, given, dropped)


@attention_rope_backward.register_fake
def _(grad_out, q, k, v, extras, tables, needs_grad, table_grads, spec, seed=None):
    d_extras = [e.new_empty(e.shape if need and e.dtype.is_floating_point else 0) for e, need in zip(extras, needs_grad)]
    by, params = qk_norm.split_tables(_spec(spec), tables)
    d_tables = [t.new_empty(t.shape if table_grads else 0) for pair in by.values() for t in pair]
    d_tables += [p.new_empty(p.shape) for ps in params.values() for p in ps]
    return [q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), *d_extras, *d_tables]


def _setup(ctx, inputs, output):
    q, k, v, extras, tables, spec, seed = inputs[:7]
    extras = listed(extras)
    ctx.save_for_backward(q, k, v, seed, *extras, *tables)
    ctx.spec, ctx.interpret, ctx.n_extras = spec, config.current.interpret, len(extras)
    ctx.needs_grad = [e.requires_grad for e in extras]
    by, params = qk_norm.split_tables(_spec(spec), tables)
    ctx.table_grads = any(t.requires_grad for pair in by.values() for t in pair)
    ctx.rope_tables = 2 * len(by)  # the norm parameters follow: their gradients are always computed
    ctx.param_grads = [t.requires_grad for t in tables[ctx.rope_tables:]]


def _backward(ctx, grad_out):
    q, k, v, seed, *rest = ctx.saved_tensors
    extras, tables = rest[:ctx.n_extras], rest[ctx.n_extras:]
    with config.patch(interpret=ctx.interpret):
        dq, dk, dv, *d_rest = torch.ops.fxfuse.attention_rope_backward(
            grad_out, q, k, v, extras, tables, ctx.needs_grad, ctx.table_grads, ctx.spec, seed)
    d_extras = [d if need and e.dtype.is_floating_point else None
                for d, e, need in zip(d_rest[:len(extras)], extras, ctx.needs_grad)]
    d_tables = [d if ctx.table_grads else None for d in d_rest[len(extras):len(extras) + ctx.rope_tables]]
    d_tables += [d if need else None for d, need in zip(d_rest[len(extras) + ctx.rope_tables:], ctx.param_grads)]
    # One gradient per argument the call passed (trailing defaults are dropped before autograd counts).
    return (dq, dk, dv, d_extras, d_tables, None, None, None)[:len(ctx.needs_input_grad)]


attention_rope.register_autograd(_backward, setup_context=_setup)
