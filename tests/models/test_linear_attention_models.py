"""A small causal linear-attention language model written the way public repositories write it
(a 0/1 tril mask compared with 0, heads split with view/transpose, elu + 1 features,
the normaliser with an eps): the rewrite fuses each layer's attention and a training step's loss
and gradients equal eager's."""
import torch
import torch.nn.functional as F
from torch import nn

import fxfuse
from tests.tolerances import tolerance

PASSES = "canonicalize,fuse-linear-attention"


class CausalLinearSelfAttention(nn.Module):
    def __init__(self, dim, heads, max_len):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)

    @staticmethod
    def feature_map(x):
        return F.elu(x) + 1

    def mask(self, t, device):
        return torch.tril(torch.ones(t, t, device=device)).view(1, 1, t, t)

    def forward(self, x):
        b, t, c = x.size()
        q, k, v = self.qkv(x).split(c, dim=2)
        q = q.view(b, t, self.heads, c // self.heads).transpose(1, 2)
        k = k.view(b, t, self.heads, c // self.heads).transpose(1, 2)
        v = v.view(b, t, self.heads, c // self.heads).transpose(1, 2)
        q, k = self.feature_map(q), self.feature_map(k)
        att = q @ k.transpose(-2, -1)
        att = att.masked_fill(self.mask(t, x.device) == 0, 0.0)
        y = (att @ v) / (att.sum(dim=-1, keepdim=True) + 1e-6)
        y = y.transpose(1, 2).contiguous().view(b, t, c)
        return self.proj(y)


class Block(nn.Module):
    def __init__(self, dim, heads, max_len):
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = CausalLinearSelfAttention(dim, heads, max_len)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class LinearTransformerLM(nn.Module):
    def __init__(self, vocab=50, dim=16, heads=2, layers=2, max_len=128):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, dim), nn.Embedding(max_len, dim)
        self.blocks = nn.ModuleList(Block(dim, heads, max_len) for _ in range(layers))
        self.ln_f, self.head = nn.LayerNorm(dim), nn.Linear(dim, vocab, bias=False)

    def forward(self, idx, targets):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.ln_f(x))
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))


def _step(model, idx, targets):
    model.zero_grad()
    loss = model(idx, targets)
    loss.backward()
    return [loss] + [p.grad for p in model.parameters()]


def test_training_step_equals_eager_in_float64():
    torch.manual_seed(0)
    model = LinearTransformerLM().double()
    idx, targets = torch.randint(0, 50, (2, 80)), torch.randint(0, 50, (2, 80))
    res = fxfuse.rewrite(model, (idx, targets), passes=PASSES)
    assert [m.kind for m in res.matches] == ["linear_attention"] * 2 and all(m.spec.causal for m in res.matches), res.report()
    rtol, atol = tolerance(torch.float64)
    for got, want in zip(_step(res.module, idx, targets), _step(model, idx, targets)):
        torch.testing.assert_close(got, want, rtol=rtol, atol=atol)


def test_under_torch_compile_in_float32(monkeypatch):
    # ReLU features here: with elu + 1 on the transposed heads, torch's own aot_eager fails the
    # same model unrewritten (elu_backward's fake strides differ from its real ones on CPU).
    monkeypatch.setattr(CausalLinearSelfAttention, "feature_map", staticmethod(F.relu))
    torch.manual_seed(0)
    model = LinearTransformerLM()
    idx, targets = torch.randint(0, 50, (2, 80)), torch.randint(0, 50, (2, 80))
    backend = fxfuse.Backend(passes=PASSES)
    compiled = torch.compile(model, backend=backend)
    rtol, atol = tolerance(torch.float32)
    for got, want in zip(_step(compiled, idx, targets), _step(model, idx, targets)):
        torch.testing.assert_close(got, want, rtol=rtol, atol=atol)
    assert sum(m.kind == "linear_attention" for m in backend.matches) == 2, backend.report()


class BufferMaskAttention(CausalLinearSelfAttention):
    """nanoGPT's mask buffer: its values may change after capture, so it is not proved causal."""

    def __init__(self, dim, heads, max_len):
        super().__init__(dim, heads, max_len)
        self.register_buffer("bias", torch.tril(torch.ones(max_len, max_len)).view(1, 1, max_len, max_len))

    def mask(self, t, device):
        return self.bias[:, :, :t, :t]


def test_mask_buffer_is_declined_with_what_to_do():
    model = BufferMaskAttention(16, 2, 128)
    x = torch.randn(2, 80, 16)
    res = fxfuse.rewrite(model, (x,), passes=PASSES)
    assert not res.matches and len(res.misses) == 1 and "build it in forward" in res.misses[0].reason, res.report()
    torch.testing.assert_close(res.module(x), model(x), rtol=0, atol=0)


