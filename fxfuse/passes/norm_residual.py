"""The residual sum feeding a fused norm, folded into the norm's load.

Two forms. A plain ``h = a + b`` whose sum is also used elsewhere (pre-norm blocks keep it as the
residual stream) becomes ``fxfuse.add_norm``. A sum of three or more terms (B2T's ``x + f(x) +
x_in``) or one with a constant-scaled term (DeepNorm's ``alpha * x + f(x)``) becomes
``fxfuse.sum_norm`` whether the sum is used again or not: the products and partial sums it folds
are intermediates eager writes and reads back. Each fold is proved from ``meta``: every term has the
sum's shape (nothing broadcasts) and dtype (no promotion between partial sums), a scale is a Python
number or a 0-d tensor of the term's dtype and device (an operator input: a DeepNorm ``alpha``
buffer or parameter; the product is computed in the accumulator and rounded to the dtype, as
eager's mul computes it). A 0-d scale of another dtype stays a term of its own: eager's product of
a bfloat16 ``x`` and a float32 0-d ``alpha`` is bfloat16 either way, but whether alpha is rounded to
bfloat16 first depends on where it lives (a CPU scalar is not, a CUDA tensor is), which the graph
does not settle. A per-feature ``alpha`` is not a scale of the sum either;
an ``add`` with ``alpha=`` (one rounding for ``a + c * b``) is not split, and the adds nest so that
adding the terms left to right rounds as the user's code does (in ``(a + b) + (c + d)`` the pair
``c + d`` stays one term, computed before the fused op).
"""
from __future__ import annotations

import dataclasses

import torch
from torch.fx import Node

from fxfuse.passes.graph import FLOAT_FORMATS, dtype, is_op, is_python_scalar, shape, val
from fxfuse.spec import dtype_name

aten = torch.ops.aten


def _plain_add(n, like: Node) -> bool:
    return (is_op(n, aten.add.Tensor) and n.kwargs.get("alpha", 1) == 1 and all(isinstance(a, Node) for a in n.args)
            and shape(n) == shape(like) and dtype(n) == dtype(like))


def _scalar_tensor(c, t: Node) -> bool:
    """``c`` is a 0-d tensor of ``t``'s dtype on ``t``'s device (see the module docstring)."""
    vc, vt = val(c) if isinstance(c, Node) else None, val(t)
    return isinstance(vc, torch.Tensor) and isinstance(vt, torch.Tensor) and vc.dim() == 0 and \
        vc.dtype == vt.dtype and vc.device == vt.device


def _term(n: Node, like: Node) -> tuple[Node, object, list[Node]] | None:
    """(tensor, constant or 0-d tensor node, nodes folded) for one term of the sum; None when it
    broadcasts or promotes."""
    if not isinstance(n, Node) or shape(n) != shape(like) or dtype(n) != dtype(like):
        return None
    if is_op(n, aten.mul.Tensor, aten.mul.Scalar) and len(n.users) == 1 and not n.kwargs:
        a, b = n.args
        t, c = (a, b) if is_python_scalar(b) else (b, a) if is_python_scalar(a) else (None, None)
        if isinstance(t, Node) and shape(t) == shape(like) and dtype(t) == dtype(like):
            return t, float(c), [n]
        for t, c in ((a, b), (b, a)):
            if isinstance(t, Node) and shape(t) == shape(like) and dtype(t) == dtype(like) and _scalar_tensor(c, t) \
                    and c is not t:
                return t, c, [n]
    return n, 1.0, []


def flatten_sum(s: Node) -> tuple[list[tuple[Node, float]], list[Node]] | None:
    """The terms of ``s`` in an order whose left-to-right sum rounds as ``s`` does, and the adds and
    products folded; None when ``s`` is not a sum of terms of its own shape and dtype."""
    if not _plain_add(s, s) or dtype(s) not in FLOAT_FORMATS:
        return None
    a, b = s.args
    # Addition is commutative in floating point, so (b + c) + a is a + (b + c): one nested add
    # per level flattens exactly; an add used elsewhere stays a term (its value is needed anyway).
    for inner, other in ((a, b), (b, a)):
        if _plain_add(inner, s) and len(inner.users) == 1 and inner is not other:
            nested = flatten_sum(inner)
            last = _term(other, s)
            if nested is not None and last is not None:
                return nested[0] + [last[:2]], nested[1] + [s] + last[2]
    first, second = _term(a, s), _term(b, s)
    if first is None or second is None:
        return None
    return [first[:2], second[:2]], [s] + first[2] + second[2]


def _plain_pair(site, s: Node, order: dict[Node, int]) -> None:
    """``h = a + b`` whose sum is also used elsewhere: ``fxfuse.add_norm`` (the two may differ in dtype)."""
    if not is_op(s, aten.add.Tensor) or s.kwargs.get("alpha", 1) != 1:
        return
    a, b = s.args
    if not (isinstance(a, Node) and isinstance(b, Node)) or not (shape(a) == shape(b) == shape(s)):
        return
    if not all(dtype(t) in FLOAT_FORMATS for t in (a, b, s)):
        return
    outside = [u for u in s.users if u not in site.interior]
    if not outside or not _after_inputs(outside, [a, b, *site.params], order):
        return
    site.residual, site.x = b, a
    site.interior.add(s)
    site.spec = dataclasses.replace(site.spec, sum_dtype=dtype_name(dtype(s)))
    site.sum_node = s


def _after_inputs(users, inputs, order) -> bool:
    """Every user of the sum runs after all the fused op's inputs exist (it is inserted there)."""
    last = max(order[n] for n in inputs)
    return all(order[u] > last for u in users)


def try_residual(site, order: dict[Node, int]) -> None:
    """Fold the sum feeding ``site`` (``site.x``) into it, when proved and worth it (above)."""
    s = site.x
    flat = flatten_sum(s)
    if flat is None or (len(flat[0]) == 2 and all(not isinstance(c, Node) and c == 1.0 for _, c in flat[0])):
        _plain_pair(site, s, order)
        return
    terms, folded = flat
    outside = [u for u in s.users if u not in site.interior]
    tensor = [(i, c) for i, (_, c) in enumerate(terms) if isinstance(c, Node)]
    inputs = [t for t, _ in terms] + [c for _, c in tensor]
    if not _after_inputs(outside, inputs + list(site.params), order):
        return  # a user of the sum runs before all inputs exist; leave the sum alone
    site.interior |= set(folded)
    site.sum_node = s
    site.terms = inputs  # the 0-d scales follow the terms (fxfuse.sum_norm's convention)
    site.spec = dataclasses.replace(site.spec, sum_dtype=dtype_name(dtype(s)),
                                    sum_scales=tuple(1.0 if isinstance(c, Node) else c for _, c in terms),
                                    sum_tensor_scales=tuple(i for i, _ in tensor))
