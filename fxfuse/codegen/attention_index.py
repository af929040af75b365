"""Index expressions (``fxfuse.index_expr``) rendered as Triton statements on a score tile.

The query position is ``offs_m[:, None]``, the key position ``offs_n[None, :]``, the batch and
head ``off_b`` and ``off_h``; a per-head input k is ``hv{k}``, loaded once per program (see
``prologue``). Each line computes what ``index_expr.evaluate`` computes, so the pass's proof holds
for the kernel: floats in float32 rounded to their dtype after each op, and integer divisions
written so that they floor whichever way ``//`` rounds (Triton's interpreter floors like numpy,
compiled Triton truncates like C): only non-negative numerators ever meet ``//``.
"""
from __future__ import annotations

import math

from fxfuse.index_expr import COMPARE, FLOATS, LOGIC

_VARS = {"i": "offs_m[:, None]", "j": "offs_n[None, :]", "b": "off_b", "h": "off_h"}
_TL = {"float32": "tl.float32", "bfloat16": "tl.bfloat16", "float16": "tl.float16", "int32": "tl.int32",
       "int64": "tl.int64"}
_ARITH = {"add": "+", "sub": "-", "mul": "*"}


def prologue(loads) -> list[str]:
    """Load each per-head input once: its (1|B, 1|H, 1, 1) view is read at (off_b, off_h)."""
    return [f"hv{k} = tl.load(E{k} + off_b * se{k}_b + off_h * se{k}_h)" for k in loads]


def emit(expr, target: str) -> list[str]:
    """Statements that assign the expression's value (a tile, or a scalar) to ``target``."""
    lines: list[str] = []
    counter = [0]

    def temp(value: str) -> str:
        name = f"{target}_t{counter[0]}"
        counter[0] += 1
        lines.append(f"{name} = {value}")
        return name

    def rounded(value: str, dt: str) -> str:
        return f"({value}).to({_TL[dt]}).to(tl.float32)" if dt in ("bfloat16", "float16") else value

    def go(e) -> str:
        op, dt, *args = e
        if op == "var":
            return _VARS[args[0]]
        if op == "const":
            v = args[0]
            if isinstance(v, float):
                return f"float('{v}')" if math.isinf(v) or math.isnan(v) else repr(v)
            return repr(v)
        if op == "load":
            return f"hv{args[0]}.to(tl.float32)" if dt in FLOATS else f"hv{args[0]}"
        xs = [go(a) for a in args]
        if op == "cast":
            src = args[0][1]
            if dt == "bool":
                return f"({xs[0]} != 0)"
            if dt in FLOATS:
                return rounded(f"({xs[0]}).to(tl.float32)" if src not in FLOATS else xs[0], dt)
            return f"({xs[0]}).to({_TL[dt]})"
        if op in _ARITH:
            return rounded(f"({xs[0]} {_ARITH[op]} {xs[1]})", dt) if dt in FLOATS else f"({xs[0]} {_ARITH[op]} {xs[1]})"
        if op in ("floordiv", "truncdiv", "mod"):
            a, c = temp(xs[0]), xs[1]  # c: a positive integer constant (the pass proves it)
            if op == "truncdiv":
                return f"tl.where({a} >= 0, {a} // {c}, -((-{a}) // {c}))"
            q = temp(f"tl.where({a} >= 0, {a} // {c}, -(({c} - 1 - {a}) // {c}))")
            return q if op == "floordiv" else f"({a} - {q} * {c})"
        if op in ("min", "max"):
            value = f"tl.{'minimum' if op == 'min' else 'maximum'}({xs[0]}, {xs[1]})"
            return rounded(value, dt) if dt in FLOATS else value
        if op in COMPARE:
            return f"({xs[0]} {COMPARE[op]} {xs[1]})"
        if op in LOGIC:
            return f"({xs[0]} {LOGIC[op]} {xs[1]})"
        if op == "not":
            return f"(~{xs[0]})"
        if op == "neg":
            return f"(-{xs[0]})"
        if op == "abs":
            return f"tl.abs({xs[0]})"
        if op == "where":
            return f"tl.where({xs[0]}, {xs[1]}, {xs[2]})"
        raise ValueError(f"unknown index expression op {op!r}")

    value = go(expr)
    lines.append(f"{target} = {value}")
    return lines
