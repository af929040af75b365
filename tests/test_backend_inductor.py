"""The backend composed with Inductor (its default): outputs and gradients equal eager's within the
float64-referenced tolerances, the graphs Inductor compiles hold SDPA's fused CPU attention (CPU
sites are lowered to their fast exact forms) or, when the Triton kernels are asked for, fxfuse's
operators themselves; Inductor's mode and options reach it; a rewritten graph exports.

Marked ``inductor`` (tests/conftest.py runs every other test with ``inner="eager"``): each test here
pays Inductor's C++ compile, so there are few of them, on tiny shapes."""
import copy
import warnings

import pytest
import torch
import torch.nn as nn

import fxfuse
import fxfuse.ops.attention
from fxfuse.demo import NaiveTransformer
from tests.attention_styles import RelativeBias, SoftcapGemma2
from tests.tolerances import assert_close_to_reference

pytestmark = pytest.mark.inductor


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _train(model, fn, *inputs):
    """Output and the gradients of every input and parameter after ``out.pow(2).sum().backward()``."""
    model.zero_grad()
    inputs = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*inputs)
    out.pow(2).sum().backward()
    return [out.detach(), *(t.grad for t in inputs), *(p.grad.clone() for p in model.parameters())]


def _check_training(model, compiled, *inputs):
    got = _train(model, compiled, *inputs)
    eager = _train(model, model, *inputs)
    reference = copy.deepcopy(model).double()
    want = _train(reference, reference, *(t.double() for t in inputs))
    for i, (g, e, w) in enumerate(zip(got, eager, want)):
        assert_close_to_reference(g, e, w, f"output/gradient {i}")


def _graphs(root, stage):
    return "\n".join(p.read_text() for p in sorted((root / "graphs").glob(f"*_{stage}.txt")))


def test_default_composition_trains_like_eager_with_sdpa_and_fused_norms_in_the_inductor_graphs(tmp_path):
    model, x = NaiveTransformer(dim=16, heads=2, layers=1), torch.randn(2, 8, 16)
    be = fxfuse.Backend(debug_dir=str(tmp_path))
    _check_training(model, torch.compile(model, backend=be), x)
    assert sorted(m.kind for m in be.matches) == ["attention", "layer_norm", "rms_norm", "rms_norm"], be.report()
    forward, backward = _graphs(tmp_path, "aot_forward"), _graphs(tmp_path, "aot_backward")
    # On CPU the causal site is SDPA's fused CPU kernel, forward and backward, and the norms are
    # their references, which Inductor fuses: no per-site Python operator call is left.
    assert "_scaled_dot_product_flash_attention_for_cpu" in forward
    assert "_scaled_dot_product_flash_attention_for_cpu_backward" in backward
    assert "fxfuse" not in forward + backward


def test_attention_sdpa_cannot_compute_is_lowered_to_its_reference_and_trains():
    model = SoftcapGemma2()
    q, k, v = model.inputs(torch.float32)
    be = fxfuse.Backend()
    _check_training(model, torch.compile(model, backend=be), q, k, v)
    assert [m.kind for m in be.matches] == ["attention"], be.report()
    assert fxfuse.ops.attention._sdpa_form(be.matches[0].spec) is None  # the reference path, not SDPA's


def test_a_learned_bias_trains_through_the_reference_since_sdpa_gives_its_mask_no_gradient():
    model = RelativeBias()  # T5's learned position bias: SDPA would compute the forward exactly
    model.bias = nn.Parameter(model.bias[None].detach().clone())  # (1, H, L, L), as T5 has it: SDPA's fused kernel
    q, k, v = model.inputs(torch.float32)
    be = fxfuse.Backend()
    _check_training(model, torch.compile(model, backend=be), q, k, v)  # the bias's gradient included
    assert [m.kind for m in be.matches] == ["attention"], be.report()
    assert fxfuse.ops.attention._sdpa_form(be.matches[0].spec) is not None


