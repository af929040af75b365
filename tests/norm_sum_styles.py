"""Residual sums feeding a norm, written as the papers' reference code writes them: DeepNorm's
scaled residual (Wang et al. 2022), B2T's three-input sum (Takase et al. 2023), Sub-LN's extra norm
inside the sublayer (Magneto, Wang et al. 2022), and near-misses that must not fold. Each block's
sublayer is a Linear so the sum's terms are distinct tensors."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class DeepNormPostLN(nn.Module):  # x_{l+1} = LN(alpha * x + G(x)), alpha = (2N)^(1/4) a constant of the model
    def __init__(self, d, layers=6):
        super().__init__()
        self.ffn, self.norm = nn.Linear(d, d), nn.LayerNorm(d)
        self.alpha = (2 * layers) ** 0.25

    def forward(self, x):
        return self.norm(x * self.alpha + self.ffn(x))


class DeepNormAlphaLeft(DeepNormPostLN):  # the constant on the left, the sublayer first
    def forward(self, x):
        return self.norm(self.ffn(x) + self.alpha * x)


class DeepNormRMS(nn.Module):  # the same scaled residual into a Llama-style RMSNorm, sum returned too
    def __init__(self, d, alpha=1.5):
        super().__init__()
        self.ffn, self.weight, self.alpha = nn.Linear(d, d), nn.Parameter(torch.randn(d)), alpha

    def forward(self, x):
        h = x * self.alpha + self.ffn(x)
        v = h.float()
        v = v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + 1e-6)
        return self.weight * v.to(h.dtype), h  # the sum is the residual stream (used again)


class B2TBlock(nn.Module):  # Takase et al.: the second post-LN adds the block's input as a third term
    def __init__(self, d):
        super().__init__()
        self.attn, self.ffn = nn.Linear(d, d), nn.Linear(d, d)
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)

    def forward(self, x):
        h = self.ln1(self.attn(x) + x)
        return self.ln2(self.ffn(h) + h + x)


class B2TRightNested(B2TBlock):  # the same three terms nested the other way: x + (f(h) + h)
    def forward(self, x):
        h = self.ln1(self.attn(x) + x)
        return self.ln2(x + (self.ffn(h) + h))


class SubLNBlock(nn.Module):  # Magneto's Sub-LN: pre-LN plus an LN before each output projection
    def __init__(self, d, hidden=None):
        super().__init__()
        hidden = hidden or 2 * d
        self.ln_attn, self.ln_attn_inner = nn.LayerNorm(d), nn.LayerNorm(d)
        self.v, self.o = nn.Linear(d, d), nn.Linear(d, d)
        self.ln_ffn, self.ln_ffn_inner = nn.LayerNorm(d), nn.LayerNorm(hidden)
        self.fc1, self.fc2 = nn.Linear(d, hidden), nn.Linear(hidden, d)

    def forward(self, x):
        x = x + self.o(self.ln_attn_inner(self.v(self.ln_attn(x))))
        return x + self.fc2(self.ln_ffn_inner(F.gelu(self.fc1(self.ln_ffn(x)))))


# ---- near-misses: the norm is fused, the sum is not folded as a scaled / multi-term sum ----------

class TensorAlpha(DeepNormPostLN):  # alpha a per-feature tensor: not a constant of the fold
    def __init__(self, d):
        super().__init__(d)
        self.alpha = nn.Parameter(torch.rand(d) + 0.5)


class ZeroDimAlphaOtherDtype(DeepNormPostLN):  # a float32 0-d alpha on a 16-bit x: its rounding is the device's
    def __init__(self, d):
        super().__init__(d)
        del self.alpha
        self.register_buffer("alpha", torch.tensor(1.7))

    def forward(self, x):
        return self.norm(x * self.alpha.float() + self.ffn(x))


class BroadcastResidual(nn.Module):  # a (B, 1, D) term broadcast over the sequence: not a row of the sum
    def __init__(self, d):
        super().__init__()
        self.ffn, self.norm = nn.Linear(d, d), nn.LayerNorm(d)

    def forward(self, x, ctx):
        return self.norm(x * 2.0 + self.ffn(x) + ctx)


class AddAlphaKwarg(DeepNormPostLN):  # torch.add(f, x, alpha=a) rounds f + a * x once: not split
    def forward(self, x):
        return self.norm(torch.add(self.ffn(x), x, alpha=self.alpha))


class PairOfPairs(nn.Module):  # (a + b) + (c + d): the second pair stays a term (left-to-right rounds differently)
    def __init__(self, d):
        super().__init__()
        self.f, self.g, self.norm = nn.Linear(d, d), nn.Linear(d, d), nn.LayerNorm(d)

    def forward(self, x):
        return self.norm((x + self.f(x)) + (self.g(x) + x * 0.5))


class ZeroDimAlpha(DeepNormPostLN):  # alpha a 0-d buffer (in the model's dtype): an operator input of the fold
    def __init__(self, d):
        super().__init__(d)
        del self.alpha
        self.register_buffer("alpha", torch.tensor(1.7))


class ZeroDimAlphaParameter(DeepNormPostLN):  # a learnable 0-d alpha on the left, the sum returned too
    def __init__(self, d):
        super().__init__(d)
        del self.alpha
        self.alpha = nn.Parameter(torch.tensor(1.3))

    def forward(self, x):
        h = self.ffn(x) + self.alpha * x
        return self.norm(h), h


SUM_STYLES = [DeepNormPostLN, DeepNormAlphaLeft, DeepNormRMS, B2TBlock, B2TRightNested]
TENSOR_ALPHA_STYLES = [ZeroDimAlpha, ZeroDimAlphaParameter]
