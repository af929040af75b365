"""Masks and biases computed from positions: derive their expression from the user's ops, prove it.

A mask like ``i // 64 == j // 64`` or a bias like ``slopes[:, None, None] * (j - i)`` is built by a
small subgraph of aranges, arithmetic, comparisons and broadcasting. Read op by op, that subgraph
is an index expression (``fxfuse.index_expr``) over the scores' positions, which the kernel
computes in place of reading an (Lq, Lk) tensor, and for masks, uses to skip whole tiles.

Derivation: every tensor of the subgraph is a symbolic tensor (its shape, its dtype, and an
expression over variables ``d0, d1, ...``, one per dimension of its own, size-1 dimensions never
referenced); layout ops rename or substitute variables, arithmetic mirrors the op with the casts
type promotion made explicit. A node no rule covers may still be a *per-head input*: a small
constant tensor whose only non-1 dimensions end up on the batch or head axis (ALiBi's slopes),
which the kernel loads once per program. At the end the variables are named after the score axes
the tensor broadcasts to (aligned on the right).

Proof: the expression is evaluated (the way the kernel computes it: 32-bit integers, float32 with
each result rounded to its dtype) on the whole index grid at the graph's static shape and compared
bit for bit with the values the subgraph computes. Anything not derived or not proved stays a
tensor input, with the reason, as before.
"""
from __future__ import annotations

import dataclasses
import math

import torch
from torch.fx import Node

from fxfuse import index_expr as ix
from fxfuse.passes.attention_layout import constant_value
from fxfuse.passes.graph import is_python_scalar, shape, val
from fxfuse.passes.symbolic import guarded, hints, is_static

aten = torch.ops.aten

_MAX_HEAD_NUMEL = 1 << 16  # a per-head input is loaded once per program: it stays small
# The proof evaluates the user's bias at its full broadcast shape once, at capture: (H, L, L) for
# ALiBi, so 16 heads up to L = 2048; a larger one stays a tensor input (with a note).
_MAX_PROOF_NUMEL = 1 << 26
_DTYPES = {torch.bool: "bool", torch.int32: "int32", torch.int64: "int64", torch.float32: "float32",
           torch.bfloat16: "bfloat16", torch.float16: "float16"}


class NotIndex(Exception):
    """The subgraph is not an index expression the kernel can compute; the message says why."""


class _NotPerHead(NotIndex):
    """A tensor leaf of the expression maps onto the query or key axis."""

    def __init__(self, leaf: int):
        super().__init__(leaf)
        self.leaf = leaf


@dataclasses.dataclass(frozen=True)
class _Sym:
    shape: tuple
    dtype: str
    expr: tuple


@dataclasses.dataclass
class Derived:
    """A proved expression; ``heads`` are the per-head inputs it loads (node, 4-d view shape), in
    the order of its ``("load", dtype, k)`` indices."""

    expr: tuple
    heads: list


def derive(node: Node, score_shape: tuple, gm: torch.fx.GraphModule, allow_heads: bool = True,
           value: torch.Tensor | None = None) -> Derived:
    """The proved expression of a mask or bias ``node`` over (b, h, i, j); raises NotIndex.
    ``value``: the node's values, when the caller already computed them."""
    deriver = _Deriver(gm, allow_heads)
    symbolic = not is_static(score_shape) or not is_static(shape(node) or ())
    try:
        sym = deriver.sym(node)
    except (TypeError, ValueError) as why:
        if not symbolic:
            raise
        # A rule compared a size symbol or a size node with a number: not decided for every size.
        raise NotIndex(f"a step of it reads a symbolic size as a value ({why})") from None
    rank = len(score_shape)
    names = "bhij" if rank == 4 else "hij"
    offset = rank - len(sym.shape)
    mapping = {f"d{k}": ix.var(names[k + offset]) for k in range(len(sym.shape)) if sym.shape[k] != 1}
    expr = ix.simplify(_subst(sym.expr, mapping))
    heads: list = []
    try:
        expr = _bind_leaves(expr, heads, score_shape)
    except _NotPerHead as bad:  # say first what made the tensor a leaf
        raise NotIndex(f"{deriver.leaves[bad.leaf][2]}; as a tensor it varies along the query or key axis (the "
                       "kernel loads only per-batch or per-head values)") from None
    if symbolic:
        _check_size_free(expr, score_shape)
    _prove(node, expr, heads, gm, sym, deriver.leaves, value, at_hints=symbolic)
    return Derived(expr, [(deriver.leaves[leaf][0], shape4) for leaf, shape4 in heads])


