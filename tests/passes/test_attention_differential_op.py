"""fxfuse.attention_differential against float64: the torch path in float64 itself, the one-kernel
Triton forward and the differential backward kernels (the halves' own for a bias needing its
gradient) through the interpreter (tiny shapes: a ragged key tile, GQA, a bottom-right causal mask
with Lq < Lk, a bias needing its gradient, lambda per (batch, head) and 0-dim), and the errors a
wrong lambda or a plain spec get."""
import pytest
import torch

import fxfuse
from fxfuse.spec_attention import AttentionSpec, ScoreStep
from tests.tolerances import assert_close_to_reference

B, H, LQ, LK, D = 2, 4, 19, 21, 16


def _spec(dtype: str, *, causal=True, bias=False, groups=1) -> AttentionSpec:
    steps = [ScoreStep("mul", dtype, value=D ** -0.5)]
    if bias:
        steps.append(ScoreStep("add", dtype, input=0))
    if causal:
        steps.append(ScoreStep("fill", dtype, value=float("-inf")))
    return AttentionSpec(dtype, tuple(steps), dtype, ("bias",) if bias else (), kv_groups=groups, differential=True)


def _reference(q1, k1, q2, k2, v, lam, extras, causal, groups):
    """The user's two attentions in plain torch ops, then o1 - lambda * o2."""
    hidden = torch.ones(q1.shape[-2], k1.shape[-2], dtype=torch.bool).triu(k1.shape[-2] - q1.shape[-2] + 1)

    def attend(q, k):
        s = q @ k.repeat_interleave(groups, 1).transpose(-1, -2) * D ** -0.5
        if extras:
            s = s + extras[0]
        if causal:
            s = s.masked_fill(hidden, float("-inf"))
        return torch.softmax(s, -1) @ v.repeat_interleave(groups, 1)

    return attend(q1, k1) - lam * attend(q2, k2)


def _inputs(dtype, lam_shape, bias, groups):
    g = torch.Generator().manual_seed(3)
    r = lambda *s: torch.randn(s, generator=g, dtype=torch.float64).to(dtype)  # noqa: E731
    hk = H // groups
    tensors = [r(B, H, LQ, D), r(B, hk, LK, D), r(B, H, LQ, D), r(B, hk, LK, D), r(B, hk, LK, D),
               (0.5 + 0.2 * r(*lam_shape))]
    extras = [r(1, H, LQ, LK)] if bias else []
    return [t.requires_grad_() for t in tensors], [e.requires_grad_() for e in extras]


CASES = [  # (lambda shape, bias, kv groups, causal)
    ((), False, 1, True),
    ((B, H, 1, 1), True, 1, True),
    ((H, 1, 1), False, 2, False),
]


def _grads(fn, tensors, extras, upstream):
    out = fn(*tensors, extras)
    grads = torch.autograd.grad(out, [*tensors, *extras], upstream)
    return out, grads


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=["f64", "f32", "bf16"])
@pytest.mark.parametrize("lam_shape,bias,groups,causal", CASES, ids=["scalar-causal", "per-bh-bias", "per-head-gqa"])
def test_operator_matches_float64(dtype, lam_shape, bias, groups, causal, cpu_path):
    # (float64 takes the torch path with interpretation on too: tl.dot has no float64)
    spec = _spec(str(dtype).removeprefix("torch."), causal=causal, bias=bias, groups=groups)
    tensors, extras = _inputs(dtype, lam_shape, bias, groups)
    upstream = torch.randn(B, H, LQ, D, generator=torch.Generator().manual_seed(4), dtype=torch.float64)

    def fused(*args):
        *t, ex = args
        return torch.ops.fxfuse.attention_differential(*t, ex, spec.to_json())[0]

    def eager(*args):
        *t, ex = args
        return _reference(*t, ex, causal, groups)

    got, got_g = _grads(fused, tensors, extras, upstream.to(dtype))
    wide = [t.detach().double().requires_grad_() for t in tensors]
    wide_ex = [e.detach().double().requires_grad_() for e in extras]
    ref, ref_g = _grads(eager, wide, wide_ex, upstream)
    want, want_g = _grads(eager, tensors, extras, upstream.to(dtype))
    assert got.dtype == dtype and got.shape == (B, H, LQ, D) and got.is_contiguous()
    assert_close_to_reference(got, want, ref, "output")
    names = ["dq1", "dk1", "dq2", "dk2", "dv", "dlambda", "dbias"]
    for name, g, w, r, t in zip(names, got_g, want_g, ref_g, [*tensors, *extras]):
        assert g.shape == t.shape and g.dtype == t.dtype, name
        assert_close_to_reference(g, w, r, name)


def test_lambda_over_the_query_dim_is_refused():
    spec = _spec("float32")
    tensors, _ = _inputs(torch.float32, (), False, 1)
    with pytest.raises(ValueError, match="scalar or one value per"):
        torch.ops.fxfuse.attention_differential(*tensors[:5], torch.ones(LQ, 1), [], spec.to_json())


def test_a_plain_spec_is_refused():
    plain = AttentionSpec("float32", (ScoreStep("mul", "float32", value=0.5),))
    tensors, _ = _inputs(torch.float32, (), False, 1)
    with pytest.raises(ValueError, match="differential set"):
        torch.ops.fxfuse.attention_differential(*tensors, [], plain.to_json())


def test_fake_outputs_match_real(cpu_path):
    """The output and what the backward reads (statistics, halves): shapes, dtypes and strides,
    on the torch path and the kernels (a float64 site keeps float64 halves)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    for dtype in (torch.float32, torch.float64):
        spec = _spec(str(dtype).removeprefix("torch.")).to_json()
        tensors, _ = _inputs(dtype, (H, 1, 1), False, 1)
        with torch.no_grad():
            for merge in (False, True):
                real = torch.ops.fxfuse.attention_differential(*tensors, [], spec, merge)
                with FakeTensorMode(allow_non_fake_inputs=True):
                    fake = torch.ops.fxfuse.attention_differential(*tensors, [], spec, merge)
                assert len(real) == len(fake) == 3
                for r, f in zip(real, fake):
                    assert (r.shape, r.dtype, r.stride()) == (f.shape, f.dtype, f.stride())
                assert real[2].dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert fxfuse  # the package registers the operators
