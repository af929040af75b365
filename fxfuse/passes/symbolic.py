"""Sizes that may be symbols: proofs that hold for every value, and the graph nodes that carry them.

Under ``torch.compile`` with dynamic shapes (a second length seen, ``dynamic=True``,
``mark_dynamic``) a fake tensor's sizes are ``torch.SymInt``s over the ShapeEnv's sympy symbols
(s0, s1, ...). Comparing two of them with ``==`` in Python *decides* the comparison at the example
values and records a guard on the ShapeEnv, which Dynamo checks before reusing the compiled graph:
sound, but a guard the pass did not mean to add recompiles the graph for other lengths. So the
passes ask two different questions:

* ``same(a, b)`` / ``known(cond)``: true only when the fact holds for every value of the symbols
  allowed by the guards already there (``statically_known_true``: sympy over the ShapeEnv's symbols
  and value ranges; nothing is added). The default for every proof.
* ``guarded(cond)``: the fact at the example values, with a Dynamo guard that it stays so (used only
  where a rule holds for some sizes and the caller decided a recompile is the right price).

On plain ints every answer is the ordinary comparison.
"""
from __future__ import annotations

import math
import operator

import sympy
import torch
from torch.fx import Node
from torch.fx.experimental.symbolic_shapes import statically_known_true


def is_static(sizes) -> bool:
    """Whether every size is a plain int (no symbol)."""
    return sizes is not None and all(isinstance(n, int) for n in sizes)


def known(cond) -> bool:
    """Whether a (symbolic) condition holds for every value of its symbols; adds no guard."""
    if isinstance(cond, bool):
        return cond
    return bool(statically_known_true(cond))


def same(a, b) -> bool:
    """``a == b`` for every value of the symbols (ints, SymInts, or tuples of them)."""
    if isinstance(a, (tuple, list)) or isinstance(b, (tuple, list)):
        if a is None or b is None or len(a) != len(b):
            return False
        return all(same(x, y) for x, y in zip(a, b))
    if a is None or b is None:
        return False
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    return known(a == b)


def differ(a, b) -> bool:
    """``a != b`` for every value of the symbols."""
    if isinstance(a, int) and isinstance(b, int):
        return a != b
    return known(a != b)


def guarded(cond) -> bool:
    """The condition at the example values; when it is symbolic a Dynamo guard keeps it so."""
    return bool(cond)


def equal_or_guarded(a, b) -> bool:
    """``a == b`` for every value of the symbols, or, where they are equal at the example values,
    with a Dynamo guard that keeps them equal (for sizes the eager op itself requires equal, as the
    key and value lengths of a KV cache that Dynamo gave two symbols: the guard unifies them)."""
    if same(a, b):
        return True
    return hint(a) == hint(b) and guarded(a == b)


def specialised(n) -> int:
    """A size as an int: its value, with a Dynamo guard that it stays so when it is a symbol."""
    if isinstance(n, int):
        return n
    value = hint(n)
    guarded(n == value)
    return value


def hint(n) -> int:
    """A size's example value (the value Dynamo traced with)."""
    if isinstance(n, torch.SymInt):
        return int(n.node.hint) if n.node.hint is not None else int(n.node.shape_env.size_hint(n.node.expr))
    return int(n)


def hints(sizes) -> tuple:
    return tuple(hint(n) for n in sizes)


def expr(n) -> sympy.Expr:
    """A size as a sympy expression (an int as an Integer)."""
    if isinstance(n, torch.SymInt):
        return n.node.expr
    return sympy.Integer(int(n))


def prod(sizes):
    return math.prod(sizes)


def divides(d, n) -> bool:
    """``d`` divides ``n`` for every value of the symbols."""
    if isinstance(d, int) and isinstance(n, int):
        return d != 0 and n % d == 0
    return known(n % d == 0)


def size_node(gm: torch.fx.GraphModule, n, before: Node, avoid=frozenset()):
    """``n`` as an argument of a new node inserted before ``before``: the int itself, or a node of
    the graph that computes that symbolic size placed before ``before`` (a SymInt input or size
    computation, a ``sym_size`` of a tensor with that size, or sums and products of those built
    from the expression's symbols), reading no node of ``avoid``. None when some symbol of it has
    no node."""
    if isinstance(n, int):
        return n
    order = {node: i for i, node in enumerate(gm.graph.nodes)}
    earlier = [node for node in gm.graph.nodes if order[node] < order[before] and node not in avoid]
    return _expr_node(gm, expr(n), earlier, before, n if isinstance(n, torch.SymInt) else None)


def reroute_size_reads(gm: torch.fx.GraphModule, nodes, keep) -> None:
    """Make the ``sym_size`` reads of ``nodes`` by nodes outside ``keep`` read the size elsewhere.

    A symbolic trace takes a size from the latest tensor that has it, so a length used after an
    attention may be read from its scores: a read of their shape, not their values, which a fused
    site can serve from its inputs' sizes instead. Reads no other node computes stay."""
    for node in nodes:
        for user in list(node.users):
            if user in keep or user.op != "call_function" or user.target is not torch.ops.aten.sym_size.int:
                continue
            other = size_node(gm, user.meta.get("val"), user, avoid=keep | {user})
            if other is not None:
                user.replace_all_uses_with(other)
                gm.graph.erase_node(user)


def _expr_node(gm, target: sympy.Expr, earlier: list[Node], before: Node, wanted: torch.SymInt | None = None):
    if target.is_Integer:
        return int(target)

    # The same expression first; then, only if none, one the ShapeEnv proves equal ((s0*s0)//s0
    # and s0, as a traced matmul writes a head count): sympy per candidate is slow on big graphs.
    tests = [lambda size: size.node.expr == target]
    if wanted is not None:
        tests.append(lambda size: known(size == wanted))
    for equal in tests:
        for node in earlier:
            v = node.meta.get("val")
            if isinstance(v, torch.SymInt) and equal(v):
                return node
        for node in earlier:
            v = node.meta.get("val")
            if isinstance(v, torch.Tensor):
                for d, size in enumerate(v.shape):
                    if isinstance(size, torch.SymInt) and equal(size):
                        return _call(gm, torch.ops.aten.sym_size.int, (node, d), size, before)
    if isinstance(target, (sympy.Add, sympy.Mul)):
        parts = [_expr_node(gm, a, earlier, before) for a in target.args]
        if any(p is None for p in parts):
            return None
        fn = operator.add if isinstance(target, sympy.Add) else operator.mul
        acc = parts[0]
        for p in parts[1:]:
            value = fn(_value(acc), _value(p))
            acc = _call(gm, fn, (acc, p), value, before) if isinstance(value, torch.SymInt) else value
        return acc
    return None


def _value(a):
    return a.meta["val"] if isinstance(a, Node) else a


def _call(gm, fn, args, value, before: Node) -> Node:
    with gm.graph.inserting_before(before):
        out = gm.graph.call_function(fn, args)
    out.meta["val"] = value
    return out


def size_args(gm: torch.fx.GraphModule, sizes, before: Node) -> list:
    """A list of sizes as node arguments (see size_node). One size no node computes may be given
    as -1 (a view infers it); more is an error (every size of a Dynamo graph is computed from its
    inputs, so this means a bug here)."""
    out, missing = [], []
    for k, n in enumerate(sizes):
        a = size_node(gm, n, before)
        if a is None:
            missing.append(k)
        out.append(a)
    if len(missing) > 1:
        raise RuntimeError(f"fxfuse: the symbolic sizes {[sizes[k] for k in missing]} are computed by no node of "
                           "the graph; please report this")
    if missing:
        out[missing[0]] = -1
    return out
