"""Specs: what exactly one fused site computes.

A spec travels inside the rewritten graph as a JSON string argument of the fused operator, so the
graph stays an ordinary torch program (printable, exportable, picklable) and the operator, the
lowering and the report all read the same description.
"""
from __future__ import annotations

import dataclasses
import json

import torch

_DTYPES = {
    "float64": torch.float64,
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
_SHORT = {"float64": "f64", "float32": "f32", "bfloat16": "bf16", "float16": "f16"}


def dtype_name(dtype: torch.dtype) -> str:
    for name, value in _DTYPES.items():
        if value == dtype:
            return name
    raise ValueError(f"fxfuse fuses floating-point computations only; got dtype {dtype}")


def to_dtype(name: str) -> torch.dtype:
    return _DTYPES[name]


@dataclasses.dataclass(frozen=True)
class ParamPrep:
    """How a per-feature parameter (weight, bias) is prepared before use: ``p.to(dtype) + offset``.

    ``offset`` covers Gemma-style ``(1 + w)``; it is added in ``dtype``, as the user's code does.
    """

    dtype: str
    offset: float = 0.0


@dataclasses.dataclass(frozen=True)
class Step:
    """One operation applied to the normalized row after normalization, in program order.

    ``op`` is ``"cast"`` (round to ``dtype``), ``"mul"`` or ``"add"`` (with ``params[param]``,
    broadcast along the normalized dimension), or ``"scale"``: times the constant ``value`` (LayerNorm
    Scaling's 1/sqrt(layer) after the weight); ``dtype`` is the result's dtype, as type promotion
    gave it in the user's graph.
    """

    op: str
    dtype: str
    param: int = -1
    value: float = 1.0


@dataclasses.dataclass(frozen=True)
class NormSpec:
    """A normalization over the last dimension.

    kind:          "rms_norm" (x * rsqrt(mean(x^2) + eps)) or "layer_norm" ((x - mean) * rsqrt(var + eps)).
    eps:           taken from the graph, never assumed.
    compute_dtype: the dtype the user's code computes the statistics in (after any upcast).
    norm_dtype:    the dtype of the normalized value before the steps.
    inverse:       "rsqrt" (multiplied by rsqrt) or "div_sqrt" (divided by sqrt); both are exact
                   rewrites, the field lets the CPU reference reproduce the user's rounding. Or, for an
                   rms_norm only, "max_l2": ``x / max(||x||_2, eps)`` (``F.normalize``; x-transformers'
                   RMSNorm is that times sqrt(d) and a weight). Not x * rsqrt(mean(x^2) + eps): eps
                   clamps the norm instead of being added to the mean, so it is its own form.
    scale:         a constant the normalized value is multiplied by before the steps (the sqrt(d)
                   of the "max_l2" form), rounded to norm_dtype; 1 for none.
    steps:         casts and per-feature multiplies/adds after normalization.
    params:        how each parameter tensor is prepared.
    sum_dtype:     set when the input is ``x + residual`` and the sum is a second output: the
                   sum's dtype (it is rounded to it before it is normalized, as the user's code does).
    statistic:     how the user's code computed the statistic: "mean" (a mean of products in
                   compute_dtype: ``(xc - mean).pow(2).mean(-1)``, squares rounded to it), "var"
                   (``torch.var(..., correction=0)``) or "var_mean" (``torch.var_mean``, whose mean
                   also centers the input). torch's var accumulates a 16-bit input in float32 (CPU:
                   float64) and rounds only its result, so a 16-bit var of values beyond ~256 is
                   finite where squaring in 16 bits overflows: the reference calls the same op.
    sum_scales:    set for ``fxfuse.sum_norm``: the input is the sum of these terms, each times its
                   constant (DeepNorm's ``alpha * x + f(x)``; B2T's three-input ``x + f(x) + x_in``),
                   added left to right, every product and partial sum rounded to sum_dtype as the
                   user's code rounds them. Empty for the other operators.
    sum_tensor_scales: the terms (indices) whose scale is a 0-d tensor of the term's dtype and
                   device (DeepNorm's ``self.alpha * x`` with alpha a 0-d buffer or parameter): the
                   operator takes these tensors after the terms, in this order; their entry of
                   sum_scales is 1.0.
    """

    kind: str
    eps: float
    compute_dtype: str
    norm_dtype: str
    inverse: str = "rsqrt"
    steps: tuple[Step, ...] = ()
    params: tuple[ParamPrep, ...] = ()
    sum_dtype: str | None = None
    statistic: str = "mean"
    scale: float = 1.0
    sum_scales: tuple[float, ...] = ()
    sum_tensor_scales: tuple[int, ...] = ()

    @property
    def residual(self) -> bool:
        return self.sum_dtype is not None

    @property
    def out_dtype(self) -> str:
        return self.steps[-1].dtype if self.steps else self.norm_dtype

    def to_json(self) -> str:
        raw = dataclasses.asdict(self)
        if raw["statistic"] == "mean":  # left out at its default: existing specs keep their JSON and kernel names
            del raw["statistic"]
        if raw["scale"] == 1.0:  # likewise
            del raw["scale"]
        if not raw["sum_scales"]:  # likewise
            del raw["sum_scales"]
        if not raw["sum_tensor_scales"]:  # likewise
            del raw["sum_tensor_scales"]
        for step in raw["steps"]:
            if step["op"] != "scale":  # likewise
                del step["value"]
        return json.dumps(raw, sort_keys=True, separators=(",", ":"))

    @staticmethod
    def from_json(text: str) -> "NormSpec":
        raw = json.loads(text)
        raw["steps"] = tuple(Step(**s) for s in raw["steps"])
        raw["params"] = tuple(ParamPrep(**p) for p in raw["params"])
        raw["sum_scales"] = tuple(raw.get("sum_scales", ()))
        raw["sum_tensor_scales"] = tuple(raw.get("sum_tensor_scales", ()))
        return NormSpec(**raw)

    def describe(self) -> str:
        """The spec in words, for reports: ``rms_norm eps=1e-06, f32 stats, * (1 + w) -> bf16``."""
        stats = f"stats in {_SHORT[self.compute_dtype]}"
        if self.statistic != "mean":  # torch.var accumulates wider than its 16-bit input: say so
            stats = f"{self.statistic.replace('_', '-')} of {_SHORT[self.compute_dtype]} input"
        parts = [f"{self.kind}", f"eps={self.eps:g}", stats]
        if self.inverse == "max_l2":
            parts[1] = f"x / max(||x||, eps={self.eps:g})"
        if self.sum_scales:
            tensor = {i: j for j, i in enumerate(self.sum_tensor_scales)}
            terms = " + ".join(f"alpha{tensor[i]} * t{i}" if i in tensor else f"{c:g} * t{i}" if c != 1.0 else f"t{i}"
                               for i, c in enumerate(self.sum_scales))
            parts.insert(1, f"residual sum {terms}")
        elif self.residual:
            parts.insert(1, "residual add")
        if self.scale != 1.0:
            parts.append(f"* {self.scale:g}")
        for step in self.steps:
            if step.op == "cast":
                parts.append(f"cast {_SHORT[step.dtype]}")
                continue
            if step.op == "scale":
                parts.append(f"* {step.value:g}")
                continue
            prep = self.params[step.param]
            name = "weight" if step.op == "mul" else "bias"
            term = f"({prep.offset:g} + {name})" if prep.offset else name
            parts.append(f"{'*' if step.op == 'mul' else '+'} {term}")
        parts.append(f"-> {_SHORT[self.out_dtype]}")
        return ", ".join(parts)
