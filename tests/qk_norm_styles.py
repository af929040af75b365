"""QK-norm: a norm over the head dim of q and/or k right before attention (Qwen3, Gemma3), written
the ways real code writes it, and near-misses whose norm must stay as written (or whose order
must be kept).

Same form as tests/rope_styles.py: ``inputs(dtype)`` builds the example inputs (B=2, L=5, H=2,
D=16: the kernels normalise in their loads at a power-of-two head dim of at least 16), ``forward``
returns the attention's output. ``FOLDED`` says which operands' norms the default pipeline must
fold into the attention operator, ``ROTATED`` which are rotated in it too; ``CONSTANT_INPUTS``
take no gradient (the cos/sin tables).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from tests.rope_styles import _tables, rotate_half

B, L, H, D = 2, 5, 2, 16


def _rms(x, w, eps=1e-6):  # transformers' Qwen3RMSNorm
    dtype = x.dtype
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return w * h.to(dtype)


def _gemma_rms(x, w, eps=1e-6):  # transformers' Gemma3RMSNorm: (1 + w) in float32, then cast
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return (h * (1.0 + w.float())).type_as(x)


def _attend(q, k, v):
    s = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))
    hidden = torch.triu(torch.ones(q.size(-2), k.size(-2), dtype=torch.bool), 1)
    return s.masked_fill(hidden, float("-inf")).softmax(dim=-1) @ v


def _rope(x, cos, sin):
    return x * cos + rotate_half(x) * sin


def _weights(dtype, n=2, shape=(D,)):
    g = torch.Generator().manual_seed(5)
    return [(1 + 0.3 * torch.randn(shape, generator=g)).to(dtype) for _ in range(n)]


def _blhd(dtype):
    g = torch.Generator().manual_seed(4)
    return [(2 * torch.randn(B, L, H, D, generator=g) + 0.5).to(dtype) for _ in range(3)]


class Qwen3(nn.Module):  # (B, L, H, D) projections, RMSNorm per head, transpose, RoPE, attention
    FOLDED = ROTATED = "qk"
    CONSTANT_INPUTS = (5, 6)

    def inputs(self, dtype):
        return _blhd(dtype) + _weights(dtype) + list(_tables(dtype))

    def forward(self, q, k, v, wq, wk, cos, sin):
        q, k = _rms(q, wq).transpose(1, 2), _rms(k, wk).transpose(1, 2)
        return _attend(_rope(q, cos, sin), _rope(k, cos, sin), v.transpose(1, 2))


class Gemma3(nn.Module):  # Gemma3's (1 + w) RMSNorm on q and k, then RoPE
    FOLDED = ROTATED = "qk"
    CONSTANT_INPUTS = (5, 6)

    def inputs(self, dtype):
        return _blhd(dtype) + _weights(torch.float32) + list(_tables(dtype))

    def forward(self, q, k, v, wq, wk, cos, sin):
        q, k = _gemma_rms(q, wq).transpose(1, 2), _gemma_rms(k, wk).transpose(1, 2)
        return _attend(_rope(q, cos, sin), _rope(k, cos, sin), v.transpose(1, 2))


class LayerNormNoRope(nn.Module):  # F.layer_norm over D of (B, H, L, D) q and k, no RoPE
    FOLDED, ROTATED = "qk", ""

    def inputs(self, dtype):
        return [t.transpose(1, 2).contiguous() for t in _blhd(dtype)] + _weights(dtype, 4)

    def forward(self, q, k, v, wq, bq, wk, bk):
        return _attend(F.layer_norm(q, (D,), wq, bq), F.layer_norm(k, (D,), wk, bk), v)


class QueryOnly(nn.Module):  # only q normalised (a permute instead of a transpose)
    FOLDED, ROTATED = "q", ""

    def inputs(self, dtype):
        return _blhd(dtype) + _weights(dtype, 1)

    def forward(self, q, k, v, wq):
        perm = (0, 2, 1, 3)
        return _attend(_rms(q, wq).permute(perm), k.permute(perm), v.permute(perm))


STYLES = [Qwen3, Gemma3, LayerNormNoRope, QueryOnly]


# ---- near-misses -----------------------------------------------------------------------------------

class NormOverSequence(nn.Module):  # normalises each head's L positions per feature, not its D row
    FOLDED, ROTATED, WHY = "", "", "not the operand's head rows"

    def inputs(self, dtype):
        return [t.transpose(1, 2).contiguous() for t in _blhd(dtype)] + _weights(dtype, 1, (L,))

    def forward(self, q, k, v, w):
        return _attend(_rms(q.transpose(-1, -2), w).transpose(-1, -2), k, v)


class NormalisedKeysReturned(nn.Module):  # the normalised k is also an output (a KV cache)
    FOLDED, ROTATED, WHY = "q", "", "also used by"

    def inputs(self, dtype):
        return _blhd(dtype) + _weights(dtype)

    def forward(self, q, k, v, wq, wk):
        k = _rms(k, wk).transpose(1, 2)
        return _attend(_rms(q, wq).transpose(1, 2), k, v.transpose(1, 2)), k


class WeightPerHead(nn.Module):  # a (H, 1, D) weight: each head its own, not one (D,) vector
    FOLDED, ROTATED, WHY = "", "", None

    def inputs(self, dtype):
        return [t.transpose(1, 2).contiguous() for t in _blhd(dtype)] + _weights(dtype, 1, (H, 1, D))

    def forward(self, q, k, v, w):
        return _attend(_rms(q, w), k, v)


class NormAfterRope(nn.Module):  # RoPE first, then the norm (with a non-uniform weight the order matters)
    FOLDED, ROTATED, WHY = "qk", "", None
    CONSTANT_INPUTS = (5, 6)

    def inputs(self, dtype):
        return _blhd(dtype) + _weights(dtype) + list(_tables(dtype))

    def forward(self, q, k, v, wq, wk, cos, sin):
        q, k = _rope(q.transpose(1, 2), cos, sin), _rope(k.transpose(1, 2), cos, sin)
        return _attend(_rms(q, wq), _rms(k, wk), v.transpose(1, 2))


class WholeHidden(nn.Module):  # OLMo2: one norm over H * D, then the heads are split off
    FOLDED, ROTATED, WHY = "", "", "whole hidden"

    def inputs(self, dtype):
        return [t.reshape(B, L, H * D) for t in _blhd(dtype)] + _weights(dtype, 2, (H * D,))

    def forward(self, q, k, v, wq, wk):
        split = lambda t: t.view(B, L, H, D).transpose(1, 2)  # noqa: E731
        return _attend(split(_rms(q, wq)), split(_rms(k, wk)), split(v))


NEAR_MISSES = [NormOverSequence, NormalisedKeysReturned, WeightPerHead, NormAfterRope, WholeHidden]
