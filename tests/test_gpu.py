"""GPU checks: the generated Triton kernels compiled for CUDA (not interpreted) against a float64
reference, through the whole rewrite and through the torch.compile backend. Marked ``gpu``: they
are skipped on machines without CUDA (CI) and run on the GPU machine with ``pytest -m gpu``."""
import copy

import pytest
import torch

import fxfuse
from tests.attention_styles import STYLES as ATTENTION_STYLES
from tests.attention_differential_styles import STYLES as DIFFERENTIAL_STYLES
from tests.attention_variant_styles import VARIANT_STYLES
from tests.norm_styles import LAYER_STYLES, RMS_STYLES, PreNormResidualBlock, build
from tests.norm_sum_styles import SUM_STYLES
from tests.linear_attention_styles import LINEAR_ORDER, STYLES as LINEAR_STYLES
from tests.polynorm_styles import STYLES as POLYNORM_STYLES
from tests.tolerances import assert_close_to_reference

pytestmark = pytest.mark.gpu
D = 1000  # not a power of two: the kernels' masked tail


def _forward_backward(model, inputs):
    out = model(*inputs)
    out.float().pow(2).sum().backward()
    return out, [p.grad for p in model.parameters()]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("style", RMS_STYLES + LAYER_STYLES, ids=lambda s: s.__name__)
def test_norm_kernels_on_cuda(style, dtype):
    model = build(style, D).cuda().to(dtype)
    x = torch.randn(4, 37, D, device="cuda", dtype=dtype)
    res = fxfuse.rewrite(model, (x,))
    assert len(res.matches) == 1, res.report()
    expected, expected_grads = _forward_backward(copy.deepcopy(model).double(), [x.double()])
    eager, eager_grads = _forward_backward(copy.deepcopy(model), [x])
    model.zero_grad()
    got, got_grads = _forward_backward(res.module, [x])
    assert_close_to_reference(got, eager, expected, "output")
    for g, e, r in zip(got_grads, eager_grads, expected_grads):
        assert_close_to_reference(g, e, r, "parameter gradient")


def test_residual_norm_on_cuda():
    model = PreNormResidualBlock(D).cuda()
    x, delta = torch.randn(8, D, device="cuda"), torch.randn(8, D, device="cuda")
    res = fxfuse.rewrite(model, (x, delta))
    assert res.matches[0].spec.residual
    torch.testing.assert_close(res.module(x, delta), model(x, delta), rtol=1e-4, atol=1e-4)


def _first(out):
    return out[0] if isinstance(out, tuple) else out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("style", SUM_STYLES + POLYNORM_STYLES, ids=lambda s: s.__name__)
def test_sum_norm_and_polynorm_kernels_on_cuda(style, dtype):
    """DeepNorm / B2T sums (fxfuse.sum_norm) and PolyNorm (fxfuse.polynorm), compiled for CUDA."""
    model = (style(D) if style in SUM_STYLES else style()).cuda().to(dtype)
    x = torch.randn(4, 37, D, device="cuda", dtype=dtype)
    res = fxfuse.rewrite(model, (x,))
    assert any(m.kind == "polynorm" or m.spec.sum_scales for m in res.matches), res.report()

    def run(m, inp, params):
        inp = inp.clone().requires_grad_()
        out = _first(m(inp))
        return out, torch.autograd.grad(out.float().pow(2).sum(), [inp, *params])

    ref_model = copy.deepcopy(model).double()
    expected, expected_grads = run(ref_model, x.double(), list(ref_model.parameters()))
    eager, eager_grads = run(model, x, list(model.parameters()))
    got, got_grads = run(res.module, x, list(model.parameters()))
    assert_close_to_reference(got, eager, expected, "output")
    for g, e, r in zip(got_grads, eager_grads, expected_grads):
        assert_close_to_reference(g, e, r, "gradient")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("style", ATTENTION_STYLES + VARIANT_STYLES, ids=lambda s: s.__name__)
def test_attention_kernels_on_cuda(style, dtype):
    model = style().cuda().to(dtype)
    inputs = [t.cuda() for t in model.inputs(dtype)]
    res = fxfuse.rewrite(model, tuple(inputs))
    assert [m.kind for m in res.matches] == ["attention"], res.report()
    leaves = [t.requires_grad_() if t.is_floating_point() else t for t in inputs]
    got = res.module(*leaves)
    ref = copy.deepcopy(model).double()(*[t.detach().double() if t.is_floating_point() else t for t in inputs])
    eager = model(*[t.detach() for t in inputs])
    assert_close_to_reference(got.detach(), eager, ref, "output")
    got.float().pow(2).sum().backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in leaves if t.is_floating_point())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("style", DIFFERENTIAL_STYLES, ids=lambda s: s.__name__)
