"""Spec of the gated-MLP family: what one fused activation product ``act(gate) * up`` computes."""
from __future__ import annotations

import dataclasses
import json

ACTIVATIONS = ("silu", "silu_by_sigmoid", "gelu", "gelu_tanh")


@dataclasses.dataclass(frozen=True)
class GatedActSpec:
    """``act(gate) * up`` elementwise, gate and up of one shape and dtype (SwiGLU, GeGLU).

    act:   "silu" (``F.silu``), "silu_by_sigmoid" (``g * torch.sigmoid(g)`` written by hand, two
           roundings), "gelu" (erf) or "gelu_tanh" (``approximate="tanh"``).
    dtype: the dtype everything is computed and rounded in, as in the user's graph.
    """

    act: str
    dtype: str

    kernel = False  # computed by the same ATen ops eager uses; the gain is what backward keeps

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True, separators=(",", ":"))

    @staticmethod
    def from_json(text: str) -> "GatedActSpec":
        return GatedActSpec(**json.loads(text))

    def describe(self) -> str:
        return f"gated activation {self.act}(gate) * up in {self.dtype}, backward recomputes {self.act}(gate)"
