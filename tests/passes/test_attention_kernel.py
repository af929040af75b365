"""The fused attention operator on its own: the generated flash-attention kernel (through Triton's
interpreter) against the torch reference of the spec, at lengths that are not multiples of the
tile, for decoding (one query), with causal tile skipping, masks, biases and low-precision
roundings; the log-sum-exp it saves; the exact CPU path (SDPA where it is exact); the backward
formula (gradcheck); the backward kernels, learned biases' and factor tensors' gradients included; and
the spec's JSON form."""
import dataclasses
import math

import pytest
import torch

import fxfuse
from fxfuse.runtime.attention import forward as kernel_forward
from fxfuse.codegen.attention import generate
from fxfuse.lowering.attention import lower_attention
from fxfuse.ops.attention import _sdpa_form, reference
from fxfuse.runtime.configs import LaunchConfig
from fxfuse.spec_attention import AttentionSpec, ScoreStep
from tests.tolerances import assert_close_to_reference, tolerance

B, H, D = 1, 2, 8
MIN32 = torch.finfo(torch.float32).min


def _spec(kind, dtype):
    d = dtype
    steps = {
        "plain": (ScoreStep("mul", d, value=0.35),),
        "causal": (ScoreStep("div", d, value=2.0), ScoreStep("fill", d, value=-math.inf, input=-1)),
        "causal_finite": (ScoreStep("fill", d, value=MIN32 if d == "float32" else -1e9, input=-1),),
        # bf16 scores + a float32 bias: the scores widen to float32, then are cast back before softmax.
        "mask_bias": (ScoreStep("fill", d, value=-math.inf, input=0, invert=True), ScoreStep("add", "float32", input=1),
                      ScoreStep("cast", d)),
        # A per-head temperature tensor and a 0-dim divisor tensor.
        "factor": (ScoreStep("mul", d, input=0), ScoreStep("div", d, input=1)),
        # A fill that leaves hidden keys real probability: the backward must zero their dS itself.
        "fill_zero": (ScoreStep("fill", d, value=0.0, input=0),),
        # Soft-capping after the scale, then a causal mask (Gemma 2's order).
        "softcap": (ScoreStep("div", d, value=2.0), ScoreStep("tanh", d), ScoreStep("mul", d, value=2.0),
                    ScoreStep("fill", d, value=-math.inf, input=-1)),
        # Each query sees itself and the 4 keys before it: tiles on both sides are skipped.
        "window": (ScoreStep("mul", d, value=0.5), ScoreStep("fill", d, value=-math.inf, input=-1, window=5)),
    }[kind]
    inputs = {"mask_bias": ("mask", "bias"), "factor": ("factor", "factor"), "fill_zero": ("mask",)}.get(kind, ())
    return AttentionSpec(score_dtype=d, steps=steps, prob_dtype=d, inputs=inputs)


def _extras(kind, lq, lk):
    if kind == "factor":
        return [torch.rand(1, H, 1, 1) + 0.5, torch.tensor(1.7)]
    if kind == "fill_zero":
        return [torch.rand(B, H, lq, lk) > 0.5]
    if kind != "mask_bias":
        return []
    keep = torch.rand(B, 1, 1, lk) > 0.3
    keep[..., 0] = True  # every query sees at least one key
    return [keep, torch.randn(H, lq, lk)]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("kind", ["plain", "causal", "causal_finite", "mask_bias", "factor", "fill_zero", "window", "softcap"])
@pytest.mark.parametrize("lq,lk", [(5, 5), (19, 19), (1, 21), (3, 21), (37, 37)])
def test_kernel_matches_reference(lq, lk, kind, dtype):
    spec = _spec(kind, dtype)
    t = getattr(torch, dtype)
    q, k = torch.randn(B, H, lq, D, dtype=t), torch.randn(B, H, lk, D, dtype=t)
    v = torch.randn(B, H, lk, D + 4, dtype=t)  # Dv != D
    extras = _extras(kind, lq, lk)
    out, stats = kernel_forward(spec, q, k, v, extras)
    lse = stats[0] + stats[1].log()
    f64 = AttentionSpec(score_dtype="float64", prob_dtype="float64", inputs=spec.inputs, steps=tuple(
        dataclasses.replace(s, dtype="float64") for s in spec.steps))
    wide = [e.double() if e.is_floating_point() else e for e in extras]
    expected = reference(f64, q.double(), k.double(), v.double(), wide)
    assert_close_to_reference(out, reference(spec, q, k, v, extras), expected, "kernel output")
    from fxfuse.ops.attention import _scores

    lse_expected = torch.logsumexp(_scores(f64, q.double(), k.double(), wide), -1).reshape(B * H, lq)
    # The kernel's scores carry the site's bf16 roundings (product, then each step), the float64
    # ones none: the table's bf16 tolerance for values rounded a few times.
    rtol, atol = tolerance(t)
    torch.testing.assert_close(lse.double(), lse_expected, rtol=rtol, atol=atol)


