"""Index expressions: a mask or bias written as arithmetic on positions, computed where it is used.

An expression is a nested tuple ``(op, dtype, *args)`` over the index variables ``b``, ``h``,
``i`` (query) and ``j`` (key) of the scores ``(B, H, Lq, Lk)``; it travels in an AttentionSpec
step (as JSON lists) and is read three ways: ``text`` for people, ``evaluate`` for the torch
reference and the pass's proof, and ``fxfuse.codegen.attention_index`` for the kernel.

Ops (every result has a dtype: "bool", "int32", "int64", "float32", "bfloat16", "float16"):
  ("var", "int64", name)           b, h, i or j
  ("const", dtype, value)          a Python number
  ("load", dtype, k)               input k (a (1|B, 1|H, 1, 1) tensor) at (b, h): per-head values
  ("cast", dtype, x)
  (op, dtype, x)                   op in neg, abs, not
  (op, dtype, x, y)                op in add, sub, mul, floordiv, truncdiv, mod, min, max,
                                   lt, le, gt, ge, eq, ne, and, or (divisions by positive constants)
  ("where", dtype, c, x, y)

Both operands of an arithmetic op already have the op's computation type (the pass inserts the
casts type promotion made). ``evaluate`` computes exactly what the kernel does: integers exactly
(the kernel's are 32-bit; the pass proves they fit), floating-point values in float32 with each
result rounded to its dtype, as torch computes half and bfloat16 ops; no float division (the GPU's
is approximate) and no fused multiply-add in the evaluation.
"""
from __future__ import annotations

import operator

import torch

FLOATS = ("float32", "bfloat16", "float16")
INTS = ("int32", "int64")
ARITH = ("add", "sub", "mul", "floordiv", "truncdiv", "mod", "min", "max")
COMPARE = {"lt": "<", "le": "<=", "gt": ">", "ge": ">=", "eq": "==", "ne": "!="}
LOGIC = {"and": "&", "or": "|"}
NEGATED = {"lt": "ge", "le": "gt", "gt": "le", "ge": "lt", "eq": "ne", "ne": "eq"}
_SHORT = {"float32": "f32", "bfloat16": "bf16", "float16": "f16", "int32": "i32", "int64": "i64", "bool": "bool"}


def var(name: str) -> tuple:
    return ("var", "int64", name)


def const(value, dtype: str) -> tuple:
    return ("const", dtype, value)


def variables(expr) -> set[str]:
    if expr[0] == "var":
        return {expr[2]}
    return set().union(*(variables(a) for a in expr[2:] if isinstance(a, tuple)))


def loads(expr) -> set[int]:
    if expr[0] == "load":
        return {expr[2]}
    return set().union(*(loads(a) for a in expr[2:] if isinstance(a, tuple)))


def relabel_loads(expr, mapping: dict) -> tuple:
    """The expression with its loads of input k reading input ``mapping[k]``."""
    if expr[0] == "load":
        return ("load", expr[1], mapping[expr[2]])
    if expr[0] in ("var", "const"):
        return expr
    return (expr[0], expr[1], *(relabel_loads(a, mapping) for a in expr[2:]))


def tupled(x):
    """The expression back from its JSON form (lists) to tuples."""
    return tuple(tupled(a) for a in x) if isinstance(x, list) else x


def negate(expr) -> tuple:
    """``not expr`` for a boolean expression, simplified where that is exact."""
    op = expr[0]
    if op == "not":
        return expr[2]
    if op == "const":
        return const(not expr[2], "bool")
    # Integer comparisons negate exactly (float ones do not: a NaN is neither < nor >=).
    if op in NEGATED and all(a[1] not in FLOATS for a in expr[2:]):
        return (NEGATED[op], "bool", *expr[2:])
    return ("not", "bool", expr)