def test_with_interpret_inductor_calls_the_fused_operators_and_their_kernels_forward_and_backward(tmp_path, monkeypatch):
    seen = []
    use_triton = fxfuse.ops.attention._use_triton
    monkeypatch.setattr(fxfuse.ops.attention, "_use_triton", lambda q, s: seen.append(use_triton(q, s)) or seen[-1])
    model, x = NaiveTransformer(dim=16, heads=2, layers=1), torch.randn(2, 8, 16)
    be = fxfuse.Backend(interpret=True, debug_dir=str(tmp_path))
    _check_training(model, torch.compile(model, backend=be), x)
    forward, backward = _graphs(tmp_path, "aot_forward"), _graphs(tmp_path, "aot_backward")
    assert "torch.ops.fxfuse.attention.default" in forward and "torch.ops.fxfuse.norm.default" in forward
    assert "torch.ops.fxfuse.attention_backward.default" in backward and "fxfuse.norm_backward" in backward
    # The forward and the backward (which autograd runs after the compiled forward has returned)
    # both ran the Triton kernels: the backend's options reached them.
    assert len(seen) >= 2 and all(seen), seen


def test_mode_and_inductor_options_reach_inductor(monkeypatch):
    import torch._inductor.compile_fx as compile_fx

    patches = []
    real = compile_fx.compile_fx

    def recording(gm, inputs, **kwargs):
        if kwargs.get("config_patches") is not None:  # compile_fx calls itself again without them
            patches.append(kwargs["config_patches"])
        return real(gm, inputs, **kwargs)

    monkeypatch.setattr(compile_fx, "compile_fx", recording)
    model, x = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8)), torch.randn(2, 8)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(model, backend="fxfuse", mode="reduce-overhead")(x), model(x))
    torch._dynamo.reset()
    options = {"mode": "max-autotune-no-cudagraphs", "inductor": {"coordinate_descent_tuning": False}}
    monkeypatch.setattr(compile_fx, "compile_fx", lambda gm, inputs, **kw: patches.append(kw["config_patches"]) or gm)
    torch.compile(model, backend="fxfuse", options=options)(x)
    assert patches == [{"triton.cudagraphs": True}, {"max_autotune": True, "coordinate_descent_tuning": False}]


def test_unknown_inner_compiler_or_mode_fails_when_the_backend_is_made():
    with pytest.raises(ValueError, match="'inner' must be one of 'inductor', 'eager'"):
        fxfuse.Backend(inner="tvm")
    with pytest.raises(ValueError, match="unknown Inductor mode 'fast'.*max-autotune"):
        fxfuse.Backend(mode="fast")


def test_rewritten_graph_exports_with_its_fused_operators():
    model, x = NaiveTransformer(dim=16, heads=2, layers=1).eval(), torch.randn(2, 8, 16)
    res = fxfuse.rewrite(model, (x,))
    args = (*model.parameters(), *model.buffers(), x)
    exported = torch.export.export(res.graph, args)
    fused = {str(n.target) for n in exported.graph.nodes if "fxfuse" in str(n.target)}
    assert fused == {"fxfuse.attention.default", "fxfuse.norm.default", "fxfuse.add_norm.default"}
    (out,) = exported.module()(*args)
    with torch.no_grad():
        torch.testing.assert_close(out, model(x), rtol=1e-5, atol=1e-5)


def test_compiled_inside_saved_tensors_hooks_the_demo_model_is_fused_and_lowered():
    # `fxfuse demo` compiled its training graph inside a pack hook that reads storage addresses:
    # neither capture nor the CPU lowering may run the user's hook on their fake tensors.
    model, x = NaiveTransformer(dim=16, heads=2, layers=1), torch.randn(2, 8, 16)
    packed = []

    def pack(t):
        packed.append(t.untyped_storage().data_ptr())  # fails on a fake tensor
        return t

    be = fxfuse.Backend()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # "fxfuse graph 0 runs unfused: ..." would fail here
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            got = _train(model, torch.compile(model, backend=be), x)
    assert sorted(m.kind for m in be.matches) == ["attention", "layer_norm", "rms_norm", "rms_norm"], be.report()
    assert packed, "the hooks did not run at run time"
    torch.testing.assert_close(got, _train(model, model, x), rtol=1e-4, atol=1e-5)


