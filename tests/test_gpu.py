"""GPU checks: the generated Triton kernels compiled for CUDA (not interpreted) against a float64
reference, through the whole rewrite and through the torch.compile backend. Marked ``gpu``: they
are skipped on machines without CUDA (CI) and run on the GPU machine with ``pytest -m gpu``."""
import copy

import pytest
import torch

import fxfuse
from tests.attention_styles import STYLES as ATTENTION_STYLES
from tests.norm_styles import LAYER_STYLES, RMS_STYLES, PreNormResidualBlock, build
from tests.tolerances import assert_close_to_reference

pytestmark = pytest.mark.gpu
D = 1000  # not a power of two: the kernels' masked tail


def _forward_backward(model, inputs):
    out = model(*inputs)
    out.float().pow(2).sum().backward()
    return out, [p.grad for p in model.parameters()]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("style", RMS_STYLES + LAYER_STYLES, ids=lambda s: s.__name__)
def test_norm_kernels_on_cuda(style, dtype):
    model = build(style, D).cuda().to(dtype)
    x = torch.randn(4, 37, D, device="cuda", dtype=dtype)
    res = fxfuse.rewrite(model, (x,))
    assert len(res.matches) == 1, res.report()
    expected, expected_grads = _forward_backward(copy.deepcopy(model).double(), [x.double()])
    eager, eager_grads = _forward_backward(copy.deepcopy(model), [x])
    model.zero_grad()
    got, got_grads = _forward_backward(res.module, [x])
    assert_close_to_reference(got, eager, expected, "output")
    for g, e, r in zip(got_grads, eager_grads, expected_grads):
        assert_close_to_reference(g, e, r, "parameter gradient")


def test_residual_norm_on_cuda():
    model = PreNormResidualBlock(D).cuda()
    x, delta = torch.randn(8, D, device="cuda"), torch.randn(8, D, device="cuda")
    res = fxfuse.rewrite(model, (x, delta))
    assert res.matches[0].spec.residual
    torch.testing.assert_close(res.module(x, delta), model(x, delta), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("style", ATTENTION_STYLES, ids=lambda s: s.__name__)
def test_attention_kernels_on_cuda(style, dtype):
    model = style().cuda().to(dtype)
    inputs = [t.cuda() for t in model.inputs(dtype)]
    res = fxfuse.rewrite(model, tuple(inputs))
    assert [m.kind for m in res.matches] == ["attention"], res.report()
    leaves = [t.requires_grad_() if t.is_floating_point() else t for t in inputs]
    got = res.module(*leaves)
    ref = copy.deepcopy(model).double()(*[t.detach().double() if t.is_floating_point() else t for t in inputs])
    eager = model(*[t.detach() for t in inputs])
    assert_close_to_reference(got.detach(), eager, ref, "output")
    got.float().pow(2).sum().backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in leaves if t.is_floating_point())


def test_backend_on_cuda_trains_like_eager():
    model = PreNormResidualBlock(256).cuda()
    reference = copy.deepcopy(model)
    compiled = torch.compile(model, backend="fxfuse")
    x, delta = torch.randn(4, 16, 256, device="cuda"), torch.randn(4, 16, 256, device="cuda")
    compiled(x, delta).pow(2).sum().backward()
    reference(x, delta).pow(2).sum().backward()
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-4)