def arith(op, dt, a, b) -> tuple:
    """a op b, with integer constants folded: x + 0 is x, (x + c1) - c2 is x + (c1 - c2). Exact for
    integers (the proof evaluates the folded form: a 32-bit wrap in the user's code would show);
    not done for floats (-0.0 + 0 is not -0.0, and each float op rounds)."""
    if dt not in INTS or op not in ("add", "sub"):
        return (op, dt, a, b)
    if b[0] == "const" and a[0] == "add" and a[3][0] == "const":
        offset = a[3][2] + (b[2] if op == "add" else -b[2])
        return arith("add", dt, a[2], const(offset, dt))
    if b == const(0, dt):
        return a
    if op == "add" and a == const(0, dt):
        return b
    return (op, dt, a, b)


def cast(dt, x) -> tuple:
    """x.to(dt), folding a boolean cast of a two-constant where: bool(where(c, 0., -inf)) is ~c."""
    if dt == "bool" and x[0] == "where" and x[3][0] == x[4][0] == "const":
        return where(x[2], const(bool(x[3][2]), "bool"), const(bool(x[4][2]), "bool"), "bool")
    return ("cast", dt, x)


def where(c, a, b, dt) -> tuple:
    """where(c, a, b), folding boolean constants: where(c, True, False) is c."""
    if dt == "bool" and a[0] == b[0] == "const":
        if a[2] == b[2]:
            return a
        return c if a[2] else negate(c)
    # where(x == y, a, where(x != y, b, z)) is where(x == y, a, b): ``!=`` is the negation of ``==``
    # for every value, NaN included (so is ``==`` of ``!=``); masked_fill(m != 0, v).masked_fill(m == 0, 0)
    # (Swin's shift mask) then reads m twice, not three times.
    if b[0] == "where" and c[0] in ("eq", "ne") and b[2] == (NEGATED[c[0]], "bool", *c[2:]):
        b = b[3]
    return ("where", dt, c, a, b)


def compare(op, a, b) -> tuple:
    """a op b, folding a comparison of a two-constant where: (where(c, 1., 0.) == 0) is ~c."""
    if a[0] == "where" and a[3][0] == a[4][0] == "const" and b[0] == "const":
        cmp = getattr(operator, op)
        return where(a[2], const(bool(cmp(a[3][2], b[2])), "bool"), const(bool(cmp(a[4][2], b[2])), "bool"), "bool")
    return (op, "bool", a, b)


def simplify(expr) -> tuple:
    """The expression rebuilt bottom-up through the folding constructors (after substitutions,
    e.g. a slice's start put into an arange's ``d + start``)."""
    op, dt, *args = expr
    if op in ("var", "const", "load", "leaf"):
        return expr
    args = [simplify(a) if isinstance(a, tuple) else a for a in args]
    if op in ("add", "sub"):
        return arith(op, dt, *args)
    if op == "cast":
        return cast(dt, args[0])
    if op == "where":
        return where(*args, dt)
    if op in COMPARE:
        return compare(op, *args)
    return (op, dt, *args)


# ---- text -------------------------------------------------------------------------------------------

_PREC = {**{c: 1 for c in COMPARE}, "or": 2, "and": 3, "add": 4, "sub": 4, "mul": 5, "floordiv": 5, "mod": 5}
_SYMBOL = {**COMPARE, **LOGIC, "add": "+", "sub": "-", "mul": "*", "floordiv": "//", "mod": "%"}


def text(expr) -> str:
    """Python-like infix text: ``i // 64 != j // 64``, ``head0 * f32(j - i)``."""
    return _text(expr)[0]


def _text(expr) -> tuple[str, int]:
    op, dt, *args = expr
    if op == "var":
        return args[0], 9
    if op == "const":
        return (repr(args[0]) if not isinstance(args[0], float) else f"{args[0]:g}"), 9 if args[0] >= 0 else 6
    if op == "load":
        return f"head{args[0]}", 9
    if op == "cast":
        return f"{_SHORT[dt]}({text(args[0])})", 9
    if op in ("neg", "not"):
        inner, p = _text(args[0])
        return ("-" if op == "neg" else "~") + (inner if p >= 6 else f"({inner})"), 6
    if op in _SYMBOL:
        p = _PREC[op]
        (a, pa), (b, pb) = _text(args[0]), _text(args[1])
        left_ok = pa > p or (pa == p and p != 1)
        a = a if left_ok else f"({a})"
        b = b if pb > p else f"({b})"
        result = f"{a} {_SYMBOL[op]} {b}"
        return (f"{_SHORT[dt]}({result})" if dt in FLOATS and dt != "float32" else result), (9 if dt in ("bfloat16", "float16") else p)
    return f"{'trunc_div' if op == 'truncdiv' else op}({', '.join(text(a) for a in args)})", 9


