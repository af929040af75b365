"""Meta's complex RoPE (Llama's reference code): ``view_as_real(view_as_complex(x as (..., D/2, 2))
* freqs_cis).flatten(-2)``, recognised as the interleaved rotation (fxfuse.passes.attention_rope).

Pair j of a head row, (x[2j], x[2j+1]) = a + ib, times freqs_cis[j] = c + is gives
(a c - b s) + i(a s + b c): that is ``x * cos + rotate_every_two(x) * sin`` with cos and sin the
real and imaginary parts of freqs_cis, each repeated for both elements of its pair. The operator
then gets those (1|B, 1|L, D) tables, built in the graph from freqs_cis (``view_as_real``, select,
repeat per pair: exact copies of its parts).

What is proved, besides what fuse-rope proves of any rotation (x's rows are the operand's, nothing
else reads the result): the complex view pairs x's last dim as (D/2, 2); the product is with a
complex tensor of one value per pair and position, broadcast over the heads (and the batch, or
one per batch); x is float32 (the complex dtype's parts), so each of the rotation's products and
its sum round in x's dtype as the kernel's do. A 16-bit q turned to float32 first (``xq.float()``)
and rounded back once after (``type_as(xq)``), as Meta's and torchtitan's code does for bf16 training,
is the style "interleaved/float32": the operator reads the 16-bit q, rotates it in float32 with the
float32 tables and rounds once, the same roundings. Any other mix of dtypes is left as written,
with the reason.
"""
from __future__ import annotations

import torch
from torch.fx import Node

from fxfuse.passes.graph import dtype, insert_call, is_op, plain_cast, shape
from fxfuse.passes.symbolic import is_static, same

aten = torch.ops.aten
_VIEWS = (aten.view.default, aten.reshape.default, aten._unsafe_view.default)


class NotComplexRope(Exception):
    """Not the complex rotation (nothing to report)."""


def match_complex(node: Node, perm: list[int], declined) -> tuple[Node, Node, bool]:
    """(x, freqs_cis, in float32) when ``node`` is the complex rotation of x (in float32: x is 16-bit,
    turned to float32 for the rotation and the result rounded back to x's dtype once); raises
    ``declined(reason)`` for a rotation that cannot be fused, NotComplexRope for anything else."""
    cast = None
    if is_op(node, aten._to_copy.default) and is_op(node.args[0], *_VIEWS):  # type_as(xq) after the rotation
        cast, node = node, node.args[0]
    s = shape(node)
    if not is_op(node, *_VIEWS) or s is None or len(s) != 4 or not is_static(s[-1:]):
        raise NotComplexRope()
    real = node.args[0]
    if not is_op(real, aten.view_as_real.default) or not same(tuple(shape(real)), (*s[:-1], s[-1] // 2, 2)):
        raise NotComplexRope()
    product = real.args[0]
    if not is_op(product, aten.mul.Tensor) or not all(isinstance(a, Node) for a in product.args[:2]):
        raise NotComplexRope()
    for pairs, freqs in (product.args[:2], product.args[1::-1]):
        if not is_op(pairs, aten.view_as_complex.default) or not is_op(pairs.args[0], *_VIEWS):
            continue
        x = pairs.args[0].args[0]
        if not same(tuple(shape(x) or ()), tuple(s)):
            continue
        if cast is not None or is_op(x, aten._to_copy.default):
            source = upcast_source(x, cast)
            if source is None:
                raise declined(f"the complex rotation takes a {dtype(x.args[0] if is_op(x, aten._to_copy.default) else x)} "
                               f"q/k to float32 and gives {dtype(cast or node)}; fused RoPE in float32 takes a 16-bit "
                               "q/k to float32 and rounds the rotation back to its dtype once (type_as)")
            _check(x, freqs, node, perm, declined)
            return source, freqs, True
        _check(x, freqs, node, perm, declined)
        return x, freqs, False
    raise NotComplexRope()


def upcast_source(x: Node, cast: Node | None) -> Node | None:
    """The 16-bit q/k of ``x = q.float()`` whose rotation ``cast`` rounds back to q's dtype, or None."""
    if cast is None or not is_op(x, aten._to_copy.default) or not isinstance(x.args[0], Node):
        return None
    source = x.args[0]
    if not plain_cast(x) or not plain_cast(cast) or dtype(source) not in (torch.bfloat16, torch.float16) or dtype(x) != torch.float32 or \
            dtype(cast) != dtype(source) or not same(tuple(shape(source) or ()), tuple(shape(x))):
        return None
    return source


def _check(x: Node, freqs: Node, node: Node, perm: list[int], declined) -> None:
    if dtype(x) != torch.float32 or dtype(node) != torch.float32:
        raise declined(f"the complex rotation of a {dtype(x)} q/k gives {dtype(node)}; fused RoPE rotates float32 "
                       "pairs of a complex64 product only")
    if dtype(freqs) != torch.complex64:
        raise declined(f"freqs_cis is {dtype(freqs)}, not the complex64 of a float32 rotation")
    fs = shape(freqs)
    if fs is None or len(fs) > 4:
        raise declined("freqs_cis has no known shape of rank <= 4")
    fs = [((1,) * (4 - len(fs)) + tuple(fs))[p] for p in perm]
    operand = [shape(node)[p] for p in perm]  # (B, H, L, D) as the operator reads it
    if not (same(fs[-1], operand[-1] // 2) and same(fs[1], 1) and (same(fs[2], 1) or same(fs[2], operand[2]))
            and (same(fs[0], 1) or same(fs[0], operand[0]))):
        raise declined(f"freqs_cis (read as {list(fs)}) is not one value per pair and position, broadcast over the "
                       f"heads of q/k ({list(operand)})")


def tables(gm, freqs: Node, before: Node) -> tuple[Node, Node]:
    """cos and sin in x's layout (freqs_cis's shape with its last dim D): its real and imaginary
    parts, each repeated for the two elements of its pair."""
    real = insert_call(gm, aten.view_as_real.default, (freqs,), before)
    out = []
    for part in (0, 1):
        p = insert_call(gm, aten.select.int, (real, -1, part), before)
        pair = insert_call(gm, aten.stack.default, ([p, p], -1), before)
        out.append(insert_call(gm, aten.flatten.using_ints, (pair, -2, -1), before))
    return out[0], out[1]
