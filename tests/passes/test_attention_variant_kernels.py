"""The fused operator's variants on their own (issue 12): a spec with attention sinks, and sigmoid
attention, on the torch reference, on the generated Triton kernels (interpreted) and through the
operator's autograd, each against float64 autograd of the plain formula, at lengths that are not
multiples of the tile, with and without a causal mask (its tiles skipped). The sinks' gradient
``d c = -p_sink * rowsum(dO * O)`` is checked here against autograd of ``cat, softmax, slice``."""
import dataclasses
import math

import pytest
import torch

import fxfuse
from fxfuse.ops.attention import reference, reference_backward
from fxfuse.runtime import attention as kernels
from fxfuse.spec_attention import AttentionSpec, ScoreStep
from tests.tolerances import tolerance

B, H, LQ, LK, D = 2, 2, 5, 19, 8  # LK > one 16-wide key tile, not a multiple of it


def _spec(sigmoid: bool, causal: bool, dtype="float32") -> AttentionSpec:
    steps = [ScoreStep("mul", dtype, value=0.3)]
    if causal:
        steps.append(ScoreStep("fill", dtype, value=-math.inf, input=-1))
    if sigmoid:
        steps.append(ScoreStep("add", dtype, value=-math.log(LK)))
        return AttentionSpec(dtype, tuple(steps), dtype, normalizer="sigmoid")
    return AttentionSpec(dtype, tuple(steps), dtype, inputs=("sink",), sinks=0)


def _formula(q, k, v, sinks, sigmoid: bool, causal: bool):
    """The site as eager code writes it (gpt-oss's cat/softmax/slice; Apple's sigmoid)."""
    s = q @ k.transpose(-1, -2) * 0.3
    if causal:  # bottom-right aligned, as the spec's causal rule
        s = s.masked_fill(torch.ones(LQ, LK, dtype=torch.bool).triu(LK - LQ + 1), -math.inf)
    if sigmoid:
        return torch.sigmoid(s - math.log(LK)) @ v
    joined = torch.cat([s, sinks.reshape(1, -1, 1, 1).expand(B, H, LQ, 1)], dim=-1)
    return joined.softmax(-1)[..., :-1] @ v


def _case(sigmoid, causal):
    q, k, v = (torch.randn(B, H, n, D) for n in (LQ, LK, LK))
    sinks = torch.randn(H) * 2
    leaves = [t.double().requires_grad_() for t in (q, k, v, sinks)]
    expected = _formula(*leaves, sigmoid, causal)
    upstream = torch.randn(expected.shape, dtype=torch.float64)
    (expected * upstream).sum().backward()
    return (q, k, v, sinks), expected, upstream, [t.grad for t in leaves]


def _close(got, want, what):
    rtol, atol = tolerance(torch.float32)
    torch.testing.assert_close(got.double(), want, rtol=rtol, atol=atol, msg=what)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("sigmoid", [False, True], ids=["sinks", "sigmoid"])
def test_reference_and_kernels_match_float64(sigmoid, causal):
    (q, k, v, sinks), expected, upstream, grads = _case(sigmoid, causal)
    spec = _spec(sigmoid, causal)
    extras = [] if sigmoid else [sinks.reshape(1, H, 1, 1).expand(B, H, LQ, 1)]
    out_kernel, _ = kernels.forward(spec, q, k, v, extras)
    for what, out in (("reference", reference(spec, q, k, v, extras)), ("kernel", out_kernel)):
        _close(out, expected, f"{what} output")
    paths = (("reference", reference_backward(spec, upstream.float(), q, k, v, extras)),
             ("kernel", kernels.backward(spec, upstream.float(), q, k, v, extras, [True] * len(extras))))
    for what, got in paths:
        for name, g, want in zip(("dq", "dk", "dv", "d sinks"), got, grads):
            if name == "d sinks":  # the column's gradient, summed over what the expand broadcast
                g = g.sum((0, 2, 3))
            _close(g, want, f"{what} {name}")


@pytest.mark.parametrize("sigmoid", [False, True], ids=["sinks", "sigmoid"])
def test_operator_autograd_matches_float64(sigmoid, cpu_path):
    (q, k, v, sinks), expected, upstream, grads = _case(sigmoid, True)
    leaves = [t.clone().requires_grad_() for t in (q, k, v, sinks)]
    extras = [] if sigmoid else [leaves[3].reshape(1, H, 1, 1).expand(B, H, LQ, 1)]
    out = torch.ops.fxfuse.attention(*leaves[:3], extras, _spec(sigmoid, True).to_json())
    (out.double() * upstream).sum().backward()
    _close(out, expected, "output")
    for name, leaf, want in zip(("dq", "dk", "dv", "d sinks"), leaves, grads):
        if name != "d sinks" or not sigmoid:
            _close(leaf.grad, want, name)


def test_a_sink_row_with_every_key_hidden_gives_zero_not_nan(cpu_path):
    # The sink keeps the row's sum positive: eager's softmax over the joined row gives the keys 0.
    spec = AttentionSpec("float32", (ScoreStep("fill", "float32", value=-math.inf, input=0),), "float32",
                         inputs=("mask", "sink"), sinks=1)
    q, k, v = (torch.randn(1, 1, n, D) for n in (3, 4, 4))
    hidden = torch.zeros(1, 1, 3, 4, dtype=torch.bool)
    hidden[..., 1, :] = True
    out = torch.ops.fxfuse.attention(q, k, v, [hidden, torch.zeros(1, 1, 3, 1)], spec.to_json())
    assert torch.isfinite(out).all() and (out[..., 1, :] == 0).all(), out