def test_differential_kernel_on_cuda(style, dtype):
    """The two-softmax forward compiled for CUDA, and the halves' backward kernels."""
    model = style().cuda().to(dtype)
    inputs = [t.cuda().requires_grad_() for t in model.inputs(dtype)]
    res = fxfuse.rewrite(model, tuple(inputs))
    assert "differential" in [m.kind for m in res.matches], res.report()
    got = res.module(*inputs)
    ref = copy.deepcopy(model).double()(*[t.detach().double() for t in inputs])
    eager = model(*[t.detach() for t in inputs])
    assert_close_to_reference(got.detach(), eager, ref, "output")
    got.float().pow(2).sum().backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in inputs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_differential_backward_kernels_on_cuda(dtype):
    """The differential backward kernels compiled for CUDA (head dim 64, ragged lengths, a padding
    mask, causal with Lq < Lk, lambda per head) against float64, from the forward's saved statistics."""
    from tests.passes.test_attention_differential_backward import NAMES, _spec

    b, h, lq, lk, d = 2, 4, 333, 401, 64
    g = torch.Generator().manual_seed(5)
    r = lambda *s: torch.randn(s, generator=g, dtype=torch.float64)  # noqa: E731
    wide = [r(b, h, lq, d), r(b, h, lk, d), r(b, h, lq, d), r(b, h, lk, d), r(b, h, lk, d), 0.4 + 0.1 * r(h, 1, 1)]
    keep = torch.ones(b, 1, 1, lk, dtype=torch.bool)
    keep[1, ..., lk - 50:] = False
    upstream = r(b, h, lq, d)
    hidden = torch.ones(lq, lk, dtype=torch.bool).triu(lk - lq + 1)

    def reference(q1, k1, q2, k2, v, lam):
        def attend(q, k):
            s = (q @ k.transpose(-1, -2) * d ** -0.5).masked_fill(~keep.to(q.device), float("-inf"))
            return torch.softmax(s.masked_fill(hidden.to(q.device), float("-inf")), -1) @ v
        return attend(q1, k1) - lam * attend(q2, k2)

    leaves = [t.to(dtype).cuda().requires_grad_() for t in wide]
    spec = _spec(str(dtype).removeprefix("torch."), True, False, True)
    out = torch.ops.fxfuse.attention_differential(*leaves, [keep.cuda()], spec.to_json())[0]
    got = torch.autograd.grad(out, leaves, upstream.to(dtype).cuda())
    wide = [t.requires_grad_() for t in wide]
    ref = torch.autograd.grad(reference(*wide), wide, upstream)
    eager = torch.autograd.grad(reference(*leaves), leaves, upstream.to(dtype).cuda())
    for name, gk, e, rf in zip(NAMES, got, eager, ref):
        assert_close_to_reference(gk.cpu(), e.cpu(), rf, name)


def test_backend_on_cuda_trains_like_eager():
    model = PreNormResidualBlock(256).cuda()
    reference = copy.deepcopy(model)
    compiled = torch.compile(model, backend="fxfuse")
    x, delta = torch.randn(4, 16, 256, device="cuda"), torch.randn(4, 16, 256, device="cuda")
    compiled(x, delta).pow(2).sum().backward()
    reference(x, delta).pow(2).sum().backward()
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-4)