def test_causal_tiles_are_skipped_only_when_exact():
    assert lower_attention(_spec("causal", "float32")).skip_above_diagonal
    assert "tl.minimum(LK" in generate(_spec("causal", "float32")).source
    window = generate(_spec("window", "float32")).source  # and the tiles a whole window back
    assert "tl.maximum(0, (pid_m * BLOCK_M + LK - LQ - 5 + 1)" in window and "+ 5)" in window
    # A finite fill gives hidden keys a tiny but nonzero weight in a row's softmax (and a
    # uniform one in a fully hidden row): skipping them would change the result.
    assert not lower_attention(_spec("causal_finite", "float32")).skip_above_diagonal
    negated = AttentionSpec("float32", (ScoreStep("fill", "float32", -math.inf, -1), ScoreStep("mul", "float32", -1.0)))
    assert not lower_attention(negated).skip_above_diagonal  # -inf * -1 = +inf: the hidden keys would win
    capped = AttentionSpec("float32", (ScoreStep("fill", "float32", -math.inf, -1), ScoreStep("tanh", "float32")))
    assert not lower_attention(capped).skip_above_diagonal  # tanh(-inf) = -1: hidden keys get weight again
    assert lower_attention(_spec("softcap", "float32")).skip_above_diagonal  # capped before the mask: fine


def test_fully_hidden_rows_are_nan_as_in_eager():
    spec = AttentionSpec("float32", (ScoreStep("fill", "float32", -math.inf, 0),), "float32", ("mask",))
    q, k, v = torch.randn(3, 1, 1, 4, D).unbind(0)
    hidden = torch.zeros(4, 4, dtype=torch.bool)
    hidden[2] = True
    eager = (q @ k.mT).masked_fill(hidden, -math.inf).softmax(-1) @ v
    assert eager[0, 0, 2].isnan().all() and not eager[0, 0, 1].isnan().any()
    kernel = kernel_forward(spec, q, k, v, [hidden])[0]
    op = torch.ops.fxfuse.attention(q, k, v, [hidden], spec.to_json())  # the SDPA path, fixed up
    assert _sdpa_form(spec) is not None
    for got in (kernel, op):
        assert torch.equal(got.isnan(), eager.isnan())
        torch.testing.assert_close(got[~got.isnan()], eager[~eager.isnan()])


def test_sdpa_is_used_only_where_exact():
    assert _sdpa_form(_spec("plain", "float32")) == (0.35, None)
    assert _sdpa_form(_spec("causal", "float32"))[0] == 0.5
    assert _sdpa_form(_spec("causal_finite", "float32")) is None  # a finite fill is not SDPA's -inf
    assert _sdpa_form(_spec("mask_bias", "bfloat16")) is None  # casts between steps


def test_source_is_deterministic_and_uses_no_libdevice():
    a, b = generate(_spec("mask_bias", "bfloat16")), generate(_spec("mask_bias", "bfloat16"))
    assert a.source == b.source and a.name == b.name
    assert generate(_spec("plain", "float32")).name != a.name
    for kind in ("plain", "causal", "mask_bias"):
        src = generate(_spec(kind, "float32")).source
        assert "libdevice" not in src and "tl.math" not in src


