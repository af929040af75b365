"""torch.compile(backend="fxfuse", options={"inner": "eager"}) in training on CPU: each fused site
reaches AOTAutograd as the form the composed backend hands Inductor (fxfuse/inductor.py), so its
backward is SDPA's fused one or autograd's of the reference (what the user's code saved), never
the operators' backward, which recomputes the forward (GPT-2's training step took 1.6x eager's
time that way). Inference keeps the operators; ``keep_operators=True`` keeps them in training.
The sinks and sigmoid sites (issue 12) are checked against float64 autograd of the user's code."""
import pytest
import torch

import fxfuse
from fxfuse.demo import NaiveTransformer
from tests import attention_styles as styles
from tests.attention_variant_styles import SigmoidCausalLearnedBias, SinksGptOss
from tests.norm_styles import LlamaStyleRMSNorm, TorchLayerNorm
from tests.norm_sum_styles import DeepNormPostLN
from tests.polynorm_styles import RsqrtPolyNorm
from tests.tolerances import assert_close_to_reference


class _FxfuseOps:
    """The fxfuse operators (forward or backward ones) that ran, by name, as the profiler saw them
    (a dispatch mode would make Dynamo trace it instead of running the compiled graphs)."""

    def __enter__(self):
        self.prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
        self.prof.__enter__()
        return self

    def __exit__(self, *exc):
        self.prof.__exit__(*exc)
        self.ops = [e.key.split("::", 1)[1] for e in self.prof.key_averages() if e.key.startswith("fxfuse::")]


def _step(fn, model, inputs):
    for p in model.parameters():
        p.grad = None
    leaves = [t.detach().requires_grad_() if t.is_floating_point() else t for t in inputs]
    out = fn(*leaves)
    out.pow(2).sum().backward()
    return [out, *(t.grad for t in leaves if t.requires_grad), *(p.grad for p in model.parameters())]


def _compiled(model, keep_operators=False):
    # keep_operators given: conftest runs the other tests with True
    torch._dynamo.reset()
    return torch.compile(model, backend=fxfuse.Backend(inner="eager", keep_operators=keep_operators))


@pytest.mark.parametrize("style", [SinksGptOss, SigmoidCausalLearnedBias], ids=["sinks", "sigmoid"])
def test_sinks_and_sigmoid_train_without_the_operators_backward(style, monkeypatch):
    model = style()
    inputs = model.inputs(torch.float32)
    compiled = _compiled(model)
    reruns = []
    import fxfuse.ops.attention as attention_op

    real = attention_op.reference_backward
    monkeypatch.setattr(attention_op, "reference_backward", lambda *a, **k: reruns.append(1) or real(*a, **k))
    _step(compiled, model, inputs)  # compiles
    with _FxfuseOps() as seen:
        got = _step(compiled, model, inputs)
    assert not seen.ops and not reruns, (seen.ops, reruns)  # no operator, no forward recomputed for the backward
    eager = _step(model, model, inputs)
    want = _step(model.double(), model, [t.double() for t in inputs])
    model.float()
    for i, (g, e, w) in enumerate(zip(got, eager, want)):
        assert_close_to_reference(g, e, w, f"output/gradient {i}")


