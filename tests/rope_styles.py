"""RoPE on q and k right before attention, written the ways real code writes it, and near-misses
whose rotation must stay as written (the attention itself may still be fused).

Same form as tests/attention_styles.py: ``inputs(dtype)`` builds the example inputs (B=2, H=2,
L=5, D=16: the kernels rotate in their loads at a power-of-two head dim of at least 16), and
``forward`` returns the attention's output. ``ROTATED`` says which operands the pass must fuse;
``CONSTANT_INPUTS`` are inputs that take no gradient (the tables of most styles: with tables that
require grad the operator's backward runs in torch, which the other styles test).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

B, H, L, D = 2, 2, 5, 16


def _tables(dtype, length=L, dim=D, base=10000.0):
    """Llama's cos/sin: inv_freq over half the dim, the frequencies repeated for both halves."""
    inv_freq = 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    freqs = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x):  # transformers' Llama
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def _attend(q, k, v, causal=False):
    s = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))
    if causal:
        hidden = torch.triu(torch.ones(q.size(-2), k.size(-2), dtype=torch.bool), 1)
        s = s.masked_fill(hidden, float("-inf"))
    return s.softmax(dim=-1) @ v


class LlamaPositionIds(nn.Module):  # transformers' Llama: a (B, L, D) table gathered by position ids, unsqueeze(1)
    ROTATED = "qk"
    CONSTANT_INPUTS = (3, 4)  # rotary tables are buffers: the kernels rotate the gradients back

    def inputs(self, dtype):
        cos, sin = _tables(dtype, 2 * L)
        positions = torch.stack([torch.arange(L), torch.arange(2, L + 2)])  # the second sequence is offset
        return [torch.randn(B, H, L, D, dtype=dtype) for _ in range(3)] + [cos, sin, positions]

    def forward(self, q, k, v, cos_cached, sin_cached, position_ids):
        cos, sin = cos_cached[position_ids].unsqueeze(1), sin_cached[position_ids].unsqueeze(1)
        q = (q * cos) + (rotate_half(q) * sin)
        k = (k * cos) + (rotate_half(k) * sin)
        return _attend(q, k, v, causal=True)


class NeoXChunkTable(nn.Module):  # GPT-NeoX-like: rotate_half by chunk(2, -1), an (L, D) table [None, None]
    ROTATED = "qk"

    def inputs(self, dtype):
        return [torch.randn(B, H, L, D, dtype=dtype) for _ in range(3)] + list(_tables(dtype))

    def forward(self, q, k, v, cos, sin):
        def rot(x):
            x1, x2 = x.chunk(2, dim=-1)
            return torch.cat((-x2, x1), dim=-1)

        cos, sin = cos[None, None], sin[None, None]
        return _attend(rot(q) * sin + q * cos, k * cos + rot(k) * sin, v)


class GroupedQueryLlama(nn.Module):  # Llama with GQA: k rotated on its 1 kv head, then repeat_kv
    ROTATED = "qk"
    CONSTANT_INPUTS = (3, 4)  # rotary tables are buffers: the kernels rotate the gradients back

    def inputs(self, dtype):
        return [torch.randn(B, H, L, D, dtype=dtype), torch.randn(B, 1, L, D, dtype=dtype),
                torch.randn(B, 1, L, D, dtype=dtype), *_tables(dtype)]

    def forward(self, q, k, v, cos, sin):
        cos, sin = cos.unsqueeze(0).unsqueeze(1), sin.unsqueeze(0).unsqueeze(1)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        k, v = (t[:, :, None].expand(B, 1, H, L, D).reshape(B, H, L, D) for t in (k, v))
        return _attend(q, k, v, causal=True)


class GPTJInterleavedBLHD(nn.Module):  # GPT-J: rotate_every_two on (B, L, H, D), before the heads move forward
    ROTATED = "qk"
    CONSTANT_INPUTS = (3, 4)  # rotary tables are buffers: the kernels rotate the gradients back

    def inputs(self, dtype):
        inv_freq = 1.0 / 10000 ** (torch.arange(0, D, 2, dtype=torch.float32) / D)
        freqs = torch.outer(torch.arange(L, dtype=torch.float32), inv_freq)
        return [torch.randn(B, L, H, D, dtype=dtype) for _ in range(3)] + [freqs.sin().to(dtype), freqs.cos().to(dtype)]

    def forward(self, q, k, v, sin, cos):
        def rotate_every_two(x):
            x1, x2 = x[:, :, :, ::2], x[:, :, :, 1::2]
            return torch.stack((-x2, x1), dim=-1).flatten(-2)

        sin = torch.repeat_interleave(sin[None, :, None, :], 2, 3)
        cos = torch.repeat_interleave(cos[None, :, None, :], 2, 3)
        q = q * cos + rotate_every_two(q) * sin
        k = k * cos + rotate_every_two(k) * sin
        return _attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))