class EfficientAttention(nn.Module):
    """Shen et al.'s efficient attention over a sequence, as reimplementations in ViT-style code
    write it (the quadratic product, heads split by reshape/permute and indexing): q's softmax
    over its features, k's over the positions, no normaliser (both softmaxes already sum to 1)."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.to_qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        qkv = self.to_qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        q = q.softmax(dim=-1)
        k = k.softmax(dim=-2)
        context = q @ k.transpose(-2, -1)
        out = (context @ v).transpose(1, 2).reshape(b, n, c)
        return self.proj(out)


class EfficientEncoder(nn.Module):
    def __init__(self, dim=16, heads=2, layers=2):
        super().__init__()
        self.blocks = nn.ModuleList(EfficientAttention(dim, heads) for _ in range(layers))
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(layers))

    def forward(self, x):
        for norm, attn in zip(self.norms, self.blocks):
            x = x + attn(norm(x))
        return x.pow(2).mean()


def test_efficient_attention_training_step_equals_eager_in_float64():
    """Both softmaxes are applied inside the operator in each layer; loss and every parameter's
    gradient equal eager's."""
    torch.manual_seed(0)
    model = EfficientEncoder().double()
    x = torch.randn(2, 70, 16, dtype=torch.float64)
    res = fxfuse.rewrite(model, (x,), passes=PASSES)
    assert [(m.kind, m.spec.causal, m.spec.phi_a, m.spec.phi_b) for m in res.matches] == \
        [("linear_attention", False, "softmax_features", "softmax_keys")] * 2, res.report()
    assert not any(n.target == torch.ops.aten._softmax.default for n in res.graph.graph.nodes)
    rtol, atol = tolerance(torch.float64)

    def step(m):
        m.zero_grad()
        loss = m(x)
        loss.backward()
        return [loss] + [p.grad.clone() for p in m.parameters()]

    for got, want in zip(step(res.module), step(model)):
        torch.testing.assert_close(got, want, rtol=rtol, atol=atol)


def test_efficient_attention_under_torch_compile_in_float32():
    torch.manual_seed(0)
    model = EfficientEncoder()
    x = torch.randn(2, 70, 16)
    backend = fxfuse.Backend(passes=PASSES)
    compiled = torch.compile(model, backend=backend)
    rtol, atol = tolerance(torch.float32)
    torch.testing.assert_close(compiled(x), model(x), rtol=rtol, atol=atol)
    assert [(m.spec.phi_a, m.spec.phi_b) for m in backend.matches] == [("softmax_features", "softmax_keys")] * 2, \
        backend.report()


class EfficientAttention2d(nn.Module):
    """Efficient attention on feature maps as Shen et al.'s code lays it out (written here from the
    paper): 1x1 convolutions for keys, queries and values, channels first (N, C, H*W), a loop over
    heads slicing channels, k's softmax over the positions, q's over the channels, then
    ``context = k @ v^T`` and ``context^T @ q``, heads concatenated, reprojected, a residual."""

    def __init__(self, channels=8, key_channels=8, value_channels=8, heads=2):
        super().__init__()
        self.heads, self.key_channels, self.value_channels = heads, key_channels, value_channels
        self.to_k, self.to_q = nn.Conv2d(channels, key_channels, 1), nn.Conv2d(channels, key_channels, 1)
        self.to_v = nn.Conv2d(channels, value_channels, 1)
        self.reproject = nn.Conv2d(value_channels, channels, 1)

    def forward(self, x):
        n, _, h, w = x.shape
        keys = self.to_k(x).reshape(n, self.key_channels, h * w)
        queries = self.to_q(x).reshape(n, self.key_channels, h * w)
        values = self.to_v(x).reshape(n, self.value_channels, h * w)
        dk, dv = self.key_channels // self.heads, self.value_channels // self.heads
        heads = []
        for i in range(self.heads):
            key = F.softmax(keys[:, i * dk:(i + 1) * dk, :], dim=2)
            query = F.softmax(queries[:, i * dk:(i + 1) * dk, :], dim=1)
            value = values[:, i * dv:(i + 1) * dv, :]
            context = key @ value.transpose(1, 2)
            heads.append((context.transpose(1, 2) @ query).reshape(n, dv, h, w))
        return self.reproject(torch.cat(heads, dim=1)) + x


def test_efficient_attention_2d_as_the_paper_code_writes_it_in_float64():
    """Each head's two products become one operator with both softmaxes inside; the output and
    every parameter's gradient equal eager's."""
    torch.manual_seed(0)
    model = EfficientAttention2d().double()
    x = torch.randn(2, 8, 5, 7, dtype=torch.float64)
    res = fxfuse.rewrite(model, (x,), passes=PASSES)
    assert [(m.spec.phi_a, m.spec.phi_b) for m in res.matches] == [("softmax_features", "softmax_keys")] * 2, res.report()
    assert not any(n.target == torch.ops.aten._softmax.default for n in res.graph.graph.nodes)
    rtol, atol = tolerance(torch.float64)

    def step(m):
        m.zero_grad()
        out = m(x)
        out.pow(2).sum().backward()
        return [out] + [p.grad.clone() for p in m.parameters()]

    for got, want in zip(step(res.module), step(model)):
        torch.testing.assert_close(got, want, rtol=rtol, atol=atol)
