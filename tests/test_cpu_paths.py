"""The fused attention operator's fast CPU paths (no Triton, no Inductor): a causal site with as many
queries as keys runs SDPA with ``is_causal`` (its kernel skips hidden tiles), and its backward goes
through SDPA's own backward instead of the explicit formula; results stay within the tolerance
table of the float64 reference. A row that sees no key keeps the formula (NaN as in eager). The
rewritten module calls its CPU sites' implementations directly (no operator dispatch), and a layer
norm site runs ATen's fused layer_norm."""
import pytest
import torch
import torch.nn as nn

import fxfuse
import fxfuse.api
import fxfuse.ops.attention as attention_op
from tests.attention_styles import CausalArangeWhere, PaddingMaskFill
from tests.tolerances import assert_close_to_reference


def _grads(model, dtype, inputs):
    inputs = [t.detach().to(dtype).clone().requires_grad_() if t.is_floating_point() else t for t in inputs]
    out = model(*inputs)
    out.pow(2).sum().backward()
    return [out.detach(), *(t.grad for t in inputs if t.is_floating_point())]


def _spy(monkeypatch, name):
    calls = []
    real = getattr(attention_op, name)
    monkeypatch.setattr(attention_op, name, lambda *a, **k: calls.append(k) or real(*a, **k))
    return calls


def test_causal_site_runs_sdpa_is_causal_forward_and_its_backward(monkeypatch):
    model = CausalArangeWhere()
    inputs = model.inputs(torch.float32)
    res = fxfuse.rewrite(model, inputs)
    assert [m.kind for m in res.matches] == ["attention"]
    sdpa_calls = []
    real_sdpa = attention_op.F.scaled_dot_product_attention
    monkeypatch.setattr(attention_op.F, "scaled_dot_product_attention",
                        lambda *a, **k: sdpa_calls.append(k) or real_sdpa(*a, **k))
    formula = _spy(monkeypatch, "reference_backward")
    got = _grads(res.module, torch.float32, inputs)
    assert sdpa_calls and all(k.get("is_causal") and k.get("attn_mask") is None for k in sdpa_calls), sdpa_calls
    assert len(sdpa_calls) == 1 and not formula  # the forward; the backward is ATen's flash backward
    eager = _grads(model, torch.float32, inputs)
    want = _grads(model, torch.float64, inputs)
    for i, (g, e, w) in enumerate(zip(got, eager, want)):
        assert_close_to_reference(g, e, w, f"output/gradient {i}")


@pytest.mark.parametrize("through", ["operator", "direct call"])
def test_a_row_that_sees_no_key_keeps_the_formula_and_eagers_nan(monkeypatch, through):
    model = PaddingMaskFill()
    q, k, v, keep = model.inputs(torch.float32)
    keep[0] = False  # the first sequence hides every key: its rows are NaN in eager
    if through == "operator":  # as under torch.compile's inner="eager": the operator and its backward
        monkeypatch.setattr(fxfuse.api, "direct_cpu_calls", lambda gm: gm)
    res = fxfuse.rewrite(model, (q, k, v, keep))
    formula, sdpa = _spy(monkeypatch, "reference_backward"), _spy(monkeypatch, "_sdpa")
    got = _grads(res.module, torch.float32, (q, k, v, keep))
    want = _grads(model, torch.float32, (q, k, v, keep))
    if through == "operator":
        assert formula, "SDPA's backward would have zeroed the NaN rows' gradients"
    else:  # autograd differentiates the reference: SDPA's backward would have zeroed them
        assert not sdpa and not formula
    for g, w in zip(got, want):
        assert torch.equal(torch.isnan(g), torch.isnan(w))
        torch.testing.assert_close(g.nan_to_num(), w.nan_to_num(), rtol=1e-5, atol=1e-5)


def test_rewritten_module_calls_its_cpu_sites_directly_and_the_triton_kernels_when_asked(monkeypatch):
    # The operators' dispatch costs tens of microseconds a call on CPU, as much as a small site: the
    # module runs a copy of the graph whose CPU sites call their implementations (fxfuse.cpu_calls).
    import fxfuse.runtime.norm
    from fxfuse.demo import NaiveTransformer

    model, x = NaiveTransformer(dim=16, heads=2, layers=1), torch.randn(2, 8, 16)
    res = fxfuse.rewrite(model, (x,))
    (graph,) = res.module._graphs.values()
    assert "torch.ops.fxfuse.attention" in res.graph.code and "torch.ops.fxfuse.norm" in res.graph.code
    assert "torch.ops.fxfuse" not in graph.run.__self__.code  # the executed copy
    got = _grads(res.module, torch.float32, (x,))
    eager = _grads(model, torch.float32, (x,))
    want = _grads(model.double(), torch.float64, (x,))
    model.float()
    for i, (g, e, w) in enumerate(zip(got, eager, want)):
        assert_close_to_reference(g, e, w, f"output/gradient {i}")
    launches = []
    forward = fxfuse.runtime.norm.forward
    monkeypatch.setattr(fxfuse.runtime.norm, "forward", lambda *a, **k: launches.append(1) or forward(*a, **k))
    with fxfuse.config.patch(interpret=True), torch.no_grad():
        res.module(x)
    assert launches, "interpret=True did not reach the operators"


def test_a_layer_norm_site_runs_atens_layer_norm_on_cpu():
    # ATen's fused layer_norm computes the spec in one pass (the reference takes eight ops, several
    # times slower): F.layer_norm's site gives eager's values bit for bit, forward and backward.
    model = nn.LayerNorm(256)
    nn.init.normal_(model.weight)
    nn.init.normal_(model.bias)
    x = torch.randn(4, 16, 256) * 3 + 1
    res = fxfuse.rewrite(model, (x,))
    assert [m.kind for m in res.matches] == ["layer_norm"]
    got, want = _grads(res.module, torch.float32, (x,)), _grads(model, torch.float32, (x,))
    for g, w in zip(got, want):
        assert torch.equal(g, w)
    with torch.no_grad():  # the operator's own CPU path too
        assert torch.equal(torch.ops.fxfuse.norm(x, [model.weight, model.bias], res.matches[0].spec.to_json()), model(x))


def test_fused_cpu_backward_on_keys_stored_transposed():
    """Keys laid out (B, H, D, L) and read transposed: ATen's fused CPU backward gives wrong
    gradients on such strides, so the operator hands it contiguous operands."""
    from fxfuse.spec_attention import AttentionSpec, ScoreStep

    spec = AttentionSpec("float32", (ScoreStep("div", "float32", value=4.0),)).to_json()
    g = torch.Generator().manual_seed(0)
    q, v = (torch.randn(2, 2, 5, 16, generator=g, requires_grad=True) for _ in range(2))
    k_dl = torch.randn(2, 2, 16, 5, generator=g, requires_grad=True)
    got = torch.autograd.grad(torch.ops.fxfuse.attention(q, k_dl.transpose(2, 3), v, [], spec).sum(), (q, k_dl, v))
    args64 = [t.detach().double().requires_grad_() for t in (q, k_dl, v)]
    eager = torch.autograd.grad((((q @ k_dl) / 4).softmax(-1) @ v).sum(), (q, k_dl, v))
    out64 = (((args64[0] @ args64[1]) / 4).softmax(-1) @ args64[2]).sum()
    for a, e, r in zip(got, eager, torch.autograd.grad(out64, args64)):
        assert_close_to_reference(a, e, r, "gradient")
