"""The differential backward kernels (fxfuse.codegen.attention_differential_backward) through the
interpreter, against float64: a padding mask (a boolean extra), a bias that needs no gradient
(read by the kernels, its gradient not asked), causal with Lq < Lk, lambda scalar and per head;
that the backward runs no forward (it reads the forward's statistics and halves) and no per-half
backward; and that statistics a forward did not write (NaN) are recomputed, to the same gradients."""
import pytest
import torch

import fxfuse
from fxfuse.runtime import attention as plain_kernels
from fxfuse.runtime import attention_differential as kernels
from fxfuse.spec_attention import AttentionSpec, ScoreStep
from tests.tolerances import assert_close_to_reference

B, H, LQ, LK, D = 2, 2, 13, 18, 16
NAMES = ["dq1", "dk1", "dq2", "dk2", "dv", "dlambda"]


def _spec(dtype: str, mask: bool, bias: bool, causal: bool) -> AttentionSpec:
    steps = [ScoreStep("mul", dtype, value=D ** -0.5)]
    inputs = []
    if mask:
        steps.append(ScoreStep("fill", dtype, value=float("-inf"), input=len(inputs), invert=True))
        inputs.append("mask")
    if bias:
        steps.append(ScoreStep("add", dtype, input=len(inputs)))
        inputs.append("bias")
    if causal:
        steps.append(ScoreStep("fill", dtype, value=float("-inf")))
    return AttentionSpec(dtype, tuple(steps), dtype, tuple(inputs), differential=True)


def _extras(mask: bool, bias: bool, dtype, g):
    extras = []
    if mask:  # padding: batch 1's last 5 keys hidden; every row keeps a key
        keep = torch.ones(B, 1, 1, LK, dtype=torch.bool)
        keep[1, ..., LK - 5:] = False
        extras.append(keep)
    if bias:
        extras.append(torch.randn(1, H, LQ, LK, generator=g, dtype=torch.float64).to(dtype))
    return extras


def _reference(q1, k1, q2, k2, v, lam, extras, spec: AttentionSpec):
    hidden = torch.ones(LQ, LK, dtype=torch.bool).triu(LK - LQ + 1)

    def attend(q, k):
        s = q @ k.transpose(-1, -2) * D ** -0.5
        for step in spec.steps[1:]:
            if step.op == "fill" and step.input >= 0:
                s = s.masked_fill(~extras[step.input], float("-inf"))
            elif step.op == "add":
                s = s + extras[step.input].to(s.dtype)
            else:
                s = s.masked_fill(hidden, float("-inf"))
        return torch.softmax(s, -1) @ v

    return attend(q1, k1) - lam * attend(q2, k2)


def _case(dtype, lam_shape, mask, bias, causal):
    g = torch.Generator().manual_seed(7)
    r = lambda *s: torch.randn(s, generator=g, dtype=torch.float64).to(dtype)  # noqa: E731
    tensors = [r(B, H, LQ, D), r(B, H, LK, D), r(B, H, LQ, D), r(B, H, LK, D), r(B, H, LK, D), 0.4 + 0.1 * r(*lam_shape)]
    return [t.requires_grad_() for t in tensors], _extras(mask, bias, dtype, g), r(B, H, LQ, D)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("lam_shape,mask,bias,causal", [((), True, False, False), ((H, 1, 1), True, True, True),
                                                        ((B, H, 1, 1), False, False, True)],
                         ids=["scalar-padding", "per-head-padding-bias-causal", "per-bh-causal"])