class RepeatedKeysCopied(nn.Module):  # k rotated, then its head copied (a clone between expand and reshape)
    ROTATED = "qk"
    CONSTANT_INPUTS = (3, 4)

    def inputs(self, dtype):
        return [torch.randn(B, H, L, D, dtype=dtype), torch.randn(B, 1, L, D, dtype=dtype),
                torch.randn(B, H, L, D, dtype=dtype), *_tables(dtype)]

    def forward(self, q, k, v, cos, sin):
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        k = k[:, :, None].expand(B, 1, H, L, D).clone().reshape(B, H, L, D)
        return _attend(q, k, v)


class SmallHeadDim(nn.Module):  # D = 8: the operator rotates in torch before the kernels (no in-tile halves)
    ROTATED = "qk"

    def inputs(self, dtype):
        return [torch.randn(B, H, L, 8, dtype=dtype) for _ in range(3)] + list(_tables(dtype, dim=8))

    def forward(self, q, k, v, cos, sin):
        return _attend(q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin, v, causal=True)


class TablesFromPositions(nn.Module):  # cos/sin computed in the graph from positions and a base (Motif's 500000)
    ROTATED = "qk"

    def inputs(self, dtype):
        return [torch.randn(B, H, L, D, dtype=dtype) for _ in range(3)]

    def forward(self, q, k, v):
        inv_freq = 1.0 / 500000.0 ** (torch.arange(0, D, 2, dtype=torch.float32) / D)
        freqs = torch.arange(q.size(-2), dtype=torch.float32)[:, None] * inv_freq[None, :]
        emb = freqs.repeat(1, 2)  # the frequencies for both halves (a cat would stay in the graph: the test counts cats)
        cos, sin = emb.cos().to(q.dtype), emb.sin().to(q.dtype)
        return _attend(q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin, v, causal=True)


class VisionRotaryInFloat32(nn.Module):  # Qwen2-VL's (and 28 other transformers families') vision RoPE
    ROTATED = "qk"  # a 16-bit q/k is turned to float32, rotated with float32 tables, cast back once

    def inputs(self, dtype):
        return [torch.randn(B, L, H, D, dtype=dtype) for _ in range(3)] + list(_tables(dtype))

    def forward(self, q, k, v, cos, sin):  # q, k: (L-major) (B, L, H, D); cos, sin: (L, D)
        dtype = q.dtype
        q, k = q.float(), k.float()
        cos, sin = cos.unsqueeze(-2).float(), sin.unsqueeze(-2).float()
        q = ((q * cos) + (rotate_half(q) * sin)).to(dtype)
        k = ((k * cos) + (rotate_half(k) * sin)).to(dtype)
        return _attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))


STYLES = [LlamaPositionIds, NeoXChunkTable, GroupedQueryLlama, GPTJInterleavedBLHD, RepeatedKeysCopied, SmallHeadDim,
          TablesFromPositions, VisionRotaryInFloat32]


def freqs_cis(length=L, dim=D, base=10000.0, heads=None):
    """Meta's precompute_freqs_cis: polar(1, positions x inv_freq), (L, D/2) complex64 (or one per head)."""
    inv_freq = 1.0 / base ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim)
    angles = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq)
    if heads:  # a different table per head (a near-miss)
        angles = angles[:, None, :] * torch.arange(1, heads + 1, dtype=torch.float32)[None, :, None]
    return torch.polar(torch.ones_like(angles), angles)


def meta_rotary(xq, xk, freqs):  # Meta's Llama apply_rotary_emb, on (B, L, H, D)
    xq_ = torch.view_as_complex(xq.float().reshape(*xq.shape[:-1], -1, 2))
    xk_ = torch.view_as_complex(xk.float().reshape(*xk.shape[:-1], -1, 2))
    shape = [d if i == 1 or i == xq_.ndim - 1 else 1 for i, d in enumerate(xq_.shape)] if freqs.dim() == 2 else \
        [1, *freqs.shape]
    freqs = freqs.view(*shape)
    return torch.view_as_real(xq_ * freqs).flatten(3).type_as(xq), torch.view_as_real(xk_ * freqs).flatten(3).type_as(xk)


class MetaComplex(nn.Module):  # Meta's Llama: view_as_complex pairs times freqs_cis, view_as_real, flatten
    ROTATED = "qk"  # a bf16 q/k is rotated in float32 and rounded once ("interleaved/float32")

    def inputs(self, dtype):
        return [torch.randn(B, L, H, D, dtype=dtype) for _ in range(3)] + [freqs_cis()]

    def forward(self, q, k, v, freqs):
        q, k = meta_rotary(q, k, freqs)
        return _attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True)


# ---- near-misses: the rotation named stays as written ----------------------------------------------

class RotatedKeysAlsoReturned(nn.Module):  # the rotated k goes into a KV cache (returned): only q's is fused
    ROTATED = "q"

    def inputs(self, dtype):
        return [torch.randn(B, H, L, D, dtype=dtype) for _ in range(3)] + list(_tables(dtype))

    def forward(self, q, k, v, cos, sin):
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        return _attend(q, k, v), k