def test_new_fields_stay_out_of_the_json_at_their_defaults():
    plain = AttentionSpec("float32", (ScoreStep("mul", "float32", value=0.5),), "float32")
    assert "sinks" not in plain.to_json() and "normalizer" not in plain.to_json()
    for spec in (_spec(True, True), _spec(False, False)):
        assert AttentionSpec.from_json(spec.to_json()) == spec


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_cpu_fast_path_for_sinks_is_flash_attention_rescaled(causal, monkeypatch):
    # ATen's flash CPU attention and its log-sum-exp: the sink's share rescales each row.
    from fxfuse.ops import attention_cpu

    calls = []
    monkeypatch.setattr(attention_cpu, "sdpa_sinks", lambda *a, _f=attention_cpu.sdpa_sinks: calls.append(1) or _f(*a))
    (q, k, v, sinks), expected, _, _ = _case(False, causal)
    extras = [sinks.reshape(1, H, 1, 1).expand(B, H, LQ, 1)]
    with fxfuse.config.patch(interpret=False):
        out = torch.ops.fxfuse.attention(q, k, v, extras, _spec(False, causal).to_json())
    assert calls == [1]
    _close(out, expected, "flash + sinks output")


@pytest.mark.parametrize("shape", [(LQ, 1), (1, H, 1, 1)], ids=["per-row", "per-head"])
def test_cpu_fast_path_moves_row_factors_onto_q(shape, monkeypatch):
    # SSMax's log(i + 1) per query row (or a per-head temperature) before the causal mask: SDPA on
    # q * f, forward and backward, against float64 autograd of the written form.
    from fxfuse.ops import attention_cpu

    calls = []
    monkeypatch.setattr(attention_cpu, "_sdpa", lambda *a, _f=attention_cpu._sdpa: calls.append(1) or _f(*a))
    spec = AttentionSpec("float32", (ScoreStep("mul", "float32", input=0), ScoreStep("mul", "float32", value=0.3),
                                     ScoreStep("fill", "float32", value=-math.inf, input=-1)), "float32",
                         inputs=("factor",))
    q, k, v = (torch.randn(B, H, LQ, D) for _ in range(3))
    factor = torch.rand(shape) + 0.5
    leaves = [t.double().requires_grad_() for t in (q, k, v)]
    s = (leaves[0] @ leaves[1].transpose(-1, -2)) * factor.double() * 0.3
    expected = s.masked_fill(torch.ones(LQ, LQ, dtype=torch.bool).triu(1), -math.inf).softmax(-1) @ leaves[2]
    upstream = torch.randn(expected.shape, dtype=torch.float64)
    (expected * upstream).sum().backward()
    got = [t.clone().requires_grad_() for t in (q, k, v)]
    with fxfuse.config.patch(interpret=False):
        out = torch.ops.fxfuse.attention(*got, [factor], spec.to_json())
        (out.double() * upstream).sum().backward()
    assert calls == [1]
    _close(out, expected, "output")
    for name, g, want in zip(("dq", "dk", "dv"), got, leaves):
        _close(g.grad, want.grad, name)


def test_split_key_decode_kernel_declines_the_variants():
    # The split kernel combines ranges by their row max and sum: it knows neither a sink nor a sigmoid.
    from fxfuse.codegen.attention_decode import splittable

    assert "sinks" in splittable(_spec(False, False))
    assert "normalizer" in splittable(_spec(True, False))


def test_sinks_with_dropout_match_float64_given_the_kernels_mask():
    # Dropout acts on the probabilities after the sink's is dropped; d c = -p_sink * rowsum(dO * O)
    # still holds with the dropped output. The kernels' own mask, given to the float64 formula.
    spec = dataclasses.replace(_spec(False, True), dropout=0.3)
    (q, k, v, sinks), _, upstream, _ = _case(False, True)
    seed = torch.tensor(1234, dtype=torch.int64)
    keep = kernels.dropout_mask(spec, seed, (B, H, LQ, LK), q.device)
    leaves = [t.double().requires_grad_() for t in (q, k, v, sinks)]
    s = (leaves[0] @ leaves[1].transpose(-1, -2) * 0.3).masked_fill(
        torch.ones(LQ, LK, dtype=torch.bool).triu(LK - LQ + 1), -math.inf)
    joined = torch.cat([s, leaves[3].reshape(1, -1, 1, 1).expand(B, H, LQ, 1)], dim=-1)
    p = joined.softmax(-1)[..., :-1] * keep / 0.7
    expected = p @ leaves[2]
    (expected * upstream).sum().backward()
    extras = [sinks.reshape(1, H, 1, 1).expand(B, H, LQ, 1)]
    out, _ = kernels.forward(spec, q, k, v, extras, seed=seed)
    _close(out, expected, "kernel output")
    _close(reference(spec, q, k, v, extras, keep), expected, "reference output")
    for what, got in (("kernel", kernels.backward(spec, upstream.float(), q, k, v, extras, [True], seed=seed)),
                      ("reference", reference_backward(spec, upstream.float(), q, k, v, extras, keep))):
        for name, g, leaf in zip(("dq", "dk", "dv", "d sinks"), got, leaves):
            _close(g.sum((0, 2, 3)) if name == "d sinks" else g, leaf.grad, f"{what} {name}")
