"""The linear attention kernels (fxfuse.codegen.linear_attention), run through Triton's interpreter
at tiny shapes: forward and gradients against a float64 reference of the quadratic form, for each
form (causal or not, values or the normaliser), through the operator and through the pass for each
feature map; golden sources; and the kernels compiled for sm_90 (ptxas registers, spills, wgmma)."""
import pytest
import torch

import fxfuse
from fxfuse.codegen.linear_attention import generate
from fxfuse.runtime import linear_attention as runtime
from fxfuse.spec_linear_attention import LinearAttentionSpec
from tests import linear_attention_styles as styles
from tests.codegen.test_golden import GOLDEN_DIR, assert_matches_golden
from tests.tolerances import assert_close_as_a_whole, assert_close_to_reference

FORMS = [(causal, values) for causal in (False, True) for values in (True, False)]
N, L, S, D, E = 2, 37, 29, 5, 20  # L, S past one 16-row chunk and not a multiple of it; E two 16-column blocks


def _quadratic(a, bt, v, causal):
    s = a @ bt
    s = s.tril() if causal else s
    return s @ v if v is not None else s.sum(-1, keepdim=True)


def _operands(causal, values, grad=True):
    g = torch.Generator().manual_seed(0)
    s = L if causal else S
    a = torch.rand(N, L, D, generator=g, dtype=torch.float64)
    bt = torch.rand(N, s, D, generator=g, dtype=torch.float64).transpose(1, 2)  # as phi(k).transpose(-2, -1) is
    v = torch.randn(N, s, E, generator=g, dtype=torch.float64) if values else None
    ins = [t.requires_grad_(grad) for t in (a, bt, v) if t is not None]
    return ins, torch.randn(N, L, E if values else 1, generator=g, dtype=torch.float64)


def _kernel_calls(monkeypatch):
    calls = []
    for name in ("forward", "backward"):
        real = getattr(runtime, name)
        monkeypatch.setattr(runtime, name, lambda *args, real=real, name=name: calls.append(name) or real(*args))
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("causal,values", FORMS)
def test_interpreted_kernels_against_float64(causal, values, dtype, monkeypatch):
    calls = _kernel_calls(monkeypatch)
    ins, grad = _operands(causal, values)
    spec = LinearAttentionSpec(causal, values, "elu + 1").to_json()
    ref = _quadratic(*ins[:2], ins[2] if values else None, causal)
    ref_grads = torch.autograd.grad(ref, ins, grad)
    low = [t.detach().to(dtype).requires_grad_() for t in ins]
    v = low[2] if values else None
    eager = _quadratic(low[0], low[1], v, causal)
    eager_grads = torch.autograd.grad(eager, low, grad.to(dtype))
    with fxfuse.config.patch(interpret=True):
        out = torch.ops.fxfuse.linear_attention(low[0], low[1], v, spec)
        grads = torch.autograd.grad(out, low, grad.to(dtype))
    assert calls == ["forward", "backward"]
    assert out.dtype == dtype and out.is_contiguous() and out.shape == ref.shape
    for name, got, want, reference in [("output", out, eager, ref), *zip(("d_a", "d_bt", "d_v"), grads, eager_grads, ref_grads)]:
        assert got.shape == reference.shape and got.dtype == dtype, name
        if dtype == torch.float32:
            assert_close_to_reference(got, want, reference, f"{name} causal={causal}")
        else:  # values near zero (v, g of either sign) and the interpreter's bf16 conversion: see docs/tolerances.md
            assert_close_as_a_whole(got, want, reference, dtype, f"{name} causal={causal}")


def test_a_single_matrix_product_runs_as_a_batch_of_one():
    ins, _ = _operands(False, True, grad=False)
    a, bt, v = (t[0].float() for t in ins)
    spec = LinearAttentionSpec(False, True, "any").to_json()
    with fxfuse.config.patch(interpret=True):
        out = torch.ops.fxfuse.linear_attention(a, bt, v, spec)
    torch.testing.assert_close(out, (a.double() @ bt.double() @ v.double()).float(), rtol=1e-5, atol=1e-5)


def test_float64_and_wide_features_keep_the_torch_path(monkeypatch):
    calls = _kernel_calls(monkeypatch)
    ins, _ = _operands(True, True, grad=False)
    spec = LinearAttentionSpec(True, True, "any").to_json()
    with fxfuse.config.patch(interpret=True):
        torch.ops.fxfuse.linear_attention(*ins, spec)
    assert calls == [] and "dtype torch.float64" in runtime.supports(*ins)
    wide = torch.zeros(1, 4, runtime.MAX_D + 1)
    assert "feature dim" in runtime.supports(wide, wide.transpose(1, 2), None)


PHI64 = {"elu1": lambda x: torch.nn.functional.elu(x) + 1, "relu": torch.relu, "exp": torch.exp,
         "sigmoid": torch.sigmoid, "square": lambda x: x * x}


