"""Every norm style is matched, and the rewritten module equals eager (outputs and gradients), on
the exact torch reference and on the generated Triton kernels run through the interpreter."""
import copy

import pytest
import torch

import fxfuse
from fxfuse.lowering.norm import lower_norm
from tests.norm_styles import LAYER_STYLES, RMS_STYLES, PreNormResidualBlock, build
from tests.tolerances import assert_close_to_reference, tolerance

D = 24  # not a power of two: the kernels' masked tail is exercised


def _run(model, inputs):
    out = model(*inputs)
    out.float().pow(2).sum().backward()
    grads = [i.grad for i in inputs] + [p.grad for p in model.parameters()]
    return out, grads


def _check(model, dtype, shape=(2, 5, D)):
    model = model.to(dtype)
    x = torch.randn(shape, dtype=dtype)
    res = fxfuse.rewrite(model, (x,))
    ref_model = copy.deepcopy(model).double()
    expected, expected_grads = _run(ref_model, [x.double().requires_grad_()])
    eager, eager_grads = _run(copy.deepcopy(model), [x.clone().requires_grad_()])
    model.zero_grad()
    got = res.module(x.clone().requires_grad_())
    got.float().pow(2).sum().backward()
    assert got.dtype == eager.dtype
    assert_close_to_reference(got, eager, expected, "output")
    got_grads = [p.grad for p in model.parameters()]
    for g, e, r in zip(got_grads, eager_grads[1:], expected_grads[1:]):
        assert_close_to_reference(g, e, r, "parameter gradient")
    return res


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("style", RMS_STYLES + LAYER_STYLES, ids=lambda s: s.__name__)
def test_style_is_fused_and_exact(style, dtype, cpu_path):
    res = _check(build(style, D), dtype)
    kind = "rms_norm" if style in RMS_STYLES else "layer_norm"
    assert [m.kind for m in res.matches] == [kind], res.report()
    assert not res.misses, res.report()
    assert "torch.ops.fxfuse.norm" in res.graph.code


@pytest.mark.parametrize("shape", [(D,), (3, D), (2, 2, 3, D)], ids=["rank1", "rank2", "rank4"])
def test_any_rank(shape, cpu_path):
    res = _check(build(RMS_STYLES[0], D), torch.float32, shape)
    assert len(res.matches) == 1


@pytest.mark.parametrize("style", [RMS_STYLES[2], LAYER_STYLES[2]], ids=lambda s: s.__name__)
def test_gradcheck_in_float64(style, cpu_path):
    # Styles without a hard-coded float32 upcast, so the whole site runs in float64.
    model = build(style, D)
    x = torch.randn(3, D, dtype=torch.float64, requires_grad=True)
    res = fxfuse.rewrite(model.double(), (x,))
    assert torch.autograd.gradcheck(lambda t: res.module(t), (x,), eps=1e-6, atol=1e-5)


def test_residual_norm_is_one_kernel_with_two_outputs(cpu_path):
    model = PreNormResidualBlock(D)
    x, delta = torch.randn(2, 3, D), torch.randn(2, 3, D)
    res = fxfuse.rewrite(model, (x, delta))
    assert [m.kind for m in res.matches] == ["rms_norm"]
    assert res.matches[0].spec.residual
    assert "fxfuse.add_norm" in res.graph.code and "aten.add.Tensor(arg" not in res.graph.code.split("add_norm")[0]
    xs = [x.clone().requires_grad_(), delta.clone().requires_grad_()]
    out = res.module(*xs)
    out.pow(2).sum().backward()
    ref_xs = [x.clone().requires_grad_(), delta.clone().requires_grad_()]
    model.zero_grad()
    ref = model(*ref_xs)
    ref.pow(2).sum().backward()
    torch.testing.assert_close(out, ref)
    for a, b in zip(xs, ref_xs):
        torch.testing.assert_close(a.grad, b.grad)


def test_eps_is_captured_not_assumed():
    for eps in (1e-3, 0.25):
        model = build(RMS_STYLES[0], D)
        model.eps = eps
        res = fxfuse.rewrite(model, (torch.randn(2, D),))
        assert res.matches[0].spec.eps == pytest.approx(eps)


