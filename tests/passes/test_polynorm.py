"""PolyNorm (issue 13 item 3): three RMS norms of x, x^2 and x^3, weighted and summed, become one
``fxfuse.polynorm`` whose kernel reads the row once, forward and backward; near-misses stay as
written (their norms fused one by one); float64 numerics on the torch path and the interpreted kernel."""
import copy

import pytest
import torch

import fxfuse
from fxfuse.spec_polynorm import PolyNormSpec
from tests import polynorm_styles as styles
from tests.tolerances import assert_close_to_reference, tolerance

D = 16


def _model(style, dtype=torch.float32):
    torch.manual_seed(0)
    m = styles.build(style, D)
    with torch.no_grad():
        for p in m.parameters():
            p.uniform_(0.2, 0.8)
    return m.to(dtype)


@pytest.mark.parametrize("style,powers", [(styles.PolyComPolyNorm, (3, 2, 1)), (styles.RsqrtPolyNorm, (3, 2, 1)),
                                          (styles.AscendingScalarPolyNorm, (1, 2, 3))],
                         ids=lambda p: getattr(p, "__name__", ""))
def test_polynorm_is_one_operator_and_equals_eager(style, powers):
    model = _model(style)
    x = torch.randn(2, 5, D)
    res = fxfuse.rewrite(model, (x,))
    assert [m.kind for m in res.matches] == ["polynorm"] and not res.misses, res.report()
    spec = res.matches[0].spec
    assert spec.powers == powers and spec.inverse == ("div_sqrt" if style is styles.PolyComPolyNorm else "rsqrt")
    code = res.graph.code
    assert code.count("fxfuse.polynorm.default(") == 1 and "aten.pow" not in code and "aten.add" not in code, code
    rtol, atol = tolerance(torch.float32)  # float32 on CPU: dot-product statistics (polynorm_cpu)
    torch.testing.assert_close(res.module(x), model(x), rtol=rtol, atol=atol)
    bf16, xb = _model(style, torch.bfloat16), x.bfloat16()
    fused = fxfuse.rewrite(bf16, (xb,)).module
    torch.testing.assert_close(fused(xb), bf16(xb), rtol=0, atol=0)  # 16-bit: eager's ops, so its bits
    with torch.no_grad():  # ... in place without autograd: the same roundings
        torch.testing.assert_close(fused(xb), bf16(xb), rtol=0, atol=0)


def _run(module, x, params):
    x = x.clone().requires_grad_()
    out = module(x)
    w = torch.linspace(-1, 1, out.numel(), dtype=torch.float64).view(out.shape)
    return out, torch.autograd.grad((out.double() * w).sum(), [x, *params])


@pytest.mark.parametrize("style", styles.STYLES, ids=lambda s: s.__name__)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_polynorm_numerics_forward_and_backward(style, dtype, cpu_path):
    model = _model(style, dtype)
    x = torch.randn(3, 5, D, dtype=torch.float64).to(dtype)
    res = fxfuse.rewrite(model, (x,))
    assert [m.kind for m in res.matches] == ["polynorm"], res.report()
    params = list(model.parameters())
    out, grads = _run(res.module, x, params)
    eager, eager_grads = _run(model, x, params)
    ref_model = _model(style, torch.float64)
    ref_model.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    ref, ref_grads = _run(ref_model, x.double(), list(ref_model.parameters()))
    assert out.dtype == eager.dtype and out.shape == eager.shape and out.stride() == eager.stride()
    assert_close_to_reference(out, eager, ref, f"{style.__name__} output")
    with torch.no_grad():  # the CPU path without autograd (in place)
        assert_close_to_reference(res.module(x), eager, ref, f"{style.__name__} output without autograd")
    for i, (g, e, r) in enumerate(zip(grads, eager_grads, ref_grads)):
        assert g.dtype == e.dtype and g.shape == e.shape
        assert_close_to_reference(g, e, r, f"{style.__name__} gradient {i}")


@pytest.mark.parametrize("style", styles.NEAR_MISSES, ids=lambda s: s.__name__)
def test_near_misses_are_not_polynorm(style):
    model = _model(style)
    x = torch.randn(2, 5, D)
    res = fxfuse.rewrite(model, (x,))
    assert "polynorm" not in [m.kind for m in res.matches] and "fxfuse.polynorm" not in res.graph.code, res.report()
    if style is styles.BiasFirst:  # three norms of x, x^2, x^3, combined otherwise: the user is told why
        assert [m.reason for m in res.misses if m.kind == "polynorm"] == [
            "the weighted norms are not added to one another first"], res.report()
    torch.testing.assert_close(res.module(x), model(x), rtol=1e-6, atol=1e-6)