def reads_graph_input(node: Node) -> bool:
    """Whether a graph input (placeholder) is among ``node``'s ancestors."""
    seen, todo = set(), [node]
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op == "placeholder":
            return True
        todo.extend(n.all_input_nodes)
    return False


# ---- substitution ---------------------------------------------------------------------------------

def _subst(expr, mapping: dict) -> tuple:
    if expr[0] == "var":
        return mapping.get(expr[2], expr)
    return (expr[0], expr[1], *(_subst(a, mapping) if isinstance(a, tuple) else a for a in expr[2:]))


def _shift(expr, start: int, by: int) -> tuple:
    """Rename d_k to d_{k+by} for k >= start (a dimension inserted or removed before them)."""
    def rename(name):
        k = int(name[1:])
        return f"d{k + by}" if k >= start else name
    return _rename(expr, rename)


def _rename(expr, fn) -> tuple:
    if expr[0] == "var":
        return ix.var(fn(expr[2]))
    return (expr[0], expr[1], *(_rename(a, fn) if isinstance(a, tuple) else a for a in expr[2:]))


def _regrouped(old: tuple, new: tuple) -> dict:
    """A row-major reshape that merges or splits dimensions (Swin's window partition: (Hp, Wp) viewed
    as (Hp/ws, ws, Wp/ws, ws), then windows merged into one dim), as a substitution of each old
    dimension's variable by an expression over the new ones (``t{k}``): within each group of
    dimensions whose sizes have equal products, the flat offset ``sum t_k * stride_k`` of the new
    dims, divided by the old dim's stride and taken modulo its size. Integer arithmetic on
    non-negative positions (exact; the proof checks it fits 32 bits); static sizes only."""
    if not is_static(old) or not is_static(new):
        raise NotIndex("a reshape that merges or splits index dimensions at symbolic sizes")
    if 0 in old or 0 in new or math.prod(old) != math.prod(new):
        raise NotIndex("a reshape of an empty tensor")
    mapping, i, j = {}, 0, 0
    while i < len(old) or j < len(new):
        group_old, group_new, n_old, n_new = [], [], 1, 1
        if i < len(old):
            group_old, n_old, i = [i], old[i], i + 1
        if j < len(new):
            group_new, n_new, j = [j], new[j], j + 1
        while n_old != n_new:
            if n_old < n_new:
                group_old.append(i)
                n_old, i = n_old * old[i], i + 1
            else:
                group_new.append(j)
                n_new, j = n_new * new[j], j + 1
        flat, stride = None, 1
        for k in reversed(group_new):
            if new[k] != 1:
                term = ix.var(f"t{k}") if stride == 1 else ("mul", "int64", ix.var(f"t{k}"), ix.const(stride, "int64"))
                flat = term if flat is None else ("add", "int64", term, flat)
            stride *= new[k]
        stride, first = n_old, True
        for k in group_old:
            stride //= old[k]
            if old[k] == 1:
                continue
            e = flat if stride == 1 else ("floordiv", "int64", flat, ix.const(stride, "int64"))
            mapping[f"d{k}"] = e if first else ("mod", "int64", e, ix.const(old[k], "int64"))
            first = False
    return mapping


def _affine(start: int, step: int, name: str) -> tuple:
    e = ix.var(name)
    if step != 1:
        e = ("mul", "int64", e, ix.const(step, "int64"))
    return ix.arith("add", "int64", e, ix.const(start, "int64"))


# ---- derivation -----------------------------------------------------------------------------------

_UNARY = {aten.neg.default: "neg", aten.abs.default: "abs"}
_COMPARE = {getattr(aten, op).Tensor: op for op in ix.COMPARE} | {getattr(aten, op).Scalar: op for op in ix.COMPARE}
_LOGIC = {aten.logical_and.default: "and", aten.logical_or.default: "or", aten.bitwise_and.Tensor: "and",
          aten.bitwise_or.Tensor: "or"}
_ARITH = {aten.add.Tensor: "add", aten.add.Scalar: "add", aten.sub.Tensor: "sub", aten.sub.Scalar: "sub",
          aten.mul.Tensor: "mul", aten.mul.Scalar: "mul", aten.minimum.default: "min", aten.maximum.default: "max"}