class _FinfoMinMask(nn.Module):
    """Hugging Face's additive mask (``finfo.min``, not -inf) over a left-padded batch: the padded
    query rows see no key, so their scores round to one value, the user's softmax is uniform
    there and still passes the gradient on to the scores; SDPA's backward gives another one."""

    def forward(self, q, k, v, mask):
        return ((q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5 + mask).softmax(-1) @ v


def test_a_site_with_a_finfo_min_mask_trains_with_the_users_gradient():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, 8, 4) for _ in range(3))
    mask = torch.zeros(2, 1, 8, 8).masked_fill(torch.ones(8, 8, dtype=torch.bool).triu(1), torch.finfo(torch.float32).min)
    mask[1, ..., :2] = torch.finfo(torch.float32).min  # the second sequence's first two keys are padding
    model, be = _FinfoMinMask(), fxfuse.Backend()
    compiled = torch.compile(model, backend=be)
    got = _train(model, lambda q, k, v: compiled(q, k, v, mask), q, k, v)
    assert [m.kind for m in be.matches] == ["attention"], be.report()
    eager = _train(model, lambda q, k, v: model(q, k, v, mask), q, k, v)
    want = _train(model, lambda q, k, v: model(q, k, v, mask.double()), *(t.double() for t in (q, k, v)))
    for i, (g, e, w) in enumerate(zip(got, eager, want)):
        assert_close_to_reference(g, e, w, f"output/gradient {i}")


def test_a_layer_norm_site_reaches_inductor_as_atens_layer_norm_forward_and_backward(tmp_path):
    # The backward Inductor compiles is the one it compiles for the user's own F.layer_norm
    # (aten.native_layer_norm's decomposition); autograd's gradient of the reference took more
    # loops (GPT-2's training step: 126 kernels against Inductor's 122).
    import collections
    import re

    model, x = nn.Sequential(nn.Linear(16, 16), nn.LayerNorm(16)), torch.randn(2, 8, 16)
    be = fxfuse.Backend(debug_dir=str(tmp_path / "fused"))
    _check_training(model, torch.compile(model, backend=be), x)
    assert [m.kind for m in be.matches] == ["layer_norm"], be.report()
    torch._dynamo.reset()  # the same model with nothing fused: what Inductor gets from F.layer_norm
    _train(model, torch.compile(model, backend=fxfuse.Backend(passes="canonicalize", debug_dir=str(tmp_path / "plain"))), x)
    ops = {run: collections.Counter(re.findall(r"torch\.ops\.aten\.(\w+)", _graphs(tmp_path / run, "aot_backward")))
           for run in ("fused", "plain")}
    assert ops["fused"] == ops["plain"]



def test_dynamic_shape_graphs_use_inductors_fx_graph_cache_and_still_run_inner_compile(tmp_path, monkeypatch):
    # make_fx's symbolic trace left its ShapeEnv on the graph, which Inductor's cache keys cannot
    # pickle ("Failed to pickle cache key": every dynamic-shape compile bypassed the cache). And a
    # hit of AOTAutograd's cache would skip fxfuse's inner_compile (the backward's options, dumps).
    from torch._dynamo.utils import counters

    import fxfuse.backend

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    stages = []
    real_dump = fxfuse.backend.dump_graph
    monkeypatch.setattr(fxfuse.backend, "dump_graph", lambda gm, stage, index: stages.append(stage) or
                        real_dump(gm, stage, index))
    model, x = NaiveTransformer(dim=16, heads=2, layers=1), torch.randn(2, 8, 16)
    runs = []
    for _ in range(2):
        torch._dynamo.reset()
        counters.clear()
        with torch._inductor.config.patch(fx_graph_cache=True):
            out = torch.compile(model, backend="fxfuse", dynamic=True)(x)
            out.sum().backward()
        runs.append((dict(counters["inductor"]), stages.copy()))
        stages.clear()
        torch.testing.assert_close(out, model(x), rtol=1e-5, atol=1e-5)
    (first, first_stages), (second, second_stages) = runs
    assert first.get("fxgraph_cache_bypass", 0) == 0 and first.get("fxgraph_cache_miss", 0) >= 2, first
    assert second.get("fxgraph_cache_bypass", 0) == 0 and second.get("fxgraph_cache_hit", 0) >= 2, second
    assert sorted(first_stages) == sorted(second_stages) == ["aot_backward", "aot_forward"]