@pytest.mark.parametrize("kind", ["plain", "causal", "mask_bias", "factor", "softcap"])
def test_backward_formula_passes_gradcheck(kind):
    spec = _spec(kind, "float64")
    spec = AttentionSpec("float64", tuple(dataclasses.replace(s, dtype="float64") for s in spec.steps),
                         "float64", spec.inputs)
    q, k, v = (torch.randn(1, 2, 3, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    extras = [e.double().requires_grad_() if e.is_floating_point() else e for e in _extras(kind, 3, 3)]

    def f(q, k, v, *floats):
        it = iter(floats)
        return torch.ops.fxfuse.attention(q, k, v, [next(it) if e.is_floating_point() else e for e in extras],
                                          spec.to_json())

    floats = [e for e in extras if e.is_floating_point()]
    assert torch.autograd.gradcheck(f, (q, k, v, *floats), eps=1e-6, atol=1e-6)


def test_spec_round_trips_through_json_and_reads_in_words():
    spec = _spec("mask_bias", "bfloat16")
    assert AttentionSpec.from_json(spec.to_json()) == spec
    causal = _spec("causal", "float32")
    assert AttentionSpec.from_json(causal.to_json()) == causal and causal.causal
    words = spec.describe()
    assert "masked_fill(~mask0, -inf)" in words and "+ bias1" in words and "softmax in bf16" in words
    assert "scale 0.5" in causal.describe() and "causal (fill -inf)" in causal.describe()
    capped = _spec("softcap", "float32").describe()
    assert "softcap 2" in capped and "scale" not in capped.replace("no scale", ""), capped


def test_operator_runs_the_kernel_when_interpreting(monkeypatch):
    import fxfuse.runtime.attention as kernels

    calls = []
    monkeypatch.setattr(kernels, "forward", lambda *a, **kw: calls.append(1) or kernel_forward(*a, **kw))
    spec = _spec("plain", "float32").to_json()
    q, k, v = torch.randn(3, 1, 2, 5, D).unbind(0)
    with fxfuse.config.patch(interpret=True):
        got = torch.ops.fxfuse.attention(q, k, v, [], spec)
    assert calls == [1]
    torch.testing.assert_close(got, torch.ops.fxfuse.attention(q, k, v, [], spec))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("lq,lk", [(5, 5), (1, 21), (19, 19)])
def test_kernel_reads_grouped_kv_heads_in_place(lq, lk, dtype):
    t = getattr(torch, dtype)
    spec = AttentionSpec(dtype, (ScoreStep("mul", dtype, value=0.3),), dtype, kv_groups=2)
    q = torch.randn(B, 4, lq, D, dtype=t)
    k, v = torch.randn(B, 2, lk, D, dtype=t), torch.randn(B, 2, lk, D, dtype=t)
    out, _ = kernel_forward(spec, q, k, v, [])
    repeated = AttentionSpec(dtype, spec.steps, dtype)  # the same site with the kv heads materialised
    k2, v2 = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    expected = reference(AttentionSpec("float64", (ScoreStep("mul", "float64", value=0.3),), "float64"),
                         q.double(), k2.double(), v2.double(), [])
    assert_close_to_reference(out, reference(repeated, q, k2, v2, []), expected, "grouped kernel output")
    op = torch.ops.fxfuse.attention(q, k, v, [], spec.to_json())  # the CPU path (SDPA with enable_gqa)
    assert_close_to_reference(op, reference(repeated, q, k2, v2, []), expected, "grouped CPU output")


def test_grouped_backward_sums_over_the_query_heads_of_each_kv_head():
    spec = AttentionSpec("float64", (ScoreStep("mul", "float64", value=0.3),), "float64", kv_groups=2).to_json()
    q = torch.randn(1, 4, 3, 4, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(1, 2, 3, 4, dtype=torch.float64, requires_grad=True) for _ in range(2))
    assert torch.autograd.gradcheck(lambda q, k, v: torch.ops.fxfuse.attention(q, k, v, [], spec), (q, k, v))
    with pytest.raises(ValueError, match="query heads"):
        torch.ops.fxfuse.attention(q, k[:, :1], v[:, :1], [], spec)


def _autograd_grads(spec, q, k, v, extras, upstream):
    """dq, dk, dv of the spec's torch reference by autograd: the user's code differentiated by eager."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = reference(spec, *leaves, extras)
    (out.double() * upstream).sum().backward()
    return [t.grad for t in leaves]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("kind", ["plain", "causal", "causal_finite", "mask_bias", "factor", "fill_zero", "window", "softcap"])
# (21, 3): causal with more queries than keys hides every key from the first rows; with a finite
# fill their probabilities are uniform, which the saved row statistics must reproduce.
@pytest.mark.parametrize("lq,lk", [(5, 5), (1, 21), (21, 3), (37, 37)])
def test_backward_kernels_match_eager_gradients(lq, lk, kind, dtype):
    from fxfuse.runtime.attention import backward as kernel_backward

    spec = _spec(kind, dtype)
    t = getattr(torch, dtype)
    q, k = torch.randn(B, H, lq, D, dtype=t), torch.randn(B, H, lk, D, dtype=t)
    v = torch.randn(B, H, lk, D + 4, dtype=t)
    extras = _extras(kind, lq, lk)
    upstream = torch.randn(B, H, lq, D + 4, dtype=torch.float64)
    got = kernel_backward(spec, upstream.to(t), q, k, v, extras)
    eager = _autograd_grads(spec, q, k, v, extras, upstream)
    f64 = AttentionSpec("float64", tuple(dataclasses.replace(s, dtype="float64") for s in spec.steps),
                        "float64", spec.inputs)
    wide = [e.double() if e.is_floating_point() else e for e in extras]
    expected = _autograd_grads(f64, q.double(), k.double(), v.double(), wide, upstream)
    for name, g, e, r in zip("qkv", got, eager, expected):
        assert g.dtype == t and g.shape == e.shape
        nan = e.isnan()  # rows with every key hidden by -inf: NaN in eager, and so in the kernels
        assert torch.equal(g.isnan(), nan), f"d{name}: NaN where eager has none, or the reverse"
        assert_close_to_reference(g.masked_fill(nan, 0), e.masked_fill(nan, 0), r.masked_fill(nan, 0), f"d{name}")


def _bias_spec(kind, dtype):
    """Sites whose bias (extra 0) is learned: T5's position bias before a causal mask, a bias under
    Gemma-style soft-capping (the gradient goes back through tanh and the scales), and a float
    padding mask (B, 1, 1, Lk) added after the scale."""
    d = dtype
    steps = {
        "bias_causal": (ScoreStep("add", d, input=0), ScoreStep("fill", d, value=-math.inf, input=-1)),
        "bias_softcap": (ScoreStep("mul", d, value=0.5), ScoreStep("add", d, input=0), ScoreStep("div", d, value=2.0),
                         ScoreStep("tanh", d), ScoreStep("mul", d, value=2.0),
                         ScoreStep("fill", d, value=-math.inf, input=-1)),
        "float_mask": (ScoreStep("mul", d, value=0.35), ScoreStep("add", d, input=0)),
    }[kind]
    return AttentionSpec(score_dtype=d, steps=steps, prob_dtype=d, inputs=("bias",))


def _bias(kind, batch, lq, lk, t):
    if kind != "float_mask":
        return torch.randn(1, H, lq, lk, dtype=t)
    keep = torch.rand(batch, 1, 1, lk) > 0.3
    keep[..., 0] = True
    return torch.where(keep, torch.randn(batch, 1, 1, lk) * 0.1, -1e4).to(t)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("kind", ["bias_causal", "bias_softcap", "float_mask"])
@pytest.mark.parametrize("lq,lk", [(5, 5), (19, 21)])
def test_backward_kernels_give_the_bias_gradient(lq, lk, kind, dtype, monkeypatch):
    import fxfuse.ops.attention as ops

    formula_calls = []
    real_formula = ops.reference_backward
    monkeypatch.setattr(ops, "reference_backward", lambda *a: formula_calls.append(1) or real_formula(*a))
    spec, t, batch = _bias_spec(kind, dtype), getattr(torch, dtype), 2
    q, k = torch.randn(batch, H, lq, D, dtype=t), torch.randn(batch, H, lk, D, dtype=t)
    v = torch.randn(batch, H, lk, D + 4, dtype=t)
    bias = _bias(kind, batch, lq, lk, t).requires_grad_()
    upstream = torch.randn(batch, H, lq, D + 4, dtype=torch.float64)
    with fxfuse.config.patch(interpret=True):
        torch.ops.fxfuse.attention(q, k, v, [bias], spec.to_json()).backward(upstream.to(t))
    assert formula_calls == [], "the bias gradient came from the torch formula, not the kernels"
    got = bias.grad
    formula = real_formula(spec, upstream.to(t), q, k, v, [bias.detach()])[3]
    eager_bias = bias.detach().clone().requires_grad_()
    (reference(spec, q, k, v, [eager_bias]).double() * upstream).sum().backward()
    f64 = AttentionSpec("float64", tuple(dataclasses.replace(s, dtype="float64") for s in spec.steps),
                        "float64", spec.inputs)
    exact_bias = bias.detach().double().requires_grad_()
    (reference(f64, q.double(), k.double(), v.double(), [exact_bias]) * upstream).sum().backward()
    assert got.dtype == t and got.shape == bias.shape
    assert_close_to_reference(got, eager_bias.grad, exact_bias.grad, "d bias vs eager")
    assert_close_to_reference(got, formula, exact_bias.grad, "d bias vs torch formula")


def _factor_spec(ops, dtype):
    """A learned per-head temperature (extra 0, (1, H, 1, 1)) and a learned 0-dim scale (extra 1),
    each a product or a quotient (``ops``), then Gemma-style soft-capping and a causal mask: the
    factors' gradients go back through tanh, the scalar scales and the mask."""
    d = dtype
    steps = (ScoreStep(ops[0], d, input=0), ScoreStep(ops[1], d, input=1), ScoreStep("div", d, value=2.0),
             ScoreStep("tanh", d), ScoreStep("mul", d, value=2.0), ScoreStep("fill", d, value=-math.inf, input=-1))
    return AttentionSpec(score_dtype=d, steps=steps, prob_dtype=d, inputs=("factor", "factor"))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("ops", [("mul", "div"), ("div", "mul")])
@pytest.mark.parametrize("lq,lk", [(5, 5), (19, 21)])
def test_backward_kernels_give_the_factor_gradient(lq, lk, ops, dtype, monkeypatch):
    import fxfuse.runtime.attention as kernels
    import fxfuse.ops.attention as ops_module

    kernel_calls, formula_calls = [], []
    real_kernels, real_formula = kernels.backward, ops_module.reference_backward
    monkeypatch.setattr(kernels, "backward", lambda *a, **kw: kernel_calls.append(1) or real_kernels(*a, **kw))
    monkeypatch.setattr(ops_module, "reference_backward", lambda *a: formula_calls.append(1) or real_formula(*a))
    spec, t, batch = _factor_spec(ops, dtype), getattr(torch, dtype), 2
    q, k = torch.randn(batch, H, lq, D, dtype=t), torch.randn(batch, H, lk, D, dtype=t)
    v = torch.randn(batch, H, lk, D + 4, dtype=t)
    factors = [(torch.rand(1, H, 1, 1) + 0.5).to(t).requires_grad_(), torch.tensor(1.7, dtype=t, requires_grad=True)]
    upstream = torch.randn(batch, H, lq, D + 4, dtype=torch.float64)
    with fxfuse.config.patch(interpret=True):
        torch.ops.fxfuse.attention(q, k, v, factors, spec.to_json()).backward(upstream.to(t))
    assert kernel_calls == [1] and formula_calls == [], "the factor gradients came from the torch formula"
    eager = [f.detach().clone().requires_grad_() for f in factors]
    (reference(spec, q, k, v, eager).double() * upstream).sum().backward()
    f64 = AttentionSpec("float64", tuple(dataclasses.replace(s, dtype="float64") for s in spec.steps),
                        "float64", spec.inputs)
    exact = [f.detach().double().requires_grad_() for f in factors]
    (reference(f64, q.double(), k.double(), v.double(), exact) * upstream).sum().backward()
    for name, got, e, x in zip(("temperature", "0-dim scale"), factors, eager, exact):
        assert got.grad.dtype == t and got.grad.shape == got.shape, name
        assert_close_to_reference(got.grad, e.grad, x.grad, f"d {name} ({ops})")


def test_operator_backward_uses_the_kernels_for_biases_and_factors(monkeypatch):
    import fxfuse.runtime.attention as kernels
    import fxfuse.ops.attention as ops

    calls, formula_calls = [], []
    monkeypatch.setattr(kernels, "backward", lambda *a, _b=kernels.backward, **kw: calls.append(1) or _b(*a, **kw))
    real_formula = ops.reference_backward
    monkeypatch.setattr(ops, "reference_backward", lambda *a: formula_calls.append(1) or real_formula(*a))
    spec = _spec("mask_bias", "float32")
    q, k, v = (torch.randn(B, H, 5, D, requires_grad=True) for _ in range(3))
    keep, bias = _extras("mask_bias", 5, 5)
    with fxfuse.config.patch(interpret=True):
        torch.ops.fxfuse.attention(q, k, v, [keep, bias], spec.to_json()).sum().backward()
        assert calls == [1] and bias.grad is None
        bias.requires_grad_()  # a learned bias: the dq kernel writes its dS
        torch.ops.fxfuse.attention(q, k, v, [keep, bias], spec.to_json()).sum().backward()
        assert calls == [1, 1] and formula_calls == [] and bias.grad is not None and bias.grad.shape == bias.shape
        # Factor tensors' gradients: the dq kernel writes them per score too.
        scale, divisor = (e.requires_grad_() for e in _extras("factor", 5, 5))
        torch.ops.fxfuse.attention(q, k, v, [scale, divisor], _spec("factor", "float32").to_json()).sum().backward()
        assert calls == [1, 1, 1] and formula_calls == []
        assert scale.grad.shape == scale.shape and divisor.grad.shape == divisor.shape


def test_grouped_backward_kernels_sum_each_kv_heads_group():
    from fxfuse.runtime.attention import backward as kernel_backward
    from fxfuse.ops.attention import reference_backward

    spec = AttentionSpec("float32", (ScoreStep("fill", "float32", -math.inf, -1),), "float32", kv_groups=2)
    q, do = torch.randn(B, 4, 19, D), torch.randn(B, 4, 19, D)
    k, v = torch.randn(B, 2, 19, D), torch.randn(B, 2, 19, D)
    got = kernel_backward(spec, do, q, k, v, [])
    for g, r in zip(got, reference_backward(spec, do, q, k, v, [])):
        assert g.shape == r.shape
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)


def _factor_bias_spec(kind, dtype):
    """A learned temperature (extra 0, (1, H, 1, 1)) times the scores, then an additive term and a
    causal mask: a learned bias tensor (extra 1), ALiBi as an index expression (slopes, extra 1), or
    a float padding mask (extra 1) -- one site with a factor tensor and an add step."""
    d = dtype
    alibi = ("mul", "float32", ("load", "float32", 1),
             ("cast", "float32", ("sub", "int64", ("var", "int64", "j"), ("var", "int64", "i"))))
    add = {"bias": ScoreStep("add", d, input=1), "alibi": ScoreStep("add", d, expr=alibi),
           "float_mask": ScoreStep("add", d, input=1)}[kind]
    second = "head" if kind == "alibi" else "bias"
    return AttentionSpec(score_dtype=d, prob_dtype=d, inputs=("factor", second), steps=(
        ScoreStep("mul", d, input=0), add, ScoreStep("fill", d, value=-math.inf, input=-1)))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("kind", ["bias", "alibi", "float_mask"])
def test_backward_kernels_with_a_factor_tensor_and_an_additive_term(kind, dtype):
    """Issue 8 item 4: a factor tensor and a bias in one site made the dq kernel's launch pass a
    factor buffer where the BIAS_GRAD flag stood (``got multiple values for argument``). Every
    gradient, through the interpreted kernels, against float64."""
    spec, t, batch, lq, lk = _factor_bias_spec(kind, dtype), getattr(torch, dtype), 2, 19, 21
    leaves = [torch.randn(batch, H, lq, D, dtype=t), torch.randn(batch, H, lk, D, dtype=t),
              torch.randn(batch, H, lk, D + 4, dtype=t), (torch.rand(1, H, 1, 1) + 0.5).to(t)]
    if kind == "alibi":
        second = torch.tensor([0.5, 0.25]).reshape(1, H, 1, 1)  # per-head slopes: a constant to the kernel
    elif kind == "float_mask":
        keep = torch.rand(batch, 1, 1, lk) > 0.3
        keep[..., 0] = True
        second = torch.where(keep, torch.randn(batch, 1, 1, lk) * 0.1, -1e4).to(t)
    else:
        second = torch.randn(1, H, lq, lk, dtype=t)
    learned = kind != "alibi"
    upstream = torch.randn(batch, H, lq, D + 4, dtype=torch.float64)

    def grads(spec, tensors, second, run):
        tensors = [x.detach().clone().requires_grad_() for x in tensors]
        second = second.detach().clone().requires_grad_(learned)
        q, k, v, temperature = tensors
        out = run(spec, q, k, v, [temperature, second])
        (out.double() * upstream).sum().backward()
        return [x.grad for x in tensors] + ([second.grad] if learned else [])

    def op(spec, q, k, v, extras):
        with fxfuse.config.patch(interpret=True):
            return torch.ops.fxfuse.attention(q, k, v, extras, spec.to_json())

    got = grads(spec, leaves, second, op)
    eager = grads(spec, leaves, second, reference)
    f64 = AttentionSpec("float64", tuple(dataclasses.replace(s, dtype="float64") for s in spec.steps),
                        "float64", spec.inputs)
    exact = grads(f64, [x.double() for x in leaves], second.double(), reference)
    for name, g, e, x in zip(["dq", "dk", "dv", "d temperature", "d bias"], got, eager, exact):
        assert g is not None and g.dtype == t, name
        assert_close_to_reference(g, e, x, f"{name} ({kind})")


# Tile sizes other than the interpreter's 16x16: the loop split into masked and full tiles, the
# causal and window ranges and the longest-rows-first order must hold for any BLOCK_M / BLOCK_N.
TILE_CONFIGS = [LaunchConfig(32, 16, 4, 2), LaunchConfig(16, 32, 4, 2), LaunchConfig(32, 64, 4, 3)]


@pytest.mark.parametrize("config", TILE_CONFIGS, ids=str)
@pytest.mark.parametrize("kind", ["causal", "window", "mask_bias", "factor", "softcap"])
@pytest.mark.parametrize("lq,lk", [(37, 37), (3, 70), (70, 45)])
def test_kernels_are_exact_at_every_tile_size(lq, lk, kind, config):
    from fxfuse.runtime.attention import backward as kernel_backward

    spec = _spec(kind, "float32")
    q, k = torch.randn(B, H, lq, D), torch.randn(B, H, lk, D)
    v = torch.randn(B, H, lk, D + 4)
    extras = _extras(kind, lq, lk)
    upstream = torch.randn(B, H, lq, D + 4, dtype=torch.float64)
    out = kernel_forward(spec, q, k, v, extras, config=config)[0]
    eager = reference(spec, q, k, v, extras)
    f64 = AttentionSpec("float64", tuple(dataclasses.replace(s, dtype="float64") for s in spec.steps),
                        "float64", spec.inputs)
    wide = [e.double() if e.is_floating_point() else e for e in extras]
    exact = reference(f64, q.double(), k.double(), v.double(), wide)
    nan = exact.isnan()  # more queries than keys: the first rows see no key under the causal rule
    assert torch.equal(out.isnan(), nan)
    assert_close_to_reference(out.masked_fill(nan, 0), eager.masked_fill(nan, 0), exact.masked_fill(nan, 0), "out")
    got = kernel_backward(spec, upstream.float(), q, k, v, extras, config=config)
    for name, g, e, r in zip("qkv", got, _autograd_grads(spec, q, k, v, extras, upstream),
                             _autograd_grads(f64, q.double(), k.double(), v.double(), wide, upstream)):
        hole = r.isnan()
        assert_close_to_reference(g.masked_fill(hole, 0), e.masked_fill(hole, 0), r.masked_fill(hole, 0), f"d{name}")


def test_the_tuner_times_each_candidate_once_per_key_and_keeps_the_fastest(monkeypatch):
    """The autotuning hook without a GPU: candidate configs are timed by an injected benchmark
    (here: a fake clock favouring 16x32), the winner is remembered per key, and every candidate's
    launch computes the right output."""
    import fxfuse.runtime.attention as launches
    from fxfuse.runtime import configs

    candidates = [LaunchConfig(16, 16, 1, 1), LaunchConfig(16, 32, 1, 1), LaunchConfig(32, 16, 1, 1)]
    monkeypatch.setattr(launches, "launch_configs", lambda *a, **kw: candidates)
    timed = []

    def fake_bench(run):
        run()  # the candidate really launches
        timed.append(1)
        return 1.0 if len(timed) % 3 == 2 else 5.0  # the second candidate (16x32) is fastest

    spec = _spec("causal", "float32")
    q, k, v = torch.randn(3, B, H, 45, D).unbind(0)
    with configs.bench_hook(fake_bench):
        out = kernel_forward(spec, q, k, v, [])[0]
        assert len(timed) == 3
        (key, chosen), = configs.chosen().items()
        assert chosen == LaunchConfig(16, 32, 1, 1) and key[2:4] == (D, D) and key[-1] is True
        kernel_forward(spec, q, k, v, [])  # the same key: no more timing
        kernel_forward(spec, *(t[:, :, :40].contiguous() for t in (q, k, v)), [])  # 40 and 37: one length bucket
        assert len(timed) == 3
    torch.testing.assert_close(out, reference(spec, q, k, v, []), rtol=1e-5, atol=1e-5)
    assert key not in configs.chosen()  # the hook forgets its choices (and restores the ones before it)


def test_config_lists_follow_the_arch_head_dim_dtype_and_length():
    from fxfuse.runtime.configs import INTERPRETER, attention_configs

    assert attention_configs(None, "forward", 128, 128, "bfloat16", 4096, 4096) == [INTERPRETER]
    h100 = attention_configs(90, "forward", 128, 128, "bfloat16", 4096, 4096)
    assert 1 < len(h100) <= 8 and all(c.BLOCK_M in (64, 128) and c.BLOCK_N in (16, 32, 64, 128) for c in h100)
    assert h100[-1] == LaunchConfig(64, 16, 4, 2)  # the fallback that never spills (--target sm_90), last
    assert LaunchConfig(128, 64, 8, 3) in h100 and LaunchConfig(128, 128, 8, 3) not in h100  # it spills at D=128
    assert LaunchConfig(128, 128, 8, 3) in attention_configs(90, "forward", 64, 64, "bfloat16", 4096, 4096)
    assert all(c.BLOCK_M == 16 for c in attention_configs(90, "forward", 128, 128, "bfloat16", 1, 8192))  # decoding
    # dq holds only its float32 dq tile in registers: 128x64 at D=128 compiles without spills
    # (--target sm_90: 206-226 registers), 128x128 spills
    dq = attention_configs(90, "backward_dq", 128, 128, "bfloat16", 4096, 4096)
    assert LaunchConfig(128, 64, 8, 3) in dq and LaunchConfig(128, 128, 8, 2) not in dq
    assert all(c.num_stages <= 3 for c in attention_configs(80, "forward", 64, 64, "bfloat16", 4096, 4096))
    assert all(c.BLOCK_M <= 64 and c.BLOCK_N <= 64 for c in attention_configs(90, "forward", 64, 64, "float32", 4096, 4096))


def test_differential_config_lists_hold_both_halves():
    """A differential program holds two query (key) tiles, two score tiles and two accumulators:
    at D=128 on sm_90 (--target sm_90, bf16) the configs that spill there are not tried, those
    that fit are."""
    from fxfuse.runtime.configs import attention_configs

    def tried(function):
        return attention_configs(90, function, 128, 128, "bfloat16", 4096, 4096, halves=2)

    forward, dkdv, dq = tried("forward"), tried("backward_dkdv"), tried("backward_dq")
    assert LaunchConfig(128, 32, 8, 2) in forward and LaunchConfig(64, 16, 4, 2) in forward
    assert not {LaunchConfig(128, 64, 8, 2), LaunchConfig(64, 64, 4, 2)} & set(forward)
    assert LaunchConfig(32, 64, 8, 2) in dkdv and LaunchConfig(64, 64, 8, 2) not in dkdv
    assert LaunchConfig(128, 32, 8, 2) in dq and not {LaunchConfig(128, 64, 8, 2), LaunchConfig(64, 64, 4, 2)} & set(dq)
