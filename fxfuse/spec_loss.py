"""Specs of the loss family: what one fused linear + cross-entropy site computes.

Travels inside the rewritten graph as JSON, like the norm and attention specs.
"""
from __future__ import annotations

import dataclasses
import json

_SHORT = {"float64": "f64", "float32": "f32", "bfloat16": "bf16", "float16": "f16"}


@dataclasses.dataclass(frozen=True)
class LogitStep:
    """One elementwise operation on the logits between the matmul and the log-softmax, in program
    order: ``"cast"`` (round to ``dtype``), ``"div"``/``"mul"`` by the constant ``value``, or
    ``"tanh"``; ``dtype`` is the result's dtype in the user's graph (softcapping is div, tanh, mul)."""

    op: str
    dtype: str
    value: float = 0.0


@dataclasses.dataclass(frozen=True)
class LinearCrossEntropySpec:
    """Per-token cross-entropy of ``logits = steps(h @ W^T (+ b))`` against integer labels.

    The operator returns three per-token vectors and never the (tokens, vocab) logits:
    ``nll`` (``-log_softmax(logits)[label]``, 0 where the label is ``ignore_index``, in
    ``compute_dtype``), ``lse`` (``logsumexp(logits)``, in the accumulation dtype) and ``sum_logp``
    (the row sum of the log-probabilities, used by label smoothing; zeros unless ``"sum_logp"`` is
    in ``outputs``). The reduction (mean over non-ignored tokens, sum, label smoothing's mix, a
    z-loss) stays in the graph as the user wrote it, on these vectors.

    matmul_dtype:  the dtype of ``h @ W^T`` (where the logits are first rounded).
    bias:          the matmul was ``addmm`` with a per-vocab bias.
    steps:         casts, scalings and tanh on the logits, as written.
    compute_dtype: the dtype of the log-softmax's input.
    vocab:         V (for reports; the operator reads it from the weight).
    outputs:       which per-token vectors the graph reads.
    """

    matmul_dtype: str
    compute_dtype: str
    ignore_index: int
    vocab: int
    bias: bool = False
    steps: tuple[LogitStep, ...] = ()
    outputs: tuple[str, ...] = ("nll",)

    # No Triton kernel is generated for this family: the operator is chunked torch (GEMMs).
    kernel = False

    @property
    def acc_dtype(self) -> str:
        return "float64" if self.compute_dtype == "float64" else "float32"

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True, separators=(",", ":"))

    @staticmethod
    def from_json(text: str) -> "LinearCrossEntropySpec":
        raw = json.loads(text)
        raw["steps"] = tuple(LogitStep(**s) for s in raw["steps"])
        raw["outputs"] = tuple(raw["outputs"])
        return LinearCrossEntropySpec(**raw)

    def describe(self) -> str:
        """``linear_cross_entropy V=32000, bf16 matmul, cast f32, ignore_index=-100, reads nll``."""
        parts = [f"linear_cross_entropy V={self.vocab}", f"{_SHORT[self.matmul_dtype]} matmul" + (" + bias" if self.bias else "")]
        for s in self.steps:
            parts.append(f"cast {_SHORT[s.dtype]}" if s.op == "cast" else "tanh" if s.op == "tanh" else f"{s.op} {s.value:g}")
        parts.append(f"log-softmax in {_SHORT[self.compute_dtype]}")
        parts.append(f"ignore_index={self.ignore_index}")
        parts.append("reads " + "+".join(self.outputs))
        return ", ".join(parts)