def _saved_bytes(module, x) -> int:
    seen = {}

    def pack(t):
        seen[(t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(x)
    return sum(seen.values())


def test_the_operator_saves_x_alone_for_backward():
    model = _model(styles.RsqrtPolyNorm)
    x = torch.randn(4, 8, D, requires_grad=True)
    res = fxfuse.rewrite(model, (x,))
    with fxfuse.config.patch(interpret=True):  # through the operator (the CPU path differentiates eager's ops)
        fused = _saved_bytes(res.module, x)
    assert fused <= x.numel() * 4 + 64  # x, plus the one-element weights and bias
    assert _saved_bytes(model, x) >= 6 * x.numel() * 4  # eager keeps the powers and the normalized values


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("powers,inverse", [((3, 2, 1), "rsqrt"), ((1, 3, 2), "div_sqrt")])
def test_the_operator_forward_and_backward_against_float64(dtype, powers, inverse, cpu_path):
    """The operator itself (as torch.compile runs it): its CPU implementation and the kernel."""
    from fxfuse.ops.polynorm import reference

    spec = PolyNormSpec(powers=powers, eps=1e-6, inverse=inverse, dtype=str(dtype).removeprefix("torch."))
    x = torch.randn(7, 24, dtype=torch.float64).to(dtype)
    ws = [torch.tensor(v, dtype=dtype) for v in (0.4, -0.3, 0.7)]
    b = torch.tensor([0.2], dtype=dtype)
    g = torch.randn(7, 24, dtype=torch.float64).to(dtype)
    inputs = [t.clone().requires_grad_() for t in (x, *ws, b)]
    out = torch.ops.fxfuse.polynorm(inputs[0], inputs[1:4], inputs[4], spec.to_json())
    grads = torch.autograd.grad(out, inputs, g)
    eager_in = [t.clone().requires_grad_() for t in (x, *ws, b)]
    eager = reference(spec, eager_in[0], eager_in[1:4], eager_in[4])
    eager_grads = torch.autograd.grad(eager, eager_in, g)
    ref_in = [t.double().requires_grad_() for t in (x, *ws, b)]
    ref = reference(spec, ref_in[0], ref_in[1:4], ref_in[4])
    ref_grads = torch.autograd.grad(ref, ref_in, g.double())
    assert_close_to_reference(out, eager, ref, "polynorm op")
    for i, (a, e, r) in enumerate(zip(grads, eager_grads, ref_grads)):
        assert a.dtype == e.dtype and a.shape == e.shape
        assert_close_to_reference(a, e, r, f"polynorm op gradient {i}")


def test_opcheck():
    spec = PolyNormSpec(powers=(3, 2, 1), eps=1e-6, inverse="rsqrt", dtype="float32").to_json()
    x = torch.randn(3, D)
    ws, b = [torch.tensor(0.3), torch.tensor(0.5), torch.tensor(0.2)], torch.tensor([0.1])
    torch.library.opcheck(torch.ops.fxfuse.polynorm.default, (x, ws, b, spec))
    torch.library.opcheck(torch.ops.fxfuse.polynorm_backward.default, (torch.randn(3, D), x, ws, b, spec))


def test_wrong_weight_count_is_a_clear_error():
    spec = PolyNormSpec(powers=(3, 2, 1), eps=1e-6, inverse="rsqrt", dtype="float32").to_json()
    with pytest.raises(ValueError, match="one-element weights"):
        torch.ops.fxfuse.polynorm(torch.randn(2, D), [torch.tensor(1.0)], torch.tensor(0.0), spec)


def _train(module, x, params, x_grad: bool):
    x = x.clone().requires_grad_(x_grad)
    out = module(x)
    w = torch.linspace(-1, 1, out.numel(), dtype=torch.float64).view(out.shape)
    return out, torch.autograd.grad((out.double() * w).sum(), [x, *params] if x_grad else params)


@pytest.mark.parametrize("x_grad", [True, False], ids=["x_grad", "params_grad"])
@pytest.mark.parametrize("inner", ["eager", pytest.param("inductor", marks=pytest.mark.inductor)])
def test_trains_under_the_backend_as_eager_does(inner, x_grad):
    # On CPU the composed backend hands AOTAutograd the spec's reference (fxfuse.inductor), traced
    # on fake tensors: its in-place branch (torch.mul(..., out=)), taken where those carried no
    # requires_grad, crashed AOTAutograd ("functions with out=... arguments don't support
    # automatic differentiation"); inner eager keeps the operator (tests/test_cpu_training_forms.py).
    torch._dynamo.reset()
    model, x = torch.nn.Sequential(torch.nn.Linear(D, D), _model(styles.RsqrtPolyNorm)), torch.randn(2, 5, D)
    params = list(model.parameters())
    backend = fxfuse.Backend(inner=inner, keep_operators=False)  # the default (conftest keeps them)
    out, grads = _train(torch.compile(model, backend=backend), x, params, x_grad)
    eager, eager_grads = _train(model, x, params, x_grad)
    ref_model = copy.deepcopy(model).double()
    ref, ref_grads = _train(ref_model, x.double(), list(ref_model.parameters()), x_grad)
    assert_close_to_reference(out, eager, ref, f"{inner} output")
    for i, (g, e, r) in enumerate(zip(grads, eager_grads, ref_grads)):
        assert_close_to_reference(g, e, r, f"{inner} gradient {i}")