@pytest.mark.parametrize("causal,values", [(True, True), (False, False)])
@pytest.mark.parametrize("phi", sorted(PHI64))
def test_interpreted_kernels_apply_each_feature_map(phi, causal, values, monkeypatch):
    """The operator given q and k^T applies phi to each tile as it loads it (zero past the ends: L,
    S and D = 5 all padded, where phi(0) is 1 for three of the maps) and chains the gradients
    through phi': against float64 autograd of the quadratic form on phi(q), phi(k)."""
    calls = _kernel_calls(monkeypatch)
    ins, grad = _operands(causal, values)
    with torch.no_grad():
        for t in ins[:2]:
            t.sub_(0.5)  # both signs, so relu and elu take both branches
    ref = _quadratic(PHI64[phi](ins[0]), PHI64[phi](ins[1]), ins[2] if values else None, causal)
    ref_grads = torch.autograd.grad(ref, ins, grad)
    low = [t.detach().float().requires_grad_() for t in ins]
    v = low[2] if values else None
    eager = _quadratic(PHI64[phi](low[0]), PHI64[phi](low[1]), v, causal)
    eager_grads = torch.autograd.grad(eager, low, grad.float())
    spec = LinearAttentionSpec(causal, values, phi, phi_a=phi, phi_b=phi).to_json()
    with fxfuse.config.patch(interpret=True):
        out = torch.ops.fxfuse.linear_attention(low[0], low[1], v, spec)
        grads = torch.autograd.grad(out, low, grad.float())
    assert calls == ["forward", "backward"]
    assert_close_to_reference(out, eager, ref, f"{phi} output")
    for name, got, want, reference in zip("a bt v".split(), grads, eager_grads, ref_grads):
        assert_close_to_reference(got, want, reference, f"{phi} d_{name}")
    torch_path = torch.ops.fxfuse.linear_attention(low[0], low[1], v, spec)  # no interpretation: torch ops
    assert_close_to_reference(torch_path, eager, ref, f"{phi} output on the torch path")


SOFTMAX64 = {("a", "softmax_features"): lambda x: x.softmax(-1), ("bt", "softmax_features"): lambda x: x.softmax(-2),
             ("bt", "softmax_keys"): lambda x: x.softmax(-1), ("a", ""): lambda x: x, ("bt", ""): lambda x: x}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("values", [True, False])
@pytest.mark.parametrize("phi_a,phi_b,causal", [("softmax_features", "softmax_keys", False),
                                                ("softmax_features", "softmax_features", True),
                                                ("", "softmax_keys", False)])
def test_interpreted_kernels_apply_each_softmax_map(phi_a, phi_b, causal, values, dtype, monkeypatch):
    """q's softmax over its features (the whole row in one tile, D = 5 padded to 16), k's over its
    features or over the S = 29 keys (a first walk for each feature's max and sum, two chunks, the
    second padded): applied to each tile as it is loaded, gradients through softmax's JVP; against
    float64 autograd of the quadratic form on the softmaxed operands."""
    calls = _kernel_calls(monkeypatch)
    ins, grad = _operands(causal, values)
    with torch.no_grad():
        for t in ins[:2]:
            t.mul_(4).sub_(2)  # logits of either sign, spread enough that the softmaxes are not flat
    ref = _quadratic(SOFTMAX64["a", phi_a](ins[0]), SOFTMAX64["bt", phi_b](ins[1]), ins[2] if values else None, causal)
    ref_grads = torch.autograd.grad(ref, ins, grad)
    low = [t.detach().to(dtype).requires_grad_() for t in ins]
    v = low[2] if values else None
    eager = _quadratic(SOFTMAX64["a", phi_a](low[0]), SOFTMAX64["bt", phi_b](low[1]), v, causal)
    eager_grads = torch.autograd.grad(eager, low, grad.to(dtype))
    spec = LinearAttentionSpec(causal, values, "softmax", phi_a=phi_a, phi_b=phi_b).to_json()
    with fxfuse.config.patch(interpret=True):
        out = torch.ops.fxfuse.linear_attention(low[0], low[1], v, spec)
        grads = torch.autograd.grad(out, low, grad.to(dtype))
    assert calls == ["forward", "backward"]
    for name, got, want, reference in [("output", out, eager, ref), *zip(("d_a", "d_bt", "d_v"), grads, eager_grads, ref_grads)]:
        assert got.dtype == dtype and got.shape == reference.shape, name
        if dtype == torch.float32:
            assert_close_to_reference(got, want, reference, f"{phi_a}/{phi_b} {name}")
        else:  # as the elementwise maps' bf16 test: values of either sign near zero, see docs/tolerances.md
            assert_close_as_a_whole(got, want, reference, dtype, f"{phi_a}/{phi_b} {name}")


