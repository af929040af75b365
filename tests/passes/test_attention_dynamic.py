"""Attention at symbolic sizes: torch.compile with dynamic shapes (Dynamo's automatic dynamic after
a second length, and dynamic=True) fuses hand-written causal, sliding-window, ALiBi and chunked
attention in every graph it compiles, for every length, with eager's outputs and gradients (by
distance to a float64 copy); the symbolic layout proofs decline what they cannot prove."""
import copy
import math

import pytest
import torch
import torch.nn as nn

from fxfuse.backend import Backend
from tests.tolerances import assert_close_to_reference

D, H = 32, 4


class _Attention(nn.Module):
    """Multi-head self-attention whose mask or bias is built from the sequence length."""

    def __init__(self, style: str):
        super().__init__()
        self.style, self.qkv, self.out = style, nn.Linear(D, 3 * D), nn.Linear(D, D)
        self.register_buffer("slopes", 2.0 ** (-8.0 * torch.arange(1, H + 1) / H))

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, H, D // H).permute(2, 0, 3, 1, 4)
        s = q @ k.transpose(-1, -2) / math.sqrt(D // H)
        i = torch.arange(n, device=x.device)[:, None]
        j = torch.arange(n, device=x.device)[None, :]
        if self.style == "causal":
            s = s.masked_fill(~torch.ones(n, n, dtype=torch.bool, device=x.device).tril(), float("-inf"))
        elif self.style == "window":
            s = s.masked_fill((j > i) | (i - j >= 3), float("-inf"))
        elif self.style == "alibi":
            s = s + self.slopes[:, None, None] * (j - i)
            s = s.masked_fill(j > i, float("-inf"))
        elif self.style == "chunked":
            s = s.masked_fill(i // 4 != j // 4, float("-inf"))
        p = s.softmax(-1)
        return self.out((p @ v).transpose(1, 2).reshape(b, n, D))


STYLES = ["causal", "window", "alibi", "chunked"]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _run(model, fn, x):
    model.zero_grad()
    x = x.clone().requires_grad_()
    out = fn(x)
    out.pow(2).sum().backward()
    return out.detach(), x.grad, [p.grad.clone() for p in model.parameters()]


def _check(model, compiled, lengths, be, min_graphs=1):
    reference = copy.deepcopy(model).double()
    for n in lengths:
        x = torch.randn(2, n, D, generator=torch.Generator().manual_seed(n))
        got, eager, ref = _run(model, compiled, x), _run(model, model, x), _run(reference, reference, x.double())
        for what, g, e, r in zip(("output", "input grad"), got[:2], eager[:2], ref[:2]):
            assert_close_to_reference(g, e, r, f"{what} at L={n}")
        for g, e, r in zip(got[2], eager[2], ref[2]):
            assert_close_to_reference(g, e, r, f"parameter grad at L={n}")
    assert len(be.reports) >= min_graphs
    for report in be.reports:  # every graph Dynamo compiled fuses the attention
        assert [m.kind for m in report.matches if m.kind == "attention"] == ["attention"], report.text()
        assert not [m for m in report.misses if m.kind == "attention"], report.text()


@pytest.mark.parametrize("style", STYLES)
def test_dynamic_true_fuses_every_length(style):
    torch.manual_seed(0)
    model, be = _Attention(style), Backend()
    compiled = torch.compile(model, backend=be, dynamic=True)
    _check(model, compiled, (5, 9, 12, 17, 23), be)
    assert len(be.reports) == 1, "one graph serves every length"
    # The masks are computed in the kernel from positions (no (L, L) tensor input). ALiBi's bias
    # reads the slopes buffer, a graph input under torch.compile: it stays a tensor (as at static
    # sizes), its causal mask an expression.
    spec = be.reports[0].matches[0].spec
    assert spec.inputs == (("bias",) if style == "alibi" else ()), be.reports[0].text()
    assert any(step.expr for step in spec.steps), be.reports[0].text()


@pytest.mark.parametrize("style", ["causal", "alibi"])
def test_automatic_dynamic_fuses_the_symbolic_graph(style):
    torch.manual_seed(0)
    model, be = _Attention(style), Backend()
    compiled = torch.compile(model, backend=be)  # static first, symbolic after a second length
    _check(model, compiled, (6, 10, 13), be, min_graphs=2)
    assert len(be.reports) == 2, [r.title for r in be.reports]
    assert any("L s" in m.shape for m in be.reports[1].matches), be.reports[1].text()


def test_mark_dynamic_fuses():
    torch.manual_seed(0)
    model, be = _Attention("causal"), Backend()
    compiled = torch.compile(model, backend=be)
    x = torch.randn(2, 7, D, requires_grad=True)  # as _check's calls: no requires_grad recompile
    torch._dynamo.mark_dynamic(x, 1)
    compiled(x)
    assert "L s" in be.reports[0].matches[0].shape, be.reports[0].text()
    _check(model, compiled, (8, 11), be)
    assert len(be.reports) == 1


class _LengthDependentMask(nn.Module):
    """A mask that reads the length as a value (keys past n // 2 hidden): one length's values say
    nothing about another's; it stays a tensor input and the outputs stay exact."""

    def forward(self, q, k, v):
        n = q.shape[-2]
        j = torch.arange(n)[None, :].expand(n, n)
        s = (q @ k.transpose(-1, -2)).masked_fill(j >= n // 2 + 1, float("-inf"))
        return s.softmax(-1) @ v


def test_a_mask_reading_the_length_stays_a_tensor_and_stays_exact():
    be = Backend()
    model = _LengthDependentMask()
    compiled = torch.compile(model, backend=be, dynamic=True)
    for n in (6, 9, 14):
        q, k, v = (torch.randn(2, H, n, 8, generator=torch.Generator().manual_seed(n + t)) for t in range(3))
        ref = model(q.double(), k.double(), v.double())
        assert_close_to_reference(compiled(q, k, v), model(q, k, v), ref, f"L={n}")
    assert len(be.reports) == 1
    spec = be.reports[0].matches[0].spec
    assert spec.inputs == ("mask",), be.reports[0].text()  # not turned into an expression baked at one length


def test_a_site_left_unfused_because_of_its_shapes_warns_once():
    # 6-d scores (three batch dims): fused attention reads rank 2 to 5, a shape reason.
    def six_d(q, k, v):
        return (q @ k.transpose(-1, -2)).softmax(-1) @ v

    be = Backend()
    compiled = torch.compile(six_d, backend=be)
    with pytest.warns(UserWarning, match="left unfused because of its shapes: the scores have rank 6") as seen:
        for n in (5, 7, 9):  # a static graph, then a symbolic one: the same site, one warning
            compiled(*(torch.randn(2, 3, 2, H, n, 8) for _ in range(3)))
    assert len(be.reports) == 2
    assert sum("left unfused because of its shapes" in str(w.message) for w in seen) == 1
    assert all(m.shapes for r in be.reports for m in r.misses if m.kind == "attention")


class _HeadDimScaled(nn.Module):
    """q, k, v passed in, the scale read from the head dim (``q.size(-1) ** -0.5``) and the mask
    from the length: under dynamic=True the head dim is a symbol too, and a traced matmul reads the
    length back from the scores."""

    def forward(self, q, k, v):
        s = (q @ k.transpose(-1, -2)) * q.size(-1) ** -0.5
        n = q.size(-2)
        s = s.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf"))
        return s.softmax(-1) @ v


def test_a_scale_from_a_symbolic_head_dim_is_fused_with_a_guard_on_its_value():
    model, be = _HeadDimScaled(), Backend()
    compiled = torch.compile(model, backend=be, dynamic=True)
    for n, d in ((5, 8), (9, 8), (7, 16)):  # a new head dim: the guard on the scale recompiles
        q, k, v = (torch.randn(2, 2, n, d, generator=torch.Generator().manual_seed(i)) for i in range(3))
        want = model.double()(q.double(), k.double(), v.double())
        assert_close_to_reference(compiled(q, k, v), model(q, k, v), want, f"output at L={n}, D={d}")
    assert len(be.reports) == 2, "one graph per head dim, every length on it"
    scales = [[s.value for s in r.matches[0].spec.steps if s.op == "mul"] for r in be.reports]
    assert scales == [[8 ** -0.5], [16 ** -0.5]], be.report()


def test_sdpa_on_q_k_v_passed_in_is_claimed_under_dynamic_true_with_its_head_sizes_guarded():
    # dynamic=True makes every dim of q, k, v a symbol, the head count and head dim included; the
    # claim takes those at their values with a guard (it declined the call before).
    def attend(q, k, v):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)

    be = Backend()
    compiled = torch.compile(attend, backend=be, dynamic=True)
    for b, h, n, d in ((2, 3, 5, 8), (3, 3, 9, 8), (2, 3, 6, 16)):
        q, k, v = (torch.randn(b, h, n, d, generator=torch.Generator().manual_seed(i)) for i in range(3))
        want = attend(q.double(), k.double(), v.double())
        assert_close_to_reference(compiled(q, k, v), attend(q, k, v), want, f"output at {(b, h, n, d)}")
    assert len(be.reports) == 2, "a new head dim compiles again; a new batch or length does not"
    for report in be.reports:
        assert [m.kind for m in report.matches] == ["attention"], report.text()
        assert "L s" in report.matches[0].shape, report.text()
