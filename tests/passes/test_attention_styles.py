"""Every attention style is fused into one operator and the rewritten module equals eager (outputs
and gradients, against a float64 reference), on the torch reference (SDPA where exact) and on the
generated Triton kernel run through the interpreter; every near-miss is declined with its reason."""
import copy

import pytest
import torch

import fxfuse
from fxfuse.passes.attention import FuseAttention
from fxfuse.passes.canonicalize import Canonicalize
from tests.attention_styles import (NEAR_MISSES, STYLES, CausalArangeWhere, CausalTrilInForward, EinsumUpcastSoftmax,
                                     GroupedQueryRepeatInterleave, MultiHeadProjections, SlidingWindowArange,
                                     ViewsBetweenScoreSteps)
from tests.tolerances import assert_close_to_reference

PASSES = [Canonicalize(), FuseAttention()]


def _run(model, inputs):
    out = model(*inputs)
    # A fixed upstream gradient (not one derived from the output, like out.pow(2)): each path's
    # gradients then differ from the float64 ones by their backward's error alone, not also by
    # the bf16 roundings of their own forward output.
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    (out.double() * upstream).sum().backward()
    return out, [t.grad for t in inputs if t.requires_grad] + [p.grad for p in model.parameters()]


def _leaves(inputs, dtype=None):
    return [(t.to(dtype) if dtype and t.is_floating_point() else t.clone()).requires_grad_(t.is_floating_point())
            for t in inputs]


def _check(style, dtype):
    model = style().to(dtype)
    inputs = model.inputs(dtype)
    res = fxfuse.rewrite(model, tuple(inputs), passes=PASSES)
    expected, expected_grads = _run(copy.deepcopy(model).double(), _leaves(inputs, torch.float64))
    eager, eager_grads = _run(copy.deepcopy(model), _leaves(inputs))
    model.zero_grad()
    got, got_grads = _run(res.module, _leaves(inputs))
    assert got.dtype == eager.dtype
    assert_close_to_reference(got, eager, expected, "output")
    assert len(got_grads) == len(eager_grads)
    for i, (g, e, r) in enumerate(zip(got_grads, eager_grads, expected_grads)):
        assert_close_to_reference(g, e, r, f"gradient {i}")
    return res


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("style", STYLES, ids=lambda s: s.__name__)
def test_style_is_fused_and_exact(style, dtype, cpu_path):
    res = _check(style, dtype)
    assert [m.kind for m in res.matches] == ["attention"], res.report()
    assert not res.misses, res.report()
    code = res.graph.code
    assert "fxfuse.attention" in code and "softmax.default" not in code and code.count("aten.bmm") == 0, code
    assert "baddbmm" not in code and "aten.mm" not in code, code  # the 2-D and added products are fused too


@pytest.mark.parametrize("style", [CausalTrilInForward, CausalArangeWhere], ids=lambda s: s.__name__)
def test_constant_causal_mask_is_proved_and_dropped(style):
    model = style()
    res = fxfuse.rewrite(model, tuple(model.inputs(torch.float32)), passes=PASSES)
    spec = res.matches[0].spec
    assert spec.causal and spec.inputs == (), spec
    assert "causal" in res.report()


@pytest.mark.parametrize("style", NEAR_MISSES, ids=lambda s: s.__name__)
def test_near_miss_is_declined_and_left_as_written(style):
    model = style()
    inputs = model.inputs(torch.float32)
    res = fxfuse.rewrite(model, tuple(inputs), passes=PASSES)
    assert not res.matches, res.report()
    assert [m.kind for m in res.misses] == ["attention"], res.report()
    assert style.reason in res.misses[0].reason, res.report()
    assert "fxfuse.attention" not in res.graph.code
    torch.testing.assert_close(res.module(*inputs), model(*inputs))


def test_sliding_window_is_proved_from_the_mask_values():
    model = SlidingWindowArange()
    res = fxfuse.rewrite(model, tuple(model.inputs(torch.float32)), passes=PASSES)
    spec = res.matches[0].spec
    assert spec.causal and spec.inputs == () and [s.window for s in spec.steps if s.op == "fill"] == [3], spec
    assert "causal, window 3 (fill -inf)" in res.report()


def test_random_mask_is_never_proved_causal():
    # rand(1, 1) > 2 is all False, the causal pattern of one query and one key, on every draw here;
    # but a random op proves nothing about the next call, so the mask must stay an input.
    def f(q, k, v):
        hidden = torch.rand(q.size(-2), k.size(-2)) > 2.0
        return (q @ k.transpose(-1, -2)).masked_fill(hidden, float("-inf")).softmax(-1) @ v

    res = fxfuse.rewrite(f, tuple(torch.randn(3, 1, 1, 1, 8).unbind(0)), passes=PASSES)
    spec = res.matches[0].spec
    assert not spec.causal and spec.inputs == ("mask",), spec


def test_pass_is_available_by_name():
    model = CausalTrilInForward()
    res = fxfuse.rewrite(model, tuple(model.inputs(torch.float32)), passes="canonicalize,fuse-attention")
    assert [m.kind for m in res.matches] == ["attention"]


@pytest.mark.parametrize("style,groups", [(GroupedQueryRepeatInterleave, 2), (EinsumUpcastSoftmax, 1),
                                          (MultiHeadProjections, 1)], ids=lambda s: getattr(s, "__name__", s))
