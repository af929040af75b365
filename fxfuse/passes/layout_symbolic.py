"""Layout proofs at symbolic sizes: where each element of a layout chain's result comes from, as
exact arithmetic over the ShapeEnv's size symbols (the static-shape proofs replay the chain on an
``arange`` tensor instead, which needs numbers).

A tensor reached from a row-major source through element-renaming ops is described by its dims,
each a list of *atoms* (size, stride), outermost first: the element at index ``i`` of a dim whose
atoms are ``(n1, s1), (n2, s2)`` is the source's flat element ``(i // n2) * s1 + (i % n2) * s2``,
and the dims' offsets add up. Permutes reorder dims, an expand adds stride-0 atoms, and a view
(a row-major reshape of the logical elements, whatever the strides) regroups the atoms of all
dims in order into the new dims, splitting an atom only when a new size divides it for every value
of the symbols. Two layouts are the same map exactly when their canonical forms (size-1 atoms
dropped, an atom merged into the one before it when that one's stride is its size times its
stride) agree term by term; every comparison is sympy arithmetic on the symbols, so a proof
here holds for every size, and anything not decided this way returns None (not proved).
"""
from __future__ import annotations

import sympy
import torch
from torch.fx import Node

from fxfuse.passes.graph import shape
from fxfuse.passes.symbolic import expr

aten = torch.ops.aten

Layout = list  # [[(size, stride), ...] per dim], sympy expressions

_RESHAPES = (aten.view.default, aten._unsafe_view.default, aten.reshape.default)
_COPIES = (aten.clone.default, aten.alias.default)


class _Unknown(Exception):
    pass


def _eq(a, b) -> bool:
    return sympy.expand(a - b) == 0


def _quotient(a, b):
    """``a / b`` when it is a polynomial in the symbols with integer coefficients (b divides a
    for every value), else None."""
    q = sympy.cancel(sympy.expand(a) / sympy.expand(b))
    num, den = q.as_numer_denom()
    if den != 1 or not all(c.is_integer for c in sympy.expand(num).as_coefficients_dict().values()):
        return None
    return None if q.is_number and not q > 0 else q


def row_major(sizes) -> Layout:
    sizes = [expr(n) for n in sizes]
    dims, stride = [], sympy.Integer(1)
    for n in reversed(sizes):
        dims.append([] if _eq(n, 1) else [(n, stride)])
        stride = stride * n
    return dims[::-1]


def _flat(layout: Layout) -> list:
    return [atom for dim in layout for atom in dim]


def _regroup(atoms: list, sizes) -> Layout:
    atoms, out = list(atoms), []
    for n in sizes:
        need, dim = expr(n), []
        while not _eq(need, 1):
            if not atoms:
                raise _Unknown
            a, s = atoms.pop(0)
            if _eq(a, need):
                dim.append((a, s))
                need = sympy.Integer(1)
            elif (rest := _quotient(need, a)) is not None:
                dim.append((a, s))
                need = rest
            elif (inner := _quotient(a, need)) is not None:
                dim.append((need, sympy.expand(inner * s)))
                atoms.insert(0, (inner, s))
                need = sympy.Integer(1)
            else:
                raise _Unknown
        out.append(dim)
    if atoms:
        raise _Unknown
    return out


def _perm_of(node: Node, rank: int) -> list[int]:
    if node.target == aten.permute.default:
        return [d % rank for d in node.args[1]]
    if node.target == aten.t.default:
        return [1, 0] if rank == 2 else [0]
    a, b = (d % rank for d in node.args[1:3])
    perm = list(range(rank))
    perm[a], perm[b] = perm[b], perm[a]
    return perm


def apply(layout: Layout, node: Node) -> Layout:
    """The layout after one layout op (its output shape read from its fake value)."""
    out_shape = shape(node)
    if out_shape is None:
        raise _Unknown
    t = node.target
    if t in _COPIES:
        return layout
    if t in _RESHAPES:
        return _regroup(_flat(layout), out_shape)
    if t in (aten.permute.default, aten.transpose.int, aten.t.default):
        perm = _perm_of(node, len(layout))
        return [layout[p] for p in perm]
    if t == aten.unsqueeze.default:
        d = node.args[1] % (len(layout) + 1)
        return layout[:d] + [[]] + layout[d:]
    if t == aten.squeeze.dim:
        d = node.args[1] % max(len(layout), 1)
        if len(out_shape) == len(layout):
            return layout
        if layout[d]:
            raise _Unknown
        return layout[:d] + layout[d + 1:]
    if t == aten.expand.default:
        extra = len(out_shape) - len(layout)
        dims = [[(expr(n), sympy.Integer(0))] if not _eq(expr(n), 1) else [] for n in out_shape[:extra]]
        for dim, n in zip(layout, out_shape[extra:]):
            size = sympy.Mul(*(a for a, _ in dim)) if dim else sympy.Integer(1)
            if _eq(size, expr(n)):
                dims.append(dim)
            elif not dim:
                dims.append([(expr(n), sympy.Integer(0))])
            else:
                raise _Unknown
        return dims
    raise _Unknown


def _canonical(dim: list) -> list:
    out = []
    for a, s in dim:
        if _eq(a, 1):
            continue
        if out and _eq(out[-1][1], a * s):
            out[-1] = (sympy.expand(out[-1][0] * a), s)
        else:
            out.append((a, s))
    return out


def same_layout(a: Layout, b: Layout) -> bool:
    if len(a) != len(b):
        return False
    for da, db in zip(a, b):
        ca, cb = _canonical(da), _canonical(db)
        if len(ca) != len(cb) or not all(_eq(x[0], y[0]) and _eq(x[1], y[1]) for x, y in zip(ca, cb)):
            return False
    return True


def replay(chain: list[Node], src_shape) -> Layout | None:
    """The layout of ``chain``'s result over a row-major ``src_shape`` source; None when an op is
    not decided for every value of the symbols."""
    layout = row_major(src_shape)
    try:
        for node in chain:
            layout = apply(layout, node)
    except _Unknown:
        return None
    return layout


def is_row_major(layout: Layout | None) -> bool:
    """Whether the layout reads the source in its own row-major order (a plain reshape)."""
    if layout is None:
        return False
    flat = _canonical(_flat(layout))
    return not flat or (len(flat) == 1 and _eq(flat[0][1], 1))


def grouped_heads(src_shape, perm: list[int], groups: int, transposed: bool) -> Layout | None:
    """The layout of ``R.permute(perm)`` (R of ``src_shape``, (B, Hkv, L, D) after the permute)
    with each kv head repeated ``groups`` times and the heads merged into the batch:
    (B*Hkv*groups, L, D), or (.., D, L) when ``transposed``."""
    layout = row_major(src_shape)
    b, hkv, l, d = (layout[p] for p in perm)
    lead = b + hkv + ([(sympy.Integer(groups), sympy.Integer(0))] if groups != 1 else [])
    return [lead, d, l] if transposed else [lead, l, d]