class RotatedKeysScrambled(nn.Module):  # the rotated k reshaped so that positions and dims trade places
    ROTATED = "q"

    def inputs(self, dtype):
        return [torch.randn(B, H, L, D, dtype=dtype) for _ in range(3)] + list(_tables(dtype))

    def forward(self, q, k, v, cos, sin):
        q = q * cos + rotate_half(q) * sin
        k = (k * cos + rotate_half(k) * sin).reshape(B, H, D, L).transpose(2, 3)
        return _attend(q, k, v)


class PartialRotary(nn.Module):  # GPT-NeoX rotary_pct / Phi: only the first 8 of 16 dims rotated
    ROTATED = ""

    def inputs(self, dtype):
        return [torch.randn(B, H, L, D, dtype=dtype) for _ in range(3)] + list(_tables(dtype, dim=8))

    def forward(self, q, k, v, cos, sin):
        def partial(x):
            rot, passed = x[..., :8], x[..., 8:]
            return torch.cat((rot * cos + rotate_half(rot) * sin, passed), dim=-1)

        return _attend(partial(q), partial(k), v)


class HalvesSwappedWrongSign(nn.Module):  # cat(x2, -x1): the transpose rotation, not rotate_half
    ROTATED = ""

    def inputs(self, dtype):
        return [torch.randn(B, H, L, D, dtype=dtype) for _ in range(3)] + list(_tables(dtype))

    def forward(self, q, k, v, cos, sin):
        def rot(x):
            return torch.cat((x[..., 8:], -x[..., :8]), dim=-1)

        return _attend(q * cos + rot(q) * sin, k * cos + rot(k) * sin, v)


class SplitOffCentre(nn.Module):  # halves split at 6 and 10: not a rotation of the head dim
    ROTATED = ""

    def inputs(self, dtype):
        return [torch.randn(B, H, L, D, dtype=dtype) for _ in range(3)] + list(_tables(dtype))

    def forward(self, q, k, v, cos, sin):
        def rot(x):
            return torch.cat((-x[..., 6:], x[..., :6]), dim=-1)

        return _attend(q * cos + rot(q) * sin, k * cos + rot(k) * sin, v)


class RotatesAnotherTensor(nn.Module):  # q * cos + rotate_half(k) * sin: the rotated tensor is not q
    ROTATED = "k"

    def inputs(self, dtype):
        return [torch.randn(B, H, L, D, dtype=dtype) for _ in range(3)] + list(_tables(dtype))

    def forward(self, q, k, v, cos, sin):
        return _attend(q * cos + rotate_half(k) * sin, k * cos + rotate_half(k) * sin, v)


class PerHeadTables(nn.Module):  # cos/sin with a head dim of H: declined (the kernel reads one row per position)
    ROTATED = ""

    def inputs(self, dtype):
        cos, sin = _tables(dtype)
        return [torch.randn(B, H, L, D, dtype=dtype) for _ in range(3)] + [cos * torch.ones(H, 1, 1, dtype=dtype),
                                                                           sin * torch.ones(H, 1, 1, dtype=dtype)]

    def forward(self, q, k, v, cos, sin):
        return _attend(q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin, v)


class Float32TablesOnHalfPrecision(nn.Module):  # float32 cos/sin on bf16 q: the rotation runs in float32
    ROTATED = ""
    # Constant tables (as rotary embeddings' are): a float32 gradient of them would carry bf16 errors
    # that the float32 tolerance does not describe.
    CONSTANT_INPUTS = (3, 4)

    def inputs(self, dtype):
        return [torch.randn(B, H, L, D, dtype=torch.bfloat16) for _ in range(3)] + list(_tables(torch.float32))

    def forward(self, q, k, v, cos, sin):
        q = (q * cos + rotate_half(q) * sin).to(v.dtype)
        k = (k * cos + rotate_half(k) * sin).to(v.dtype)
        return _attend(q, k, v)


class ComplexPerHeadFreqs(MetaComplex):  # freqs_cis differs per head: not one table for every head
    ROTATED = ""

    def inputs(self, dtype):
        return [torch.randn(B, L, H, D, dtype=dtype) for _ in range(3)] + [freqs_cis(heads=H)]


class ComplexConjugate(MetaComplex):  # times conj(freqs_cis): the inverse rotation, sin negated
    ROTATED = "qk"  # not a miss: fused with the conjugate's parts as its tables (-sin), and exact

    def forward(self, q, k, v, freqs):
        q, k = meta_rotary(q, k, freqs.conj())
        return _attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True)


class ComplexTimesItself(MetaComplex):  # the pairs times another operand's pairs: not a table, not a rotation
    ROTATED = ""

    def forward(self, q, k, v, freqs):
        qc = torch.view_as_complex(q.reshape(*q.shape[:-1], -1, 2))
        kc = torch.view_as_complex(k.reshape(*k.shape[:-1], -1, 2))
        q = torch.view_as_real(qc * kc).flatten(3)
        return _attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True)


NEAR_MISSES = [ComplexPerHeadFreqs, ComplexConjugate, ComplexTimesItself, RotatedKeysAlsoReturned, RotatedKeysScrambled, PartialRotary, HalvesSwappedWrongSign, SplitOffCentre, RotatesAnotherTensor,
               PerHeadTables, Float32TablesOnHalfPrecision]
