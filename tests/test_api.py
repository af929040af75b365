"""fxfuse.rewrite / explain: the rewritten module is a drop-in for the model (same call, same output
structure and values, trains the user's parameters, re-captures when its inputs change, compiles),
and mistakes in the call fail with messages that say what to do."""
import copy
import dataclasses
import inspect
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import fxfuse
from tests.norm_styles import NORM_SOURCE, SourceMarkedRMSNorm


@dataclasses.dataclass
class Output:
    hidden: torch.Tensor
    extras: dict


torch.utils._pytree.register_dataclass(Output)


class Block(nn.Module):
    """Positional and keyword tensors, a float and an optional mask; a nested output."""

    def __init__(self, d=8):
        super().__init__()
        self.norm, self.lin, self.drop = SourceMarkedRMSNorm(d), nn.Linear(d, d), nn.Dropout(0.5)

    def forward(self, x, bias=None, *, scale=1.0, mask=None):
        h = self.drop(self.lin(self.norm(x))) * scale
        if bias is not None:
            h = h + bias
        if mask is not None:
            h = h.masked_fill(mask, 0.0)
        return {"out": Output(h, {"sum": h.sum(-1), "n": h.shape[-1]}), "pair": (h * 2, "tag")}


def _assert_same(got, want, **kwargs):
    """Same pytree structure (dataclasses included), equal tensors, equal other leaves."""
    got_leaves, got_spec = torch.utils._pytree.tree_flatten(got)
    want_leaves, want_spec = torch.utils._pytree.tree_flatten(want)
    assert got_spec == want_spec
    for a, b in zip(got_leaves, want_leaves):
        if isinstance(b, torch.Tensor):
            torch.testing.assert_close(a, b, **kwargs)
        else:
            assert a == b


def _eager_and_rewritten(**kwargs):
    model = Block().eval()
    x = torch.randn(2, 3, 8)
    res = fxfuse.rewrite(model, (x,), **kwargs)
    return model, res, x


def test_output_structure_and_values_equal_eager():
    model, res, x = _eager_and_rewritten()
    bias, mask = torch.randn(8), torch.rand(2, 3, 8) > 0.5
    for args, kwargs in [((x,), {}), ((x, bias), {"scale": 3.0}), ((x,), {"mask": mask}), ((x, bias), {"mask": mask})]:
        got, want = res.module(*args, **kwargs), model(*args, **kwargs)
        assert isinstance(got["out"], Output) and got["pair"][1] == "tag" and got["out"].extras["n"] == 8
        _assert_same(got, want)
    assert [m.kind for m in res.matches] == ["rms_norm"]
    assert res.matches[0].source == NORM_SOURCE


def test_example_kwargs_are_captured():
    model = Block().eval()
    x, mask = torch.randn(2, 3, 8), torch.rand(2, 3, 8) > 0.5
    res = fxfuse.rewrite(model, (x,), example_kwargs={"mask": mask, "scale": 0.5})
    assert "masked_fill" in res.graph.code
    _assert_same(res.module(x, mask=mask, scale=0.5), model(x, mask=mask, scale=0.5))


def test_recaptures_on_new_shapes_constants_and_argument_positions():
    model, res, x = _eager_and_rewritten()
    t = torch.randn(8)
    calls = [((x,), {}), ((torch.randn(4, 5, 8),), {}), ((x,), {"scale": 2.0}), ((x,), {"scale": 2}),
             ((x, t), {}), ((x,), {"mask": t > 0}), ((x.transpose(0, 1),), {}), ((x.double(),), {})]
    for args, kwargs in calls:
        if args[0].dtype == torch.float64:
            model.double()
        _assert_same(res.module(*args, **kwargs), model(*args, **kwargs))
    assert len(res.module._graphs) == len(calls)  # each call differs from all others in something
    res.module(x.double())
    assert len(res.module._graphs) == len(calls)  # an identical call reuses its graph


def test_same_tensors_in_other_argument_slots_are_recaptured():
    def shift_or_scale(x, shift=None, scale=None):
        if shift is not None:
            x = x + shift
        if scale is not None:
            x = x * scale
        return x

    x, t = torch.randn(4), torch.randn(4)
    res = fxfuse.rewrite(shift_or_scale, (x,), example_kwargs={"shift": t})
    _assert_same(res.module(x, scale=t), x * t)  # same tensors, other keyword: not the shift graph
    _assert_same(res.module(x, None, t), x * t)
    _assert_same(res.module(x, shift=t), x + t)


