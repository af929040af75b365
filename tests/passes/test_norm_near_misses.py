"""Near-misses: code that looks like a norm but computes something else must be left as written.

Each case asserts three things: the site is not rewritten into a norm (or, where only a trailing
parameter is wrong, the norm core fuses and that parameter stays outside), a recorded miss says
why in words a user can act on, and the rewritten module still computes what eager does. A
property test at the end generates norms with one or two parts changed and checks the last of
these for every one of them.
"""
import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import fxfuse
from fxfuse.passes.canonicalize import Canonicalize
from tests.tolerances import tolerance

EPS = 1e-6
D = 8


def _rms(x, dim=-1):
    return x * torch.rsqrt(x.pow(2).mean(dim, keepdim=True) + EPS)


def _rewrite(fn, *inputs):
    """Rewrite ``fn`` and check that the rewritten module returns what eager does, and gives the
    same gradients to its floating-point inputs."""
    res = fxfuse.rewrite(fn, inputs)

    def run(f):
        leaves = [t.clone().requires_grad_(t.is_floating_point()) for t in inputs]
        out = f(*leaves)
        out = out if isinstance(out, tuple) else (out,)
        sum(o.float().pow(2).sum() for o in out if o.requires_grad).backward()
        return out, [t.grad for t in leaves if t.is_floating_point()]

    (got, got_grads), (expected, expected_grads) = run(res.module), run(fn)
    for g, e in zip([*got, *got_grads], [*expected, *expected_grads], strict=True):
        rtol, atol = tolerance(e.dtype)
        torch.testing.assert_close(g, e, rtol=rtol, atol=atol)
    return res


def _reasons(res) -> str:
    return " | ".join(m.reason for m in res.misses).lower()


def _assert_declined(res, *words):
    assert not res.matches, res.report()
    assert "fxfuse" not in res.graph.code, res.graph.code
    text = _reasons(res)
    for word in words:
        assert word.lower() in text, f"{word!r} not in the misses: {text}"


# ---- sites that are not norms at all --------------------------------------------------------------

DECLINED = {
    "reduce_other_axis": (lambda x: _rms(x, 0), (4, D), ["dims [0]", "last dimension"]),
    "reduce_two_axes": (lambda x: _rms(x, (-2, -1)), (3, 4, D), ["dims [-2, -1]", "last dimension"]),
    "eps_outside_sqrt": (lambda x: x / (torch.sqrt(x.pow(2).mean(-1, keepdim=True)) + EPS), (4, D),
                         ["outside the square root"]),
    "unbiased_var": (lambda x: (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, keepdim=True) + EPS), (4, D),
                     ["unbiased", "unbiased=False"]),
    "unbiased_var_mean": (lambda x: (x - torch.var_mean(x, -1, keepdim=True)[1])
                          * torch.rsqrt(torch.var_mean(x, -1, keepdim=True)[0] + EPS), (4, D), ["unbiased"]),
    # A square input makes the non-keepdim statistic broadcast along the wrong axis without an error.
    "mean_without_keepdim": (lambda x: x * torch.rsqrt(x.pow(2).mean(-1) + EPS), (D, D), ["keepdim=True"]),
    "eps_is_a_tensor": (lambda x: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + torch.tensor(EPS)), (4, D),
                        ["eps is a tensor"]),
    "product_of_two_tensors": (lambda x: x * torch.rsqrt((x.exp() * x.exp().flip(-1)).mean(-1, keepdim=True) + EPS), (4, D),
                               ["product of two different tensors"]),
    "centering_mean_over_other_axis": (
        lambda x: (x - x.mean(0, keepdim=True))
        * torch.rsqrt(((x - x.mean(0, keepdim=True)) ** 2).mean(-1, keepdim=True) + EPS),
        (4, D), ["mean subtracted", "dims [0]"]),
    "layer_norm_over_two_dims": (lambda x: F.layer_norm(x, x.shape[-2:]), (2, 3, D), ["last 2 dimensions"]),
    # Statistics of a bf16 copy normalizing the float32 input: the two differ by bf16 rounding.
    "stats_of_a_rounded_copy": (lambda x: x * torch.rsqrt(x.bfloat16().pow(2).mean(-1, keepdim=True) + EPS), (4, D),
                                ["bfloat16 copy", "differ by rounding"]),
    "normalizes_a_rounded_copy": (
        lambda x: x.half() * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS), (4, D),
        ["float16 copy", "differ by rounding"]),
    "statistic_of_a_slice": (lambda x: x * torch.rsqrt(x[:, :4].pow(2).mean(-1, keepdim=True) + EPS), (4, D),
                             ["not the one the statistic was computed from"]),
    # Centred in float64 while the statistics are float32: the reference would centre in float32.
    "centred_in_another_dtype": (
        lambda x: (x.double() - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, keepdim=True, correction=0) + EPS),
        (4, D), ["not the one the statistic was computed from"]),
    "mean_with_dtype": (
        lambda x: x.float() * torch.rsqrt(x.pow(2).mean(-1, keepdim=True, dtype=torch.float32) + EPS),
        (4, D), ["dtype=torch.float32", "upcast the input"]),
}


