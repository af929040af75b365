"""Small models written the way the papers' public code writes them (torchscale's DeepNorm and
Sub-LN encoder layers, fairseq-style B2T post-LN layers, a decoder with Motif's PolyNorm MLP
activation): every norm is fused, the scaled and the three-input residual sums go into the norms'
loads, each PolyNorm is one operator, and a training step equals eager's."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxfuse
from tests.tolerances import tolerance


class MultiheadAttention(nn.Module):
    def __init__(self, dim, heads, subln=False):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.scaling = self.head_dim ** -0.5
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)
        self.inner_attn_ln = nn.LayerNorm(dim) if subln else None  # Sub-LN: before the output projection

    def forward(self, x):
        b, t, c = x.shape
        q = self.q_proj(x) * self.scaling
        k, v = self.k_proj(x), self.v_proj(x)
        q, k, v = (u.view(b, t, self.heads, self.head_dim).transpose(1, 2) for u in (q, k, v))
        attn = torch.softmax(torch.matmul(q, k.transpose(-1, -2)), dim=-1)
        out = torch.matmul(attn, v).transpose(1, 2).reshape(b, t, c)
        if self.inner_attn_ln is not None:
            out = self.inner_attn_ln(out)
        return self.out_proj(out)


class FeedForward(nn.Module):
    def __init__(self, dim, ffn_dim, subln=False):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, ffn_dim), nn.Linear(ffn_dim, dim)
        self.ffn_layernorm = nn.LayerNorm(ffn_dim) if subln else None

    def forward(self, x):
        x = F.gelu(self.fc1(x))
        if self.ffn_layernorm is not None:
            x = self.ffn_layernorm(x)
        return self.fc2(x)


class EncoderLayer(nn.Module):
    """DeepNorm: post-LN with the residual scaled by alpha = (2N)^(1/4); Sub-LN: pre-LN plus the
    sublayers' inner norms."""

    def __init__(self, dim, heads, ffn_dim, layers, deepnorm=False, subln=False):
        super().__init__()
        self.self_attn, self.ffn = MultiheadAttention(dim, heads, subln), FeedForward(dim, ffn_dim, subln)
        self.self_attn_layer_norm, self.final_layer_norm = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.normalize_before = not deepnorm
        self.alpha = math.pow(2.0 * layers, 0.25) if deepnorm else 1.0

    def residual_connection(self, x, residual):
        return residual * self.alpha + x

    def forward(self, x):
        residual = x
        if self.normalize_before:
            x = self.self_attn_layer_norm(x)
        x = self.residual_connection(self.self_attn(x), residual)
        if not self.normalize_before:
            x = self.self_attn_layer_norm(x)
        residual = x
        if self.normalize_before:
            x = self.final_layer_norm(x)
        x = self.residual_connection(self.ffn(x), residual)
        if not self.normalize_before:
            x = self.final_layer_norm(x)
        return x


class B2TEncoderLayer(nn.Module):
    """Post-LN with B2T's connection: the layer's input skips both sublayers into the last norm."""

    def __init__(self, dim, heads, ffn_dim):
        super().__init__()
        self.self_attn, self.ffn = MultiheadAttention(dim, heads), FeedForward(dim, ffn_dim)
        self.self_attn_layer_norm, self.final_layer_norm = nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, x):
        layer_input = x
        x = self.self_attn_layer_norm(x + self.self_attn(x))
        residual = x
        x = self.ffn(x)
        return self.final_layer_norm(residual + x + layer_input)


class Encoder(nn.Module):
    def __init__(self, kind, vocab=40, dim=16, heads=2, layers=2):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        if kind == "b2t":
            self.layers = nn.ModuleList(B2TEncoderLayer(dim, heads, 2 * dim) for _ in range(layers))
        else:
            self.layers = nn.ModuleList(EncoderLayer(dim, heads, 2 * dim, layers, deepnorm=kind == "deepnorm",
                                                     subln=kind == "subln") for _ in range(layers))
        self.layer_norm = nn.LayerNorm(dim) if kind == "subln" else None  # pre-LN's final norm
        self.head = nn.Linear(dim, vocab)

    def forward(self, tokens):
        x = self.embed(tokens)
        for layer in self.layers:
            x = layer(x)
        if self.layer_norm is not None:
            x = self.layer_norm(x)
        return self.head(x)


