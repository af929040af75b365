"""Spec of linear attention written in its quadratic form ``(phi(q) @ phi(k)^T) @ v`` (and its
normaliser, the same product summed over the keys), computed in the linear-time order."""
from __future__ import annotations

import dataclasses
import json


@dataclasses.dataclass(frozen=True)
class LinearAttentionSpec:
    """``a @ (bt @ v)`` for the (N, L, D) queries' features ``a``, (N, D, S) keys' features ``bt``
    (the product's second operand as written) and (N, S, E) values; with ``causal``, query i sees
    keys j <= i only, computed chunk by chunk (``chunk`` rows). ``values=False``: the normaliser,
    the (L, S) product summed over the keys, (N, L, 1). ``features`` names phi as recognised (for
    the report; the rewrite is exact for any phi)."""

    causal: bool
    values: bool
    features: str
    chunk: int = 64


    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True, separators=(",", ":"))

    @staticmethod
    def from_json(text: str) -> "LinearAttentionSpec":
        return LinearAttentionSpec(**json.loads(text))

    def describe(self) -> str:
        what = "phi(q) @ (phi(k)^T @ v)" if self.values else "normaliser phi(q) @ sum_keys phi(k)"
        order = f"causal, chunks of {self.chunk}" if self.causal else "non-causal"
        return f"linear attention {what} ({order}; phi: {self.features}), the (L, L) matrix never formed"
