"""Gated MLPs written the ways real code writes them: ``forward(x) -> down(act(gate(x)) * up(x))``.
Each style names where the form comes from; NEAR_MISSES look alike but must not be fused."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class _MLP(nn.Module):
    def __init__(self, d: int, inner: int):
        super().__init__()
        self.gate_proj = nn.Linear(d, inner, bias=False)
        self.up_proj = nn.Linear(d, inner, bias=False)
        self.down_proj = nn.Linear(inner, d, bias=False)


class SwiGLU(_MLP):
    """Llama / Mistral / Qwen: ``down(silu(gate(x)) * up(x))``."""

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class UpTimesAct(_MLP):
    """The factors the other way round (``up(x) * act(gate(x))``)."""

    def forward(self, x):
        return self.down_proj(self.up_proj(x) * F.silu(self.gate_proj(x)))


class GeGLUTanh(_MLP):
    """Gemma: ``gelu(approximate="tanh")`` as the gate activation."""

    def forward(self, x):
        return self.down_proj(F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x))


class GeGLU(_MLP):
    """GeGLU of Shazeer (2020), exact erf GELU."""

    def forward(self, x):
        return self.down_proj(F.gelu(self.gate_proj(x)) * self.up_proj(x))


class SiluBySigmoid(_MLP):
    """SiLU written by hand: ``g * torch.sigmoid(g)`` (research code, older repos)."""

    def forward(self, x):
        g = self.gate_proj(x)
        return self.down_proj(g * torch.sigmoid(g) * self.up_proj(x))


class FusedGateUpChunk(nn.Module):
    """Phi-3 / ChatGLM: one ``gate_up_proj`` of twice the width, split with ``chunk``."""

    def __init__(self, d: int, inner: int):
        super().__init__()
        self.gate_up_proj = nn.Linear(d, 2 * inner, bias=False)
        self.down_proj = nn.Linear(inner, d, bias=False)

    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


STYLES = [SwiGLU, UpTimesAct, GeGLUTanh, GeGLU, SiluBySigmoid, FusedGateUpChunk]


class ActivationReused(_MLP):
    """The activation is also returned (kept anyway: nothing to save)."""

    def forward(self, x):
        a = F.silu(self.gate_proj(x))
        return self.down_proj(a * self.up_proj(x)), a


class BroadcastGate(_MLP):
    """A per-feature gate that broadcasts: not a gated MLP's elementwise product."""

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj.weight[:, 0])


class PromotingProduct(_MLP):
    """The up factor in float32 while the gate is in the model's dtype: the product promotes."""

    def forward(self, x):
        return self.down_proj((F.silu(self.gate_proj(x)) * self.up_proj(x).float()).to(x.dtype))


NEAR_MISSES = {
    ActivationReused: "also used elsewhere",
    BroadcastGate: "differ in shape",
    PromotingProduct: "dtypes differ",
}
