"""``F.normalize(x, dim=-1)`` normalizations: x-transformers' RMSNorm ``F.normalize(x, dim=-1) *
sqrt(d) * g`` (written here in its style: x-transformers is not installed) is an RMSNorm with eps
inside a max, ``x / max(||x||, eps) * sqrt(d) * g`` -- not ``x * rsqrt(mean(x^2) + eps)`` -- and
fuses as that form (spec inverse "max_l2", scale sqrt(d)); rows whose norm is below eps (zero rows)
keep eager's values and gradients; other forms are declined with their reason."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxfuse
from tests.norm_styles import NormalizeScaleRMSNorm


def _grads(module, x, params):
    x = x.clone().requires_grad_()
    out = module(x)
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(4))
    return [out, *torch.autograd.grad((out * upstream).sum(), [x, *params])]


def test_x_transformers_rms_norm_is_the_max_form_and_exact_on_rows_below_eps(cpu_path):
    model = NormalizeScaleRMSNorm(8)
    x = torch.randn(3, 4, 8)
    x[0, 0] = 0.0  # norm 0 < eps: the denominator is eps, the gradient g / eps
    x[0, 1] = 1e-14  # norm below eps (1e-12) too
    res = fxfuse.rewrite(model, (x,))
    assert [m.kind for m in res.matches] == ["rms_norm"], res.report()
    spec = res.matches[0].spec
    assert spec.inverse == "max_l2" and spec.eps == 1e-12 and spec.scale == pytest.approx(8 ** 0.5), spec
    assert "x / max(||x||, eps=1e-12)" in res.report() and "linalg_vector_norm" not in res.graph.code
    got = _grads(res.module, x, [model.g])
    expected = _grads(model, x, [model.g])
    for what, g, e in zip(["output", "dx", "dg"], got, expected):
        torch.testing.assert_close(g, e, rtol=2e-5, atol=1e-5, msg=what)


def test_plain_normalize_with_a_weight_fuses():
    model = nn.Module()
    model.g = nn.Parameter(torch.randn(8))
    model.forward = lambda x: F.normalize(x, dim=-1, eps=1e-6) * model.g
    res = fxfuse.rewrite(model, (torch.randn(2, 8),))
    assert len(res.matches) == 1 and res.matches[0].spec.scale == 1.0 and res.matches[0].spec.eps == 1e-6


@pytest.mark.parametrize("fn, reason", [
    (lambda x: F.normalize(x, dim=1), "reduces over dims [1]"),
    (lambda x: F.normalize(x, p=1, dim=-1), "p=1"),
], ids=["not_last_dim", "l1"])
def test_other_normalizations_are_declined_with_their_reason(fn, reason):
    x = torch.randn(2, 3, 8)
    res = fxfuse.rewrite(fn, (x,))
    assert not res.matches and len(res.misses) == 1 and reason in res.misses[0].reason, res.report()
    torch.testing.assert_close(res.module(x), fn(x))
