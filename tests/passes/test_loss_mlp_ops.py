"""The chunked linear cross-entropy and the gated activation as operators: float64 gradients of
every output (gradcheck), agreement with the torch formula they replace, edge rows, and
torch.library.opcheck (fake shapes/strides match the real ones, autograd is registered, so
Inductor and symbolic shapes can trace them)."""
import math

import pytest
import torch
import torch.nn.functional as F

import fxfuse.ops.linear_cross_entropy as lce
from fxfuse.spec_loss import LinearCrossEntropySpec, LogitStep
from fxfuse.spec_mlp import ACTIVATIONS, GatedActSpec

N, H, V = 4, 3, 11
SOFTCAP = (LogitStep("div", "float64", 3.0), LogitStep("tanh", "float64"), LogitStep("mul", "float64", 3.0))


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    monkeypatch.setattr(lce, "CHUNK_ELEMENTS", 4 * N)  # 4 columns per chunk, a tail of 3


def _spec(bias=False, steps=(), dtype="float64"):
    return LinearCrossEntropySpec(dtype, dtype, -100, V, bias=bias, steps=steps,
                                  outputs=("nll", "lse", "sum_logp")).to_json()


def _inputs(dtype=torch.float64):
    h = torch.randn(N, H, dtype=dtype, requires_grad=True)
    w = torch.randn(V, H, dtype=dtype, requires_grad=True)
    b = torch.randn(V, dtype=dtype, requires_grad=True)
    labels = torch.randint(0, V, (N,))
    labels[1] = -100
    return h, w, b, labels


@pytest.mark.parametrize("bias,steps", [(False, ()), (True, ()), (True, SOFTCAP)], ids=["plain", "bias", "softcap"])
def test_outputs_and_gradients_match_the_formula(bias, steps):
    h, w, b, labels = _inputs()
    spec = _spec(bias, steps)
    nll, lse, sum_logp = torch.ops.fxfuse.linear_cross_entropy(h, w, b if bias else None, labels, spec)
    x = h @ w.t() + (b if bias else 0)
    if steps:
        x = torch.tanh(x / 3.0) * 3.0
    torch.testing.assert_close(nll, F.cross_entropy(x, labels, reduction="none"))
    torch.testing.assert_close(lse, x.logsumexp(-1))
    torch.testing.assert_close(sum_logp, x.log_softmax(-1).sum(-1))
    args = (h, w, b) if bias else (h, w)
    assert torch.autograd.gradcheck(
        lambda *t: torch.ops.fxfuse.linear_cross_entropy(t[0], t[1], t[2] if bias else None, labels, spec), args)


def test_a_bias_masking_a_whole_chunk_to_minus_inf():
    h, w, b, labels = _inputs()
    b = b.detach().clone()
    b[:4] = -math.inf  # the first chunk of every row is masked out
    labels[labels < 4] = 7
    nll, lse, _ = torch.ops.fxfuse.linear_cross_entropy(h, w, b, labels, _spec(bias=True))
    x = h @ w.t() + b
    torch.testing.assert_close(nll, F.cross_entropy(x, labels, reduction="none"))
    torch.testing.assert_close(lse, x.logsumexp(-1))


def test_opcheck_linear_cross_entropy():
    h, w, b, labels = _inputs(torch.float32)
    spec = _spec(True, tuple(LogitStep(s.op, "float32", s.value) for s in SOFTCAP), "float32")
    torch.library.opcheck(torch.ops.fxfuse.linear_cross_entropy.default, (h, w, b, labels, spec))
    g = torch.randn(N)
    lse = torch.randn(N)
    torch.library.opcheck(torch.ops.fxfuse.linear_cross_entropy_backward.default,
                          (g, None, g, h.detach(), w.detach(), b.detach(), labels, lse, spec))


@pytest.mark.parametrize("act", ACTIVATIONS)
def test_gated_act(act):
    gate = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    up = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    spec = GatedActSpec(act, "float64").to_json()
    assert torch.autograd.gradcheck(lambda a, b: torch.ops.fxfuse.gated_act(a, b, spec), (gate, up))
    torch.library.opcheck(torch.ops.fxfuse.gated_act.default, (gate.float(), up.float(), GatedActSpec(act, "float32").to_json()))
    # a gate that is half of a wider tensor (chunk of gate_up_proj): the result is still contiguous
    both = torch.randn(4, 12)
    out = torch.ops.fxfuse.gated_act(both[:, :6], both[:, 6:], GatedActSpec(act, "float32").to_json())
    assert out.is_contiguous()