def test_training_sites_fused_and_their_forms_reach_autograd():
    model, x = NaiveTransformer(dim=16, heads=2, layers=1), torch.randn(2, 8, 16)
    be = fxfuse.Backend(inner="eager", keep_operators=False)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=be)
    _step(compiled, model, (x,))
    with _FxfuseOps() as seen:
        got = _step(compiled, model, (x,))
    assert be.matches and not seen.ops, seen.ops  # fused (reported), run as their forms
    for g, w in zip(got, _step(model, model, (x,))):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_inference_calls_the_operators_implementations_and_keep_operators_runs_the_operators():
    # Inference keeps the fused sites, which AOTAutograd's forward (grad off) calls as their
    # operators' CPU implementations directly (fxfuse.cpu_calls): no dispatch, 35 us a call.
    model, x = NaiveTransformer(dim=16, heads=2, layers=1), torch.randn(2, 8, 16)
    compiled = _compiled(model)
    with torch.no_grad():
        compiled(x)
        with _FxfuseOps() as seen:
            got = compiled(x)
        want = model(x)
    assert compiled is not model and not seen.ops, seen.ops
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # and training: both AOTAutograd graphs call ATen without OpOverload.__call__ (cpu_calls)
    from fxfuse import backend as backend_module

    graphs = []
    boxed = backend_module._boxed
    backend_module._boxed = lambda gm, options: graphs.append(gm) or boxed(gm, options)
    try:
        got = _step(_compiled(model), model, (x,))
    finally:
        backend_module._boxed = boxed
    assert len(graphs) == 2 and all(
        n.op != "call_function" or not isinstance(n.target, torch._ops.OpOverload) for gm in graphs for n in gm.graph.nodes)
    for g, w in zip(got, _step(model, model, (x,))):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    compiled = _compiled(model, keep_operators=True)
    with torch.no_grad():
        compiled(x)
        with _FxfuseOps() as seen:
            compiled(x)
    assert "attention" in seen.ops and "norm" in seen.ops, seen.ops
    _step(compiled, model, (x,))
    with _FxfuseOps() as seen:
        _step(compiled, model, (x,))
    assert "attention_backward" in seen.ops and "norm_backward" in seen.ops, seen.ops


_DIRECT_STYLES = [styles.PaddingMaskFill, styles.AdditiveMaskBert, styles.RelativeBias, styles.CausalArangeWhere,
                  styles.GroupedQueryRepeatInterleave, styles.SoftcapGemma2, styles.AlibiSlopes,
                  styles.SafeSoftmaxPaddedQueries]


@pytest.mark.parametrize("style", _DIRECT_STYLES + [TorchLayerNorm, LlamaStyleRMSNorm, DeepNormPostLN, RsqrtPolyNorm],
                         ids=lambda c: c.__name__)
def test_inference_sites_called_directly_give_the_operators_values(style):
    # AOTAutograd's forward calls each CPU site's implementation without the operator (see above):
    # the values must be the operator's, checked against float64 eager for each kind of site.
    if style in _DIRECT_STYLES:
        model = style()
        inputs = model.inputs(torch.float32)
    elif style is RsqrtPolyNorm:
        model, inputs = style(), [torch.randn(2, 5, 16)]
    else:
        model = style(16)
        inputs = [torch.randn(2, 5, 16)]
    compiled = _compiled(model)
    with torch.no_grad():
        compiled(*inputs)
        with _FxfuseOps() as seen:
            got = compiled(*inputs)
        eager = model(*inputs)
        want = model.double()(*(t.double() if t.is_floating_point() else t for t in inputs))
    model.float()
    assert not seen.ops, seen.ops
    for g, e, w in zip(*(o if isinstance(o, tuple) else (o,) for o in (got, eager, want))):
        assert torch.equal(torch.isnan(g), torch.isnan(e))
        assert_close_to_reference(g.nan_to_num(), e.nan_to_num(), w.nan_to_num(), style.__name__)


def test_polynorm_keeps_its_operator_whose_closed_form_backward_is_faster_op_by_op():
    # Its CPU backward (ops.polynorm_cpu) is closed-form: op by op it beat autograd of the reference
    # (PolyCom MLP training: 0.85x eager as the reference, 1.5x as the operator).
    import copy

    from tests.polynorm_styles import RsqrtPolyNorm

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), RsqrtPolyNorm())
    inputs = [torch.randn(2, 5, 16)]
    compiled = _compiled(model)
    _step(compiled, model, inputs)  # compiles
    with _FxfuseOps() as seen:
        got = _step(compiled, model, inputs)
    # the forward's site called as the operator's implementation (AOTAutograd's forward runs with
    # grad off), the backward the operator's
    assert "polynorm_backward" in seen.ops and "polynorm" not in seen.ops, seen.ops
    eager = _step(model, model, inputs)
    reference = copy.deepcopy(model).double()
    want = _step(reference, reference, [t.double() for t in inputs])
    for i, (g, e, w) in enumerate(zip(got, eager, want)):
        assert_close_to_reference(g, e, w, f"output/gradient {i}")
