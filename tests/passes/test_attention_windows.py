"""Swin's shifted-window attention (timm's ``swin_transformer.WindowAttention``, written here in its
style: timm is not installed): the (B*nW, H, N, N) scores get a relative-position bias, are viewed
as (B, nW, H, N, N) to add the per-window shift mask (nW, N, N) and viewed back. The site fuses,
the mask read broadcast over the batch and merged with the windows; outputs and gradients equal
eager's (against float64) on the torch path and the interpreted kernels. A rank-5 view that is not
the batch dim split in two is declined with that reason."""
import copy

import pytest
import torch
import torch.nn as nn

import fxfuse
from tests.tolerances import assert_close_to_reference

B, WINDOWS, HEADS, N, DIM = 2, 3, 2, 4, 16


class WindowAttention(nn.Module):
    def __init__(self, split_heads: bool = False):
        super().__init__()
        self.scale = (DIM // HEADS) ** -0.5
        self.qkv, self.proj = nn.Linear(DIM, DIM * 3), nn.Linear(DIM, DIM)
        self.relative_position_bias = nn.Parameter(torch.randn(HEADS, N, N))
        self.split_heads = split_heads  # the near-miss: the view splits the head dim, not the batch

    def forward(self, x, mask):
        b_, n, c = x.shape
        qkv = self.qkv(x).reshape(b_, n, 3, HEADS, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        attn = attn + self.relative_position_bias.unsqueeze(0)
        if self.split_heads:
            attn = attn.view(b_, 2, HEADS // 2, n, n) + mask[:1].unsqueeze(1).unsqueeze(0)
        else:
            num_win = mask.shape[0]
            attn = attn.view(-1, num_win, HEADS, n, n) + mask.unsqueeze(1).unsqueeze(0)
        attn = attn.view(-1, HEADS, n, n).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b_, n, -1))


def _inputs(dtype=torch.float32):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(B * WINDOWS, N, DIM, generator=g, dtype=dtype)
    mask = torch.zeros(WINDOWS, N, N, dtype=dtype)  # Swin's shift mask: -100 between regions
    mask[1, :2, 2:] = mask[1, 2:, :2] = -100.0
    mask[2, :1, 1:] = mask[2, 1:, :1] = -100.0
    return x, mask


def _run(model, x, mask):
    x = x.clone().requires_grad_()
    out = model(x, mask)
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    (out.double() * upstream).sum().backward()
    return out, [x.grad, *(p.grad for p in model.parameters())]


def test_shifted_window_attention_fuses_and_equals_eager(cpu_path):
    model = WindowAttention()
    x, mask = _inputs()
    res = fxfuse.rewrite(model, (x, mask))
    assert [m.kind for m in res.matches] == ["attention"] and not res.misses, res.report()
    assert "softmax" not in res.graph.code and "B 6, H 2" in res.report(), res.report()
    expected, expected_grads = _run(copy.deepcopy(model).double(), x.double(), mask.double())
    eager, eager_grads = _run(copy.deepcopy(model), x, mask)
    got, got_grads = _run(res.module, x, mask)
    assert_close_to_reference(got, eager, expected, "output")
    for i, (g, e, r) in enumerate(zip(got_grads, eager_grads, expected_grads)):
        assert_close_to_reference(g, e, r, f"gradient {i}")


def test_rank5_view_that_splits_the_heads_is_declined_with_a_true_reason():
    model = WindowAttention(split_heads=True)
    x, mask = _inputs()
    res = fxfuse.rewrite(model, (x, mask))
    assert not res.matches, res.report()
    assert "a rank-5 view other than the batch dim split in two" in res.misses[0].reason, res.report()
    torch.testing.assert_close(res.module(x, mask), model(x, mask))