def test_identical_calls_reuse_the_graph_and_state_changes_recapture():
    model, res, x = _eager_and_rewritten()
    for _ in range(3):
        _assert_same(res.module(x), model(x))
    _assert_same(res.module(x=x), model(x=x))  # the same tensor as a keyword: another call structure
    assert len(res.module._graphs) == 2
    changes = [
        lambda: model.half(),  # same Parameter objects, new dtype
        lambda: model.float(),  # back to the first graph's signature: no new capture
        lambda: setattr(model.lin, "weight", nn.Parameter(torch.randn(8, 8).t())),  # other strides
        lambda: setattr(model.norm, "weight", nn.Parameter(torch.randn(1))),  # other shape (broadcasts)
        lambda: model.norm.weight.requires_grad_(False),
        lambda: model.register_buffer("unused", torch.zeros(2)),
    ]
    expected_graphs = [3, 3, 4, 5, 6, 7]
    for change, n_graphs in zip(changes, expected_graphs):
        change()
        xs = x.half() if model.lin.weight.dtype == torch.float16 else x
        _assert_same(res.module(xs), model(xs))
        _assert_same(res.module(xs), model(xs))  # the second identical call captures nothing
        assert len(res.module._graphs) == n_graphs


def test_a_replaced_parameter_of_the_same_shape_is_read_on_the_next_call():
    model, res, x = _eager_and_rewritten()
    model.norm.weight = nn.Parameter(torch.randn(8))  # same signature: no new capture, new values
    model.lin.weight.data.mul_(2)
    _assert_same(res.module(x), model(x))
    assert len(res.module._graphs) == 1


def test_tied_parameters_get_the_gradient_of_both_uses():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(8, 8, bias=False), nn.Linear(8, 8, bias=False)
            self.b.weight = self.a.weight
            self.norm = SourceMarkedRMSNorm(8)

        def forward(self, x):
            return self.b(self.norm(self.a(x)))

    model, x = Tied(), torch.randn(3, 8)
    ref = copy.deepcopy(model)
    res = fxfuse.rewrite(model, (x,))
    res.module(x).sum().backward()
    ref(x).sum().backward()
    assert model.a.weight is model.b.weight
    _assert_same(model.a.weight.grad, ref.a.weight.grad)
    _assert_same(model.norm.weight.grad, ref.norm.weight.grad)


def test_train_and_eval_are_captured_separately_and_dropout_follows():
    model, res, x = _eager_and_rewritten()
    evaluated = res.module(x)["out"].hidden
    _assert_same(evaluated, model(x)["out"].hidden)  # eval: dropout off, deterministic
    model.train()
    trained = res.module(x)["out"].hidden
    dropped = (trained == 0) & (evaluated != 0)
    assert dropped.any() and not dropped.all()
    kept = ~dropped
    _assert_same(trained[kept], 2 * evaluated[kept])  # inverted dropout scales by 1/(1-p)
    model.drop.eval()  # a submodule's mode counts too
    _assert_same(res.module(x)["out"].hidden, evaluated)


