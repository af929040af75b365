"""Residual sums folded into the fused norm (issue 13 item 3): DeepNorm's ``LN(alpha * x + f(x))``
and B2T's three-input ``LN(f(h) + h + x)`` become one ``fxfuse.sum_norm``; Sub-LN's norms are each
fused; near-misses keep their sums as written. Numerics against float64 on the torch path and the
interpreted Triton kernels, forward and backward."""
import pytest
import torch

import fxfuse
from fxfuse.spec import NormSpec
from tests import norm_sum_styles as styles
from tests.tolerances import assert_close_to_reference

D = 16


def _calls(res, op: str) -> int:
    return sum(f"fxfuse.{op}.default(" in line for line in res.graph.code.splitlines())


def _aten(res, op: str) -> int:
    return sum(f"aten.{op}." in line for line in res.graph.code.splitlines())


def _sum_specs(res) -> list[NormSpec]:
    return [m.spec for m in res.matches if m.spec.sum_scales]


def _model(style, dtype=torch.float32):
    torch.manual_seed(0)
    m = style(D)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "alpha" not in name:
                p.normal_(0, 0.5)
    return m.to(dtype)


@pytest.mark.parametrize("style,scales", [
    (styles.DeepNormPostLN, ((2 * 6) ** 0.25, 1.0)),
    (styles.DeepNormAlphaLeft, (1.0, (2 * 6) ** 0.25)),
    (styles.DeepNormRMS, (1.5, 1.0)),
    (styles.B2TBlock, (1.0, 1.0, 1.0)),
    (styles.B2TRightNested, (1.0, 1.0, 1.0)),
], ids=lambda p: getattr(p, "__name__", ""))
def test_scaled_and_three_input_sums_fold_into_one_norm(style, scales):
    model = _model(style)
    x = torch.randn(2, 5, D)
    res = fxfuse.rewrite(model, (x,), passes="canonicalize,fuse-norm")
    assert not res.misses, res.report()
    assert [s.sum_scales for s in _sum_specs(res)] == [pytest.approx(scales)], res.report()
    assert _calls(res, "sum_norm") == 1 and _aten(res, "mul") == 0, res.graph.code
    assert "residual sum" in res.report()
    out, eager = res.module(x), model(x)
    for o, e in zip(out if isinstance(out, tuple) else (out,), eager if isinstance(eager, tuple) else (eager,)):
        torch.testing.assert_close(o, e, rtol=0, atol=0)  # the CPU path runs eager's ops
    with torch.no_grad():  # ... summing in place without autograd: the same roundings
        out, eager = res.module(x), model(x)
    for o, e in zip(out if isinstance(out, tuple) else (out,), eager if isinstance(eager, tuple) else (eager,)):
        torch.testing.assert_close(o, e, rtol=0, atol=0)


def _grads(module, x, params):
    x = x.clone().requires_grad_()
    out = module(x)
    outs = out if isinstance(out, tuple) else (out,)
    loss = sum((o.double() * torch.linspace(-1, 1, o.numel(), dtype=torch.float64).view(o.shape)).sum() for o in outs)
    return outs, torch.autograd.grad(loss, [x, *params])


# A float64 Llama RMSNorm still takes float32 statistics (its .float()), so it has no float64 reference.
@pytest.mark.parametrize("style,dtype", [(s, d) for s in styles.SUM_STYLES + styles.TENSOR_ALPHA_STYLES
                                         for d in (torch.float64, torch.float32, torch.bfloat16)
                                         if not (s is styles.DeepNormRMS and d == torch.float64)],
                         ids=lambda p: getattr(p, "__name__", str(p)))
def test_sum_norm_numerics_forward_and_backward(style, dtype, cpu_path):
    model = _model(style, dtype)
    x = torch.randn(2, 3, D, dtype=torch.float64).to(dtype)
    res = fxfuse.rewrite(model, (x,), passes="canonicalize,fuse-norm")
    assert _calls(res, "sum_norm") == 1, res.report()
    params = list(model.parameters())
    outs, grads = _grads(res.module, x, params)
    eager_outs, eager_grads = _grads(model, x, params)
    ref = _model(style, torch.float64)
    ref.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    ref_outs, ref_grads = _grads(ref, x.double(), list(ref.parameters()))
    for o, e, r in zip(outs, eager_outs, ref_outs):
        assert o.dtype == e.dtype and o.shape == e.shape
        assert_close_to_reference(o, e, r, f"{style.__name__} output")
    # The residual stream: the same ops in the same dtype, so eager's values exactly (but Triton's
    # interpreter rounds float32 to bfloat16 otherwise than to nearest-even, as a GPU does).
    if len(outs) == 2 and (cpu_path == "reference" or dtype != torch.bfloat16):
        torch.testing.assert_close(outs[1], eager_outs[1], rtol=0, atol=0)
    for i, (g, e, r) in enumerate(zip(grads, eager_grads, ref_grads)):
        assert_close_to_reference(g, e, r, f"{style.__name__} gradient {i}")


