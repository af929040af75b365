"""Capture and the module's own state: a forward that assigns new tensors to itself during the
trace (a cache filled on first use) is left as it was, and buffers built by slice ``copy_`` into a
``new_empty`` tensor train (functionalization's ``aten.copy`` has no derivative)."""
import copy
import math

import pytest
import torch
import torch.nn as nn

import fxfuse


class _CachedAlibi(nn.Module):
    """x-transformers' AlibiPositionalBias (written here in its style; x-transformers is not
    installed): the bias buffer starts as None and is registered on first use, then sliced."""

    def __init__(self, heads):
        super().__init__()
        slopes = torch.tensor([2 ** (-8 * (i + 1) / heads) for i in range(heads)])
        self.register_buffer("slopes", slopes.view(heads, 1, 1), persistent=False)
        self.register_buffer("bias", None, persistent=False)

    def forward(self, i, j):
        if self.bias is not None and self.bias.shape[-1] >= j and self.bias.shape[-2] >= i:
            return self.bias[..., -i:, -j:]
        bias = -(torch.arange(j)[None, :] - torch.arange(j - i, j)[:, None]).abs() * self.slopes
        self.register_buffer("bias", bias, persistent=False)
        return self.bias


class _AlibiAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.alibi = _CachedAlibi(2)
        self.cache = None  # a plain tensor attribute filled on first use, too

    def forward(self, q, k, v):
        if self.cache is None:
            self.cache = torch.ones(())
        s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) + self.alibi(q.shape[-2], k.shape[-2])
        return (s.softmax(-1) @ v) * self.cache


def _qkv():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(1, 2, 5, 4, generator=g) for _ in range(3)]


def test_buffer_registered_on_first_call_is_left_as_before_the_capture():
    model, qkv = _AlibiAttention(), _qkv()
    expected = copy.deepcopy(model)(*qkv)
    with pytest.warns(UserWarning, match=r"assigned new tensors to 'cache', 'alibi.bias'.*keeps what it held"):
        res = fxfuse.rewrite(model, tuple(qkv))  # the rewrite is the model's first call
    assert [m.kind for m in res.matches] == ["attention"], res.report()
    assert model.alibi.bias is None and model.cache is None
    assert "bias" not in dict(model.named_buffers())
    torch.testing.assert_close(res.module(*qkv), expected)
    torch.testing.assert_close(res.module(*qkv), expected)  # no recapture, same graph
    torch.testing.assert_close(model(*qkv), expected)  # the model itself still runs, and fills its cache
    assert isinstance(model.alibi.bias, torch.Tensor) and type(model.alibi.bias) is torch.Tensor


def test_buffer_registered_on_first_call_under_compile():
    model, qkv = _AlibiAttention(), _qkv()
    expected = copy.deepcopy(model)(*qkv)
    compiled = torch.compile(model, backend="fxfuse")
    torch.testing.assert_close(compiled(*qkv), expected)
    torch.testing.assert_close(compiled(*qkv), expected)
    assert type(model.alibi.bias) is torch.Tensor


class _NewEmptyKeys(nn.Module):
    """DeepSeek-V2/V3 attention's key assembly (transformers' modeling_deepseek_v3): the key is a
    ``new_empty`` tensor whose two parts are written with slice ``copy_``, the rope part broadcast
    over the heads."""

    def __init__(self, nope=6, rope=2, heads=2):
        super().__init__()
        self.nope, self.rope, self.heads = nope, rope, heads
        self.k_proj = nn.Linear(8, heads * nope)
        self.r_proj = nn.Linear(8, rope)

    def forward(self, x, q, v):
        b, n, _ = x.shape
        k_nope = self.k_proj(x).view(b, n, self.heads, self.nope).transpose(1, 2)
        k_rot = self.r_proj(x).view(b, 1, n, self.rope)
        k = k_nope.new_empty(*k_nope.shape[:-1], self.nope + self.rope)
        k[..., :self.nope].copy_(k_nope)
        k[..., self.nope:].copy_(k_rot)  # broadcast over the heads
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.nope + self.rope)
        return scores.softmax(-1) @ v


def test_new_empty_filled_by_slice_copy_trains_rewritten_and_compiled():
    model = _NewEmptyKeys()
    g = torch.Generator().manual_seed(1)
    x, q, v = torch.randn(2, 5, 8, generator=g), torch.randn(2, 2, 5, 8, generator=g), torch.randn(2, 2, 5, 4, generator=g)
    expected = torch.autograd.grad(model(x, q, v).sum(), list(model.parameters()))
    res = fxfuse.rewrite(model, (x, q, v))
    assert [m.kind for m in res.matches] == ["attention"], res.report()
    assert "aten.copy.default" not in res.graph.code
    got = torch.autograd.grad(res.module(x, q, v).sum(), list(model.parameters()))
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b)
    compiled = torch.compile(model, backend="fxfuse")
    got = torch.autograd.grad(compiled(x, q, v).sum(), list(model.parameters()))
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b)