_DIVISION = {aten.floor_divide.default: "floordiv", aten.floor_divide.Scalar: "floordiv",
             aten.remainder.Scalar: "mod", aten.remainder.Tensor: "mod"}
_IDENTITY = (aten.clone.default, aten.alias.default, aten.lift_fresh_copy.default, aten.detach.default)
_RESHAPES = (aten.view.default, aten._unsafe_view.default, aten.reshape.default)


def _dtype(node) -> str:
    v = val(node)
    if v is None or v.dtype not in _DTYPES:
        raise NotIndex(f"{getattr(node, 'name', node)} has dtype {getattr(v, 'dtype', '?')}; index expressions "
                       "compute in bool, 32/64-bit integers, float32, bfloat16 and float16")
    return _DTYPES[v.dtype]


class _Deriver:
    def __init__(self, gm, allow_heads: bool):
        self.gm, self.allow_heads = gm, allow_heads
        self.memo: dict[Node, _Sym] = {}
        self.leaves: list[tuple[Node, torch.Tensor, str]] = []  # (node, its values, why no rule covers it)

    def sym(self, node) -> _Sym:
        if node not in self.memo:
            try:
                self.memo[node] = self._rule(node)
            except NotIndex as why:
                self.memo[node] = self._leaf(node, why)
        return self.memo[node]

    def _leaf(self, node: Node, why: NotIndex) -> _Sym:
        """A node no rule covers: a constant 1-element value, or a small per-head input."""
        v = val(node)
        if v is None or node.op == "placeholder" and v.numel() != 1:
            raise why
        small = v.numel() == 1 or (self.allow_heads and v.numel() <= _MAX_HEAD_NUMEL)
        value = constant_value(node, self.gm) if small else None
        if value is None or value.requires_grad or value.dtype not in _DTYPES:
            raise why
        dt = _DTYPES[value.dtype]
        if value.numel() == 1:
            return _Sym(tuple(v.shape), dt, ix.const(value.item(), dt))
        idx = tuple(ix.var(f"d{k}") if n != 1 else ix.const(0, "int64") for k, n in enumerate(v.shape))
        self.leaves.append((node, value, str(why)))
        return _Sym(tuple(v.shape), dt, ("leaf", dt, len(self.leaves) - 1, *idx))

    def _operand(self, x, compute: str, rank: int) -> tuple:
        """``x`` (a node or a Python scalar) as an operand of an op computing in ``compute``,
        broadcast (aligned on the right) to ``rank`` dimensions."""
        if not isinstance(x, Node):
            if not isinstance(x, (bool, int, float)):
                raise NotIndex(f"an index operand {x!r} is not a number")
            # Python scalars enter half/bfloat16 ops at float32 (torch's op math), as in the kernel.
            dt = "float32" if compute in ix.FLOATS else compute
            return ix.const(float(x) if dt in ix.FLOATS else bool(x) if dt == "bool" else int(x), dt)
        s = self.sym(x)
        e = _shift(s.expr, 0, rank - len(s.shape))
        return e if s.dtype == compute else ix.cast(compute, e)

    def _rule(self, node) -> _Sym:
        if not isinstance(node, Node) or node.op != "call_function":
            raise NotIndex(f"{getattr(node, 'name', node)} is not computed from positions")
        t, args, out = node.target, node.args, val(node)
        if out is None:
            raise NotIndex(f"{node.name} has no known shape")
        shape, dt = tuple(out.shape), _dtype(node)
        if t in (aten.arange.default, aten.arange.start, aten.arange.start_step):
            # The end only sets the length (it may be a size symbol); start and step give the values.
            values = [a for k, a in enumerate(args) if k != (0 if t == aten.arange.default else 1)]
            if dt not in ix.INTS or not all(isinstance(a, int) for a in values):
                raise NotIndex("a floating-point arange (its values depend on how torch rounds each step)")
            start, step = (0, 1) if t == aten.arange.default else (args[0], args[2] if len(args) > 2 else 1)
            expr = _affine(start, step, "d0") if shape[0] != 1 else ix.const(start, dt)
            return _Sym(shape, dt, expr if dt == "int64" else ix.cast(dt, expr))
        if t in (aten.ones.default, aten.zeros.default, aten.full.default, aten.ones_like.default,
                 aten.zeros_like.default, aten.full_like.default, aten.scalar_tensor.default):
            fixed = {aten.ones.default: 1, aten.ones_like.default: 1, aten.zeros.default: 0, aten.zeros_like.default: 0}
            value = fixed[t] if t in fixed else args[0] if t == aten.scalar_tensor.default else args[1]
            if not isinstance(value, (bool, int, float)):
                raise NotIndex("a fill value that is not a number")
            return _Sym(shape, dt, ix.const(bool(value) if dt == "bool" else float(value) if dt in ix.FLOATS
                                            else int(value), dt))
        if t in _IDENTITY:
            s = self.sym(args[0])
            return _Sym(shape, s.dtype, s.expr)
        if t == aten._to_copy.default:
            s = self.sym(args[0])
            if set(node.kwargs) - {"dtype", "layout", "device", "memory_format"}:
                raise NotIndex("a copy with options other than a dtype")
            return _Sym(shape, dt, s.expr if s.dtype == dt else ix.cast(dt, s.expr))
        if t in (aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default) or t in _RESHAPES:
            return self._reshape(node, shape, dt)
        if t == aten.expand.default:
            s = self.sym(args[0])
            return _Sym(shape, dt, _shift(s.expr, 0, len(shape) - len(s.shape)))
        if t in (aten.permute.default, aten.transpose.int, aten.t.default):
            return self._permute(node, shape, dt)
        if t == aten.slice.Tensor:
            return self._slice(node, shape, dt)
        if t == aten.select.int:
            s = self.sym(args[0])
            dim = args[1] % len(s.shape)
            index = args[2] % s.shape[dim]
            e = _subst(s.expr, {f"d{dim}": ix.const(index, "int64")})
            return _Sym(shape, dt, _shift(e, dim + 1, -1))
        if t in _UNARY:
            return _Sym(shape, dt, (_UNARY[t], dt, self._operand(args[0], dt, len(shape))))
        if t in (aten.logical_not.default, aten.bitwise_not.default):
            if _dtype(args[0]) != "bool":
                raise NotIndex("a bitwise not of integers")
            return _Sym(shape, dt, ix.negate(self._operand(args[0], "bool", len(shape))))
        if t in _LOGIC:
            if any(not isinstance(a, Node) or _dtype(a) != "bool" for a in args[:2]):
                raise NotIndex("a bitwise and/or of integers")
            return _Sym(shape, dt, (_LOGIC[t], "bool", *(self._operand(a, "bool", len(shape)) for a in args[:2])))
        if t in _COMPARE:
            compute = _DTYPES.get(torch.result_type(*(val(a) if isinstance(a, Node) else a for a in args[:2])))
            if compute is None:
                raise NotIndex("a comparison in an unsupported dtype")
            return _Sym(shape, dt, ix.compare(_COMPARE[t], *(self._operand(a, compute, len(shape)) for a in args[:2])))
        if t in _ARITH and node.kwargs.get("alpha", 1) == 1 and (len(args) < 3 or args[2] == 1):
            if dt == "bool":
                raise NotIndex("arithmetic on booleans")
            return _Sym(shape, dt, ix.arith(_ARITH[t], dt, *(self._operand(a, dt, len(shape)) for a in args[:2])))
        if t == aten.rsub.Scalar and len(args) == 2 and dt != "bool":
            return _Sym(shape, dt, ("sub", dt, self._operand(args[1], dt, len(shape)), self._operand(args[0], dt, len(shape))))
        if t in (aten.div.Tensor, aten.div.Scalar) and is_python_scalar(args[1]) and dt in ix.FLOATS:
            c = float(args[1])
            if c == 0 or math.frexp(c)[0] not in (0.5, -0.5):
                raise NotIndex(f"a float division by {c:g} (the GPU divides approximately; powers of two only)")
            return _Sym(shape, dt, ("mul", dt, self._operand(args[0], dt, len(shape)), ix.const(1.0 / c, "float32")))
        if t in _DIVISION or (t in (aten.div.Tensor_mode, aten.div.Scalar_mode) and
                              node.kwargs.get("rounding_mode") in ("floor", "trunc")):
            op = _DIVISION.get(t) or ("floordiv" if node.kwargs["rounding_mode"] == "floor" else "truncdiv")
            return self._division(node, op, shape, dt)
        if t in (aten.clamp_min.default, aten.clamp_max.default, aten.clamp.default):
            return self._clamp(node, shape, dt)
        if t in (aten.where.self, aten.masked_fill.Scalar, aten.masked_fill.Tensor):
            c, a, b = args if t == aten.where.self else (args[1], args[2], args[0])
            if _dtype(c) != "bool":
                raise NotIndex("a where() whose condition is not boolean")
            return _Sym(shape, dt, ix.where(self._operand(c, "bool", len(shape)), self._operand(a, dt, len(shape)),
                                          self._operand(b, dt, len(shape)), dt))
        if t in (aten.triu.default, aten.tril.default):
            return self._triangle(node, shape, dt)
        raise NotIndex(f"{getattr(t, '__name__', t)} is not an index operation fxfuse computes in the kernel")

    def _reshape(self, node, shape, dt) -> _Sym:
        s = self.sym(node.args[0])
        kept_in = [k for k, n in enumerate(s.shape) if n != 1]
        kept_out = [k for k, n in enumerate(shape) if n != 1]
        if [s.shape[k] for k in kept_in] == [shape[k] for k in kept_out]:
            mapping = {f"d{a}": ix.var(f"t{b}") for a, b in zip(kept_in, kept_out)}
        else:
            mapping = _regrouped(tuple(s.shape), tuple(shape))
        return _Sym(shape, dt, _rename(_subst(s.expr, mapping), lambda n: "d" + n[1:]))

    def _permute(self, node, shape, dt) -> _Sym:
        s = self.sym(node.args[0])
        rank = len(s.shape)
        if node.target == aten.permute.default:
            dims = [d % rank for d in node.args[1]]
        else:
            a, b = (node.args[1] % rank, node.args[2] % rank) if node.target == aten.transpose.int else (0, rank - 1)
            dims = list(range(rank))
            dims[a], dims[b] = dims[b], dims[a]
        mapping = {f"d{src}": ix.var(f"t{dst}") for dst, src in enumerate(dims)}
        return _Sym(shape, dt, _rename(_subst(s.expr, mapping), lambda n: "d" + n[1:]))

    def _slice(self, node, shape, dt) -> _Sym:
        s = self.sym(node.args[0])
        args = list(node.args) + [None] * (5 - len(node.args))
        dim = (args[1] or 0) % len(s.shape)
        start, step = args[2] or 0, args[4] or 1
        n = s.shape[dim]
        start = min(max(start + n if start < 0 else start, 0), n)
        if not isinstance(step, int) or step < 1:
            raise NotIndex("a slice with a non-constant step")
        name = f"d{dim}"
        target = _affine(start, step, name) if shape[dim] != 1 else ix.const(start, "int64")
        return _Sym(shape, dt, _subst(s.expr, {name: target}))

    def _division(self, node, op, shape, dt) -> _Sym:
        x, c = node.args[:2]
        if isinstance(c, Node):
            cs = self.sym(c)
            c = cs.expr[2] if cs.expr[0] == "const" else None
        if dt not in ix.INTS or not isinstance(c, int) or isinstance(c, bool) or c <= 0:
            raise NotIndex("an integer division or remainder by something other than a positive integer constant")
        return _Sym(shape, dt, (op, dt, self._operand(x, dt, len(shape)), ix.const(c, dt)))

    def _clamp(self, node, shape, dt) -> _Sym:
        args = list(node.args) + [None] * (3 - len(node.args))
        lo, hi = (args[1], None) if node.target == aten.clamp_min.default else \
            (None, args[1]) if node.target == aten.clamp_max.default else (args[1], args[2])
        e = self._operand(args[0], dt, len(shape))
        for bound, op in ((lo, "max"), (hi, "min")):
            if bound is not None:
                if isinstance(bound, Node):
                    raise NotIndex("a clamp by a tensor")
                e = (op, dt, e, self._operand(bound, dt, len(shape)))
        return _Sym(shape, dt, e)

    def _triangle(self, node, shape, dt) -> _Sym:
        s = self.sym(node.args[0])
        diagonal = node.args[1] if len(node.args) > 1 else 0
        rank = len(shape)
        if rank < 2:
            raise NotIndex("triu/tril of a vector")
        row = ix.var(f"d{rank - 2}") if shape[-2] != 1 else ix.const(0, "int64")
        col = ix.var(f"d{rank - 1}") if shape[-1] != 1 else ix.const(0, "int64")
        keep = ix.compare("ge" if node.target == aten.triu.default else "le", ("sub", "int64", col, row),
                        ix.const(diagonal, "int64"))
        zero = ix.const(False if dt == "bool" else 0.0 if dt in ix.FLOATS else 0, dt)
        return _Sym(shape, dt, ix.where(keep, s.expr, zero, dt))


