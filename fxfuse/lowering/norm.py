"""Lowering of a NormSpec to the plan the kernel template renders.

Stages, in order:
1. choose the accumulation dtype: float64 when the site computes in float64, else float32, so the
   kernel is never less precise than the user's code;
2. decide which of the site's casts round: a cast to a dtype at least as precise as the
   accumulator is a no-op inside the kernel, any other is kept as an explicit rounding so the
   kernel produces the values the user's code would (the input itself is rounded to the
   statistic's dtype when that is narrower: code such as ``h = x.bfloat16()`` normalizes the
   rounded copy; the arithmetic after it still runs in the accumulator);
3. list the parameter preparations and epilogue steps in program order.
"""
from __future__ import annotations

import dataclasses

from fxfuse.spec import NormSpec

_PRECISION = {"float64": 3, "float32": 2, "bfloat16": 1, "float16": 1}


@dataclasses.dataclass(frozen=True)
class NormPlan:
    kind: str
    eps: float
    acc: str
    sum_round: str | None  # the residual sum is rounded to this dtype before normalization
    norm_round: str | None
    params: tuple[tuple[str | None, float], ...]  # (rounding dtype, offset) per parameter
    steps: tuple[tuple[str, int, str | None, float], ...]  # (op, param index, rounding dtype, scale constant)
    residual: bool
    input_round: str | None = None  # the input (after any residual sum) is rounded to this dtype first
    inverse: str = "rsqrt"  # "max_l2": x / max(||x||, eps) (F.normalize) instead of the mean-of-squares forms
    scale: float = 1.0  # the normalized value's constant factor before the steps
    sum_scales: tuple[float, ...] = ()  # fxfuse.sum_norm: the input is the sum of these scaled terms
    sum_tensor_scales: tuple[int, ...] = ()  # ... those terms scaled by a 0-d tensor input instead


def lower_norm(spec: NormSpec) -> NormPlan:
    dtypes = {spec.compute_dtype, spec.norm_dtype, spec.out_dtype, *(p.dtype for p in spec.params)}
    if spec.sum_dtype:  # a float64 residual stream is summed in float64 even if normalized in float32
        dtypes.add(spec.sum_dtype)
    acc = "float64" if "float64" in dtypes else "float32"

    def rounding(name: str | None) -> str | None:
        return name if name is not None and _PRECISION[name] < _PRECISION[acc] else None

    return NormPlan(
        kind=spec.kind,
        eps=spec.eps,
        acc=acc,
        sum_round=rounding(spec.sum_dtype),
        norm_round=rounding(spec.norm_dtype),
        params=tuple((rounding(p.dtype), p.offset) for p in spec.params),
        steps=tuple((s.op, s.param, rounding(s.dtype), s.value) for s in spec.steps),
        residual=spec.residual,
        input_round=rounding(spec.compute_dtype),
        inverse="max_l2" if spec.inverse == "max_l2" else "rsqrt",
        scale=spec.scale,
        sum_scales=spec.sum_scales,
        sum_tensor_scales=spec.sum_tensor_scales,
    )