# (fused norms, of which sum_norm, add_norm) for two layers
EXPECTED = {"deepnorm": (4, 4, 0), "b2t": (4, 2, 0), "subln": (9, 0, 3)}


@pytest.mark.parametrize("kind", list(EXPECTED))
def test_every_norm_is_fused_and_a_training_step_equals_eager(kind):
    torch.manual_seed(0)
    model = Encoder(kind)
    tokens = torch.randint(0, 40, (2, 6))
    res = fxfuse.rewrite(model, (tokens,))
    norms = [m for m in res.matches if m.kind == "layer_norm"]
    code = res.graph.code
    assert (len(norms), code.count("fxfuse.sum_norm.default("), code.count("fxfuse.add_norm.default(")) \
        == EXPECTED[kind], res.report()
    assert not [m for m in res.misses if m.kind == "layer_norm"], res.report()
    if kind == "deepnorm":
        assert all(m.spec.sum_scales == pytest.approx((2.0 ** 0.5, 1.0)) for m in norms), res.report()
    rtol, atol = tolerance(torch.float32)
    out, eager = res.module(tokens), model(tokens)
    torch.testing.assert_close(out, eager, rtol=rtol, atol=atol)
    grads = torch.autograd.grad(out.square().mean(), list(model.parameters()))
    eager_grads = torch.autograd.grad(eager.square().mean(), list(model.parameters()))
    for g, e in zip(grads, eager_grads):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5)


class PolyNorm(nn.Module):
    def __init__(self, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(3) / 3)
        self.bias = nn.Parameter(torch.zeros(1))
        self.eps = eps

    def _norm(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)

    def forward(self, x):
        return self.weight[0] * self._norm(x ** 3) + self.weight[1] * self._norm(x ** 2) + self.weight[2] * self._norm(
            x) + self.bias


class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.weight, self.variance_epsilon = nn.Parameter(torch.ones(dim)), eps

    def forward(self, hidden_states):
        dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(dtype)


class PolyNormMLP(nn.Module):
    """A gated MLP whose activation is PolyNorm (Motif 2.6B's)."""

    def __init__(self, dim, hidden):
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(dim, hidden, bias=False), nn.Linear(dim, hidden, bias=False)
        self.down_proj, self.act_fn = nn.Linear(hidden, dim, bias=False), PolyNorm()

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class PolyNormDecoder(nn.Module):
    def __init__(self, vocab=40, dim=16, hidden=32, layers=2):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, dim)
        self.norms = nn.ModuleList(RMSNorm(dim) for _ in range(layers))
        self.mlps = nn.ModuleList(PolyNormMLP(dim, hidden) for _ in range(layers))
        self.norm, self.lm_head = RMSNorm(dim), nn.Linear(dim, vocab, bias=False)

    def forward(self, tokens):
        h = self.embed_tokens(tokens)
        for norm, mlp in zip(self.norms, self.mlps):
            h = h + mlp(norm(h))
        return self.lm_head(self.norm(h))


@pytest.mark.parametrize("cpu_path_kind", ["reference", "interpret"])
def test_polynorm_decoder_fuses_each_activation_and_trains_as_eager(cpu_path_kind):
    torch.manual_seed(0)
    model = PolyNormDecoder()
    with torch.no_grad():
        for mlp in model.mlps:
            mlp.act_fn.weight.uniform_(0.2, 0.6)
            mlp.act_fn.bias.fill_(0.05)
    tokens = torch.randint(0, 40, (2, 6))
    res = fxfuse.rewrite(model, (tokens,))
    kinds = sorted(m.kind for m in res.matches)
    assert kinds == ["polynorm"] * 2 + ["rms_norm"] * 3 and not res.misses, res.report()
    with fxfuse.config.patch(interpret=cpu_path_kind == "interpret"):
        out = res.module(tokens)
        grads = torch.autograd.grad(out.square().mean(), list(model.parameters()))
    eager = model(tokens)
    eager_grads = torch.autograd.grad(eager.square().mean(), list(model.parameters()))
    rtol, atol = tolerance(torch.float32)
    torch.testing.assert_close(out, eager, rtol=rtol, atol=atol)
    for g, e in zip(grads, eager_grads):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5)