class _DroppedAttention(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.drop = torch.nn.Dropout(0.2)

    def forward(self, q, k, v):
        return self.drop((q @ k.transpose(-1, -2) * 0.3).softmax(-1)) @ v


def test_attention_dropout_on_cuda():
    # On CUDA F.dropout traces as native_dropout; the compiled kernels draw the mask with Philox.
    # The mask for the step's seed (replayed from torch's generator) makes it exact: forward and
    # backward equal eager's dropout with that mask.
    import dataclasses

    from fxfuse.ops.attention import keep_mask, reference

    q, k, v = (torch.randn(2, 3, 37, 16, device="cuda") for _ in range(3))
    res = fxfuse.rewrite(_DroppedAttention().train(), (q, k, v))
    spec = res.matches[0].spec
    assert spec.dropout == 0.2, res.report()
    upstream = torch.randn(2, 3, 37, 16, device="cuda", dtype=torch.float64)

    def run(fn, tensors):
        leaves = [t.detach().clone().requires_grad_() for t in tensors]
        out = fn(*leaves)
        (out.double() * upstream).sum().backward()
        return out, [t.grad for t in leaves]

    torch.manual_seed(5)
    got, got_grads = run(res.module, (q, k, v))
    torch.manual_seed(5)
    seed = torch.randint(0, 2**62, (), dtype=torch.int64, device="cuda")
    keep = keep_mask(spec, seed, (2, 3, 37, 37), "cuda", triton=True)
    n = keep.numel()
    assert abs(keep.sum().item() - 0.8 * n) < 5 * (n * 0.2 * 0.8) ** 0.5
    wide = dataclasses.replace(spec, score_dtype="float64", prob_dtype="float64",
                               steps=tuple(dataclasses.replace(s, dtype="float64") for s in spec.steps))
    eager, eager_grads = run(lambda q, k, v: reference(spec, q, k, v, [], keep), (q, k, v))
    ref, ref_grads = run(lambda q, k, v: reference(wide, q, k, v, [], keep), (q.double(), k.double(), v.double()))
    assert_close_to_reference(got, eager, ref, "output")
    for g, e, r in zip(got_grads, eager_grads, ref_grads):
        assert_close_to_reference(g, e, r, "gradient")


@pytest.mark.parametrize("d", [64, 128])
def test_every_launch_config_fxfuse_tries_is_exact_on_cuda(d):
    """Each config of the tuner's list (runtime.configs) computes the same attention, forward and
    backward: the split into full and masked tiles, exp2 and the reversed causal order at GPU tile
    sizes, compiled (the CPU tests cover them interpreted at small tiles)."""
    import math

    from fxfuse.ops.attention import reference, reference_backward
    from fxfuse.runtime.attention import backward, forward, launch_configs
    from fxfuse.spec_attention import AttentionSpec, ScoreStep

    spec = AttentionSpec("bfloat16", (ScoreStep("mul", "bfloat16", value=d ** -0.5),
                                      ScoreStep("fill", "bfloat16", value=-math.inf)), "bfloat16")
    wide = AttentionSpec("float64", tuple(ScoreStep(s.op, "float64", s.value) for s in spec.steps), "float64")
    q, k, v, do = (torch.randn(2, 4, 1000, d, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    exact = reference(wide, q.double(), k.double(), v.double(), [])
    exact_grads = reference_backward(wide, do.double(), q.double(), k.double(), v.double(), [])[:3]
    for function in ("forward", "backward_dkdv", "backward_dq"):
        for config in launch_configs(spec, function, q, k, v):
            if function == "forward":
                got = [forward(spec, q, k, v, [], config=config)[0]]
                want = [exact]
            else:
                got, want = backward(spec, do, q, k, v, [], config=config)[:3], exact_grads
            for g, r in zip(got, want):  # bf16 outputs: a few roundings of values of order 1
                assert (g.double() - r).abs().max() <= 2e-2 * (1 + r.abs().max()), (function, config)


@pytest.mark.parametrize("lq", [1, 4])
def test_decode_launches_split_the_keys_on_cuda(lq):
    """A decode step (few queries over a long cache) runs the split-key forward by default, and
    every config it tries gives the one-program forward's result and the float64 reference's."""
    import math

    from fxfuse.ops.attention import reference
    from fxfuse.runtime import attention_decode
    from fxfuse.runtime.attention import forward, launch_configs
    from fxfuse.spec_attention import AttentionSpec, ScoreStep

    spec = AttentionSpec("bfloat16", (ScoreStep("mul", "bfloat16", value=128 ** -0.5),
                                      ScoreStep("fill", "bfloat16", value=-math.inf)), "bfloat16", kv_groups=4)
    wide = AttentionSpec("float64", tuple(ScoreStep(s.op, "float64", s.value) for s in spec.steps), "float64",
                         kv_groups=4)
    q = torch.randn(2, 8, lq, 128, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(2, 2, 8192, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    assert attention_decode.decode_splits(spec, q, k) > 1
    exact = reference(wide, q.double(), k.double(), v.double(), [])
    whole = forward(spec, q, k, v, [], splits=1)[0]
    for config in launch_configs(spec, "forward", q, k, v):
        got = forward(spec, q, k, v, [], config=config)[0]
        assert (got.double() - exact).abs().max() <= 2e-2 * (1 + exact.abs().max()), config
        assert (got.double() - whole.double()).abs().max() <= 2e-2 * (1 + exact.abs().max()), config


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("style", LINEAR_STYLES + LINEAR_ORDER, ids=lambda s: s.__name__)
def test_linear_attention_kernels_on_cuda(style, dtype, monkeypatch):
    """fuse-linear-attention's sites run the compiled Triton kernels (forward and backward) on CUDA,
    at head dims 64 and lengths past one chunk and not a multiple of it."""
    from fxfuse.runtime import linear_attention as runtime
    from tests.tolerances import assert_close_as_a_whole

    calls = []
    for name in ("forward", "backward"):
        real = getattr(runtime, name)
        monkeypatch.setattr(runtime, name, lambda *a, real=real, name=name: calls.append(name) or real(*a))
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(2, 3, 200, 64, device="cuda", generator=g, dtype=torch.float64).requires_grad_()
               for _ in range(3))
    low = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    res = fxfuse.rewrite(style, tuple(low), passes="canonicalize,fuse-linear-attention")
    assert [m.kind for m in res.matches] == ["linear_attention"], res.report()
    out = res.module(*low)
    ours = torch.autograd.grad(out.float().sum(), low)
    assert "forward" in calls and "backward" in calls
    eager, ref = style(*low), style(q, k, v)
    eager_grads = torch.autograd.grad(eager.float().sum(), low)
    ref_grads = torch.autograd.grad(ref.sum(), (q, k, v))
    check = assert_close_to_reference if dtype == torch.float32 else \
        (lambda got, want, r, what: assert_close_as_a_whole(got, want, r, dtype, what))
    check(out, eager, ref, "output")
    for got, want, r in zip(ours, eager_grads, ref_grads):
        check(got, want, r, "gradient")
