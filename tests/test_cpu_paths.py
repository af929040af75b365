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


def _assert_grads_match_eager(module, model, inputs):
    """``module``'s output and input gradients equal ``model``'s (eager) against float64; returns
    (got, eager)."""
    got = _grads(module, torch.float32, inputs)
    eager = _grads(model, torch.float32, inputs)
    want = _grads(model.double(), torch.float64, inputs)
    model.float()
    for i, (g, e, w) in enumerate(zip(got, eager, want)):
        assert_close_to_reference(g, e, w, f"output/gradient {i}")
    return got, eager


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
    _assert_grads_match_eager(res.module, model, (x,))
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


class _AdditiveMask(nn.Module):  # a float (B, 1, 1, L) mask added to the scores
    def forward(self, q, k, v, mask):
        return (q @ k.transpose(-1, -2) * 0.3 + mask).softmax(-1) @ v


class _TorchCalls(torch.overrides.TorchFunctionMode):
    """The names of the torch functions and tensor methods called under it."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.names.append(getattr(func, "__name__", str(func)))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("hide_a_row", [False, True])
def test_an_additive_mask_without_neg_inf_skips_the_hidden_row_check(hide_a_row):
    # SDPA gives zeros where every score of a row is -inf, the user's softmax NaN: the CPU path
    # fills such rows with NaN. Checking for them took an (B, H, Lq, Lk) comparison, a reduction and
    # a masked copy of the output (0.2 of Swin's 0.5 ms window site); a mask whose min is finite
    # (transformers' finfo.min masks, biases) has no such row: one reduction decides it.
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 6, 8, generator=g) for _ in range(3))
    mask = torch.zeros(2, 1, 1, 6)
    mask[1, ..., :2] = torch.finfo(torch.float32).min
    if hide_a_row:
        mask[0] = float("-inf")  # every key of the first sequence hidden: NaN rows in eager
    model = _AdditiveMask()
    res = fxfuse.rewrite(model, (q, k, v, mask))
    assert [m.kind for m in res.matches] == ["attention"]
    calls = _TorchCalls()
    with torch.no_grad(), calls:
        got = res.module(q, k, v, mask)
    filled = [n for n in calls.names if n in ("masked_fill", "__eq__", "all")]
    assert "scaled_dot_product_attention" in calls.names
    assert filled == (["__eq__", "all", "masked_fill"] if hide_a_row else []), calls.names
    want = model(q, k, v, mask)
    assert torch.equal(torch.isnan(got), torch.isnan(want)) and torch.isnan(want).any() == hide_a_row
    want64 = model(*(t.double() for t in (q, k, v, mask)))
    assert_close_to_reference(got.nan_to_num(), want.nan_to_num(), want64.nan_to_num(), "output")


def test_contiguous_strides_are_torchs_and_the_attention_output_check_uses_them():
    from torch._prims_common import make_contiguous_strides_for

    from fxfuse.runtime.arguments import contiguous_strides

    for shape in [(), (3,), (2, 0, 4), (1, 5, 1, 2), (2, 3, 4, 5), (0,), (1, 1)]:
        assert contiguous_strides(shape) == tuple(make_contiguous_strides_for(shape)), shape
    assert "make_contiguous_strides_for" not in vars(attention_op)  # the ~45 us helper, per call


def test_a_layer_norm_sites_proof_runs_once_per_spec_not_per_call():
    import fxfuse.ops.norm as norm_op

    model, x = nn.LayerNorm(16), torch.randn(2, 4, 16)
    res = fxfuse.rewrite(model, (x,))
    with torch.no_grad():
        res.module(x)
        before = norm_op._layer_norm_plan.cache_info()
        for _ in range(3):
            got = res.module(x)
        after = norm_op._layer_norm_plan.cache_info()
    assert after.misses == before.misses and after.hits == before.hits + 3
    torch.testing.assert_close(got, model(x), rtol=0, atol=0)


def test_the_training_reference_takes_q_whole_and_checks_no_values_sdpa_would_not_use(monkeypatch):
    # One chunk of rows: q itself, not a slice (whose backward is a zero-filled copy of dq); a masked
    # site trains through the reference, so the finite-values check for SDPA is not run at all.
    model = PaddingMaskFill()
    q, k, v, keep = model.inputs(torch.float32)
    res = fxfuse.rewrite(model, (q, k, v, keep))
    checks = _spy(monkeypatch, "_sdpa_exact_on")
    inputs = [t.clone().requires_grad_() if t.is_floating_point() else t for t in (q, k, v, keep)]
    out = res.module(*inputs)
    seen, todo = set(), [out.grad_fn]
    while todo:
        fn = todo.pop()
        if fn is not None and fn not in seen:
            seen.add(fn)
            todo += [f for f, _ in fn.next_functions]
    assert not checks
    assert "SliceBackward0" not in {type(f).__name__ for f in seen}, sorted({type(f).__name__ for f in seen})
    got = _grads(res.module, torch.float32, (q, k, v, keep))
    eager, want = _grads(model, torch.float32, (q, k, v, keep)), _grads(model, torch.float64, (q, k, v, keep))
    for i, (g, e, w) in enumerate(zip(got, eager, want)):
        assert_close_to_reference(g, e, w, f"output/gradient {i}")


def test_the_executed_graph_calls_aten_without_the_opoverload_wrapper():
    # OpOverload.__call__ is one Python frame around ``self._op``: 1-2 us on each small op, the most
    # of a graph's nodes. The executed copy calls ``_op`` (in a partial) with the same arguments.
    from fxfuse.demo import NaiveTransformer

    model, x = NaiveTransformer(dim=16, heads=2, layers=1), torch.randn(2, 8, 16)
    res = fxfuse.rewrite(model, (x,))
    (graph,) = res.module._graphs.values()
    executed = graph.run.__self__
    targets = [n.target for n in executed.graph.nodes if n.op == "call_function"]
    assert any(isinstance(n.target, torch._ops.OpOverload) for n in res.graph.graph.nodes)  # the reported graph
    assert targets and not any(isinstance(t, torch._ops.OpOverload) for t in targets)
    aten = {n.name: n.target for n in graph.captured.gm.graph.nodes
            if isinstance(n.target, torch._ops.OpOverload) and n.target.namespace == "aten"}
    called = {n.name: n.target for n in executed.graph.nodes if n.name in aten}
    assert aten and all(called[name].func is op._op and not called[name].args for name, op in aten.items())
    _assert_grads_match_eager(res.module, model, (x,))


def test_a_layer_norm_on_a_transposed_view_makes_its_contiguous_output_once():
    # F.layer_norm of a transposed view (a patch embedding: conv, flatten, transpose) is contiguous;
    # the operator promises the input's strides, so the graph copied its output back (clone). The
    # executed graph folds the two: one contiguous output, no clone, the same values and gradients.
    class PatchNorm(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj, self.norm = nn.Conv2d(3, 16, 2, stride=2), nn.LayerNorm(16)

        def forward(self, img):
            return self.norm(self.proj(img).flatten(2).transpose(1, 2)) * 2

    model, img = PatchNorm(), torch.randn(2, 3, 8, 8)
    res = fxfuse.rewrite(model, (img,))
    assert [m.kind for m in res.matches] == ["layer_norm"]
    clones = [n for n in res.graph.graph.nodes if n.target is torch.ops.aten.clone.default]
    assert clones  # the reported graph: the operator, then the copy to F.layer_norm's layout
    (graph,) = res.module._graphs.values()
    executed = graph.run.__self__.graph
    assert not [n for n in executed.nodes if getattr(n.target, "func", None) is torch.ops.aten.clone.default._op]
    got, eager = _assert_grads_match_eager(res.module, model, (img,))
    assert got[0].stride() == eager[0].stride()
