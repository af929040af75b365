"""Spec of linear attention written in its quadratic form ``(phi(q) @ phi(k)^T) @ v`` (and its
normaliser, the same product summed over the keys), computed in the linear-time order."""
from __future__ import annotations

import dataclasses
import json

# Elementwise feature maps the operator can apply itself: Katharopoulos et al.'s elu(x) + 1 (alpha 1),
# relu, exp, sigmoid, and the square (ReBased's, after its affine map).
FEATURE_MAPS = ("elu1", "relu", "exp", "sigmoid", "square")
# Softmax feature maps (Shen et al.'s efficient attention): "softmax_features" normalises each
# query's (a's rows) or key's (bt's columns) features; "softmax_keys", k's softmax over the
# sequence, normalises each feature over all the keys (bt's rows): non-causal only, since every
# key's feature then depends on keys a causal query must not see (a chunked kernel could not
# stream them).
SOFTMAX_MAPS = ("softmax_features", "softmax_keys")


def softmax_dim(kind: str, side: str) -> int:
    """The dim of the operand (``a`` (N, L, D) or ``bt`` (N, D, S)) a softmax map normalises over."""
    if kind == "softmax_features":
        return -1 if side == "a" else -2
    assert kind == "softmax_keys" and side == "bt", (kind, side)
    return -1


@dataclasses.dataclass(frozen=True)
class LinearAttentionSpec:
    """``a @ (bt @ v)`` for the (N, L, D) queries' features ``a``, (N, D, S) keys' features ``bt``
    (the product's second operand as written) and (N, S, E) values; with ``causal``, query i sees
    keys j <= i only, computed chunk by chunk (``chunk`` rows). ``values=False``: the normaliser,
    the (L, S) product summed over the keys, (N, L, 1). ``features`` names phi as recognised (for
    the report; the rewrite is exact for any phi). ``phi_a`` / ``phi_b``: an elementwise feature
    map (one of ``FEATURE_MAPS``) or a softmax (``SOFTMAX_MAPS``) the operator applies to ``a`` / ``bt`` itself, which are then
    q and k^T before phi ("" when the graph computed the features): the kernels apply it as they
    load a tile, so phi(q) and phi(k) are never written, nor kept for the backward."""

    causal: bool
    values: bool
    features: str
    chunk: int = 64
    phi_a: str = ""
    phi_b: str = ""

    def __post_init__(self):
        for side, kind in (("a", self.phi_a), ("bt", self.phi_b)):
            if kind and kind not in FEATURE_MAPS + SOFTMAX_MAPS:
                raise ValueError(f"unknown feature map {kind!r} for {side}")
        if self.phi_a == "softmax_keys":
            raise ValueError("softmax_keys normalises the keys' features over the sequence: it applies to bt only")
        if self.phi_b == "softmax_keys" and self.causal:
            raise ValueError("softmax_keys (k's softmax over the sequence) is non-causal only: causal queries would "
                             "depend on later keys through its sums")

    def to_json(self) -> str:
        fields = dataclasses.asdict(self)
        for name in ("phi_a", "phi_b"):  # absent at their default: specs (and kernel names) from before them are unchanged
            if not fields[name]:
                del fields[name]
        return json.dumps(fields, sort_keys=True, separators=(",", ":"))

    @staticmethod
    def from_json(text: str) -> "LinearAttentionSpec":
        return LinearAttentionSpec(**json.loads(text))

    def describe(self) -> str:
        what = "phi(q) @ (phi(k)^T @ v)" if self.values else "normaliser phi(q) @ sum_keys phi(k)"
        order = f"causal, chunks of {self.chunk}" if self.causal else "non-causal"
        inside = [f"{side} {m}" for side, m in (("phi(q) =", self.phi_a), ("phi(k) =", self.phi_b)) if m]
        where = f", applied in the operator: {', '.join(inside)}" if inside else ""
        return f"linear attention {what} ({order}; phi: {self.features}{where}), the (L, L) matrix never formed"