# ---- binding and proof ----------------------------------------------------------------------------

def _bind_leaves(expr, heads: list, score_shape) -> tuple:
    """Replace each per-head leaf by a load of an input whose 4-d view is (1|B, 1|H, 1, 1)."""
    if expr[0] != "leaf":
        if expr[0] in ("var", "const"):
            return expr
        return (expr[0], expr[1], *(_bind_leaves(a, heads, score_shape) if isinstance(a, tuple) else a
                                    for a in expr[2:]))
    _, dt, leaf, *idx = expr
    axes = [a[2] for a in idx if a[0] != "const"]
    if any(a[0] not in ("var", "const") or (a[0] == "const" and a[2] != 0) for a in idx) or \
            not set(axes) <= {"b", "h"} or axes != sorted(axes, key="bh".index) or len(set(axes)) != len(axes):
        raise _NotPerHead(leaf)
    rank4 = (1,) * (4 - len(score_shape)) + tuple(score_shape)
    shape4 = (rank4[0] if "b" in axes else 1, rank4[1] if "h" in axes else 1, 1, 1)
    key = (leaf, shape4)
    if key not in heads:
        heads.append(key)
    return ("load", dt, heads.index(key))


def _check_size_free(expr, score_shape) -> None:
    """At symbolic sizes the bit-for-bit proof below sees one size only; what makes the expression
    right at every size is that each rule reads positions, never a size, and that its arithmetic
    is exact there: integers (no product of two position terms, so 32 bits hold it whatever the
    length) and floats only as an exact cast of an integer (guarded: lengths below 2^24) and
    arithmetic on such values and constants, rounded per element as eager rounds it."""
    def walk(e, in_int: bool):
        op, dt = e[0], e[1]
        if op in ("var", "load"):
            return
        if op == "const":
            if in_int and not isinstance(e[2], (int, bool)):
                raise NotIndex("an integer step with a non-integer constant")
            return
        if op == "cast":
            inner = e[2]
            if dt in ix.FLOATS and inner[1] not in ix.FLOATS:
                for n in score_shape:
                    guarded(n < (1 << 24))  # the cast of a position to float32 is exact
            walk(inner, inner[1] not in ix.FLOATS)
            return
        if dt in ix.FLOATS and any(isinstance(a, tuple) and a[0] == "var" for a in e[2:]):
            raise NotIndex("a float step on a position without a cast")
        if op == "mul" and dt not in ix.FLOATS and \
                sum(bool(ix.variables(a)) for a in e[2:] if isinstance(a, tuple)) > 1:
            raise NotIndex("a product of two positions (its 32-bit range depends on the length)")
        for a in e[2:]:
            if isinstance(a, tuple):
                walk(a, dt not in ix.FLOATS)

    walk(expr, expr[1] not in ix.FLOATS)