@pytest.mark.parametrize("case", sorted(DECLINED))
def test_near_miss_is_declined_with_reason(case):
    fn, shape, words = DECLINED[case]
    dtype = torch.bfloat16 if case == "mean_with_dtype" else torch.float32
    _assert_declined(_rewrite(fn, torch.randn(shape, dtype=dtype)), *words)


@pytest.mark.parametrize("returned", ["mean", "variance", "rsqrt"])
def test_intermediate_returned_by_the_model_is_not_swallowed(returned):
    def layer_norm_returning(x):
        mean = x.mean(-1, keepdim=True)
        var = ((x - mean) ** 2).mean(-1, keepdim=True)
        r = torch.rsqrt(var + EPS)
        return (x - mean) * r, {"mean": mean, "variance": var, "rsqrt": r}[returned]

    res = _rewrite(layer_norm_returning, torch.randn(4, D))
    words = ["used 2 times"] if returned == "rsqrt" else ["also used", "outside the norm"]
    _assert_declined(res, *words)


# ---- a trailing parameter that is not per-feature stays outside the fused norm --------------------

def _assert_core_fused_param_outside(res, *words):
    assert [m.kind for m in res.matches] == ["rms_norm"], res.report()
    assert not res.matches[0].spec.params, "the parameter was swallowed into the fused norm"
    assert "aten.mul.Tensor" in res.graph.code.split("fxfuse.norm")[1], res.graph.code
    text = _reasons(res)
    for word in words:
        assert word.lower() in text, f"{word!r} not in the misses: {text}"


@pytest.mark.parametrize("x_shape,w_shape", [((2, 5, D), (5, 1)), ((6, D), (6, 1))], ids=["L1", "N1"])
def test_weight_broadcast_along_another_axis_stays_outside(x_shape, w_shape):
    res = _rewrite(lambda x, w: _rms(x) * w, torch.randn(x_shape), torch.randn(w_shape))
    _assert_core_fused_param_outside(res, f"shape {list(w_shape)}", "another dimension")


def test_weight_computed_from_the_input_stays_outside():
    res = _rewrite(lambda x: _rms(x) * x.mean(0), torch.randn(4, D))
    _assert_core_fused_param_outside(res, "computed from the normalized input")


def test_mask_and_residual_after_the_norm_are_not_swallowed():
    def masked(x, w, mask):
        return _rms(x) * w * mask + x

    x, w, mask = torch.randn(2, 5, D), torch.randn(D), (torch.rand(2, 5, 1) > 0.5).float()
    res = _rewrite(masked, x, w, mask)
    assert [m.kind for m in res.matches] == ["rms_norm"]
    assert [s.op for s in res.matches[0].spec.steps] == ["mul"]  # only the per-feature weight
    after = res.graph.code.split("fxfuse.norm")[1]
    assert "aten.mul.Tensor" in after and "aten.add.Tensor" in after


# ---- soundness of the paths the recogniser takes ------------------------------------------------

def test_sub_with_alpha_is_not_a_layer_norm():
    # x - 0.5 * mean is not centred; at most it is an RMS norm of that difference, which is exact.
    def half_centred(x):
        y = torch.sub(x, x.mean(-1, keepdim=True), alpha=0.5)
        return y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + EPS)

    res = _rewrite(half_centred, torch.randn(4, D) + 3.0)
    assert "layer_norm" not in [m.kind for m in res.matches], res.report()


def test_layer_norm_centred_with_alpha_is_declined():
    def centred_with_alpha(x):
        mean = x.mean(-1, keepdim=True)
        return torch.sub(x, mean, alpha=0.5) / torch.sqrt(x.var(-1, keepdim=True, unbiased=False) + EPS)

    _assert_declined(_rewrite(centred_with_alpha, torch.randn(4, D) + 3.0), "not the one the statistic")


def test_cast_to_another_device_is_not_stripped():
    # A device copy is not a plain cast: the fused op must read the copy, not the original tensor.
    def on_meta(x):
        return _rms(x.to("meta"))

    res = fxfuse.rewrite(on_meta, (torch.randn(4, D),))
    norm = next(n for n in res.graph.graph.nodes if "fxfuse" in str(n.target))
    assert norm.args[0].meta["val"].device.type == "meta"
    assert res.module(torch.randn(4, D)).device.type == "meta"


def test_canonicalize_keeps_in_place_ops_on_views():
    # Mutating a view changes its base too; turning it into an out-of-place op would drop that.
    def graph_with(base_op):
        g = torch.fx.Graph()
        x = g.placeholder("x")
        y = g.call_function(torch.ops.aten.mul.Tensor, (x, 2.0))
        base = g.call_function(base_op, (y, [-1]) if base_op == torch.ops.aten.view.default else (y, [-1], True))
        base.meta["val"] = torch.empty(2 * D) if base_op == torch.ops.aten.view.default else torch.empty(2, 1)
        g.call_function(torch.ops.aten.add_.Scalar, (base, 1.0))
        g.output(y)
        return torch.fx.GraphModule(torch.nn.Module(), g)

    def targets(gm):
        return [n.target for n in gm.graph.nodes]

    on_view = graph_with(torch.ops.aten.view.default)
    assert Canonicalize()(on_view).changed == 0
    assert torch.ops.aten.add_.Scalar in targets(on_view)
    on_temporary = graph_with(torch.ops.aten.mean.dim)
    assert Canonicalize()(on_temporary).changed == 1
    assert torch.ops.aten.add.Scalar in targets(on_temporary)


