"""Norm numerics the style tests do not reach: 16-bit statistics of large values (torch.var
accumulates wider than its input, a hand-written mean of squares does not), NaN and inf inputs,
empty inputs; and random combinations of them (hypothesis) against eager and a float64 reference."""
import copy

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fxfuse
from tests.norm_styles import LAYER_STYLES, RMS_STYLES, build
from tests.tolerances import assert_close_to_reference, assert_close_with_nonfinite

D = 12


class BiasedVarLayerNorm(torch.nn.Module):
    """(x - mean) / sqrt(var + eps) with the biased variance written three ways."""

    def __init__(self, form):
        super().__init__()
        self.form = form

    def forward(self, x):
        if self.form == "var_mean":
            var, mean = torch.var_mean(x, -1, correction=0, keepdim=True)
        else:
            mean = x.mean(-1, keepdim=True)
            var = x.var(-1, unbiased=False, keepdim=True) if self.form == "unbiased_false" else \
                torch.var(x, -1, correction=0, keepdim=True)
        return (x - mean) / torch.sqrt(var + 1e-5)


FORMS = ["unbiased_false", "correction_0", "var_mean"]


@pytest.mark.parametrize("form", FORMS)
def test_fp16_biased_variance_of_large_values_equals_eager(form, cpu_path):
    # |x - mean| = 300: squared in float16 it overflows (65504), but torch.var accumulates in
    # float32 and gives 45000, so eager normalizes to +-1.414; the fused site once returned 0.
    model = BiasedVarLayerNorm(form)
    x = torch.tensor([[300.0, -300.0, 0.0, 0.0], [1000.0, 3.0, -7.0, 0.5]], dtype=torch.float16)
    res = fxfuse.rewrite(model, (x,))
    assert [m.kind for m in res.matches] == ["layer_norm"], res.report()
    assert res.matches[0].spec.statistic == ("var_mean" if form == "var_mean" else "var")
    got, eager = res.module(x), model(x)
    assert_close_to_reference(got, eager, model(x.double()), "output")
    if cpu_path == "reference":  # the reference calls the same torch ops as the model
        assert torch.equal(got, eager)


def test_fp16_biased_variance_under_torch_compile():
    torch._dynamo.reset()
    model = BiasedVarLayerNorm("unbiased_false")
    x = torch.tensor([[300.0, -300.0, 0.0, 0.0]], dtype=torch.float16)
    backend = fxfuse.Backend()
    try:
        got = torch.compile(model, backend=backend)(x)
    finally:
        torch._dynamo.reset()
    assert [m.kind for m in backend.matches] == ["layer_norm"], backend.report()
    assert_close_to_reference(got, model(x), model(x.double()), "output")
    assert got[0, 0].item() == pytest.approx(1.414, abs=1e-2)


def test_var_statistic_is_named_in_the_report():
    x = torch.randn(2, D, dtype=torch.float16)
    res = fxfuse.rewrite(BiasedVarLayerNorm("unbiased_false"), (x,))
    assert "var of f16 input" in res.matches[0].spec.describe(), res.report()


@pytest.mark.parametrize("shape", [(0, D), (3, 0), (2, 0, D)], ids=["no_rows", "empty_row", "empty_batch"])
@pytest.mark.parametrize("style", [RMS_STYLES[0], LAYER_STYLES[1]], ids=lambda s: s.__name__)
def test_empty_input_is_declined_with_a_reason(style, shape):
    model = build(style, shape[-1])
    x = torch.randn(shape)
    res = fxfuse.rewrite(model, (x,))
    assert not res.matches and len(res.misses) == 1 and "empty" in res.misses[0].reason, res.report()
    assert res.module(x).shape == model(x).shape


# ---- random combinations --------------------------------------------------------------------------

STYLES = RMS_STYLES + LAYER_STYLES
SPECIALS = ["none", "nan", "inf", "large"]


def _input(dtype, special, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 4, D, generator=g).to(dtype)
    if special == "nan":
        x[1, 2, 5] = float("nan")
    elif special == "inf":
        x[2, 0, 1] = float("inf")
    elif special == "large":  # 16-bit squares of these overflow; float32 statistics do not
        x = (x * 300).to(dtype)
    return x


@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(style=st.sampled_from(STYLES), dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
       special=st.sampled_from(SPECIALS), seed=st.integers(0, 3))
def test_generated_norm_input_is_fused_and_equals_eager(style, dtype, special, seed):
    torch.manual_seed(seed)
    model = build(style, D).to(dtype)
    x = _input(dtype, special, seed)
    res = fxfuse.rewrite(model, (x,))
    assert len(res.matches) == 1 and not res.misses, res.report()
    got, eager = res.module(x), model(x)
    assert got.dtype == eager.dtype
    expected = copy.deepcopy(model).double()(x.double())
    assert_close_with_nonfinite(got, eager, expected, f"{style.__name__} {dtype} {special}")
