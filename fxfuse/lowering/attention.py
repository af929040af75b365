"""Lowering of an AttentionSpec to the plan the flash-attention template renders.

Stages, in order:
1. the accumulator is float32 (the template's tl.dot accumulates in it; float64 sites run the
   reference instead, see fxfuse.ops.attention);
2. decide which roundings of the scores the kernel must reproduce: the product's own rounding to
   the score dtype and each step's result dtype, when that dtype is less precise than float32;
3. decide whether key tiles entirely above the causal diagonal (or, with a sliding window,
   entirely before it) may be skipped: only when the
   causal fill is -inf and nothing after it can turn -inf into a finite value or NaN (a
   non-positive factor), so that a skipped key's probability would have been exactly zero;
4. with index-expression masks, the kernels visit key (query) tiles from per-tile lists computed
   at launch (``attention_tiles``): tiles every skippable fill hides (the rule of stage 3) are left
   out, and tiles no index mask touches skip evaluating the expressions;
5. decide whether log2(e) may be folded into a scalar scale so that the kernels take ``exp2`` of
   the scores directly (``log2_fold``): only where no score can be a huge finite value (a finite
   fill, an additive tensor or expression) that the factor would overflow to -inf, and where no
   rounding of the user's happens at or after the folded step (it would round other values);
   never with sink logits (one may be huge too) or a sigmoid (no exponential of a row max);
6. carry the normaliser: a softmax starting from each row's sink logit (``sinks``), or a sigmoid.
"""
from __future__ import annotations

import dataclasses

from fxfuse.index_expr import loads
from fxfuse.spec_attention import AttentionSpec

_PRECISION = {"float64": 3, "float32": 2, "bfloat16": 1, "float16": 1}


@dataclasses.dataclass(frozen=True)
class AttentionPlan:
    score_round: str | None  # rounding of q @ k^T, as the user's product rounds it
    # (op, value, input, invert, window, rounding, index expression or None)
    steps: tuple[tuple[str, float, int, bool, int, str | None, tuple | None], ...]
    inputs: tuple[str, ...]
    skip_above_diagonal: bool
    window: int  # with skip_above_diagonal: key tiles a whole window before a query tile are skipped too
    fp32_dot: bool  # the operands are float32: ask tl.dot for full precision (no tf32)
    tile_lists: bool = False  # an index-expression mask: tiles come from lists made at launch
    loads: tuple[int, ...] = ()  # inputs of kind "head" the expressions load once per program
    # The step whose scalar scale also multiplies by log2(e) (len(steps): a multiply after the
    # steps), so the online softmax runs on exp2; None: natural units and tl.exp.
    log2_fold: int | None = None
    sinks: int = -1  # the input of per-row sink logits: the online softmax starts from them (max c, sum 1)
    sigmoid: bool = False  # probabilities are sigmoid(s): no running max or sum at all


def _rounding(name: str) -> str | None:
    return name if _PRECISION[name] < _PRECISION["float32"] else None


def skippable_fill(spec: AttentionSpec, k: int) -> bool:
    """Whether the scores fill step ``k`` hides have probability exactly zero: it fills -inf, and
    nothing after it can turn -inf into a finite value or NaN (a later fill of a finite value, a
    bias, tanh, a non-positive factor)."""
    step = spec.steps[k]
    if step.op != "fill" or step.value != float("-inf") or step.invert:
        return False
    # A factor tensor (input >= 0) may hold non-positive values: no skipping after one.
    return all(s.op == "cast" or (s.op in ("mul", "div") and s.input == -1 and s.value > 0) or
               (s.op == "fill" and s.value == float("-inf")) for s in spec.steps[k + 1:])


def _can_skip_causal_tiles(spec: AttentionSpec) -> bool:
    causal = [i for i, s in enumerate(spec.steps) if s.causal]
    return bool(causal) and skippable_fill(spec, causal[0])


def _log2_fold(spec: AttentionSpec) -> int | None:
    """Where log2(e) can be folded (see stage 5), or None."""
    if spec.sinks >= 0 or spec.normalizer == "sigmoid":
        return None  # a sink logit may be huge and finite too; a sigmoid needs no exponential of the max
    for s in spec.steps:
        if s.op == "add" or (s.op == "fill" and s.value != float("-inf")):
            return None  # a huge finite score times log2(e) may overflow to -inf
    # Walking back from the softmax: fold into the last positive scalar scale if only -inf fills
    # and casts, none rounding, come after it; else multiply by log2(e) after every step (after
    # the last rounding, so each rounding still sees the user's values).
    for k in reversed(range(len(spec.steps))):
        s = spec.steps[k]
        if _rounding(s.dtype):
            break
        if s.op in ("mul", "div") and s.input == -1 and s.value > 0:
            return k
        if s.op not in ("fill", "cast"):
            break
    return len(spec.steps)


def lower_attention(spec: AttentionSpec) -> AttentionPlan:
    return AttentionPlan(
        score_round=_rounding(spec.score_dtype),
        steps=tuple((s.op, s.value, s.input, s.invert, s.window, _rounding(s.dtype), s.expr) for s in spec.steps),
        inputs=spec.inputs,
        skip_above_diagonal=_can_skip_causal_tiles(spec),
        window=next((s.window for s in spec.steps if s.causal), 0),
        fp32_dot=spec.score_dtype == "float32",
        tile_lists=any(s.op == "fill" and s.expr is not None for s in spec.steps),
        loads=tuple(sorted(set().union(*(loads(s.expr) for s in spec.steps if s.expr is not None)))),
        log2_fold=_log2_fold(spec),
        sinks=spec.sinks,
        sigmoid=spec.normalizer == "sigmoid",
    )