# ---- evaluation ------------------------------------------------------------------------------------

class Overflow(ValueError):
    """An integer intermediate does not fit the kernel's 32 bits."""


def _round(x: torch.Tensor, dtype: str) -> torch.Tensor:
    return x.to(getattr(torch, dtype)).float() if dtype in ("bfloat16", "float16") else x


def evaluate(expr, grids: dict, inputs: list, check_int32: bool = False) -> torch.Tensor:
    """The expression's values, broadcast over the index tensors in ``grids`` (name -> int64
    tensor, e.g. ``i`` of shape (1, 1, Lq, 1)); floats come back in their dtype. With
    ``check_int32`` an integer intermediate outside 32 bits raises Overflow."""
    out = _eval(expr, grids, inputs, check_int32, {})
    return out.to(getattr(torch, expr[1])) if expr[1] in FLOATS else out


def _eval(expr, grids, inputs, check, memo) -> torch.Tensor:
    if expr in memo:
        return memo[expr]
    op, dt, *args = expr
    if op == "var":
        r = grids[args[0]]
    elif op == "const":
        r = torch.tensor(args[0], dtype=torch.float32 if dt in FLOATS else getattr(torch, dt))
        r = _round(r, dt) if dt in FLOATS else r
    elif op == "load":
        t = inputs[args[0]]
        r = t.float() if t.is_floating_point() else t.to(torch.int64) if dt in INTS else t
    else:
        xs = [_eval(a, grids, inputs, check, memo) for a in args]
        r = _apply(op, dt, xs)
    if check and dt in INTS and r.numel() and (r.abs() > 2**31 - 1).any():
        raise Overflow(f"an index intermediate reaches {int(r.abs().max())}, past 32 bits")
    memo[expr] = r
    return r


def _apply(op, dt, xs):
    if op == "cast":
        x = xs[0]
        if dt in FLOATS:
            return _round(x.float(), dt)
        if dt == "bool":
            return x != 0
        return x.to(torch.int64) if x.is_floating_point() or x.dtype == torch.bool else x
    if op == "where":
        r = torch.where(*xs)
    elif op == "neg":
        r = -xs[0]
    elif op == "abs":
        r = xs[0].abs()
    elif op == "not":
        return ~xs[0]
    elif op in COMPARE:
        return getattr(torch, op)(*xs)
    elif op in LOGIC:
        return xs[0] & xs[1] if op == "and" else xs[0] | xs[1]
    elif op in ("floordiv", "truncdiv"):
        r = torch.div(*xs, rounding_mode="floor" if op == "floordiv" else "trunc")
    elif op == "mod":
        r = torch.remainder(*xs)
    elif op in ("min", "max"):
        r = torch.minimum(*xs) if op == "min" else torch.maximum(*xs)
    else:
        r = {"add": torch.add, "sub": torch.sub, "mul": torch.mul}[op](*xs)
    return _round(r, dt) if dt in FLOATS else r


def grids(shape4, device=None, rows: tuple[int, int] | None = None) -> dict:
    """Index tensors b, h, i, j broadcasting over a (B, H, Lq, Lk) grid; ``rows`` (first, end)
    keeps only those query rows (a chunk of the torch reference)."""
    out = {}
    for axis, (name, n) in enumerate(zip("bhij", shape4)):
        view = [1, 1, 1, 1]
        first, end = rows if name == "i" and rows else (0, n)
        view[axis] = end - first
        out[name] = torch.arange(first, end, device=device).view(view)
    return out