@pytest.mark.parametrize("style", [styles.elu_causal_masked_fill, styles.elu_einsum_normalised,
                                   styles.efficient_attention, styles.efficient_attention_heads_last,
                                   styles.efficient_attention_paper_code, styles.rebased_causal], ids=lambda s: s.__name__)
def test_each_feature_map_through_the_pass_on_the_kernels(style, monkeypatch):
    """elu + 1, softmax (q over features, k over the sequence), ReBased's square: computed in the
    graph, then the kernels; output and q/k/v gradients against float64."""
    calls = _kernel_calls(monkeypatch)
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 20, 4, generator=g, dtype=torch.float64).requires_grad_() for _ in range(3))
    low = [t.detach().float().requires_grad_() for t in (q, k, v)]
    res = fxfuse.rewrite(style, tuple(low), passes="canonicalize,fuse-linear-attention")
    assert [m.kind for m in res.matches] == ["linear_attention"], res.report()
    with fxfuse.config.patch(interpret=True):
        out = res.module(*low)
        ours = torch.autograd.grad(out.sum(), low)
    assert "forward" in calls and "backward" in calls
    ref = style(q, k, v)
    eager = style(*low)
    assert_close_to_reference(out, eager, ref, style.__name__)
    for got, want, reference in zip(ours, torch.autograd.grad(eager.sum(), low), torch.autograd.grad(ref.sum(), (q, k, v))):
        assert_close_to_reference(got, want, reference, f"{style.__name__} gradient")


SPECS = {"linear_attention_causal": LinearAttentionSpec(True, True, "elu + 1"),
         "linear_attention_normaliser": LinearAttentionSpec(False, False, "elu + 1"),
         "linear_attention_causal_elu_in_loads": LinearAttentionSpec(True, True, "elu + 1", phi_a="elu1", phi_b="elu1"),
         "linear_attention_efficient_softmax_in_loads": LinearAttentionSpec(False, True, "softmax", phi_a="softmax_features",
                                                                            phi_b="softmax_keys")}


@pytest.mark.parametrize("case", sorted(SPECS))
def test_source_matches_golden_file(case):
    assert_matches_golden(generate(SPECS[case]), GOLDEN_DIR / "linear_attention" / f"{case}.py",
                          ("_forward", "_backward_da", "_backward_dbdv"))


def test_source_is_specialised_to_the_spec():
    causal, plain = generate(SPECS["linear_attention_causal"]).source, generate(LinearAttentionSpec(False, True, "x")).source
    assert "rows[:, None] >= rows[None, :]" in causal and "rows[:, None] >= rows[None, :]" not in plain
    normaliser = generate(SPECS["linear_attention_normaliser"]).source
    assert "tl.load(V" not in normaliser and "tl.store(DV" not in normaliser and "tl.load(V" in plain


def test_bf16_kernels_compile_for_sm90_on_tensor_cores():
    from fxfuse.runtime.static_check import check, launch

    launches = [launch(LinearAttentionSpec(causal, True, "elu + 1", phi_a=phi, phi_b=phi), d=64, e=64, dtype="bfloat16")
                for causal in (False, True) for phi in ("", "elu1")]
    launches += [launch(LinearAttentionSpec(False, True, "softmax", phi_a="softmax_features", phi_b="softmax_keys"),
                        d=64, e=64, dtype="bfloat16"),
                 launch(LinearAttentionSpec(True, True, "softmax", phi_a="softmax_features", phi_b="softmax_features"),
                        d=64, e=64, dtype="bfloat16")]
    rows = list(check(launches, "sm_90", functions=("forward", "backward_da")))
    assert len(rows) == 12 and not any("error" in r for r in rows), rows
    for r in rows:
        assert r["mma"] == "wgmma" and r["spills"] == 0 and 0 < r["registers"] <= 255, r


def test_explain_target_lists_the_linear_attention_launches():
    from fxfuse.target_check import launches_of_graph

    q, k, v = (torch.randn(1, 2, 20, 16, dtype=torch.bfloat16) for _ in range(3))
    res = fxfuse.rewrite(styles.elu_causal_masked_fill, (q, k, v), passes="canonicalize,fuse-linear-attention")
    items = [i for i in launches_of_graph(res.graph) if i["kind"] == "linear_attention"]
    assert sorted(i["sizes"]["e"] for i in items) == [1, 16] and all(i["sizes"]["d"] == 16 for i in items)


def test_no_queries_gives_zero_gradients():
    spec = LinearAttentionSpec(False, True, "any").to_json()
    a, bt, v = torch.rand(2, 0, 4), torch.rand(2, 4, 5), torch.rand(2, 5, 3)
    with fxfuse.config.patch(interpret=True):
        d_a, d_bt, d_v = torch.ops.fxfuse.linear_attention_backward(torch.zeros(2, 0, 3), a, bt, v, spec)
    assert d_a.shape == (2, 0, 4) and torch.equal(d_bt, torch.zeros(2, 4, 5)) and torch.equal(d_v, torch.zeros(2, 5, 3))