def test_sub_ln_block_fuses_every_norm():
    """Magneto's Sub-LN: the two pre-norms, the two inner norms (one over the FFN's hidden size),
    and the residual stream shared by the FFN's pre-norm and the block's output."""
    model = _model(styles.SubLNBlock)
    x = torch.randn(2, 5, D)
    res = fxfuse.rewrite(model, (x,), passes="canonicalize,fuse-norm")
    assert [m.kind for m in res.matches] == ["layer_norm"] * 4 and not res.misses, res.report()
    assert _calls(res, "norm") == 3 and _calls(res, "add_norm") == 1, res.graph.code
    rtol_out = model(x)
    torch.testing.assert_close(res.module(x), rtol_out, rtol=0, atol=0)


@pytest.mark.parametrize("style", styles.TENSOR_ALPHA_STYLES, ids=lambda s: s.__name__)
def test_a_zero_dim_alpha_of_the_terms_dtype_folds_as_an_operator_input(style):
    model = _model(style)
    x = torch.randn(2, 5, D)
    res = fxfuse.rewrite(model, (x,), passes="canonicalize,fuse-norm")
    specs = _sum_specs(res)
    assert len(specs) == 1 and len(specs[0].sum_tensor_scales) == 1 and not res.misses, res.report()
    assert _calls(res, "sum_norm") == 1 and _aten(res, "mul") == 0 and "alpha0 * t" in res.report(), res.graph.code
    out, eager = res.module(x), model(x)
    for o, e in zip(out if isinstance(out, tuple) else (out,), eager if isinstance(eager, tuple) else (eager,)):
        torch.testing.assert_close(o, e, rtol=0, atol=0)  # the CPU path runs eager's ops
    model.alpha.data.fill_(0.25)  # an input, not a constant: a new value is read at the next call
    out, eager = res.module(x), model(x)
    torch.testing.assert_close(out, eager, rtol=0, atol=0)


@pytest.mark.parametrize("style,dtype", [(styles.TensorAlpha, torch.float32), (styles.ZeroDimAlphaOtherDtype, torch.bfloat16),
                                         (styles.AddAlphaKwarg, torch.float32)],
                         ids=lambda p: getattr(p, "__name__", str(p)))
def test_a_tensor_or_fused_alpha_is_not_a_constant_of_the_fold(style, dtype):
    model = _model(style, dtype)
    x = torch.randn(2, 5, D).to(dtype)
    res = fxfuse.rewrite(model, (x,), passes="canonicalize,fuse-norm")
    assert len(res.matches) == 1 and not _sum_specs(res), res.report()
    assert _calls(res, "sum_norm") == 0 and _aten(res, "add") == 1, res.graph.code
    torch.testing.assert_close(res.module(x), model(x), rtol=1e-6, atol=1e-6)


def test_a_broadcast_residual_is_not_folded():
    model = _model(styles.BroadcastResidual)
    x, ctx = torch.randn(2, 5, D), torch.randn(2, 1, D)
    res = fxfuse.rewrite(model, (x, ctx), passes="canonicalize,fuse-norm")
    assert len(res.matches) == 1 and not _sum_specs(res), res.report()
    assert _calls(res, "sum_norm") == 0 and _aten(res, "add") == 2 and _aten(res, "mul") == 1, res.graph.code
    torch.testing.assert_close(res.module(x, ctx), model(x, ctx), rtol=0, atol=0)


def test_a_pair_of_pairs_keeps_its_second_pair_as_one_term():
    model = _model(styles.PairOfPairs)
    x = torch.randn(2, 5, D)
    res = fxfuse.rewrite(model, (x,), passes="canonicalize,fuse-norm")
    assert [s.sum_scales for s in _sum_specs(res)] == [(1.0, 1.0, 1.0)], res.report()
    assert _aten(res, "add") == 1 and _aten(res, "mul") == 1, res.graph.code  # g(x) + 0.5 x, as written
    torch.testing.assert_close(res.module(x), model(x), rtol=0, atol=0)