class _LearnedRelativeBias(nn.Module):
    """A learned bias per head and key offset, gathered in forward from the lengths (T5's and
    Swin's style): at symbolic sizes a score term that needs a gradient, which SDPA cannot give."""

    def __init__(self, heads=2, span=16):
        super().__init__()
        self.span = span
        self.table = nn.Parameter(torch.randn(heads, 2 * span - 1) * 0.3)

    def forward(self, q, k, v):
        n = q.size(-2)
        offset = torch.arange(n)[None, :] - torch.arange(n)[:, None] + self.span - 1
        scores = q @ k.transpose(-1, -2) * q.size(-1) ** -0.5 + self.table[:, offset]
        return scores.softmax(-1) @ v


@pytest.mark.parametrize("model", [SoftcapGemma2(), _LearnedRelativeBias()], ids=["softcap", "learned-bias"])
def test_at_symbolic_sizes_sites_sdpa_cannot_compute_train_through_the_reference_inductor_fuses(model, tmp_path):
    # With symbolic sizes these sites kept the operator, whose CPU backward reruns the forward:
    # one attention forward more per step than Inductor compiling the user's code. The reference
    # of all rows at once (its row chunks need concrete sizes) is what Inductor gets now.
    be = fxfuse.Backend(debug_dir=str(tmp_path))
    compiled = torch.compile(model, backend=be, dynamic=True)
    for n in (5, 7, 9):
        _check_training(model, compiled, *(torch.randn(2, 2, n, 8) for _ in range(3)))
    assert [m.kind for m in be.matches] == ["attention"], be.report()
    forward, backward = _graphs(tmp_path, "aot_forward"), _graphs(tmp_path, "aot_backward")
    assert forward.count("\n") > 0 and "fxfuse" not in forward + backward


class _GeLUFunction(torch.autograd.Function):
    """A custom autograd.Function in the model's forward (BLOOM's GeLU is one): fxfuse's capture
    refuses the training graph."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * torch.sigmoid(1.702 * x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        s = torch.sigmoid(1.702 * x)
        return grad * (s + 1.702 * x * s * (1 - s))


class _CustomFunctionBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(8, 16), nn.Linear(16, 8)

    def forward(self, x):
        return self.down(_GeLUFunction.apply(self.up(x)))


def test_a_graph_fxfuse_cannot_capture_is_still_compiled_by_inductor(monkeypatch):
    """Composed with Inductor, a graph the capture refuses is Inductor's to compile, as it would be
    without fxfuse (it ran op by op before: BLOOM training lost Inductor's speed), with the warning."""
    from torch._inductor import compile_fx as inductor

    calls = []
    real = inductor.compile_fx
    monkeypatch.setattr(inductor, "compile_fx", lambda gm, inputs, **kw: calls.append(gm) or real(gm, inputs, **kw))
    torch.manual_seed(0)
    model, x = _CustomFunctionBlock(), torch.randn(2, 5, 8)
    be = fxfuse.Backend()
    with pytest.warns(UserWarning, match="runs unfused, compiled by Inductor as written"):
        got = _train(model, torch.compile(model, backend=be), x)
    assert len(calls) == 1 and be.misses and be.misses[0].kind == "graph", be.report()
    reference = copy.deepcopy(model).double()
    for g, e, r in zip(got, _train(model, model, x), _train(reference, reference, x.double())):
        assert_close_to_reference(g, e, r, "custom-function block")
