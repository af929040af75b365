"""Gated MLPs (SwiGLU, GeGLU, the fused gate+up projection split with chunk) are fused into the
activation-product operator; the rewritten module equals eager bitwise (the operator runs eager's
own ops) and keeps one (tokens, intermediate) tensor less for backward. Near-misses are declined."""
import copy

import pytest
import torch

import fxfuse
from tests.mlp_styles import NEAR_MISSES, STYLES, SwiGLU
from tests.tolerances import assert_close_to_reference

D, INNER = 12, 20
PASSES = "canonicalize,fuse-gated-mlp"


def _run(model, x):
    x = x.clone().requires_grad_()
    model.zero_grad()
    out = model(x)
    out = out[0] if isinstance(out, tuple) else out
    out.float().pow(2).sum().backward()
    return out, [x.grad] + [p.grad for p in model.parameters()]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("style", STYLES, ids=lambda s: s.__name__)
def test_style_is_fused_and_equals_eager(style, dtype):
    model = style(D, INNER).to(dtype)
    x = torch.randn(2, 3, D, dtype=dtype)
    res = fxfuse.rewrite(model, (x,), passes=PASSES)
    assert [m.kind for m in res.matches] == ["gated_mlp"], res.report()
    assert not res.misses and "fxfuse.gated_act" in res.graph.code
    got, got_grads = _run(res.module, x)
    eager, eager_grads = _run(model, x)
    expected, expected_grads = _run(copy.deepcopy(model).double(), x.double())
    torch.testing.assert_close(got, eager, rtol=0, atol=0)  # the same ATen ops, in the same dtypes
    for g, e, r in zip(got_grads, eager_grads, expected_grads):
        torch.testing.assert_close(g, e, rtol=0, atol=0)
        assert_close_to_reference(g, e, r, "gradient")


def test_gradcheck_in_float64():
    for style in STYLES:
        model = style(D, INNER).double()
        x = torch.randn(3, D, dtype=torch.float64, requires_grad=True)
        res = fxfuse.rewrite(model, (x,), passes=PASSES)
        assert torch.autograd.gradcheck(lambda t: res.module(t), (x,)), style.__name__


@pytest.mark.parametrize("style", list(NEAR_MISSES), ids=lambda s: s.__name__)
def test_near_miss_is_declined(style):
    model = style(D, INNER).to(torch.bfloat16)
    x = torch.randn(2, 3, D, dtype=torch.bfloat16)
    res = fxfuse.rewrite(model, (x,), passes=PASSES)
    assert not res.matches, res.report()
    assert res.misses and NEAR_MISSES[style] in res.misses[0].reason, res.report()
    out, ref = res.module(x), model(x)
    torch.testing.assert_close(out, ref)


def _saved_bytes(module, x) -> int:
    """Bytes of the distinct tensors autograd keeps for backward during one forward."""
    seen = {}

    def pack(t):
        seen[(t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(x)
    return sum(seen.values())


def test_backward_keeps_one_intermediate_less():
    model = SwiGLU(D, INNER)
    x = torch.randn(4, 8, D, requires_grad=True)
    res = fxfuse.rewrite(model, (x,), passes=PASSES)
    intermediate = 4 * 8 * INNER * 4  # silu(gate) in float32
    assert _saved_bytes(model, x) - _saved_bytes(res.module, x) == intermediate
