"""Dynamic Tanh (DyT) is fused into one operator that keeps x only for backward; the rewritten
module equals eager bitwise (the operator runs eager's ops), near-misses are declined."""
import pytest
import torch
from torch import nn

import fxfuse

D = 12
PASSES = "canonicalize,fuse-dyt"


class DyT(nn.Module):
    """The paper's module (Zhu et al. 2025): alpha of shape (1,), weight and bias per channel."""

    def __init__(self, d, alpha=0.5):
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(1) * alpha)
        self.weight = nn.Parameter(torch.randn(d))
        self.bias = nn.Parameter(torch.randn(d))

    def forward(self, x):
        x = torch.tanh(self.alpha * x)
        return x * self.weight + self.bias


class DyTWeightFirst(DyT):
    """``weight * tanh(x * alpha)``, no bias."""

    def forward(self, x):
        return self.weight * torch.tanh(x * self.alpha)


class AlphaFromInput(DyT):
    def forward(self, x):
        return torch.tanh(x.detach().abs().amax().reshape(1) * x) * self.weight


class TanhReused(DyT):
    def forward(self, x):
        t = torch.tanh(self.alpha * x)
        return t * self.weight + self.bias, t


def _run(module, x):
    x = x.clone().requires_grad_()
    module.zero_grad()
    out = module(x)
    out = out[0] if isinstance(out, tuple) else out
    out.float().pow(2).sum().backward()
    return [out, x.grad] + [p.grad for p in module.parameters() if p.grad is not None]


@pytest.mark.parametrize("params_dtype,x_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                                  (torch.float32, torch.bfloat16)], ids=["f32", "bf16", "f32-params-bf16-x"])
@pytest.mark.parametrize("style", [DyT, DyTWeightFirst], ids=lambda s: s.__name__)
def test_dyt_is_fused_and_equals_eager(style, params_dtype, x_dtype):
    model = style(D).to(params_dtype)
    x = torch.randn(2, 3, D, dtype=x_dtype)
    res = fxfuse.rewrite(model, (x,), passes=PASSES)
    assert [m.kind for m in res.matches] == ["dyt"] and not res.misses, res.report()
    assert "aten.tanh" not in res.graph.code
    for got, eager in zip(_run(res.module, x), _run(model, x)):
        assert got.dtype == eager.dtype
        torch.testing.assert_close(got, eager, rtol=0, atol=0)


def test_gradcheck_in_float64():
    model = DyT(D).double()
    x = torch.randn(3, D, dtype=torch.float64, requires_grad=True)
    res = fxfuse.rewrite(model, (x,), passes=PASSES)
    assert res.matches and torch.autograd.gradcheck(lambda t: res.module(t), (x,))


@pytest.mark.parametrize("style,reason", [(AlphaFromInput, "computed from the input"), (TanhReused, "also used elsewhere")],
                         ids=["alpha_from_input", "tanh_reused"])
def test_near_miss_is_declined(style, reason):
    model = style(D)
    x = torch.randn(2, 3, D)
    res = fxfuse.rewrite(model, (x,), passes=PASSES)
    assert not res.matches and res.misses and reason in res.misses[0].reason, res.report()
    torch.testing.assert_close(res.module(x)[0] if isinstance(model(x), tuple) else res.module(x),
                               model(x)[0] if isinstance(model(x), tuple) else model(x))


def test_scalar_softcap_is_not_dyt():
    res = fxfuse.rewrite(lambda s: torch.tanh(s / 30.0) * 30.0, (torch.randn(4, D),), passes=PASSES)
    assert not res.matches and not res.misses


def test_backward_keeps_one_activation_less():
    from tests.passes.test_gated_mlp import _saved_bytes

    model = DyT(D)
    x = torch.randn(4, 8, D, requires_grad=True)
    res = fxfuse.rewrite(model, (x,), passes=PASSES)
    assert _saved_bytes(model, x) - _saved_bytes(res.module, x) == x.numel() * 4  # tanh(alpha * x), float32


def test_opcheck():
    from fxfuse.spec_dyt import DyTSpec

    x, a, w, b = torch.randn(3, D), torch.tensor([0.7]), torch.randn(D), torch.randn(D)
    spec = DyTSpec(True, True, "float32").to_json()
    torch.library.opcheck(torch.ops.fxfuse.dyt.default, (x, a, w, b, spec))
    torch.library.opcheck(torch.ops.fxfuse.dyt_backward.default, (torch.randn(3, D), x, a, w, spec))