def test_operands_are_read_in_place(style, groups):
    # Repeated kv heads, einsum's permuted copies and head-split transposes: the operator reads the
    # tensors they were made from (by strides), so no copy of q, k or v is left in the graph.
    model = style()
    res = fxfuse.rewrite(model, tuple(model.inputs(torch.float32)), passes=PASSES)
    assert res.matches[0].spec.kv_groups == groups
    before_op = res.graph.code.split("fxfuse.attention")[0]
    assert "clone" not in before_op and "expand" not in before_op and "_unsafe_view" not in before_op, res.graph.code


def test_large_sites_are_fused_and_their_causal_masks_proved():
    # Past the size at which layout chains could be replayed on index tensors (2^22 scores): the
    # reshape-only chains of q @ k^T are proved without a replay, and a causal mask built in forward
    # is still evaluated and proved (it was declined as "not a plain reshape" before).
    lq = 2304

    def causal_attention(q, k, v):
        scores = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5
        i = torch.arange(lq)
        scores = scores.masked_fill(i[None, :] > i[:, None], float("-inf"))
        return scores.softmax(-1) @ v

    q, k, v = (torch.randn(1, 2, lq, 8) for _ in range(3))
    res = fxfuse.rewrite(causal_attention, (q, k, v))
    assert [m.kind for m in res.matches] == ["attention"], res.report()
    assert res.matches[0].spec.causal and not res.matches[0].spec.inputs  # an index rule, no mask tensor
    torch.testing.assert_close(res.module(q, k, v), causal_attention(q, k, v), rtol=1e-5, atol=1e-5)


def test_an_unknown_op_on_the_scores_is_declined_with_its_name():
    def sine_attention(q, k, v):
        return torch.sin(q @ k.transpose(-2, -1)).softmax(-1) @ v

    q, k, v = (torch.randn(2, 2, 5, 8) for _ in range(3))
    res = fxfuse.rewrite(sine_attention, (q, k, v))
    assert not res.matches
    assert len(res.misses) == 1 and "sin" in res.misses[0].reason, res.report()
    torch.testing.assert_close(res.module(q, k, v), sine_attention(q, k, v))


def test_two_head_splits_of_the_scores_are_declined():
    # A tensor added on a (1, 4, L, L) view and one added on a (2, 2, L, L) view would be read
    # against different (B, H) by the operator: only one split of the flat scores is taken.
    def two_splits(q, k, v, m1, m2):
        scores = torch.bmm(q, k.transpose(1, 2)).view(2, 2, 5, 5) + m1
        scores = scores.view(1, 4, 5, 5) + m2
        return torch.bmm(scores.view(4, 5, 5).softmax(-1), v)

    inputs = [torch.randn(4, 5, 8) for _ in range(3)] + [torch.randn(2, 1, 1, 5), torch.randn(1, 4, 1, 5)]
    res = fxfuse.rewrite(two_splits, tuple(inputs), passes=PASSES)
    assert not res.matches and len(res.misses) == 1, res.report()
    assert "two different (batch, head) splits" in res.misses[0].reason, res.report()
    torch.testing.assert_close(res.module(*inputs), two_splits(*inputs))


def test_a_view_between_score_steps_is_never_left_in_the_rewritten_graph():
    # The flat scores viewed to heads and back (MBart): the views belong to the site, and the
    # 3-d bias added on the flat scores reaches the operator viewed as (B, H, L, L).
    model = ViewsBetweenScoreSteps()
    res = fxfuse.rewrite(model, tuple(model.inputs(torch.float32)), passes=PASSES)
    code = res.graph.code
    assert [m.kind for m in res.matches] == ["attention"] and "_softmax" not in code, res.report()
    assert "[2, 2, 5, 5]" in code.split("fxfuse.attention")[0], code


def test_low_precision_baddbmm_rounds_once():
    # bf16 baddbmm accumulates q @ k^T in float32 and rounds once, after alpha and the bias: the
    # spec keeps the product and both steps in float32 and casts after them (three bf16 roundings
    # would differ from eager's single one).
    from tests.attention_styles import BaddbmmAlibiBloom

    model = BaddbmmAlibiBloom()
    res = fxfuse.rewrite(model, tuple(model.inputs(torch.bfloat16)), passes=PASSES)
    spec = res.matches[0].spec
    assert spec.score_dtype == "float32", spec
    assert [(s.op, s.dtype) for s in spec.steps][:3] == [("mul", "float32"), ("add", "float32"), ("cast", "bfloat16")]


def test_baddbmm_with_beta_zero_never_reads_its_input():
    # beta=0: eager ignores the input tensor, NaN and inf included; so does the fused site (a NaN
    # read as a bias would make every output NaN).
    def nan_input(q, k, v):
        scores = torch.baddbmm(torch.full((4, 5, 5), float("nan")), q, k.transpose(1, 2), beta=0.0, alpha=0.5)
        return scores.softmax(-1) @ v

    q, k, v = (torch.randn(4, 5, 8) for _ in range(3))
    res = fxfuse.rewrite(nan_input, (q, k, v), passes=PASSES)
    assert [m.kind for m in res.matches] == ["attention"] and res.matches[0].spec.inputs == (), res.report()
    out = res.module(q, k, v)
    assert not out.isnan().any()
    torch.testing.assert_close(out, nan_input(q, k, v), rtol=1e-5, atol=1e-5)