def test_canonicalize_keeps_in_place_ops_that_would_promote():
    # t.mul_(w) keeps t's float16; t.mul(w) with a float32 w would give float32.
    def graph_with(weight_dtype):
        g = torch.fx.Graph()
        x, w = g.placeholder("x"), g.placeholder("w")
        x.meta["val"], w.meta["val"] = torch.empty(2, D, dtype=torch.float16), torch.empty(D, dtype=weight_dtype)
        t = g.call_function(torch.ops.aten.mul.Tensor, (x, 2.0))
        t.meta["val"] = torch.empty(2, D, dtype=torch.float16)
        out = g.call_function(torch.ops.aten.mul_.Tensor, (t, w))
        g.output(out)
        return torch.fx.GraphModule(torch.nn.Module(), g)

    assert Canonicalize()(graph_with(torch.float32)).changed == 0
    assert Canonicalize()(graph_with(torch.float16)).changed == 1


# ---- property: whatever the recogniser decides, the rewritten module computes what eager does ----

# A valid norm (first option of each field), then up to two fields changed to any option: most
# examples are norms or near-misses of one, which is where a recogniser can go wrong.
OPTIONS = {
    "cast": [None, torch.float64, torch.bfloat16],  # what the statistic is computed on
    "operand": ["same", "input", "half"],  # what is normalized
    "centre": [None, -1, 0, "alpha"],
    "square": ["pow", "mul", "other"],
    "dims": [-1, 0, (-2, -1)],
    "keepdim": [True, False],
    "eps": ["inside", "left", "tensor", "outside", "none"],
    "inverse": ["rsqrt", "sqrt"],
    "weight": ["row", None, "(1,D)", "column", "from_x"],
    "bias": [True, False],
    "returns_stat": [False, True],
}


@st.composite
def _variants(draw):
    v = {k: options[0] for k, options in OPTIONS.items()}
    v["centre"] = draw(st.sampled_from([None, -1]))  # an RMSNorm or a LayerNorm
    for field in draw(st.sets(st.sampled_from(sorted(OPTIONS)), max_size=2)):
        v[field] = draw(st.sampled_from(OPTIONS[field]))
    return v


def _variant(v):
    def fn(x, w, b, column):
        xc = x if v["cast"] is None else x.to(v["cast"])
        if v["centre"] == "alpha":
            xc = torch.sub(xc, xc.mean(-1, keepdim=True), alpha=0.5)
        elif v["centre"] is not None:
            xc = xc - xc.mean(v["centre"], keepdim=True)
        sq = {"pow": xc.pow(2), "mul": xc * xc, "other": xc * xc.flip(-1).abs()}[v["square"]]
        stat = sq.mean(v["dims"], keepdim=v["keepdim"])
        if not v["keepdim"]:
            stat = stat.unsqueeze(-1) if v["dims"] == -1 else stat
        inner = {"inside": stat + EPS, "left": EPS + stat, "tensor": stat + torch.tensor(EPS), "outside": stat,
                 "none": stat}[v["eps"]]
        operand = {"same": xc, "input": x, "half": x.half()}[v["operand"]]
        if v["inverse"] == "rsqrt":
            y = operand * torch.rsqrt(inner)
        else:
            root = torch.sqrt(inner)
            y = operand / (root + EPS if v["eps"] == "outside" else root)
        if v["weight"] is not None:
            y = y * {"row": w, "(1,D)": w[None], "column": column, "from_x": x.mean(0)}[v["weight"]]
        if v["bias"]:
            y = y + b
        return (y, stat) if v["returns_stat"] else y
    return fn


# FXFUSE_FUZZ_EXAMPLES=2000 for a longer search (each example is a capture and a rewrite: ~30 ms).
@settings(max_examples=int(os.environ.get("FXFUSE_FUZZ_EXAMPLES", 120)), deadline=None)
@given(_variants())
def test_any_variant_rewrites_to_what_eager_computes(v):
    inputs = (torch.randn(3, D) + 0.5, torch.randn(D), torch.randn(D), torch.randn(3, 1))
    fn = _variant(v)
    try:
        expected = fn(*inputs)
    except RuntimeError:
        return  # shapes that do not broadcast in eager either
    res = fxfuse.rewrite(fn, inputs)
    got = res.module(*inputs)
    got, expected = (got, expected) if isinstance(got, tuple) else ((got,), (expected,))
    for g, e in zip(got, expected, strict=True):
        assert g.dtype == e.dtype and g.shape == e.shape
        rtol, atol = tolerance(e.dtype)
        torch.testing.assert_close(g, e, rtol=rtol, atol=atol, equal_nan=True, msg=lambda m: f"{v}: {m}")
