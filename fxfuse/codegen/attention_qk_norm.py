"""QK-norm inside the attention kernels (a spec with ``norm_q``/``norm_k``).

Each row of a loaded q (k) tile is one head's D values, and the tile holds the whole head dim
(BLOCK_D == D, the condition the kernels rotate under too: fxfuse.ops.attention_rope), so the norm
over the head dim is a reduction along the tile's second axis, done right after the load and
before any RoPE. It computes what the ``fxfuse.norm`` kernel of the same NormSpec computes
(fxfuse.codegen.norm: float32 statistics, the spec's roundings, parameters and steps) and rounds
the result to the operand's dtype, as the user's normalised q was. Rows past the end of the
sequence are loaded as zeros and stay zeros (their statistics see eps only).

The backward kernels normalise their loads the same way; the gradient they store is that of the
normalised operand, which the operator takes back through the norm (fxfuse.norm_backward).
"""
from __future__ import annotations

from fxfuse.lowering.norm import lower_norm
from fxfuse.spec import NormSpec
from fxfuse.spec_attention import AttentionSpec

_TL = {"float32": "tl.float32", "bfloat16": "tl.bfloat16", "float16": "tl.float16"}


def _norms(spec: AttentionSpec) -> list[tuple[str, NormSpec]]:
    """(operand, NormSpec) per normalised operand, q before k."""
    return [(n, NormSpec.from_json(text)) for n, text in (("q", spec.norm_q), ("k", spec.norm_k)) if text]


def norm_args(spec: AttentionSpec) -> str:
    return "".join(f"N{n.upper()}{i}, " for n, ns in _norms(spec) for i in range(len(ns.params)))


def norm_strides(spec: AttentionSpec) -> str:
    return "".join(f"sn{n}{i}_d, " for n, ns in _norms(spec) for i in range(len(ns.params)))


def _round(expr: str, dtype: str | None) -> str:
    return f"({expr}).to({_TL[dtype]}).to(tl.float32)" if dtype else expr


def normalise(spec: AttentionSpec, name: str, var: str) -> list[str]:
    """Lines normalising each row of the [rows, BLOCK_D] tile ``var`` of operand ``name`` in place."""
    found = dict(_norms(spec))
    if name not in found:
        return []
    plan = lower_norm(found[name])
    p = f"n{name}_"  # the names of q's and k's norms stay apart (the dK/dV kernel loads both)
    lines = [f"# QK-norm on the load: {found[name].describe()}", f"{p}x = {var}.to(tl.float32)"]
    if plan.input_round:
        lines.append(f"{p}x = {_round(f'{p}x', plan.input_round)}  # the statistics are of the rounded input")
    if plan.kind == "rms_norm":
        lines += [f"{p}rstd = tl.rsqrt(tl.sum({p}x * {p}x, axis=1)[:, None] / D + {plan.eps!r})", f"{p}n = {p}x * {p}rstd"]
    else:
        lines += [f"{p}xm = {p}x - tl.sum({p}x, axis=1)[:, None] / D",
                  f"{p}rstd = tl.rsqrt(tl.sum({p}xm * {p}xm, axis=1)[:, None] / D + {plan.eps!r})",
                  f"{p}n = {p}xm * {p}rstd"]
    for i, (rounding, offset) in enumerate(plan.params):
        w = f"N{name.upper()}{i}"
        lines.append(f"{p}p{i} = {_round(f'tl.load({w} + offs_d * sn{name}{i}_d, mask=offs_d < D, other=0.0).to(tl.float32)', rounding)}[None, :]")
        if offset:
            lines.append(f"{p}p{i} = {_round(f'{p}p{i} + {offset!r}', rounding)}")
    lines.append(f"{p}v = {_round(f'{p}n', plan.norm_round)}")
    if plan.scale != 1.0:
        lines.append(f"{p}v = {_round(f'{p}v * {plan.scale!r}', plan.norm_round)}")
    for op, param, rounding, value in plan.steps:
        expr = f"{p}v" if op == "cast" else f"{p}v * {value!r}" if op == "scale" else \
            f"{p}v {'*' if op == 'mul' else '+'} {p}p{param}"
        lines.append(f"{p}v = {_round(expr, rounding)}")
    return lines + [f"{var} = {p}v.to({var}.dtype)"]