def test_fused_backward_matches_float64(dtype, lam_shape, mask, bias, causal):
    spec = _spec(str(dtype).removeprefix("torch."), mask, bias, causal)
    tensors, extras, upstream = _case(dtype, lam_shape, mask, bias, causal)
    with fxfuse.config.patch(interpret=True):
        out = torch.ops.fxfuse.attention_differential(*tensors, extras, spec.to_json())[0]
        got = torch.autograd.grad(out, tensors, upstream)
    wide = [t.detach().double().requires_grad_() for t in tensors]
    wide_extras = [e if e.dtype == torch.bool else e.double() for e in extras]
    ref = torch.autograd.grad(_reference(*wide, wide_extras, spec), wide, upstream.double())
    eager = torch.autograd.grad(_reference(*tensors, extras, spec), tensors, upstream)
    for name, g, e, r, t in zip(NAMES, got, eager, ref, tensors):
        assert g.shape == t.shape and g.dtype == t.dtype, name
        assert_close_to_reference(g, e, r, name)


def _counting(monkeypatch):
    calls = {"forward": 0, "plain": 0, "backward": 0}

    def counted(key, fn):
        def wrapper(*args, **kwargs):
            calls[key] += 1
            return fn(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(kernels, "forward", counted("forward", kernels.forward))
    monkeypatch.setattr(kernels, "backward", counted("backward", kernels.backward))
    monkeypatch.setattr(plain_kernels, "forward", counted("plain", plain_kernels.forward))
    monkeypatch.setattr(plain_kernels, "backward", counted("plain", plain_kernels.backward))
    return calls


def test_backward_runs_no_forward(monkeypatch):
    spec = _spec("float32", True, False, True)
    tensors, extras, upstream = _case(torch.float32, (H, 1, 1), True, False, True)
    calls = _counting(monkeypatch)
    with fxfuse.config.patch(interpret=True):
        out = torch.ops.fxfuse.attention_differential(*tensors, extras, spec.to_json())[0]
        assert calls == {"forward": 1, "plain": 0, "backward": 0}
        torch.autograd.grad(out, tensors, upstream)
    assert calls == {"forward": 1, "plain": 0, "backward": 1}, "the backward ran a forward or a per-half kernel"


def test_statistics_a_forward_did_not_write_are_recomputed(monkeypatch):
    spec = _spec("float32", True, False, True).to_json()
    tensors, extras, upstream = _case(torch.float32, (), True, False, True)
    args = [t.detach() for t in tensors]
    with fxfuse.config.patch(interpret=True), torch.no_grad():
        _, stats, halves = torch.ops.fxfuse.attention_differential(*args, extras, spec)
        saved = torch.ops.fxfuse.attention_differential_backward(upstream, *args, stats, halves, extras,
                                                                 [True, False], spec)
        calls = _counting(monkeypatch)
        again = torch.ops.fxfuse.attention_differential_backward(upstream, *args, torch.full_like(stats, float("nan")),
                                                                 halves, extras, [True, False], spec)
    assert calls["forward"] == 1  # the statistics were recomputed, once for both halves
    for name, a, b in zip(NAMES, saved, again):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_compiled_training_saves_the_statistics(monkeypatch):
    """Under torch.compile AOTAutograd saves the operator's statistics and halves for its backward:
    one differential forward and one fused backward per step, gradients as eager's (float64)."""
    import copy

    from tests.attention_differential_styles import DiffFlashStyleSDPA

    model = DiffFlashStyleSDPA()
    inputs = [t.requires_grad_() for t in model.inputs(torch.float32)]
    wide_model = copy.deepcopy(model).double()
    wide = [t.detach().double().requires_grad_() for t in inputs]
    ref = torch.autograd.grad(wide_model(*wide).pow(2).sum(), [*wide, *wide_model.parameters()])
    eager_model = copy.deepcopy(model)
    eager = torch.autograd.grad(eager_model(*inputs).pow(2).sum(), [*inputs, *eager_model.parameters()])
    with fxfuse.config.patch(interpret=True):
        compiled = torch.compile(model, backend="fxfuse")
        compiled(*inputs)  # compiles (the capture runs the operator on fake tensors only)
        calls = _counting(monkeypatch)
        got = torch.autograd.grad(compiled(*inputs).pow(2).sum(), [*inputs, *model.parameters()])
    assert calls == {"forward": 1, "plain": 0, "backward": 1}, calls
    for g, e, r in zip(got, eager, ref):
        assert_close_to_reference(g, e, r, "gradient")
