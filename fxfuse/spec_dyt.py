"""Spec of Dynamic Tanh (DyT, Zhu et al. 2025, "Transformers without Normalization"), a
normalization replacement: ``weight * tanh(alpha * x) + bias`` with a learnable scalar alpha."""
from __future__ import annotations

import dataclasses
import json


@dataclasses.dataclass(frozen=True)
class DyTSpec:
    """``tanh(alpha * x) [* weight] [+ bias]``, alpha a one-element tensor, weight and bias
    per-feature (last dimension). Computed by the same ops as written, so type promotion (a float32
    alpha on a bfloat16 input) happens where it happened; ``out_dtype`` is the result's dtype."""

    weight: bool
    bias: bool
    out_dtype: str

    kernel = False  # eager's own ops; the gain is what backward keeps (x only, not tanh(alpha * x))

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True, separators=(",", ":"))

    @staticmethod
    def from_json(text: str) -> "DyTSpec":
        return DyTSpec(**json.loads(text))

    def describe(self) -> str:
        return ("dyt " + ("weight * " if self.weight else "") + "tanh(alpha * x)" + (" + bias" if self.bias else "")
                + f" -> {self.out_dtype}, backward recomputes tanh")
