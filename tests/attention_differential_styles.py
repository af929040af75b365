"""Differential attention (Ye et al., Differential Transformer; Motif 2.6B) written as public code
writes it, in the form of attention_styles.py: two attentions sharing v combined as
``o1 - lambda * o2``, lambda from parameters; then near-misses, each with the reason it is
declined (``reason``) or None when it is simply not this form (the two attentions stay fused apart).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from tests.attention_styles import B, D, H, L

LAMBDA_INIT = 0.8 - 0.6 * math.exp(-0.3 * 1)  # the paper's schedule at depth 1


def _qkv5(dtype):
    return [torch.randn(B, H, L, D, dtype=dtype) for _ in range(5)]


class _Lambda(nn.Module):
    """lambda = exp(lq1 . lk1) - exp(lq2 . lk2) + lambda_init, from four learned vectors."""

    def __init__(self, *shape):
        super().__init__()
        self.lq1, self.lk1, self.lq2, self.lk2 = (nn.Parameter(torch.randn(*shape) * 0.1) for _ in range(4))

    def lam(self):
        l1 = torch.exp(torch.sum(self.lq1 * self.lk1, dim=-1).float()).type_as(self.lq1)
        l2 = torch.exp(torch.sum(self.lq2 * self.lk2, dim=-1).float()).type_as(self.lq1)
        return l1 - l2 + LAMBDA_INIT


class DiffCausalMatmul(_Lambda):  # two hand-written causal attentions, a scalar lambda (the paper's code)
    def __init__(self):
        super().__init__(D)

    def inputs(self, dtype):
        return _qkv5(dtype)

    def forward(self, q1, k1, q2, k2, v):
        hidden = torch.ones(L, L, dtype=torch.bool, device=q1.device).triu(1)

        def attend(q, k):
            scores = (q @ k.transpose(-1, -2)) * D ** -0.5
            return torch.softmax(scores.masked_fill(hidden, float("-inf")), dim=-1) @ v

        return attend(q1, k1) - self.lam() * attend(q2, k2)


class DiffFlashStyleSDPA(_Lambda):  # the official FlashAttention form: q, k split in pairs of heads, SDPA twice
    def __init__(self):
        super().__init__(D)
        self.subln = nn.RMSNorm(D, eps=1e-5)

    def inputs(self, dtype):
        return [torch.randn(B, L, H, 2, D, dtype=dtype), torch.randn(B, L, H, 2, D, dtype=dtype),
                torch.randn(B, L, H, D, dtype=dtype)]

    def forward(self, q, k, v):
        q1, q2 = q[:, :, :, 0].transpose(1, 2), q[:, :, :, 1].transpose(1, 2)
        k1, k2 = k[:, :, :, 0].transpose(1, 2), k[:, :, :, 1].transpose(1, 2)
        v = v.transpose(1, 2)
        attn1 = F.scaled_dot_product_attention(q1, k1, v, is_causal=True)
        attn2 = F.scaled_dot_product_attention(q2, k2, v, is_causal=True)
        attn = attn1 - self.lam() * attn2
        return self.subln(attn) * (1 - LAMBDA_INIT)  # the per-head norm and the (1 - lambda_init) scale


class DiffPerHeadLambda(_Lambda):  # one lambda per head (H, 1, 1), the product written o2 * lambda
    def __init__(self):
        super().__init__(H, D)

    def inputs(self, dtype):
        return _qkv5(dtype)

    def forward(self, q1, k1, q2, k2, v):
        a1 = F.softmax(torch.matmul(q1, k1.transpose(2, 3)) / math.sqrt(D), dim=-1)
        a2 = F.softmax(torch.matmul(q2, k2.transpose(2, 3)) / math.sqrt(D), dim=-1)
        return torch.matmul(a1, v) - torch.matmul(a2, v) * self.lam()[:, None, None]


class DiffPaddingMaskConstantLambda(nn.Module):  # a shared additive padding mask, a constant lambda
    def inputs(self, dtype):
        mask = torch.zeros(B, 1, 1, L, dtype=dtype)
        mask[0, ..., -2:] = float("-inf")
        return _qkv5(dtype) + [mask]

    def forward(self, q1, k1, q2, k2, v, mask):
        def attend(q, k):
            return torch.softmax(q @ k.transpose(-1, -2) * 0.3 + mask, -1) @ v

        return attend(q1, k1) - 0.5 * attend(q2, k2)


class DiffOfficialNaive(_Lambda):  # the official naive code: one softmax over 2H heads, split in pairs, one @ v
    nan_to_num = False  # the official code passes the scores through nan_to_num: see OfficialWithNanToNum

    def __init__(self):
        super().__init__(D)

    def inputs(self, dtype):  # q, k with 2H heads of D; v with H heads of 2D
        return [torch.randn(B, 2 * H, L, D, dtype=dtype), torch.randn(B, 2 * H, L, D, dtype=dtype),
                torch.randn(B, H, L, 2 * D, dtype=dtype)]

    def forward(self, q, k, v):
        q = q * D ** -0.5
        weights = torch.matmul(q, k.transpose(-1, -2))
        if self.nan_to_num:
            weights = torch.nan_to_num(weights)
        weights = weights + torch.triu(torch.zeros(L, L, device=q.device).float().fill_(float("-inf")).type_as(weights), 1)
        weights = F.softmax(weights, dim=-1, dtype=torch.float32).type_as(weights)
        weights = weights.view(B, H, 2, L, L)
        weights = weights[:, :, 0] - self.lam() * weights[:, :, 1]
        return torch.matmul(weights, v)


STYLES = [DiffCausalMatmul, DiffFlashStyleSDPA, DiffPerHeadLambda, DiffPaddingMaskConstantLambda, DiffOfficialNaive]


# ---- near-misses ---------------------------------------------------------------------------------

class _Plain(_Lambda):
    def __init__(self):
        super().__init__(D)

    def inputs(self, dtype):
        return _qkv5(dtype) + [torch.randn(B, H, L, D, dtype=dtype)]


def _attend(q, k, v, scale=D ** -0.5):
    return torch.softmax(q @ k.transpose(-1, -2) * scale, -1) @ v


class DifferentValues(_Plain):  # each half reads its own v
    reason = "different values"

    def forward(self, q1, k1, q2, k2, v, v2):
        return _attend(q1, k1, v) - self.lam() * _attend(q2, k2, v2)


class DifferentScales(_Plain):  # the halves' scales differ
    reason = "compute different scores"

    def forward(self, q1, k1, q2, k2, v, v2):
        return _attend(q1, k1, v) - self.lam() * _attend(q2, k2, v, scale=0.3)


class LambdaPerQuery(_Plain):  # lambda varies along the query dim: not one per (batch, head)
    reason = "along the query or feature dims"

    def forward(self, q1, k1, q2, k2, v, v2):
        per_query = self.lam() * torch.linspace(0.5, 1.5, L)[:, None]  # (L, 1)
        return _attend(q1, k1, v) - per_query * _attend(q2, k2, v)


class SumNotDifference(_Plain):  # o1 + lambda * o2: a sum
    reason = "o1 + lambda * o2"

    def forward(self, q1, k1, q2, k2, v, v2):
        return _attend(q1, k1, v) + self.lam() * _attend(q2, k2, v)


class HalfAlsoReturned(_Plain):  # o1 is returned as well
    reason = "also used"

    def forward(self, q1, k1, q2, k2, v, v2):
        o1 = _attend(q1, k1, v)
        return o1 - self.lam() * _attend(q2, k2, v), o1


class ReversedSubtraction(_Plain):  # lambda * o2 - o1: another computation, not this form (no miss)
    reason = None

    def forward(self, q1, k1, q2, k2, v, v2):
        return self.lam() * _attend(q2, k2, v) - _attend(q1, k1, v)


class PairsOfProbabilitiesSummed(nn.Module):  # the official form with p0 + lambda * p1: not combined (no miss)
    reason = None

    def inputs(self, dtype):
        return [torch.randn(B, 2 * H, L, D, dtype=dtype), torch.randn(B, 2 * H, L, D, dtype=dtype),
                torch.randn(B, H, L, 2 * D, dtype=dtype)]

    def forward(self, q, k, v):
        p = torch.softmax(q @ k.transpose(-1, -2), -1).view(B, H, 2, L, L)
        return (p[:, :, 0] + 0.5 * p[:, :, 1]) @ v


class OfficialWithNanToNum(DiffOfficialNaive):  # nan_to_num on the scores: fuse-attention declines it, undone
    reason = "nan_to_num"
    nan_to_num = True


NEAR_MISSES = [OfficialWithNanToNum, PairsOfProbabilitiesSummed, DifferentValues, DifferentScales, LambdaPerQuery, SumNotDifference, HalfAlsoReturned,
               ReversedSubtraction]