def test_float64_layer_norm_stays_in_float64():
    # ATen computes a float64 layer_norm in float64; a float32 fused kernel would lose ~1e-7.
    model = build(LAYER_STYLES[0], D).double()
    x = torch.randn(3, D, dtype=torch.float64)
    res = fxfuse.rewrite(model, (x,))
    assert res.matches[0].spec.compute_dtype == "float64"
    torch.testing.assert_close(res.module(x), model(x), rtol=1e-12, atol=1e-12)


def test_statistics_in_bf16_normalizing_an_upcast_copy(cpu_path):
    # The statistic rounds in bf16, but the normalized product is taken in float32 as the code says.
    def upcast_operand(x):
        return x.float() * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)

    x = torch.randn(4, D, dtype=torch.bfloat16)
    res = fxfuse.rewrite(upcast_operand, (x,))
    assert [m.kind for m in res.matches] == ["rms_norm"], res.report()
    expected = upcast_operand(x)
    got = res.module(x)
    assert got.dtype == torch.float32
    if cpu_path == "reference":  # the reference reproduces the user's roundings exactly
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    else:  # the kernel keeps the statistic in float32: closer to the truth, not bit-equal
        assert_close_to_reference(got, expected, upcast_operand(x.double()), "output")


def test_statistics_of_a_bf16_copy_of_a_float32_input(cpu_path):
    # The site normalizes the rounded copy h, so the fused op must round its float32 input first.
    def rounded_copy(x):
        h = x.bfloat16()
        return h.float() * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)

    x = torch.randn(4, D)
    res = fxfuse.rewrite(rounded_copy, (x,))
    assert [m.kind for m in res.matches] == ["rms_norm"], res.report()
    spec = res.matches[0].spec
    assert spec.compute_dtype == "bfloat16" and lower_norm(spec).input_round == "bfloat16"
    got, eager = res.module(x), rounded_copy(x)
    if cpu_path == "reference":
        torch.testing.assert_close(got, eager, rtol=0, atol=0)
    else:
        # Triton's interpreter truncates float32 -> bfloat16 casts (a GPU rounds to nearest), so the
        # interpreted kernel is held to bfloat16's tolerance against the exact result on bf16(x).
        h = x.bfloat16().double()
        exact = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
        rtol, atol = tolerance(torch.bfloat16)
        torch.testing.assert_close(got.double(), exact, rtol=rtol, atol=atol)


def test_strided_weight(cpu_path):
    # A weight that is a strided view (a column of a matrix): the kernels must not read it densely.
    def column_weight(x, w2):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w2[:, 0]

    x, w2 = torch.randn(3, D), torch.randn(D, 2)
    res = fxfuse.rewrite(column_weight, (x, w2))
    assert len(res.matches[0].spec.params) == 1, res.report()
    inputs = [x.clone().requires_grad_(), w2.clone().requires_grad_()]
    eager_inputs = [x.clone().requires_grad_(), w2.clone().requires_grad_()]
    got, eager = res.module(*inputs), column_weight(*eager_inputs)
    got.pow(2).sum().backward()
    eager.pow(2).sum().backward()
    torch.testing.assert_close(got, eager)
    torch.testing.assert_close(inputs[1].grad, eager_inputs[1].grad)


class _ResidualWithLateWeight(torch.nn.Module):
    """The weight is computed after the norm's statistics: the fused op goes after it, while the
    site's own nodes still read the unfused sum (a regression: they were redirected too)."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(D))

    def forward(self, x, r):
        h = x + r
        n = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
        w = self.w * 2
        return w * n, h


def test_residual_site_with_a_weight_computed_late(cpu_path):
    model = _ResidualWithLateWeight()
    x, r = torch.randn(3, D), torch.randn(3, D)
    res = fxfuse.rewrite(model, (x, r))
    assert [m.spec.residual for m in res.matches] == [True]
    for got, want in zip(res.module(x, r), model(x, r)):
        torch.testing.assert_close(got, want)


def test_source_is_the_users_line_even_in_a_folder_named_like_the_library(tmp_path):
    from fxfuse.passes.graph import source_of

    class FakeNode:
        meta = {"stack_trace": (
            f'  File "{tmp_path}/fxfuse/torch/model.py", line 7, in forward\n    return self.norm(x)\n'
            f'  File "{torch.__file__}", line 3, in helper\n    something()\n'
        )}

    assert source_of(FakeNode()) == (f"{tmp_path}/fxfuse/torch/model.py:7", "return self.norm(x)")
