"""Attention written the ways real code writes it, and near-misses that are not attention.

Each style is a module whose ``forward`` is one way of writing ``softmax(scores) @ v``; its
``inputs(dtype)`` builds example inputs (B=2, H=2, L=5 — not a multiple of any tile — D=8), float
tensors in ``dtype``, boolean masks as they are. The comment says where the style comes from.
Shared by the recognition and numerics tests.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

B, H, L, D = 2, 2, 5, 8


def _qkv(dtype, layout=(B, H, L, D)):
    return [torch.randn(layout, dtype=dtype) for _ in range(3)]


def _padding(dtype):
    keep = torch.ones(B, L, dtype=torch.bool)
    keep[1, 3:] = False  # the second sequence is padded; every row still sees key 0
    return keep


class MatmulTranspose(nn.Module):  # the textbook: q @ k.transpose(-2, -1) / sqrt(d)
    def inputs(self, dtype):
        return _qkv(dtype)

    def forward(self, q, k, v):
        scores = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(q.size(-1))
        return torch.matmul(scores.softmax(dim=-1), v)


class EinsumUpcastSoftmax(nn.Module):  # (B, L, H, D) layout, einsum, softmax in float32 cast back
    def inputs(self, dtype):
        return _qkv(dtype, (B, L, H, D))

    def forward(self, q, k, v):
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * q.size(-1) ** -0.5
        probs = F.softmax(scores.float(), dim=-1).to(q.dtype)
        return torch.einsum("bhqk,bkhd->bqhd", probs, v)


class BmmFlatHeadsScaledQuery(nn.Module):  # fairseq-style: (B*H, L, D), the query pre-scaled
    def inputs(self, dtype):
        return _qkv(dtype, (B * H, L, D))

    def forward(self, q, k, v):
        q = q * (q.size(-1) ** -0.5)
        return torch.bmm(torch.softmax(torch.bmm(q, k.transpose(1, 2)), dim=-1), v)


class ScaleOnScoresMT(nn.Module):  # .mT, a scale multiplied after the product, no head split
    def inputs(self, dtype):
        return _qkv(dtype)

    def forward(self, q, k, v):
        return (0.125 * (q @ k.mT)).softmax(-1) @ v


class CausalTrilBuffer(nn.Module):  # GPT-2 (older transformers)/nanoGPT: a tril buffer sliced to length
    def __init__(self, max_len=16):
        super().__init__()
        self.register_buffer("bias", torch.tril(torch.ones(max_len, max_len)).view(1, 1, max_len, max_len))

    def inputs(self, dtype):
        return _qkv(dtype)

    def forward(self, q, k, v):
        n = q.size(-2)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = att.masked_fill(self.bias[:, :, :n, :n] == 0, float("-inf"))
        return F.softmax(att, dim=-1) @ v


class CausalTrilInForward(nn.Module):  # the mask built in forward: proved causal from its values
    def inputs(self, dtype):
        return _qkv(dtype)

    def forward(self, q, k, v):
        n = q.size(-2)
        causal = torch.tril(torch.ones(n, n, dtype=torch.bool))
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.size(-1))
        scores = scores.masked_fill(~causal, torch.finfo(scores.dtype).min)
        return scores.softmax(-1) @ v


class CausalArangeWhere(nn.Module):  # causality from an arange comparison, applied with torch.where
    def inputs(self, dtype):
        return _qkv(dtype)

    def forward(self, q, k, v):
        i = torch.arange(q.size(-2))
        scores = torch.where(i[None, :] <= i[:, None], q @ k.transpose(-1, -2), float("-inf"))
        return scores.softmax(-1) @ v


class SlidingWindowArange(nn.Module):  # Mistral-style: causal and at most WINDOW keys back
    WINDOW = 3

    def inputs(self, dtype):
        return _qkv(dtype)

    def forward(self, q, k, v):
        i, j = torch.arange(q.size(-2))[:, None], torch.arange(k.size(-2))[None, :]
        hidden = (j > i) | (i - j >= self.WINDOW)
        scores = (q @ k.transpose(-1, -2) / math.sqrt(q.size(-1))).masked_fill(hidden, float("-inf"))
        return scores.softmax(-1) @ v


class SoftcapGemma2(nn.Module):  # Gemma 2: logits soft-capped, c * tanh(s / c), before the causal mask
    CAP = 5.0

    def inputs(self, dtype):
        return _qkv(dtype)

    def forward(self, q, k, v):
        scores = (q @ k.transpose(-1, -2)) * q.size(-1) ** -0.5
        scores = torch.tanh(scores / self.CAP) * self.CAP
        n = q.size(-2)
        scores = scores.masked_fill(~torch.tril(torch.ones(n, n, dtype=torch.bool)), float("-inf"))
        return F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype) @ v


class PaddingMaskFill(nn.Module):  # boolean key-padding mask, masked_fill(-inf)
    def inputs(self, dtype):
        return _qkv(dtype) + [_padding(dtype)]

    def forward(self, q, k, v, keep):
        scores = q @ k.transpose(-1, -2) * 0.3
        scores = scores.masked_fill(~keep[:, None, None, :], float("-inf"))
        return scores.softmax(-1) @ v


class AdditiveMaskBert(nn.Module):  # BERT: (1 - mask) * -10000 as a (B, 1, 1, L) additive mask
    def inputs(self, dtype):
        return _qkv(dtype) + [_padding(dtype).to(dtype)]

    def forward(self, q, k, v, mask):
        extended = (1.0 - mask[:, None, None, :]) * -10000.0
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.size(-1)) + extended
        return nn.functional.softmax(scores, dim=-1) @ v


class RelativeBias(nn.Module):  # T5: a learned (H, L, L) position bias, no scale
    def __init__(self):
        super().__init__()
        self.bias = nn.Parameter(torch.randn(H, L, L))

    def inputs(self, dtype):
        return _qkv(dtype)

    def forward(self, q, k, v):
        scores = q @ k.transpose(-1, -2) + self.bias
        return F.softmax(scores.float(), dim=-1).type_as(scores) @ v


class GroupedQueryRepeatInterleave(nn.Module):  # GQA: 2 key/value heads shared by 4 query heads
    def inputs(self, dtype):
        return [torch.randn(B, 4, L, D, dtype=dtype)] + [torch.randn(B, 2, L, D, dtype=dtype) for _ in range(2)]

    def forward(self, q, k, v):
        k = k.repeat_interleave(2, dim=1)
        v = v.repeat_interleave(2, dim=1)
        return (q @ k.transpose(-1, -2) / math.sqrt(D)).softmax(-1) @ v


class MultiHeadProjections(nn.Module):  # a whole MHA block: heads split by view+transpose, merged back
    def __init__(self):
        super().__init__()
        self.qkv, self.proj = nn.Linear(H * D, 3 * H * D), nn.Linear(H * D, H * D)

    def inputs(self, dtype):
        return [torch.randn(B, L, H * D, dtype=dtype)]

    def forward(self, x):
        q, k, v = self.qkv(x).split(H * D, dim=-1)
        q, k, v = (t.view(B, L, H, D).transpose(1, 2) for t in (q, k, v))
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(D))
        y = att.softmax(dim=-1) @ v
        return self.proj(y.transpose(1, 2).contiguous().view(B, L, H * D))


class ScaledValues(nn.Module):  # a factor on v is part of the value operand: fused, and exact
    def inputs(self, dtype):
        return _qkv(dtype)

    def forward(self, q, k, v):
        return (q @ k.transpose(-1, -2)).softmax(-1) @ (v * 0.5)


class PerHeadTemperature(nn.Module):  # a learned (1, H, 1, 1) temperature: a score factor indexed by h
    def __init__(self):
        super().__init__()
        self.temperature = nn.Parameter(torch.rand(1, H, 1, 1) + 0.5)

    def inputs(self, dtype):
        return _qkv(dtype)

    def forward(self, q, k, v):
        return ((q @ k.transpose(-1, -2)) * self.temperature).softmax(-1) @ v


class TensorSqrtScale(nn.Module):  # "Attention is all you need" ports: / torch.sqrt(torch.tensor(d_k))
    def inputs(self, dtype):
        return _qkv(dtype)

    def forward(self, q, k, v):
        scores = q @ k.transpose(-1, -2) / torch.sqrt(torch.tensor(q.size(-1), dtype=q.dtype))
        return scores.softmax(-1) @ v


class BaddbmmAlibiBloom(nn.Module):  # BLOOM: alibi.baddbmm(q, k^T, beta=1, alpha=1/sqrt(d)), viewed to heads
    def inputs(self, dtype):
        slopes = torch.tensor([0.5, 0.25]).repeat(B)  # one ALiBi slope per (batch, head)
        return _qkv(dtype, (B * H, L, D)) + [(slopes[:, None, None] * torch.arange(L)).to(dtype)]

    def forward(self, q, k, v, alibi):
        scores = alibi.baddbmm(batch1=q, batch2=k.transpose(-1, -2), beta=1.0, alpha=1.0 / math.sqrt(D))
        probs = F.softmax(scores.view(B, H, L, L), dim=-1, dtype=torch.float32).to(q.dtype)
        return torch.bmm(probs.view(B * H, L, L), v)


class BaddbmmScaledBias(nn.Module):  # baddbmm with beta != 1: the operator is given beta * bias
    def inputs(self, dtype):
        return _qkv(dtype, (B * H, L, D)) + [torch.randn(1, L, L, dtype=dtype)]

    def forward(self, q, k, v, bias):
        return torch.baddbmm(bias, q, k.transpose(1, 2), beta=0.5, alpha=0.3).softmax(-1) @ v


class BaddbmmEmptyBetaZero(nn.Module):  # old GPT-2 (_upcast_and_reordered_attn): torch.empty, beta=0
    def inputs(self, dtype):
        return _qkv(dtype, (B * H, L, D))

    def forward(self, q, k, v):
        out = torch.empty(B * H, L, L, dtype=q.dtype)  # never read: beta=0 ignores its NaN and inf
        scores = torch.baddbmm(out, q, k.transpose(-1, -2), beta=0, alpha=1.0 / math.sqrt(D))
        return scores.softmax(-1) @ v


class SingleHead2D(nn.Module):  # single-head code on (L, D) tensors: q @ k.T is an aten.mm
    def inputs(self, dtype):
        return _qkv(dtype, (L, D))

    def forward(self, q, k, v):
        return (q @ k.T / math.sqrt(D)).softmax(-1) @ v


class AddmmSingleHead2D(nn.Module):  # torch.addmm(bias, q, k.T): a 2-D product with its bias
    def inputs(self, dtype):
        return _qkv(dtype, (L, D)) + [torch.randn(L, L, dtype=dtype)]

    def forward(self, q, k, v, bias):
        return torch.addmm(bias, q, k.T, alpha=0.5).softmax(-1) @ v


class ChunkedLocalMask(nn.Module):  # chunked/local attention (Llama 4-style chunks): i // C == j // C
    CHUNK = 2

    def inputs(self, dtype):
        return _qkv(dtype)

    def forward(self, q, k, v):
        i, j = torch.arange(q.size(-2)), torch.arange(k.size(-2))
        same_chunk = (i[:, None] // self.CHUNK) == (j[None, :] // self.CHUNK)
        scores = (q @ k.transpose(-1, -2)) * q.size(-1) ** -0.5
        return scores.masked_fill(~same_chunk, float("-inf")).softmax(-1) @ v


class PrefixLMWhere(nn.Module):  # prefix-LM (T5/PaliGemma): the prefix is seen by all, the rest causally
    PREFIX = 2

    def inputs(self, dtype):
        return _qkv(dtype)

    def forward(self, q, k, v):
        i = torch.arange(q.size(-2)).view(-1, 1)
        j = torch.arange(k.size(-2)).view(1, -1)
        visible = (j < self.PREFIX) | (j <= i)
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.size(-1))
        return torch.where(visible, scores, torch.finfo(scores.dtype).min).softmax(-1) @ v


class DilatedCausal(nn.Module):  # strided/dilated (Sparse Transformer): every 2nd key back, causally
    STRIDE = 2

    def inputs(self, dtype):
        return _qkv(dtype)

    def forward(self, q, k, v):
        i, j = torch.arange(q.size(-2))[:, None], torch.arange(k.size(-2))[None, :]
        keep = ((i - j) % self.STRIDE == 0) & (j <= i)
        return (q @ k.transpose(-1, -2)).masked_fill(keep.logical_not(), float("-inf")).softmax(-1) @ v


class CausalTriuOnes(nn.Module):  # torch.triu(ones, 1) as the hidden part: proved causal
    def inputs(self, dtype):
        return _qkv(dtype)

    def forward(self, q, k, v):
        n = q.size(-2)
        hidden = torch.triu(torch.ones(n, n, dtype=torch.bool), diagonal=1)
        return (q @ k.transpose(-1, -2) * 0.3).masked_fill(hidden, float("-inf")).softmax(-1) @ v


class OffsetPositionsMask(nn.Module):  # positions offset by a cache length: each query sees one key ahead
    OFFSET = 7

    def inputs(self, dtype):
        return _qkv(dtype)

    def forward(self, q, k, v):
        i = torch.arange(self.OFFSET, self.OFFSET + q.size(-2))[:, None]
        j = torch.arange(k.size(-2))[None, :] + self.OFFSET
        return (q @ k.transpose(-1, -2)).masked_fill(j > i + 1, float("-inf")).softmax(-1) @ v


class AlibiSlopes(nn.Module):  # ALiBi (Press et al.; BLOOM's slopes): slopes[:, None, None] * (j - i), causal
    def inputs(self, dtype):
        return _qkv(dtype)

    def forward(self, q, k, v):
        heads, n = q.size(1), q.size(-2)
        slopes = 2.0 ** (-8.0 * torch.arange(1, heads + 1) / heads)
        i = torch.arange(n)
        bias = (slopes[:, None, None] * (i[None, :] - i[:, None])).to(q.dtype)
        scores = q @ k.transpose(-1, -2) * q.size(-1) ** -0.5 + bias
        return scores.masked_fill(i[None, :] > i[:, None], float("-inf")).softmax(-1) @ v


class AlibiMPT(nn.Module):  # MPT's build_alibi_bias: int32 arange(1 - L, 1) * (1, H, 1, 1) slopes
    def inputs(self, dtype):
        return _qkv(dtype)

    def forward(self, q, k, v):
        heads, n = q.size(1), k.size(-2)
        alibi = torch.arange(1 - n, 1, dtype=torch.int32).view(1, 1, 1, n)
        base = torch.arange(1, heads + 1, dtype=torch.int64).float() * (8 / heads)
        slopes = (1.0 / torch.pow(2, base)).view(1, heads, 1, 1)
        bias = (alibi * slopes).squeeze(0)  # (H, 1, L)
        scores = (q @ k.transpose(-1, -2)) * q.size(-1) ** -0.5 + bias.to(q.dtype)
        return scores.softmax(-1) @ v


class ViewsBetweenScoreSteps(nn.Module):  # MBart-like: flat (B*H, L, L) scores viewed to heads and back between steps
    def inputs(self, dtype):
        mask = torch.where(_padding(dtype), 0.0, -1e4).to(dtype)[:, None, None, :]  # (B, 1, 1, L): per batch
        return _qkv(dtype, (B * H, L, D)) + [mask, torch.randn(B * H, L, L, dtype=dtype)]

    def forward(self, q, k, v, mask, bias):
        n, lq, lk = q.size(0), q.size(1), k.size(1)
        scores = torch.bmm(q, k.transpose(1, 2)) * q.size(-1) ** -0.5  # a scale on the 3-d scores
        scores = scores.view(n // H, H, lq, lk) + mask  # a 4-d mask, per batch: needs the (B, H) split
        scores = scores.reshape(n, lq, lk) + bias  # a 3-d (B*H, L, L) bias: read as (B, H, L, L)
        return torch.bmm(scores.softmax(-1), v)


class SafeSoftmaxPaddedQueries(nn.Module):  # SDPA's math form written out: padded queries see no key, _safe_softmax
    # gives them 0 (a plain softmax would give NaN); its dtype argument upcasts half scores to float32.
    def inputs(self, dtype):
        return _qkv(dtype) + [_padding(dtype)]

    def forward(self, q, k, v, keep):
        pairs = keep[:, None, :, None] & keep[:, None, None, :]  # padded queries' rows are all False
        scores = (q @ k.transpose(-1, -2) * 0.3).masked_fill(~pairs, float("-inf"))
        return torch._safe_softmax(scores, -1, dtype=torch.float32).to(q.dtype) @ v


STYLES = [MatmulTranspose, EinsumUpcastSoftmax, BmmFlatHeadsScaledQuery, ScaleOnScoresMT, CausalTrilBuffer,
          CausalTrilInForward, CausalArangeWhere, SlidingWindowArange, SoftcapGemma2, PaddingMaskFill, AdditiveMaskBert, RelativeBias,
          GroupedQueryRepeatInterleave, MultiHeadProjections, ScaledValues, PerHeadTemperature, TensorSqrtScale,
          BaddbmmAlibiBloom, BaddbmmScaledBias, BaddbmmEmptyBetaZero, SingleHead2D, AddmmSingleHead2D,
          ChunkedLocalMask, PrefixLMWhere, DilatedCausal, CausalTriuOnes, OffsetPositionsMask, AlibiSlopes, AlibiMPT,
          ViewsBetweenScoreSteps, SafeSoftmaxPaddedQueries]
# Masks and biases computed from positions: the kernel computes them (no mask or bias tensor).
INDEX_STYLES = [ChunkedLocalMask, PrefixLMWhere, DilatedCausal, CausalTriuOnes, OffsetPositionsMask, AlibiSlopes,
                AlibiMPT]


# ---- near-misses: each must be declined, with the reason in ``reason`` ----------------------------

class SoftmaxOverQueries(nn.Module):
    reason = "query axis"

    def inputs(self, dtype):
        return _qkv(dtype)

    def forward(self, q, k, v):
        return (q @ k.transpose(-1, -2)).softmax(-2) @ v


class MaskAfterSoftmax(nn.Module):
    reason = "after the softmax"

    def inputs(self, dtype):
        return _qkv(dtype) + [_padding(dtype)]

    def forward(self, q, k, v, keep):
        probs = (q @ k.transpose(-1, -2)).softmax(-1)
        return probs.masked_fill(~keep[:, None, None, :], 0.0) @ v


class ScaleOnProbabilities(nn.Module):
    reason = "after the softmax"

    def inputs(self, dtype):
        return _qkv(dtype)

    def forward(self, q, k, v):
        return ((q @ k.transpose(-1, -2)).softmax(-1) * 0.5) @ v


class ScoresAlsoReturned(nn.Module):
    reason = "also used"

    def inputs(self, dtype):
        return _qkv(dtype)

    def forward(self, q, k, v):
        scores = q @ k.transpose(-1, -2)
        return scores.softmax(-1) @ v, scores


class ProbabilitiesAlsoReturned(nn.Module):
    reason = "also used"

    def inputs(self, dtype):
        return _qkv(dtype)

    def forward(self, q, k, v):
        probs = (q @ k.transpose(-1, -2)).softmax(-1)
        return probs @ v, probs


class ProductOverQueryAxis(nn.Module):  # p^T @ v: contracts the query axis
    reason = "does not contract the key axis"

    def inputs(self, dtype):
        return _qkv(dtype)

    def forward(self, q, k, v):
        return (q @ k.transpose(-1, -2)).softmax(-1).transpose(-1, -2) @ v


class ScoreTermFromValues(nn.Module):
    reason = "computed from the values"

    def inputs(self, dtype):
        return _qkv(dtype)

    def forward(self, q, k, v):
        scores = q @ k.transpose(-1, -2) + v.sum(-1)[:, :, None, :]
        return scores.softmax(-1) @ v


class TransposedScores(nn.Module):  # softmax over what were the queries, after a transpose
    reason = "not a plain reshape"

    def inputs(self, dtype):
        return _qkv(dtype)

    def forward(self, q, k, v):
        return (q @ k.transpose(-1, -2)).transpose(-1, -2).softmax(-1) @ v


class BaddbmmBiasFromValues(nn.Module):
    reason = "computed from the values"

    def inputs(self, dtype):
        return _qkv(dtype, (B * H, L, D))

    def forward(self, q, k, v):
        return torch.baddbmm(v.sum(-1)[:, None, :], q, k.transpose(1, 2)).softmax(-1) @ v


class BaddbmmBetaZeroOnInput(nn.Module):  # the ignored tensor is a graph input: eager gives it a zero gradient
    reason = "beta=0"

    def inputs(self, dtype):
        return _qkv(dtype, (B * H, L, D)) + [torch.randn(B * H, L, L, dtype=dtype)]

    def forward(self, q, k, v, bias):
        return torch.baddbmm(bias, q, k.transpose(1, 2), beta=0.0).softmax(-1) @ v


class BaddbmmAlphaZero(nn.Module):  # the scores are the bias alone
    reason = "alpha=0"

    def inputs(self, dtype):
        return _qkv(dtype, (B * H, L, D)) + [torch.randn(B * H, L, L, dtype=dtype)]

    def forward(self, q, k, v, bias):
        return torch.baddbmm(bias, q, k.transpose(1, 2), alpha=0.0).softmax(-1) @ v


class BaddbmmValueProduct(nn.Module):  # a tensor added to p @ v inside the value product
    reason = "adds a tensor"

    def inputs(self, dtype):
        return _qkv(dtype, (B * H, L, D))

    def forward(self, q, k, v):
        return torch.baddbmm(q, (q @ k.transpose(1, 2)).softmax(-1), v)


class HeadsSwappedBetweenScoreSteps(nn.Module):  # scaled, viewed as (B, H), then swapped to (H, B) before the bias
    reason = "reorders them"

    def inputs(self, dtype):
        return _qkv(dtype, (B * H, L, D)) + [torch.randn(L, L, dtype=dtype)]

    def forward(self, q, k, v, bias):
        scores = (torch.bmm(q, k.transpose(1, 2)) * 0.5).view(B, H, L, L).transpose(0, 1) + bias
        return torch.bmm(scores.reshape(B * H, L, L).softmax(-1), v)  # each row meets another head's v


class KeyAxisSplitBetweenScoreSteps(nn.Module):  # the key axis viewed as (2, Lk / 2) for a per-half factor
    reason = "splits or merges the query or key axis"

    def inputs(self, dtype):
        return [torch.randn(B * H, 4, D, dtype=dtype) for _ in range(3)] + [torch.rand(2, 1, dtype=dtype) + 0.5]

    def forward(self, q, k, v, halves):
        scores = torch.bmm(q, k.transpose(1, 2))
        scores = scores.view(B * H, 4, 2, 2) * halves
        return torch.bmm(scores.view(B * H, 4, 4).softmax(-1), v)


class SafeSoftmaxNarrowingDtype(nn.Module):  # _safe_softmax(f32 scores, dtype=bf16): a score may become -inf
    reason = "only a cast from 16 bits to float32"  # after it checked for -inf rows, so it is not taken

    def inputs(self, dtype):
        return _qkv(dtype)

    def forward(self, q, k, v):
        return torch._safe_softmax(q @ k.transpose(-1, -2), -1, dtype=torch.bfloat16).to(v.dtype) @ v


NEAR_MISSES = [SoftmaxOverQueries, MaskAfterSoftmax, ScaleOnProbabilities, ScoresAlsoReturned,
               ProbabilitiesAlsoReturned, ProductOverQueryAxis, ScoreTermFromValues, TransposedScores,
               BaddbmmBiasFromValues, BaddbmmBetaZeroOnInput, BaddbmmAlphaZero, BaddbmmValueProduct,
               HeadsSwappedBetweenScoreSteps, KeyAxisSplitBetweenScoreSteps, SafeSoftmaxNarrowingDtype]
