"""Attention variants from current models and papers (issue 12), in the form of attention_styles.py:
attention sinks (gpt-oss, StreamingLLM), sigmoid attention (Apple's sigmoid self-attention) and a
per-row softmax temperature (SSMax, Llama 4's inference-time temperature tuning); then their
near-misses, each declined with the reason in ``reason``."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from tests.attention_styles import B, D, H, L, _padding, _qkv


class SinksGptOss(nn.Module):  # transformers' gpt-oss eager attention: a learned logit per head joined to the scores
    def __init__(self):
        super().__init__()
        self.sinks = nn.Parameter(torch.randn(H))

    def inputs(self, dtype):
        causal = torch.full((L, L), float("-inf")).triu(1)[None, None].expand(B, 1, L, L)
        return _qkv(dtype) + [causal.to(dtype)]

    def forward(self, q, k, v, mask):
        scores = torch.matmul(q, k.transpose(2, 3)) * D ** -0.5 + mask
        sinks = self.sinks.reshape(1, -1, 1, 1).expand(q.shape[0], -1, q.shape[-2], -1)
        combined = torch.cat([scores, sinks], dim=-1)
        combined = combined - combined.max(dim=-1, keepdim=True).values  # overflow guard (softmax ignores it)
        probs = F.softmax(combined, dim=-1, dtype=combined.dtype)
        return torch.matmul(probs[..., :-1], v)


class SinksAmaxNoShift(nn.Module):  # the same without the max shift, the sink column built per row
    def __init__(self):
        super().__init__()
        self.sinks = nn.Parameter(torch.randn(1, H, 1, 1))

    def inputs(self, dtype):
        return _qkv(dtype)

    def forward(self, q, k, v):
        scores = q @ k.transpose(-1, -2) * 0.3
        column = self.sinks.expand(*scores.shape[:-1], 1)
        probs = torch.cat([scores, column], dim=3).softmax(-1)
        return probs[:, :, :, : scores.size(-1)] @ v


class StreamingLLMSinkTokens(nn.Module):  # StreamingLLM: the first 2 keys always visible, then a sliding window
    SINK, WINDOW = 2, 2

    def inputs(self, dtype):
        return _qkv(dtype)

    def forward(self, q, k, v):
        i = torch.arange(q.size(-2))[:, None]
        j = torch.arange(k.size(-2))[None, :]
        visible = (j <= i) & ((j < self.SINK) | (i - j < self.WINDOW))
        scores = (q @ k.transpose(-1, -2)) * D ** -0.5
        return scores.masked_fill(~visible, float("-inf")).softmax(-1) @ v


class SigmoidAttention(nn.Module):  # Ramapuram et al.: sigmoid(q k^T / sqrt(d) + b), b = -log(L), no normalisation
    def inputs(self, dtype):
        return _qkv(dtype)

    def forward(self, q, k, v):
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.size(-1)) - math.log(k.size(-2))
        return torch.sigmoid(scores) @ v


class SigmoidCausalLearnedBias(nn.Module):  # a learned scalar bias (0-dim parameter) and a causal mask
    def __init__(self):
        super().__init__()
        self.b = nn.Parameter(torch.tensor(-1.5))

    def inputs(self, dtype):
        return _qkv(dtype)

    def forward(self, q, k, v):
        n = q.size(-2)
        scores = (q @ k.transpose(-1, -2)) * D ** -0.5 + self.b
        hidden = torch.ones(n, n, dtype=torch.bool).triu(1)
        return F.sigmoid(scores.masked_fill(hidden, float("-inf"))) @ v


class SSMaxPerHead(nn.Module):  # SSMax (Nakanishi): a learned s per head times log(n), n the number of keys
    def __init__(self):
        super().__init__()
        self.s = nn.Parameter(torch.rand(H) + 0.5)

    def inputs(self, dtype):
        return _qkv(dtype)

    def forward(self, q, k, v):
        factor = (self.s * math.log(k.size(-2))).view(1, -1, 1, 1)
        scores = (q @ k.transpose(-1, -2)) * factor * D ** -0.5
        return scores.softmax(-1) @ v


class SSMaxCausalPerQuery(nn.Module):  # SSMax under a causal mask: query i sees n = i + 1 keys, log(i + 1) per row
    def __init__(self):
        super().__init__()
        self.s = nn.Parameter(torch.rand(1, H, 1, 1) + 0.5)

    def inputs(self, dtype):
        return _qkv(dtype)

    def forward(self, q, k, v):
        n = q.size(-2)
        visible = torch.arange(1, n + 1, dtype=q.dtype)[:, None]  # (Lq, 1): per query row
        scores = (q @ k.transpose(-1, -2)) * (self.s * torch.log(visible)) * D ** -0.5
        hidden = torch.ones(n, n, dtype=torch.bool).triu(1)
        return scores.masked_fill(hidden, float("-inf")).softmax(-1) @ v


class SSMaxOnQuery(nn.Module):  # SSMax applied to q before the product (as its paper writes it)
    def __init__(self):
        super().__init__()
        self.s = nn.Parameter(torch.rand(1, H, 1, 1) + 0.5)

    def inputs(self, dtype):
        return _qkv(dtype)

    def forward(self, q, k, v):
        q = q * (self.s * math.log(k.size(-2)))
        return (q @ k.transpose(-1, -2) * D ** -0.5).softmax(-1) @ v


class Llama4TemperatureTuning(nn.Module):  # Llama 4: log1p(floor((pos + 1) / floor_scale)) * scale + 1 on q
    FLOOR, SCALE = 2.0, 0.1

    def inputs(self, dtype):
        return _qkv(dtype, (B, L, H, D)) + [torch.arange(L)]

    def forward(self, q, k, v, positions):
        scales = torch.log1p(torch.floor((positions.float() + 1.0) / self.FLOOR)) * self.SCALE + 1.0
        q = (q * scales.view(1, -1, 1, 1)).to(q.dtype)  # (1, L, 1, 1): per query position
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        return F.softmax(q @ k.transpose(-1, -2) * D ** -0.5, dim=-1) @ v


SINK_STYLES = [SinksGptOss, SinksAmaxNoShift]
SIGMOID_STYLES = [SigmoidAttention, SigmoidCausalLearnedBias]
TEMPERATURE_STYLES = [SSMaxPerHead, SSMaxCausalPerQuery, SSMaxOnQuery, Llama4TemperatureTuning]
VARIANT_STYLES = SINK_STYLES + [StreamingLLMSinkTokens] + SIGMOID_STYLES + TEMPERATURE_STYLES


# ---- near-misses ---------------------------------------------------------------------------------

class SinkColumnFirst(nn.Module):  # the sink joined before the scores, then the first column dropped
    reason = "after the scores"

    def __init__(self):
        super().__init__()
        self.sinks = nn.Parameter(torch.randn(1, H, 1, 1))

    def inputs(self, dtype):
        return _qkv(dtype)

    def forward(self, q, k, v):
        scores = q @ k.transpose(-1, -2)
        return torch.cat([self.sinks.expand(B, H, L, 1), scores], -1).softmax(-1)[..., 1:] @ v


class SinkShiftedByQueryMax(nn.Module):  # the max over the queries subtracted: not softmax's own shift
    reason = "other than their own row max"

    def __init__(self):
        super().__init__()
        self.sinks = nn.Parameter(torch.randn(1, H, 1, 1))

    def inputs(self, dtype):
        return _qkv(dtype)

    def forward(self, q, k, v):
        c = torch.cat([q @ k.transpose(-1, -2), self.sinks.expand(B, H, L, 1)], -1)
        return (c - c.max(dim=-2, keepdim=True).values).softmax(-1)[..., :-1] @ v


class SinkProbabilityKept(nn.Module):  # the sink's probability is not dropped: a value row for it
    reason = "other than by dropping that column"

    def __init__(self):
        super().__init__()
        self.sinks = nn.Parameter(torch.randn(1, H, 1, 1))

    def inputs(self, dtype):
        return _qkv(dtype) + [torch.randn(B, H, L + 1, D, dtype=dtype)]

    def forward(self, q, k, v, v_with_sink):
        c = torch.cat([q @ k.transpose(-1, -2), self.sinks.expand(B, H, L, 1)], -1)
        return c.softmax(-1) @ v_with_sink


class SinkFromValues(nn.Module):  # the joined column is computed from v
    reason = "computed from the values"

    def inputs(self, dtype):
        return _qkv(dtype)

    def forward(self, q, k, v):
        column = v.mean(-1, keepdim=True)  # (B, H, L, 1)
        c = torch.cat([q @ k.transpose(-1, -2), column], -1)
        return c.softmax(-1)[..., :-1] @ v


class SigmoidRowNormalised(nn.Module):  # sigmoid divided by its row sum: another normaliser
    reason = "divided by its own sum"

    def inputs(self, dtype):
        return _qkv(dtype)

    def forward(self, q, k, v):
        p = torch.sigmoid(q @ k.transpose(-1, -2))
        return (p / p.sum(-1, keepdim=True)) @ v


class SigmoidAlsoReturned(nn.Module):  # the sigmoid's probabilities are returned too
    reason = "also used"

    def inputs(self, dtype):
        return _qkv(dtype)

    def forward(self, q, k, v):
        p = torch.sigmoid(q @ k.transpose(-1, -2) - 2.0)
        return p @ v, p


class TemperatureOnProbabilities(nn.Module):  # a per-row temperature multiplying the probabilities
    reason = "after the softmax"

    def inputs(self, dtype):
        return _qkv(dtype)

    def forward(self, q, k, v):
        factor = torch.log(torch.arange(2, L + 2, dtype=q.dtype))[:, None]
        return ((q @ k.transpose(-1, -2)).softmax(-1) * factor) @ v


VARIANT_NEAR_MISSES = [SinkColumnFirst, SinkShiftedByQueryMax, SinkProbabilityKept, SinkFromValues,
                       SigmoidRowNormalised, SigmoidAlsoReturned, TemperatureOnProbabilities]


class SigmoidGateMLP(nn.Module):  # sigmoid(x @ W1) @ W2 on 2-D products: an MLP, not looked at (no miss)
    def __init__(self):
        super().__init__()
        self.w1, self.w2 = nn.Parameter(torch.randn(D, 16)), nn.Parameter(torch.randn(16, D))

    def inputs(self, dtype):
        return [torch.randn(B * L, D, dtype=dtype)]

    def forward(self, x):
        return torch.sigmoid(x @ self.w1) @ self.w2


class RouterSoftmaxOverJoinedLogits(nn.Module):  # softmax over two joined logit sets, no value product: silent
    def inputs(self, dtype):
        return [torch.randn(B, L, 4, dtype=dtype), torch.randn(B, L, 3, dtype=dtype)]

    def forward(self, a, b):
        return torch.cat([a, b], dim=-1).softmax(-1)[..., :4].sum(-1)
