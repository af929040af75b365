"""Inductor's attention patterns, re-written here as small modules.

PyTorch's Inductor replaces hand-written attention with ``scaled_dot_product_attention`` when a
graph matches one of a fixed list of patterns (``_sfdp_pattern_1`` .. ``_sfdp_pattern_30`` in
torch/_inductor/fx_passes/fuse_attention.py, exercised by test/inductor/test_fused_attention.py).
Each class below computes what one of those patterns computes, written the way model code writes
it, so that fxfuse can be checked against the same list: ``SFDP`` names the pattern(s) it stands
for, ``inputs(dtype)`` builds example inputs (float tensors in ``dtype``, masks as the pattern
takes them), ``DROPOUT`` is the dropout probability on the attention probabilities (0 when the
pattern has none; modules apply it only in training, as ``nn.Dropout`` does, so in eval mode the
site is the pattern's dropout-free inference form), and ``CASTS`` says the pattern is about dtype
casts (tested in bf16 as well as fp32).

Shapes are tiny: B=2, H=2, L=6 (queries and keys), D=8. Patterns whose inputs arrive as
(B, L, H, D) and are permuted to heads-first take them in that layout, as the originals do.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

B, H, L, D = 2, 2, 6, 8
P = 0.3  # dropout probability of the patterns that have one


def _heads_first(dtype):
    return [torch.randn(B, H, L, D, dtype=dtype) for _ in range(3)]


def _seq_first(dtype):  # (B, L, H, D): the layout of a projection split into heads before the permute
    return [torch.randn(B, L, H, D, dtype=dtype) for _ in range(3)]


def _to_heads(*ts):
    return [t.permute(0, 2, 1, 3) for t in ts]


def _causal_additive(n, dtype):  # 0 on and below the diagonal, -inf above: an additive causal mask
    keep = torch.ones(n, n, dtype=torch.bool).tril()
    return torch.zeros(n, n, dtype=dtype).masked_fill(~keep, float("-inf"))


def _padding_2d(dtype):  # (B, L) 1 = attend, 0 = padding: the second sequence's last two keys are padding
    keep = torch.ones(B, L, dtype=dtype)
    keep[1, -2:] = 0
    return keep


def _additive_padding(dtype):  # BERT's extended mask: (B, 1, 1, L), 0 or a large negative number
    return (1.0 - _padding_2d(dtype)[:, None, None, :]) * torch.finfo(dtype).min


class _Pattern(nn.Module):
    SFDP: tuple[int, ...] = ()
    DROPOUT = 0.0
    CASTS = False

    def _drop(self, probs):
        return F.dropout(probs, self.DROPOUT, self.training) if self.DROPOUT else probs


class DivByScalar(_Pattern):  # 1: matmul(q, k^T).div(sqrt(d)).softmax(-1).matmul(v)
    SFDP = (1,)

    def inputs(self, dtype):
        return _heads_first(dtype)

    def forward(self, q, k, v):
        return torch.matmul(q, k.transpose(-2, -1)).div(math.sqrt(k.size(-1))).softmax(dim=-1).matmul(v)


class MulByScalar(_Pattern):  # 2: .mul(1 / sqrt(d)) instead of a division
    SFDP = (2,)

    def inputs(self, dtype):
        return _heads_first(dtype)

    def forward(self, q, k, v):
        return torch.matmul(q, k.transpose(-2, -1)).mul(1.0 / math.sqrt(k.size(-1))).softmax(dim=-1).matmul(v)


class DivDropout(_Pattern):  # 3: 1 with dropout on the probabilities
    SFDP = (3,)
    DROPOUT = P

    def inputs(self, dtype):
        return _heads_first(dtype)

    def forward(self, q, k, v):
        return self._drop(torch.matmul(q, k.transpose(-2, -1)).div(3.0).softmax(dim=-1)).matmul(v)


class MulDropout(_Pattern):  # 4 (and 28, the same on non-contiguous inputs: see NonContiguousMulDropout)
    SFDP = (4,)
    DROPOUT = P

    def inputs(self, dtype):
        return _heads_first(dtype)

    def forward(self, q, k, v):
        return self._drop(torch.matmul(q, k.transpose(-2, -1)).mul(0.4).softmax(dim=-1)).matmul(v)


class AdditiveCausalMask(_Pattern):  # 5: + an (L, L) float mask, -inf above the diagonal, built in forward
    SFDP = (5,)

    def inputs(self, dtype):
        return _heads_first(dtype)

    def forward(self, q, k, v):
        mask = _causal_additive(q.size(-2), q.dtype)
        return torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.size(-1)) + mask, dim=-1) @ v


class AdditiveMaskInput(_Pattern):  # 5: the additive mask as an input, (1, 1, L, L) of any values
    SFDP = (5,)

    def inputs(self, dtype):
        return _heads_first(dtype) + [torch.randn(1, 1, L, L, dtype=dtype)]

    def forward(self, q, k, v, mask):
        return torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.size(-1)) + mask, dim=-1) @ v


class AdditiveMaskDropout(_Pattern):  # 6: 5 with dropout
    SFDP = (6,)
    DROPOUT = P

    def inputs(self, dtype):
        return _heads_first(dtype)

    def forward(self, q, k, v):
        mask = _causal_additive(q.size(-2), q.dtype)
        probs = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.size(-1)) + mask, dim=-1)
        return self._drop(probs) @ v


class UpcastSoftmaxDropout(_Pattern):  # 7: permuted inputs, scores upcast to fp32, probs cast back, dropout
    SFDP = (7,)
    DROPOUT = P
    CASTS = True

    def inputs(self, dtype):
        return _seq_first(dtype)

    def forward(self, query, key, value):
        q, k, v = _to_heads(query, key, value)
        scores = (q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))).to(torch.float32)
        probs = self._drop(torch.softmax(scores, dim=-1)).to(query.dtype)
        return probs @ v.to(probs.dtype)


class UpcastSoftmax(_Pattern):  # 8: 7 without dropout
    SFDP = (8,)
    CASTS = True

    def inputs(self, dtype):
        return _seq_first(dtype)

    def forward(self, query, key, value):
        q, k, v = _to_heads(query, key, value)
        scores = (q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))).to(torch.float32)
        probs = torch.softmax(scores, dim=-1).to(query.dtype)
        return probs @ v.to(probs.dtype)


class ScaledQueryUpcastDropout(_Pattern):  # 9: 7 with the query divided before the product
    SFDP = (9,)
    DROPOUT = P
    CASTS = True

    def inputs(self, dtype):
        return _seq_first(dtype)

    def forward(self, query, key, value):
        q, k, v = _to_heads(query, key, value)
        q = q / math.sqrt(q.size(-1))
        probs = self._drop(torch.softmax((q @ k.transpose(-2, -1)).to(torch.float32), dim=-1)).to(query.dtype)
        return probs @ v.to(probs.dtype)


class ScaledQueryUpcast(_Pattern):  # 10: 9 without dropout
    SFDP = (10,)
    CASTS = True

    def inputs(self, dtype):
        return _seq_first(dtype)

    def forward(self, query, key, value):
        q, k, v = _to_heads(query, key, value)
        q = q / math.sqrt(q.size(-1))
        probs = torch.softmax((q @ k.transpose(-2, -1)).to(torch.float32), dim=-1).to(query.dtype)
        return probs @ v.to(probs.dtype)


class TransposedHeads(_Pattern):  # 11: (B, L, H, D) inputs transposed to heads-first (Hugging Face)
    SFDP = (11,)

    def inputs(self, dtype):
        return _seq_first(dtype)

    def forward(self, query, key, value):
        q, k, v = (t.transpose(1, 2) for t in (query, key, value))
        return torch.matmul(q, k.transpose(-2, -1)).div(math.sqrt(key.size(-1))).softmax(dim=-1).matmul(v)


class TransposedHeadsDropout(_Pattern):  # 12: 11 with dropout
    SFDP = (12,)
    DROPOUT = P

    def inputs(self, dtype):
        return _seq_first(dtype)

    def forward(self, query, key, value):
        q, k, v = (t.transpose(1, 2) for t in (query, key, value))
        probs = torch.matmul(q, k.transpose(-2, -1)).div(math.sqrt(key.size(-1))).softmax(dim=-1)
        return self._drop(probs).matmul(v)


class BmmNoScaleDropout(_Pattern):  # 13: (B*H, L, D) bmm, no scale, dropout
    SFDP = (13,)
    DROPOUT = P

    def inputs(self, dtype):
        return [torch.randn(B * H, L, D, dtype=dtype) for _ in range(3)]

    def forward(self, q, k, v):
        return torch.bmm(self._drop(torch.bmm(q, k.transpose(1, 2)).softmax(dim=-1)), v)


class PermutedPaddingBias(_Pattern):  # 14: BERT-large: permuted inputs, div, + a (B, 1, 1, L) additive mask
    SFDP = (14,)

    def inputs(self, dtype):
        return _seq_first(dtype) + [_additive_padding(dtype)]

    def forward(self, query, key, value, mask):
        q, k, v = _to_heads(query, key, value)
        return (torch.matmul(q, k.transpose(-2, -1)).div(math.sqrt(q.size(-1))) + mask).softmax(dim=-1).matmul(v)


class DistilBertMaskFill(_Pattern):  # 15: DistilBERT: (mask == 0).view(B, 1, 1, L).expand_as(scores), fill -inf
    SFDP = (15,)

    def inputs(self, dtype):
        return _seq_first(dtype) + [_padding_2d(dtype)]

    def forward(self, query, key, value, mask):
        q, k, v = _to_heads(query, key, value)
        scores = (q @ k.transpose(-2, -1)).div(math.sqrt(q.size(-1)))
        hidden = (mask == 0).view(q.size(0), 1, 1, k.size(-2)).expand_as(scores)
        fill = torch.full((), -float("inf"), dtype=q.dtype)
        return torch.softmax(scores.masked_fill(hidden, fill), dim=-1) @ v


class PermutedPaddingBiasDropout(_Pattern):  # 16: 14 with dropout, the probabilities cast to the query's dtype
    SFDP = (16,)
    DROPOUT = P

    def inputs(self, dtype):
        return _seq_first(dtype) + [_additive_padding(dtype)]

    def forward(self, query, key, value, mask):
        q, k, v = _to_heads(query, key, value)
        probs = (torch.matmul(q, k.transpose(-2, -1)).div(math.sqrt(q.size(-1))) + mask).softmax(dim=-1)
        return self._drop(probs).to(dtype=query.dtype).matmul(v)


class DistilBertMaskFillDropout(_Pattern):  # 17: 15 with dropout
    SFDP = (17,)
    DROPOUT = P

    def inputs(self, dtype):
        return _seq_first(dtype) + [_padding_2d(dtype)]

    def forward(self, query, key, value, mask):
        q, k, v = _to_heads(query, key, value)
        scores = (q @ k.transpose(-2, -1)).div(math.sqrt(q.size(-1)))
        hidden = (mask == 0).view(q.size(0), 1, 1, k.size(-2)).expand_as(scores)
        fill = torch.full((), -float("inf"), dtype=q.dtype)
        return self._drop(torch.softmax(scores.masked_fill(hidden, fill), dim=-1)) @ v


def _gpt2_scores(q, k, causal):
    # GPT-2 (older transformers): scores divided by a 0-d tensor, then where(causal, s, finfo.min)
    scores = torch.matmul(q, k.permute(0, 1, 3, 2))
    scores = scores.div(torch.full([], math.sqrt(q.size(-1)), dtype=scores.dtype))
    return torch.where(causal, scores, torch.full((), torch.finfo(q.dtype).min, dtype=q.dtype))


def _causal_bool():
    return torch.ones(L, L, dtype=torch.bool).tril()[None, None]


class Gpt2WhereCausal(_Pattern):  # 18: permuted, where(causal, s, min), dropout; returns the permuted k and v too
    SFDP = (18,)
    DROPOUT = P

    def inputs(self, dtype):
        return _seq_first(dtype) + [_causal_bool()]

    def forward(self, query, key, value, causal):
        q, k, v = _to_heads(query, key, value)
        out = self._drop(_gpt2_scores(q, k, causal).softmax(dim=-1)).matmul(v)
        return out, k, v


class Gpt2WhereCausalAndMask(_Pattern):  # 19: where(causal, s, min) + an additive padding mask, .type(v.dtype)
    SFDP = (19,)
    DROPOUT = P
    CASTS = True

    def inputs(self, dtype):
        return _heads_first(dtype) + [_causal_bool(), _additive_padding(dtype)]

    def forward(self, q, k, v, causal, mask):
        probs = (_gpt2_scores(q, k, causal) + mask).softmax(dim=-1).type(v.dtype)
        return self._drop(probs).matmul(v)


class DistilBertScaledQueryDropout(_Pattern):  # 20: 17 with the query divided before the product
    SFDP = (20,)
    DROPOUT = P

    def inputs(self, dtype):
        return _seq_first(dtype) + [_padding_2d(dtype)]

    def forward(self, query, key, value, mask):
        q, k, v = _to_heads(query, key, value)
        q = q.div(math.sqrt(q.size(-1)))
        scores = q @ k.transpose(-2, -1)
        hidden = (mask == 0).view(q.size(0), 1, 1, k.size(-2)).expand_as(scores)
        fill = torch.full((), -float("inf"), dtype=q.dtype)
        return self._drop(torch.softmax(scores.masked_fill(hidden, fill), dim=-1)) @ v


def _t5_scores(q, k, bias=None):
    scores = torch.matmul(q, k.permute(0, 1, 3, 2))
    return scores if bias is None else scores + bias


class T5Bias(_Pattern):  # 21: T5: no scale, + a float position bias, float32 softmax cast back with type_as
    SFDP = (21,)
    CASTS = True

    def inputs(self, dtype):
        return _seq_first(dtype) + [torch.randn(B, H, L, L, dtype=torch.float32)]

    def forward(self, query, key, value, bias):
        q, k, v = _to_heads(query, key, value)
        scores = _t5_scores(q, k, bias).type_as(q)
        return scores.float().softmax(dim=-1).type_as(q).matmul(v)


class T5BiasReturnsKV(_Pattern):  # 22: 21, returning the permuted key and value as well
    SFDP = (22,)
    CASTS = True

    def inputs(self, dtype):
        return _seq_first(dtype) + [torch.randn(B, H, L, L, dtype=torch.float32)]

    def forward(self, query, key, value, bias):
        q, k, v = _to_heads(query, key, value)
        scores = _t5_scores(q, k, bias).type_as(q)
        return scores.float().softmax(dim=-1).type_as(q).matmul(v), k, v


class T5NoBiasReturnsKV(_Pattern):  # 23: T5 without a bias: upcast, cast back, upcast again for the softmax
    SFDP = (23,)
    CASTS = True

    def inputs(self, dtype):
        return _seq_first(dtype)

    def forward(self, query, key, value):
        q, k, v = _to_heads(query, key, value)
        scores = _t5_scores(q, k).float().type_as(q)
        return scores.float().softmax(dim=-1).type_as(q).matmul(v), k, v


class MBartFlatHeadsMask(_Pattern):  # 24: MBart: heads flattened for bmm, viewed back to add a float mask
    SFDP = (24,)
    CASTS = True

    def inputs(self, dtype):
        return _heads_first(dtype) + [_causal_additive(L, torch.float32)[None, None]]

    def forward(self, query, key, value, mask):
        b, h, n, d = query.shape
        q, k, v = (t.reshape(b * h, -1, d) for t in (query, key, value))
        scores = torch.bmm(q, k.transpose(1, 2)).view(b, h, n, -1) + mask
        probs = F.softmax(scores.view(b * h, n, -1), dim=-1).to(query.dtype)
        return torch.bmm(probs, v).view(b, h, n, d)


class T5BiasDropout(_Pattern):  # 25: 21 with dropout (no cast of the biased scores before the upcast)
    SFDP = (25,)
    DROPOUT = P
    CASTS = True

    def inputs(self, dtype):
        return _seq_first(dtype) + [torch.randn(B, H, L, L, dtype=dtype)]

    def forward(self, query, key, value, bias):
        q, k, v = _to_heads(query, key, value)
        return self._drop(_t5_scores(q, k, bias).float().softmax(dim=-1).type_as(q)).matmul(v)


class T5BiasDropoutReturnsKV(_Pattern):  # 26: 25 returning the permuted key and value
    SFDP = (26,)
    DROPOUT = P
    CASTS = True

    def inputs(self, dtype):
        return _seq_first(dtype) + [torch.randn(B, H, L, L, dtype=dtype)]

    def forward(self, query, key, value, bias):
        q, k, v = _to_heads(query, key, value)
        return self._drop(_t5_scores(q, k, bias).float().softmax(dim=-1).type_as(q)).matmul(v), k, v


class T5NoBiasDropoutReturnsKV(_Pattern):  # 27: 23 with dropout
    SFDP = (27,)
    DROPOUT = P
    CASTS = True

    def inputs(self, dtype):
        return _seq_first(dtype)

    def forward(self, query, key, value):
        q, k, v = _to_heads(query, key, value)
        return self._drop(_t5_scores(q, k).float().softmax(dim=-1).type_as(q)).matmul(v), k, v


class NonContiguousMulDropout(MulDropout):  # 28: Visformer: 4 on q, k, v that are strided views of one tensor
    SFDP = (28,)

    def inputs(self, dtype):
        return list(torch.randn(3, B, L, H, D, dtype=dtype).permute(0, 1, 3, 2, 4).unbind(0))


def _split_scale(q, k):
    # What SDPA's math decomposition emits: the square root of the scale multiplied into q and into
    # k^T (as the aten.mul.Scalar overload, which Inductor's pattern names), then one product.
    root = math.sqrt(1.0 / math.sqrt(q.size(-1)))
    return torch.ops.aten.mul.Scalar(q, root) @ torch.ops.aten.mul.Scalar(k.transpose(-2, -1), root)


class SplitScaleMask(_Pattern):  # 29: SDPA's math form: split scale, + mask, aten._safe_softmax
    SFDP = (29,)

    def inputs(self, dtype):
        return _seq_first(dtype) + [torch.randn(1, 1, L, L, dtype=dtype)]

    def forward(self, query, key, value, mask):
        q, k, v = _to_heads(query, key, value)
        return torch.ops.aten._safe_softmax(_split_scale(q, k) + mask, -1) @ v


class SplitScale(_Pattern):  # 30: 29 without a mask
    SFDP = (30,)

    def inputs(self, dtype):
        return _seq_first(dtype)

    def forward(self, query, key, value):
        q, k, v = _to_heads(query, key, value)
        return torch.ops.aten._safe_softmax(_split_scale(q, k), -1) @ v


class ProbabilitiesCloned(_Pattern):  # test_sdpa_prev_13: 1 with a .clone() of the probabilities (dropout p=0)
    SFDP = (1,)

    def inputs(self, dtype):
        return _heads_first(dtype)

    def forward(self, q, k, v):
        return torch.matmul(q, k.transpose(-2, -1)).div(math.sqrt(k.size(-1))).softmax(dim=-1).clone().matmul(v)


PATTERNS = [DivByScalar, MulByScalar, DivDropout, MulDropout, AdditiveCausalMask, AdditiveMaskInput,
            AdditiveMaskDropout, UpcastSoftmaxDropout, UpcastSoftmax, ScaledQueryUpcastDropout, ScaledQueryUpcast,
            TransposedHeads, TransposedHeadsDropout, BmmNoScaleDropout, PermutedPaddingBias, DistilBertMaskFill,
            PermutedPaddingBiasDropout, DistilBertMaskFillDropout, Gpt2WhereCausal, Gpt2WhereCausalAndMask,
            DistilBertScaledQueryDropout, T5Bias, T5BiasReturnsKV, T5NoBiasReturnsKV, MBartFlatHeadsMask,
            T5BiasDropout, T5BiasDropoutReturnsKV, T5NoBiasDropoutReturnsKV, NonContiguousMulDropout,
            SplitScaleMask, SplitScale, ProbabilitiesCloned]


# ---- grouped-query variants: Inductor's list has none; these are its patterns on repeated k/v heads --

KV_HEADS = 1  # H query heads share one key/value head


def _grouped(dtype):
    return [torch.randn(B, H, L, D, dtype=dtype)] + [torch.randn(B, KV_HEADS, L, D, dtype=dtype) for _ in range(2)]


def _repeat_kv(t, n):  # Llama's repeat_kv: a broadcast view, then a reshape that copies it
    b, g, s, d = t.shape
    return t[:, :, None].expand(b, g, n, s, d).reshape(b, g * n, s, d)


class DivByScalarRepeatKV(_Pattern):  # 1 on keys and values repeated by expand + reshape (Llama)
    SFDP = (1,)

    def inputs(self, dtype):
        return _grouped(dtype)

    def forward(self, q, k, v):
        k, v = _repeat_kv(k, H // KV_HEADS), _repeat_kv(v, H // KV_HEADS)
        return torch.matmul(q, k.transpose(-2, -1)).div(math.sqrt(k.size(-1))).softmax(dim=-1).matmul(v)


class AdditiveMaskRepeatInterleave(_Pattern):  # 5 on keys and values repeated by repeat_interleave
    SFDP = (5,)

    def inputs(self, dtype):
        return _grouped(dtype)

    def forward(self, q, k, v):
        k, v = k.repeat_interleave(H // KV_HEADS, dim=1), v.repeat_interleave(H // KV_HEADS, dim=1)
        mask = _causal_additive(q.size(-2), q.dtype)
        return torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.size(-1)) + mask, dim=-1) @ v


class UpcastSoftmaxRepeatKV(_Pattern):  # 8 on repeated heads: permuted inputs, upcast softmax cast back
    SFDP = (8,)
    CASTS = True

    def inputs(self, dtype):
        return [torch.randn(B, L, H, D, dtype=dtype)] + [torch.randn(B, L, KV_HEADS, D, dtype=dtype) for _ in range(2)]

    def forward(self, query, key, value):
        q, k, v = _to_heads(query, key, value)
        k, v = _repeat_kv(k, H // KV_HEADS), _repeat_kv(v, H // KV_HEADS)
        scores = (q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))).to(torch.float32)
        probs = torch.softmax(scores, dim=-1).to(query.dtype)
        return probs @ v.to(probs.dtype)


GQA_VARIANTS = [DivByScalarRepeatKV, AdditiveMaskRepeatInterleave, UpcastSoftmaxRepeatKV]
