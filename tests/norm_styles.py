"""Normalization written the ways real code writes it. Each module's forward is one style; the
comment names where the style comes from. Shared by the recognition, numerics and CLI tests."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F


class SourceMarkedRMSNorm(nn.Module):  # the plain form; the API and backend tests check its source line
    def __init__(self, d, eps=1e-6):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.randn(d)), eps

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))  # NORM_LINE


# Where a report must place SourceMarkedRMSNorm's site: this file, the line marked NORM_LINE.
NORM_LINE = next(i for i, line in enumerate(Path(__file__).read_text().splitlines(), 1) if line.endswith("# NORM_LINE"))
NORM_SOURCE = f"{__file__}:{NORM_LINE}"


class LlamaStyleRMSNorm(nn.Module):  # upcast, pow(2).mean, rsqrt, cast back, weight last
    def __init__(self, d, eps=1e-6):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.randn(d)), eps

    def forward(self, x):
        dtype = x.dtype
        h = x.to(torch.float32)
        variance = h.pow(2).mean(-1, keepdim=True)
        h = h * torch.rsqrt(variance + self.eps)
        return self.weight * h.to(dtype)


class SquareDivSqrtRMSNorm(nn.Module):  # torch.square, divided by sqrt, weight on the right
    def __init__(self, d):
        super().__init__()
        self.scale = nn.Parameter(torch.randn(d))

    def forward(self, x):
        return x / torch.sqrt(torch.square(x).mean(dim=-1, keepdim=True) + 1e-5) * self.scale


class MulSelfRMSNorm(nn.Module):  # x * x, eps on the left, no upcast
    def __init__(self, d):
        super().__init__()
        self.g = nn.Parameter(torch.randn(d))

    def forward(self, x):
        ms = (x * x).mean(-1, keepdim=True)
        return (x * torch.rsqrt(1e-8 + ms)) * self.g


class TwoCastsRMSNorm(nn.Module):  # x.float() * x.float(): two casts of one tensor, one square
    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d))

    def forward(self, x):
        ms = (x.float() * x.float()).mean(-1, keepdim=True)
        return (x.float() * torch.rsqrt(ms + 1e-6)).to(x.dtype) * self.weight


class GemmaStyleRMSNorm(nn.Module):  # weight stored as an offset from 1, applied in float32
    def __init__(self, d, eps=1e-6):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.randn(d) * 0.1), eps

    def forward(self, x):
        h = x.float()
        out = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        out = out * (1.0 + self.weight.float())
        return out.type_as(x)


class T5StyleRMSNorm(nn.Module):  # statistics in float32, normalizes the original-dtype input
    def __init__(self, d, eps=1e-6):
        super().__init__()
        self.weight, self.variance_epsilon = nn.Parameter(torch.randn(d)), eps

    def forward(self, hidden_states):
        variance = hidden_states.to(torch.float32).pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        if self.weight.dtype in [torch.float16, torch.bfloat16]:
            hidden_states = hidden_states.to(self.weight.dtype)
        return self.weight * hidden_states


class NoWeightRMSNorm(nn.Module):
    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


class FunctionalRMSNorm(nn.Module):  # F.rms_norm decomposes into the same ATen ops
    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d))

    def forward(self, x):
        return F.rms_norm(x, (x.shape[-1],), self.weight, 1e-5)


class TorchLayerNorm(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.ln = nn.LayerNorm(d)
        with torch.no_grad():
            self.ln.weight.normal_()
            self.ln.bias.normal_()

    def forward(self, x):
        return self.ln(x)


class VarSqrtLayerNorm(nn.Module):  # mean and biased var, divided by sqrt, weight and bias
    def __init__(self, d):
        super().__init__()
        self.w, self.b = nn.Parameter(torch.randn(d)), nn.Parameter(torch.randn(d))

    def forward(self, x):
        mean = x.mean(-1, keepdim=True)
        var = x.var(-1, unbiased=False, keepdim=True)
        return (x - mean) / torch.sqrt(var + 1e-5) * self.w + self.b


class CenteredPowLayerNorm(nn.Module):  # ((x - mean)**2).mean, multiplied by rsqrt
    def __init__(self, d):
        super().__init__()
        self.gamma, self.beta = nn.Parameter(torch.randn(d)), nn.Parameter(torch.randn(d))

    def forward(self, x):
        mu = x.mean(dim=-1, keepdim=True)
        xc = x - mu
        sigma2 = (xc ** 2).mean(dim=-1, keepdim=True)
        return self.gamma * (xc * torch.rsqrt(sigma2 + 1e-6)) + self.beta


class VarMeanLayerNorm(nn.Module):  # torch.var_mean gives both statistics in one call
    def __init__(self, d):
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.randn(d)), nn.Parameter(torch.randn(d))

    def forward(self, x):
        var, mean = torch.var_mean(x, dim=-1, keepdim=True, unbiased=False)
        return (x - mean) * torch.rsqrt(var + 1e-5) * self.weight + self.bias


class UpcastLayerNormNoAffine(nn.Module):  # float32 statistics, no weight or bias, cast back
    def forward(self, x):
        h = x.float()
        h = (h - h.mean(-1, keepdim=True)) * torch.rsqrt(h.var(-1, keepdim=True, correction=0) + 1e-5)
        return h.to(x.dtype)


class FunctionalLayerNormNoAffine(nn.Module):
    def forward(self, x):
        return F.layer_norm(x, x.shape[-1:], eps=1e-6)


class PreNormResidualBlock(nn.Module):  # residual add feeding a norm; the sum is used again
    def __init__(self, d):
        super().__init__()
        self.norm = LlamaStyleRMSNorm(d)
        self.proj = nn.Linear(d, d)

    def forward(self, x, delta):
        h = x + delta
        return h + self.proj(self.norm(h))


class NormalizeScaleRMSNorm(nn.Module):  # x-transformers' RMSNorm: F.normalize(x, dim=-1) * sqrt(d) * g
    def __init__(self, d=8):
        super().__init__()
        self.scale = d ** 0.5
        self.g = nn.Parameter(torch.randn(d))

    def forward(self, x):
        return F.normalize(x, dim=-1) * self.scale * self.g


RMS_STYLES = [LlamaStyleRMSNorm, SquareDivSqrtRMSNorm, MulSelfRMSNorm, TwoCastsRMSNorm, GemmaStyleRMSNorm,
              T5StyleRMSNorm, NoWeightRMSNorm, FunctionalRMSNorm, NormalizeScaleRMSNorm]
LAYER_STYLES = [TorchLayerNorm, VarSqrtLayerNorm, CenteredPowLayerNorm, VarMeanLayerNorm, UpcastLayerNormNoAffine,
                FunctionalLayerNormNoAffine]


def build(style, d):
    try:
        return style(d)
    except TypeError:
        return style()