def _prove(node, expr, heads, gm, sym: _Sym, leaves, actual, at_hints: bool = False) -> None:
    """Evaluate the expression as the kernel would on the node's whole index grid and compare it
    with the values the node's subgraph computes, bit for bit (at symbolic sizes: at their example
    values, see _check_size_free for the other sizes)."""
    if actual is None:
        actual = constant_value(node, gm, _MAX_PROOF_NUMEL, at_hints=at_hints)
    if actual is None:
        raise NotIndex("its values could not be computed at capture to prove the expression (too large, or "
                       "it reads a graph input)")
    own4 = hints((1,) * (4 - len(sym.shape)) + tuple(sym.shape))
    values = [leaves[leaf][1].reshape(hints(shape4)) for leaf, shape4 in heads]
    try:
        got = ix.evaluate(expr, ix.grids(own4), values, check_int32=True)
    except ix.Overflow as why:
        raise NotIndex(str(why)) from why
    want = actual.reshape(own4)
    if got.dtype != want.dtype or not _bitwise_equal(got.expand(own4), want):
        raise NotIndex(f"the expression {ix.text(expr)} does not reproduce the values the code computes "
                       "(bit for bit, in its dtype)")


def _bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype.is_floating_point:
        ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
        return torch.equal(a.contiguous().view(ints), b.contiguous().view(ints))
    return torch.equal(a, b)