def test_training_updates_the_original_parameters():
    model = Block().eval()
    ref = copy.deepcopy(model)
    x, target = torch.randn(2, 3, 8), torch.randn(2, 3, 8)
    res = fxfuse.rewrite(model, (x,))
    assert set(dict(res.module.named_parameters())) == {f"original.{n}" for n, _ in model.named_parameters()}
    opt, ref_opt = torch.optim.SGD(model.parameters(), lr=0.1), torch.optim.SGD(ref.parameters(), lr=0.1)
    for _ in range(2):
        for m, o in [(res.module, opt), (ref, ref_opt)]:
            o.zero_grad()
            ((m(x)["out"].hidden - target) ** 2).mean().backward()
        for (name, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
            _assert_same(p.grad, q.grad, msg=name)
        before = model.norm.weight.detach().clone()
        opt.step()
        ref_opt.step()
        assert not torch.equal(before, model.norm.weight)
    _assert_same(res.module(x), ref(x))  # the next call uses the updated weights


def test_rewritten_module_can_be_compiled():
    from torch._dynamo.backends.debugging import aot_eager

    torch._dynamo.reset()
    model = Block().eval()
    x = torch.randn(2, 3, 8, requires_grad=True)
    res = fxfuse.rewrite(model, (x,))
    graphs = []

    def recording_aot_eager(gm, example_inputs):
        graphs.append(gm.code)
        return aot_eager(gm, example_inputs)

    compiled = torch.compile(res.module, backend=recording_aot_eager)
    got = compiled(x)["out"].hidden
    assert any("fxfuse.norm" in code for code in graphs)  # the fused op itself went through Dynamo
    _assert_same(got, model(x)["out"].hidden)
    (grad,) = torch.autograd.grad(got.sum(), x)
    (want,) = torch.autograd.grad(model(x)["out"].hidden.sum(), x)
    _assert_same(grad, want)


def test_tiny_llama_matches_eager_and_trains():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=64, max_position_embeddings=32,
                                   attn_implementation="eager", use_cache=False)
    model = transformers.LlamaForCausalLM(cfg)
    ref = copy.deepcopy(model)
    ids = torch.randint(0, 64, (2, 7))
    res = fxfuse.rewrite(model, (ids,), example_kwargs={"labels": ids})
    # 2 per layer and the final norm; fuse-rope takes each layer's rotations into its attention
    assert [m.kind for m in res.matches] == ["attention"] * 2 + ["rope"] * 2 + ["rms_norm"] * 5
    got, want = res.module(ids, labels=ids), ref(ids, labels=ids)
    assert type(got) is type(want) and list(got.keys()) == list(want.keys()) == ["loss", "logits"]
    _assert_same(got.logits, want.logits)
    got.loss.backward()
    want.loss.backward()
    for (name, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        _assert_same(p.grad, q.grad, msg=name, rtol=1e-4, atol=1e-5)
    # A KV cache is an object holding tensors: taken apart and rebuilt with this call's tensors,
    # never returned stale (tests/models/test_rewrite_caches.py has the decode steps).
    model.config.use_cache = True
    cached = fxfuse.rewrite(model, (ids,), example_kwargs={"use_cache": True})
    with torch.no_grad():
        got, want = cached.module(ids, use_cache=True), model(ids, use_cache=True)
    assert type(got.past_key_values) is type(want.past_key_values)
    for a, b in zip(got.past_key_values.layers, want.past_key_values.layers):
        _assert_same(a.keys, b.keys)
        _assert_same(a.values, b.values)


def test_autocast_call_is_captured_with_its_casts():
    model = Block().eval()
    x = torch.randn(2, 3, 8)
    res = fxfuse.rewrite(model, (x,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, want = res.module(x)["out"].hidden, model(x)["out"].hidden
    assert got.dtype == want.dtype == torch.bfloat16
    _assert_same(got, want)
    assert len(res.module._graphs) == 2


def test_plain_function_is_rewritten():
    def norm(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * w

    x, w = torch.randn(3, 8), torch.randn(8)
    res = fxfuse.rewrite(norm, (x, w))
    assert len(res.matches) == 1
    _assert_same(res.module(x, w), norm(x, w))


# ---- errors ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("not_a_model", [torch.randn(3), 3, None])
def test_non_callable_model_says_what_to_pass(not_a_model):
    with pytest.raises(TypeError, match=r"nn\.Module or a function.*fxfuse\.rewrite\(model, \(x,\)\)"):
        fxfuse.rewrite(not_a_model, (torch.randn(3),))


def test_data_dependent_control_flow_is_a_capture_error_naming_the_line():
    class Branchy(nn.Module):
        def forward(self, x):
            if x.sum() > 0:  # BRANCH
                return x * 2
            return x

    line = inspect.getsourcelines(Branchy.forward)[1] + 1
    with pytest.raises(fxfuse.CaptureError) as info:
        fxfuse.rewrite(Branchy(), (torch.randn(3),))
    message = str(info.value)
    assert f"{__file__}:{line}" in message and "if x.sum() > 0" in message
    assert "backend='fxfuse'" in message and "torch.where" in message


def test_unknown_option_lists_the_options():
    with pytest.raises(ValueError, match=r"\['interprets'\].*interpret, debug_dir, cache_dir, passes"):
        fxfuse.rewrite(Block(), (torch.randn(2, 8),), options={"interprets": True})
    with pytest.raises(TypeError, match="'interpret' must be True or False"):
        fxfuse.rewrite(Block(), (torch.randn(2, 8),), options={"interpret": "yes"})


def test_unknown_pass_lists_the_passes():
    for kwargs in [{"passes": "canonicalize,fuse-rms"}, {"options": {"passes": ["fuse-rms"]}}]:
        with pytest.raises(ValueError, match=r"'fuse-rms'.*canonicalize.*fuse-norm"):
            fxfuse.rewrite(Block(), (torch.randn(2, 8),), **kwargs)


def test_passes_select_the_pipeline():
    res = fxfuse.rewrite(Block().eval(), (torch.randn(2, 8),), passes="canonicalize")
    assert res.matches == [] and "fxfuse.norm" not in res.graph.code


# ---- explain and the debug directory ----------------------------------------------------------------

def test_explain_prints_the_report(capsys):
    model, x = Block().eval(), torch.randn(2, 3, 8)
    res = fxfuse.explain(model, x, scale=2.0)
    printed = capsys.readouterr().out
    assert printed.strip() == res.report().strip()
    assert "1 fused (1 rms_norm)" in printed and f"{Path(NORM_SOURCE).name}" in printed


def test_debug_dir_receives_graphs_and_kernels(tmp_path):
    model, x = Block().eval(), torch.randn(2, 3, 8)
    res = fxfuse.rewrite(model, (x,), options={"debug_dir": str(tmp_path)})
    graphs = sorted(p.name for p in (tmp_path / "graphs").iterdir())
    assert [g.split("_", 1)[1] for g in graphs] == ["captured.txt", "rewritten.txt"]
    captured, rewritten = [(tmp_path / "graphs" / g).read_text() for g in graphs]
    assert "aten.rsqrt" in captured and "fxfuse.norm" not in captured
    assert "fxfuse.norm" in rewritten and "aten.rsqrt" not in rewritten
    kernel = res.kernels[0]
    assert (tmp_path / "kernels" / f"{kernel.name}.py").read_text() == kernel.source


def test_changing_a_plain_attribute_captures_again():
    # eps is read as a constant at capture; a later change must not leave the old value in use.
    from tests.norm_styles import LlamaStyleRMSNorm

    model = LlamaStyleRMSNorm(16)
    x = torch.randn(2, 16) * 1e-2  # small values so eps matters
    res = fxfuse.rewrite(model, (x,))
    model.eps = 0.5
    torch.testing.assert_close(res.module(x), model(x))
    assert res.module._graphs and len(res.module._graphs) == 2
    model.eps = 1e-6
    torch.testing.assert_close(res.module(x), model(x))
    assert len(res.module._graphs) == 2  # back to the first graph


def test_module_state_walk_matches_torchs_own_walks():
    """The per-call check walks the module once by hand (fxfuse.api._walk): the same names, order,
    shared and None entries as named_parameters/named_buffers(remove_duplicate=False), and each
    module's mode and plain attributes as their __dict__ holds them."""
    from fxfuse.api import _module_state

    shared = nn.Linear(3, 3)
    model = nn.Sequential(shared, nn.ReLU(), nn.Sequential(shared, nn.BatchNorm1d(3)), nn.LayerNorm(3))
    model.register_parameter("gone", None)
    model.register_buffer("steps", torch.zeros(()))
    model[2].flag, model[3].note, model[3].obj = True, "x", object()
    model[2].eval()
    state = _module_state(model)
    assert [n for n, _ in state.params] == [n for n, _ in model.named_parameters(remove_duplicate=False)]
    assert [n for n, _ in state.buffers] == [n for n, _ in model.named_buffers(remove_duplicate=False)]
    assert all(a is b for (_, a), (_, b) in zip(state.params, model.named_parameters(remove_duplicate=False)))
    modules = [m for _, m in model.named_modules(remove_duplicate=False)]
    internals = set(nn.Module().__dict__)
    assert [(t[0], dict(t[2])) for t in state.training] == [
        (m.training, {k: v for k, v in vars(m).items() if k not in internals and type(v) in (bool, int, float, str)})
        for m in modules]
    assert dict(state.training[3][2]) == {"flag": True} and dict(state.training[-1][2])["note"] == "x"
    model[3].eps = 0.5  # a plain attribute changed: another state, so the graph is captured again
    assert _module_state(model).training != state.training
