"""Capture keeps eager semantics that a plain ATen trace loses: in-place updates of buffers and
inputs, torch.no_grad() regions, outputs that are inputs; and refuses what it cannot replay."""
import copy
import dataclasses

import pytest
import torch
import torch.nn as nn

import fxfuse
from fxfuse.capture import capture_module


class StatefulBlock(nn.Module):
    """A step counter, hand-written running statistics under no_grad, and a BatchNorm."""

    def __init__(self, d=4):
        super().__init__()
        self.lin, self.bn = nn.Linear(d, d), nn.BatchNorm1d(d)
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self.register_buffer("running", torch.zeros(d))

    def forward(self, x):
        self.steps.add_(1)
        h = self.bn(self.lin(x))
        with torch.no_grad():
            self.running.mul_(0.9).add_(0.1 * h.mean(0))
        return h * self.steps


def _assert_same_state(model, ref):
    for (name, got), (_, want) in zip(model.named_buffers(), ref.named_buffers()):
        torch.testing.assert_close(got, want, msg=name)
        assert not got.requires_grad and got.grad_fn is None, f"buffer {name} carries autograd history"


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_buffers_updated_in_place_match_eager(mode):
    model = StatefulBlock()
    getattr(model, mode)()
    ref = copy.deepcopy(model)
    x = torch.randn(3, 4)
    res = fxfuse.rewrite(model, (x,))
    _assert_same_state(model, StatefulBlock().train(mode == "train"))  # capturing ran nothing
    for _ in range(2):  # the second call must see the first call's updates
        out, want = res.module(x), ref(x)
        out.sum().backward()
        want.sum().backward()
        torch.testing.assert_close(out, want)
        _assert_same_state(model, ref)
        for (name, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
            torch.testing.assert_close(p.grad, q.grad, msg=name)
    assert int(model.steps) == 2


def test_mutated_input_is_updated_for_the_caller():
    def accumulate(acc, x):
        acc.add_(x)
        return acc * 2

    acc, x = torch.zeros(3), torch.randn(3)
    res = fxfuse.rewrite(accumulate, (acc.clone(), x))
    out = res.module(acc, x)
    torch.testing.assert_close(acc, x)
    torch.testing.assert_close(out, 2 * x)


def test_output_that_is_an_input_is_that_tensor():
    class ReturnsCounter(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("steps", torch.zeros(()))

        def forward(self, x):
            self.steps.add_(1)
            return x * 2, self.steps, x

    model, x = ReturnsCounter(), torch.randn(2)
    res = fxfuse.rewrite(model, (x,))
    _, steps, same_x = res.module(x)
    assert steps is model.steps and same_x is x  # aliases, as in eager
    assert float(model.steps) == 1


class _StopGradient(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        h = self.lin(x)
        with torch.no_grad():
            scale = h.abs().amax()  # a statistic the user excludes from the gradient
        return h / scale + h.detach().sum() * h  # and a detach (torch 2.14 traces it as aten.alias)


@pytest.mark.parametrize("entry", ["rewrite", "compile"])
def test_no_grad_region_and_detach_block_gradients_as_in_eager(entry):
    model = _StopGradient()
    ref = copy.deepcopy(model)
    x = torch.randn(3, 4)
    if entry == "rewrite":
        res = fxfuse.rewrite(model, (x,))
        assert "aten.detach" in res.graph.code
        run = res.module
    else:
        run = torch.compile(model, backend="fxfuse")
    run(x).sum().backward()
    ref(x).sum().backward()
    torch.testing.assert_close(model.lin.weight.grad, ref.lin.weight.grad)
    torch.testing.assert_close(model.lin.bias.grad, ref.lin.bias.grad)


def test_capture_of_a_no_grad_caller_still_trains():
    model = nn.Linear(3, 3)
    with torch.no_grad():
        res = fxfuse.rewrite(model, (torch.randn(2, 3),))
    res.module(torch.randn(2, 3)).sum().backward()
    assert model.weight.grad is not None


def test_shape_changing_in_place_op_is_refused():
    def grows(x):
        x.unsqueeze_(0)
        return x * 2

    with pytest.raises(fxfuse.CaptureError, match="out-of-place"):
        fxfuse.rewrite(grows, (torch.randn(3),))


def test_opaque_output_holding_tensors_is_refused():
    class Box:
        def __init__(self, t):
            self.t = t

    with pytest.raises(fxfuse.CaptureError, match=r"output \[1\] is a .*Box .*holding tensors.*register_pytree_node"):
        fxfuse.rewrite(lambda x: (x * 2, Box(x + 1)), (torch.randn(3),))
    with pytest.raises(fxfuse.CaptureError, match="Box .*holding tensors") as refused:
        fxfuse.rewrite(lambda x, box: x * box.t, (torch.randn(3), Box(torch.randn(3))))
    with pytest.raises(fxfuse.CaptureError) as whole:
        fxfuse.rewrite(lambda x: Box(x + 1), (torch.randn(3),))
    # The whole output named as such; Hugging Face's advice only for Hugging Face's types.
    assert "the model's output is a " in str(whole.value)
    assert "use_cache" not in str(whole.value) + str(refused.value)


@dataclasses.dataclass(frozen=True)
class _Stats:
    mean: torch.Tensor
    count: int


@dataclasses.dataclass
class _NormOutput:  # what a model's forward may return instead of a tuple
    hidden: torch.Tensor
    stats: _Stats
    aux: torch.Tensor | None = None

    def __post_init__(self):
        self.built = getattr(self, "built", 0) + 1


def test_dataclass_output_is_returned_as_the_same_dataclass():
    class Model(nn.Module):
        def __init__(self, d=8):
            super().__init__()
            self.weight = nn.Parameter(torch.linspace(0.5, 1.5, d))

        def forward(self, x):
            y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight
            return _NormOutput(y, _Stats(y.mean(), 3))

    model, x = Model(), torch.randn(2, 8)
    res = fxfuse.rewrite(model, (x,))
    assert [m.kind for m in res.matches] == ["rms_norm"]
    got, want = res.module(x * 2), model(x * 2)  # this call's values, not the capture's
    assert type(got) is _NormOutput and type(got.stats) is _Stats and got.aux is None and got.stats.count == 3
    assert got.built == 1  # built once per call, as eager does
    torch.testing.assert_close(got.hidden, want.hidden)
    torch.testing.assert_close(got.stats.mean, want.stats.mean)


def test_captured_graph_is_functional_and_records_mutations():
    model = StatefulBlock().train()
    captured = capture_module(model, (torch.randn(3, 4),))
    mutating = [n for n in captured.gm.graph.nodes
                if isinstance(n.target, torch._ops.OpOverload) and n.target._schema.is_mutable]
    assert mutating == []
    names = captured.param_names + captured.buffer_names
    assert sorted(names[i] for i in captured.mutated) == ["bn.num_batches_tracked", "bn.running_mean", "bn.running_var", "running", "steps"]
    assert sorted(names[i] for i in captured.mutated_without_grad) == ["running"]


def test_hooks_are_traced_with_a_warning_that_they_run_once():
    model = nn.Linear(3, 3)
    seen = []
    model.register_forward_hook(lambda mod, args, out: seen.append(out.shape) or out * 2)
    x = torch.randn(2, 3)
    with pytest.warns(UserWarning, match="run only once, at capture"):
        res = fxfuse.rewrite(model, (x,))
    seen.clear()
    torch.testing.assert_close(res.module(x), model(x))  # the hook's effect on the output is kept
    assert len(seen) == 1  # only eager ran the hook


GLOBAL_SCALE = torch.randn(3)


def test_tensors_outside_parameters_and_buffers_are_used_by_reference():
    class PlainAttribute(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.scale = nn.Linear(3, 3), torch.tensor(2.0)  # not a registered buffer

        def forward(self, x):
            return self.lin(x) * self.scale * GLOBAL_SCALE

    model, x = PlainAttribute(), torch.randn(2, 3)
    res = fxfuse.rewrite(model, (x,))
    torch.testing.assert_close(res.module(x), model(x))
    model.scale.fill_(5.0)
    GLOBAL_SCALE.mul_(2)
    torch.testing.assert_close(res.module(x), model(x))  # in-place updates are seen


def test_norm_inside_a_no_grad_forward_is_still_fused():
    class InferenceNorm(nn.Module):  # e.g. a module decorated for inference only
        def __init__(self, d=8):
            super().__init__()
            self.w = nn.Parameter(torch.randn(d))

        @torch.no_grad()
        def forward(self, x, residual):
            h = x + residual
            return self.w * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)), h

    model, x, r = InferenceNorm(), torch.randn(2, 8), torch.randn(2, 8)
    res = fxfuse.rewrite(model, (x, r))
    assert [m.kind for m in res.matches] == ["rms_norm"] and res.matches[0].spec.residual
    out = res.module(x.requires_grad_(), r)
    torch.testing.assert_close(out, model(x, r))
    assert not out[0].requires_grad  # as in eager: nothing computed under no_grad has a gradient


class _StraightThroughClamp(torch.autograd.Function):  # clamps, but passes the gradient on unchanged
    @staticmethod
    def forward(ctx, x):
        return x.clamp(-0.1, 0.1)

    @staticmethod
    def backward(ctx, grad):
        return grad


class _CustomFunctionNorm(nn.Module):
    def __init__(self, d=8):
        super().__init__()
        self.lin = nn.Linear(d, d)

    def forward(self, x):
        h = _StraightThroughClamp.apply(self.lin(x))
        return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)


def test_custom_autograd_function_is_never_differentiated_through_its_forward():
    # make_fx records below autograd: the graph holds the Function's forward only, whose own
    # gradient (zero outside the clamp) is not the Function's (one). Inference is exact; a call
    # that needs gradients is refused, saying what to do.
    model, x = _CustomFunctionNorm(), torch.randn(4, 8) * 3
    res = fxfuse.rewrite(model, (x,))
    assert [m.kind for m in res.matches] == ["rms_norm"]
    with torch.no_grad():
        torch.testing.assert_close(res.module(x), model(x))
    with pytest.raises(fxfuse.CaptureError, match=r"_StraightThroughClamp at .*test_capture.py.*torch.no_grad"):
        res.module(x)


class _StraightThroughScale(torch.autograd.Function):  # forward without ctx, state in setup_context
    @staticmethod
    def forward(x, scale):
        return (x * scale).clamp(-0.1, 0.1)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.scale = inputs[1]

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


class _SetupContextFunctionNorm(_CustomFunctionNorm):
    def forward(self, x):
        h = _StraightThroughScale.apply(self.lin(x), 2.0)
        return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)


def test_custom_autograd_function_with_setup_context_is_found_too():
    # Its forward takes no ctx: the Function is known by its forward's code (every torch version).
    model, x = _SetupContextFunctionNorm(), torch.randn(4, 8) * 3
    res = fxfuse.rewrite(model, (x,))
    with torch.no_grad():
        torch.testing.assert_close(res.module(x), model(x))
    with pytest.raises(fxfuse.CaptureError, match=r"_StraightThroughScale at .*test_capture.py"):
        res.module(x)


def test_custom_autograd_function_under_torch_compile_keeps_its_backward():
    model, x = _CustomFunctionNorm(), torch.randn(4, 8) * 3
    backend = fxfuse.Backend()
    with pytest.warns(UserWarning, match="custom torch.autograd.Function"):
        torch.compile(model, backend=backend)(x).sum().backward()
    compiled_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model(x).sum().backward()
    for got, want in zip(compiled_grads, (p.grad for p in model.parameters())):
        torch.testing.assert_close(got, want)
    assert [m.kind for m in backend.misses] == ["graph"] and "autograd.Function" in backend.misses[0].reason
