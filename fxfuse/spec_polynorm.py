"""Spec of PolyNorm (Zhuo et al. 2024, "Polynomial Composition Activations"; Motif 2.6B's MLP
activation): ``w_a * norm(x^a) + w_b * norm(x^b) + w_c * norm(x^c) + bias``, {a, b, c} = {1, 2, 3},
``norm(u) = u * rsqrt(mean(u^2, -1) + eps)`` (or ``u / sqrt(...)``), the w's and the bias
one-element tensors."""
from __future__ import annotations

import dataclasses
import json

_SHORT = {"float64": "f64", "float32": "f32", "bfloat16": "bf16", "float16": "f16"}


@dataclasses.dataclass(frozen=True)
class PolyNormSpec:
    """powers:  the powers of x in the order the user's code adds their terms (the weights come
                in that order too); the bias is added last.
    eps:        inside each root, from the graph.
    inverse:    "rsqrt" (u * rsqrt(...)) or "div_sqrt" (u / sqrt(...)), as written.
    dtype:      x's, the weights' and the bias's dtype: every op of the user's code rounds to it."""

    powers: tuple[int, ...]
    eps: float
    inverse: str
    dtype: str

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True, separators=(",", ":"))

    @staticmethod
    def from_json(text: str) -> "PolyNormSpec":
        raw = json.loads(text)
        raw["powers"] = tuple(raw["powers"])
        return PolyNormSpec(**raw)

    def describe(self) -> str:
        root = "rsqrt" if self.inverse == "rsqrt" else "/ sqrt"
        terms = " + ".join(f"w{i} * norm(x^{p})" if p != 1 else f"w{i} * norm(x)" for i, p in enumerate(self.powers))
        return f"polynorm {terms} + bias, eps={self.eps:g} ({root}), in {_SHORT[self.dtype]}, one pass over the row"
