"""Lowering of an AttentionSpec to the plan the flash-attention template renders.

Stages, in order:
1. the accumulator is float32 (the template's tl.dot accumulates in it; float64 sites run the
   reference instead, see fxfuse.ops.attention);
2. decide which roundings of the scores the kernel must reproduce: the product's own rounding to
   the score dtype and each step's result dtype, when that dtype is less precise than float32;
3. decide whether key tiles entirely above the causal diagonal (or, with a sliding window,
   entirely before it) may be skipped: only when the
   causal fill is -inf and nothing after it can turn -inf into a finite value or NaN (a
   non-positive factor), so that a skipped key's probability would have been exactly zero.
"""
from __future__ import annotations

import dataclasses

from fxfuse.spec_attention import AttentionSpec

_PRECISION = {"float64": 3, "float32": 2, "bfloat16": 1, "float16": 1}


@dataclasses.dataclass(frozen=True)
class AttentionPlan:
    score_round: str | None  # rounding of q @ k^T, as the user's product rounds it
    steps: tuple[tuple[str, float, int, bool, int, str | None], ...]  # (op, value, input, invert, window, rounding)
    inputs: tuple[str, ...]
    skip_above_diagonal: bool
    window: int  # with skip_above_diagonal: key tiles a whole window before a query tile are skipped too
    fp32_dot: bool  # the operands are float32: ask tl.dot for full precision (no tf32)


def _rounding(name: str) -> str | None:
    return name if _PRECISION[name] < _PRECISION["float32"] else None


def _can_skip_causal_tiles(spec: AttentionSpec) -> bool:
    causal = [i for i, s in enumerate(spec.steps) if s.op == "fill" and s.input == -1]
    if not causal or spec.steps[causal[0]].value != float("-inf") or spec.steps[causal[0]].invert:
        return False
    later = spec.steps[causal[0] + 1:]
    # A factor tensor (input >= 0) may hold non-positive values: no skipping after one.
    return all(s.op == "cast" or (s.op in ("mul", "div") and s.input == -1 and s.value > 0) for s in later)


def lower_attention(spec: AttentionSpec) -> AttentionPlan:
    return AttentionPlan(
        score_round=_rounding(spec.score_dtype),
        steps=tuple((s.op, s.value, s.input, s.invert, s.window, _rounding(s.dtype)) for s in spec.steps),
        inputs=spec.inputs,
        skip_above_diagonal=_can_skip_causal_tiles(spec),
        window=next((s.window for s in spec.steps if s.op == "fill" and s.input == -1), 0),
        fp32_dot=spec.score_dtype == "float32",
    )
