"""PolyNorm (Zhuo et al. 2024, PolyCom; Motif 2.6B) written as public code writes it, and
near-misses that must not become one ``fxfuse.polynorm``."""
from __future__ import annotations

import torch
import torch.nn as nn


class PolyComPolyNorm(nn.Module):  # the paper's code: u / sqrt(mean(u^2) + eps), weight[3], bias[1]
    def __init__(self, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(3) / 3)
        self.bias = nn.Parameter(torch.zeros(1))
        self.eps = eps

    def _norm(self, x):
        return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)

    def forward(self, x):
        return self.weight[0] * self._norm(x ** 3) + self.weight[1] * self._norm(x ** 2) + self.weight[2] * self._norm(
            x) + self.bias


class RsqrtPolyNorm(PolyComPolyNorm):  # Motif's form: u * rsqrt(...)
    def _norm(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)


class AscendingScalarPolyNorm(nn.Module):  # three 0-d weights and a 0-d bias, the powers added ascending
    def __init__(self, eps=1e-5):
        super().__init__()
        self.w1, self.w2, self.w3 = (nn.Parameter(torch.tensor(v)) for v in (0.5, 0.3, 0.2))
        self.b = nn.Parameter(torch.tensor(0.05))
        self.eps = eps

    def rms(self, u):
        return u * torch.rsqrt(torch.mean(u * u, dim=-1, keepdim=True) + self.eps)

    def forward(self, x):
        return self.w1 * self.rms(x) + self.w2 * self.rms(torch.pow(x, 2)) + self.w3 * self.rms(torch.pow(x, 3)) + self.b


# ---- near-misses ----------------------------------------------------------------------------------

class PowerAfterNorm(RsqrtPolyNorm):  # norm(x)^3: the power applied after the norm, another function
    def forward(self, x):
        n = self._norm(x)
        return self.weight[0] * n ** 3 + self.weight[1] * n ** 2 + self.weight[2] * n + self.bias


class FourthPower(RsqrtPolyNorm):  # x^4 in place of x^3: not PolyNorm's powers
    def forward(self, x):
        return self.weight[0] * self._norm(x ** 4) + self.weight[1] * self._norm(x ** 2) + self.weight[2] * self._norm(
            x) + self.bias


class NormOverDim1(RsqrtPolyNorm):  # the statistic over dim 1, not the features
    def _norm(self, x):
        return x * torch.rsqrt(x.pow(2).mean(1, keepdim=True) + self.eps)


class PerFeatureWeights(nn.Module):  # weight (3, d): each term's weight is a vector, not a scalar
    def __init__(self, d, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.rand(3, d) + 0.5)
        self.bias = nn.Parameter(torch.zeros(1))
        self.eps = eps

    _norm = RsqrtPolyNorm._norm

    def forward(self, x):
        return self.weight[0] * self._norm(x ** 3) + self.weight[1] * self._norm(x ** 2) + self.weight[2] * self._norm(
            x) + self.bias


class BiasFirst(RsqrtPolyNorm):  # the bias added first: a partial sum that broadcasts; declined with a reason
    def forward(self, x):
        return self.bias + self.weight[0] * self._norm(x ** 3) + self.weight[1] * self._norm(x ** 2) + \
            self.weight[2] * self._norm(x)


STYLES = [PolyComPolyNorm, RsqrtPolyNorm, AscendingScalarPolyNorm]
NEAR_MISSES = [PowerAfterNorm, FourthPower, NormOverDim1, PerFeatureWeights, BiasFirst]


def build(style, d):
    try:
        return style(d) if style is PerFeatureWeights else style()
    except TypeError:
        return style()
