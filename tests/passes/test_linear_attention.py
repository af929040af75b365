"""Linear attention written quadratically is rewritten into phi(q) @ (phi(k)^T @ v) (chunked when
causal): equal to eager in float64, within the table's bound of a float64 reference in float32 and
bfloat16, gradients included, no (L, L) tensor left; near-misses are declined or not candidates."""
import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

import fxfuse
from fxfuse.spec_linear_attention import LinearAttentionSpec
from tests import linear_attention_styles as styles
from tests.tolerances import assert_close_to_reference, tolerance

PASSES = "canonicalize,fuse-linear-attention"
B, H, L, D = 2, 2, 70, 4  # L > the 64-row chunk, and not a multiple of it


def _inputs(dtype=torch.float64, length=L, grad=False):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(B, H, length, D, generator=g, dtype=torch.float64).to(dtype).requires_grad_(grad) for _ in range(3)]


def _largest_square(gm, length):
    """Whether any tensor of the graph, the fused operator's own steps included, is (..., L, L)."""
    traced = make_fx(gm)(*_inputs(length=length))
    return any(isinstance(v := n.meta.get("val"), torch.Tensor) and v.dim() >= 2 and tuple(v.shape[-2:]) == (length, length)
               for n in traced.graph.nodes)


@pytest.mark.parametrize("style", styles.STYLES, ids=lambda s: s.__name__)
def test_style_is_rewritten_exactly_in_float64(style):
    q, k, v = _inputs()
    res = fxfuse.rewrite(style, (q, k, v), passes=PASSES)
    assert [m.kind for m in res.matches] == ["linear_attention"] and not res.misses, res.report()
    assert res.matches[0].spec.causal == (style in styles.CAUSAL)
    torch.testing.assert_close(res.module(q, k, v), style(q, k, v), **dict(zip(("rtol", "atol"), tolerance(torch.float64))))
    assert not _largest_square(res.module, L)


@pytest.mark.parametrize("style", [styles.elu_causal_masked_fill, styles.elu_einsum_normalised, styles.rebased_causal,
                                   styles.efficient_attention_heads_last, styles.softmax_features_causal],
                         ids=lambda s: s.__name__)
def test_gradients_equal_eager_in_float64(style):
    q, k, v = _inputs(grad=True)
    res = fxfuse.rewrite(style, (q, k, v), passes=PASSES)
    assert res.matches
    ours = torch.autograd.grad(res.module(q, k, v).pow(2).sum(), (q, k, v))
    eager = torch.autograd.grad(style(q, k, v).pow(2).sum(), (q, k, v))
    for got, want in zip(ours, eager):
        torch.testing.assert_close(got, want, **dict(zip(("rtol", "atol"), tolerance(torch.float64))))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("style", [styles.elu_causal_masked_fill, styles.efficient_attention], ids=lambda s: s.__name__)
def test_low_precision_within_the_table_of_a_float64_reference(style, dtype):
    q, k, v = _inputs(length=200)
    res = fxfuse.rewrite(style, tuple(t.to(dtype) for t in (q, k, v)), passes=PASSES)
    assert res.matches
    low = [t.to(dtype) for t in (q, k, v)]
    assert_close_to_reference(res.module(*low), style(*low), style(q, k, v), f"{style.__name__} {dtype}")


@pytest.mark.parametrize("style", list(styles.NEAR_MISSES), ids=lambda s: s.__name__)
def test_near_miss_is_left_as_written(style):
    q, k, v = _inputs()
    res = fxfuse.rewrite(style, (q, k, v), passes=PASSES)
    reason = styles.NEAR_MISSES[style]
    assert not res.matches, res.report()
    if reason is None:
        assert not res.misses, res.report()
    else:
        assert len(res.misses) == 1 and reason in res.misses[0].reason, res.report()
    got, want = res.module(q, k, v), style(q, k, v)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_a_mask_that_promotes_the_scores_is_declined():
    q, k, v = (t.to(torch.bfloat16) for t in _inputs())
    res = fxfuse.rewrite(styles.promoting_mask, (q, k, v), passes=PASSES)
    assert not res.matches and "promotes" in res.misses[0].reason, res.report()
    torch.testing.assert_close(res.module(q, k, v), styles.promoting_mask(q, k, v), rtol=0, atol=0)


def test_features_used_elsewhere_still_match():
    """phi(q) is an input of both orders: reusing it elsewhere changes nothing."""
    def model(q, k, v):
        q = torch.nn.functional.elu(q) + 1
        return styles.efficient_attention(q, k, v) + q

    q, k, v = _inputs()
    res = fxfuse.rewrite(model, (q, k, v), passes=PASSES)
    assert res.matches and not res.misses
    torch.testing.assert_close(res.module(q, k, v), model(q, k, v))


def test_single_head_mm():
    def model(q, k, v):
        s = torch.tril((torch.relu(q) @ torch.relu(k).T))
        return (s @ v) / (s.sum(-1, keepdim=True) + 1e-6)

    q, k, v = (t[0, 0] for t in _inputs())
    res = fxfuse.rewrite(model, (q, k, v), passes=PASSES)
    assert res.matches and res.matches[0].spec.features == "relu"
    torch.testing.assert_close(res.module(q, k, v), model(q, k, v))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("length", [1, 63, 64, 65, 130])
def test_operator_against_the_quadratic_form_in_float64(causal, length):
    g = torch.Generator().manual_seed(1)
    a, v = torch.rand(3, length, 5, generator=g, dtype=torch.float64), torch.randn(3, length, 6, generator=g, dtype=torch.float64)
    bt = torch.rand(3, 5, length, generator=g, dtype=torch.float64)
    s = a @ bt
    s = s.tril() if causal else s
    op = torch.ops.fxfuse.linear_attention
    num = op(a, bt, v, LinearAttentionSpec(causal, True, "any").to_json())
    den = op(a, bt, None, LinearAttentionSpec(causal, False, "any").to_json())
    torch.testing.assert_close(num, s @ v, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(den, s.sum(-1, keepdim=True), rtol=1e-12, atol=1e-12)
    small = [t[:, :9].clone().requires_grad_() for t in (a, v)] + [bt[..., :9].clone().requires_grad_()]
    assert torch.autograd.gradcheck(lambda a, v, bt: op(a, bt, v, LinearAttentionSpec(causal, True, "any", 4).to_json()), small)


def test_under_torch_compile():
    q, k, v = _inputs(torch.float32)
    backend = fxfuse.Backend(passes=PASSES)
    compiled = torch.compile(styles.elu_causal_masked_fill, backend=backend)
    torch.testing.assert_close(compiled(q, k, v), styles.elu_causal_masked_fill(q, k, v), rtol=1e-5, atol=1e-5)
    assert [m.kind for m in backend.matches] == ["linear_attention"]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("values", [True, False])
def test_opcheck(causal, values):
    a, bt = torch.rand(2, 9, 3), torch.rand(2, 3, 9)
    v = torch.randn(2, 9, 4) if values else None
    spec = LinearAttentionSpec(causal, values, "any", 4).to_json()
    torch.library.opcheck(torch.ops.fxfuse.linear_attention.default, (a, bt, v, spec))
    grad = torch.randn(2, 9, 4 if values else 1)
    torch.library.opcheck(torch.ops.fxfuse.linear_attention_backward.default, (grad, a, bt, v, spec))


def test_bfloat16_gradients_within_the_table():
    q, k, v = _inputs(length=100, grad=True)
    low = [t.detach().to(torch.bfloat16).requires_grad_() for t in (q, k, v)]
    style = styles.elu_causal_masked_fill
    res = fxfuse.rewrite(style, tuple(low), passes=PASSES)
    assert res.matches
    ours = torch.autograd.grad(res.module(*low).float().sum(), low)
    eager = torch.autograd.grad(style(*low).float().sum(), low)
    reference = torch.autograd.grad(style(q, k, v).sum(), (q, k, v))
    for got, want, ref in zip(ours, eager, reference):
        assert_close_to_reference(got, want, ref, "bf16 gradient")


@pytest.mark.parametrize("style", styles.STYLES, ids=lambda s: s.__name__)
def test_elementwise_feature_maps_are_applied_in_the_operator(style):
    """elu + 1, relu, exp, sigmoid and the square move into the operator (q and k are its inputs):
    no feature-map op is left in the graph, so phi(q), phi(k) are neither written nor saved."""
    res = fxfuse.rewrite(style, tuple(_inputs()), passes=PASSES)
    want = styles.APPLIED_IN_THE_OPERATOR[style]
    assert {(m.spec.phi_a, m.spec.phi_b) for m in res.matches} == {want}, res.report()
    left = {str(n.target) for n in res.graph.graph.nodes if n.op == "call_function"}
    features = {"aten.elu.default", "aten.relu.default", "aten.exp.default", "aten.sigmoid.default", "aten.pow.Tensor_Scalar",
                "aten._softmax.default"}
    assert not (left & features) if all(want) else True, left
    assert ("feature map applied in the operator" in " ".join(res.matches[0].notes)) == any(want)


@pytest.mark.parametrize("style", styles.FEATURES_KEPT_IN_THE_GRAPH, ids=lambda s: s.__name__)
def test_other_feature_maps_stay_in_the_graph_and_the_site_is_fused(style):
    ins = _inputs(torch.float32, grad=True)
    res = fxfuse.rewrite(style, tuple(ins), passes=PASSES)
    assert [(m.kind, m.spec.phi_a, m.spec.phi_b) for m in res.matches] == [("linear_attention", "", "")], res.report()
    ref = style(*[t.detach().double() for t in ins])
    assert_close_to_reference(res.module(*ins), style(*ins), ref, style.__name__)


def test_training_saves_q_and_k_not_their_features():
    """What autograd keeps for the backward: the operator's inputs (q, k, v before phi), never phi(q)."""
    q, k, v = _inputs(torch.float32, grad=True)
    res = fxfuse.rewrite(styles.elu_causal_masked_fill, (q, k, v), passes=PASSES)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = res.module(q, k, v)
    features = (torch.nn.functional.elu(q) + 1).detach()

    def holds(t, x):  # the operator sees (B*H, L, D) views or copies of the (B, H, L, D) tensors
        return t.numel() == x.numel() and torch.equal(t.detach().reshape(x.shape), x.detach())

    assert saved and not any(holds(t, features) for t in saved)
    assert any(holds(t, q) for t in saved)
    out.sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()


@pytest.mark.parametrize("style", list(styles.SOFTMAX_NEAR_MISSES), ids=lambda s: s.__name__)
def test_softmax_feature_maps_the_operator_does_not_apply_stay_in_the_graph(style):
    """The site is still fused (exact: the graph computes those features), the softmax that the
    operator would compute differently stays as written, with a note saying why when it is one."""
    ins = _inputs()
    res = fxfuse.rewrite(style, tuple(ins), passes=PASSES)
    (phi, words) = styles.SOFTMAX_NEAR_MISSES[style]
    assert [(m.spec.phi_a, m.spec.phi_b) for m in res.matches] == [phi], res.report()
    softmaxes = sum(n.target == torch.ops.aten._softmax.default for n in res.graph.graph.nodes)
    assert softmaxes == sum(not p for p in phi), res.graph.graph
    if words:
        assert any(words in note for note in res.matches[0].notes), res.report()
    torch.testing.assert_close(res.module(*ins), style(*ins), **dict(zip(("rtol", "atol"), tolerance(torch.float64))))


SOFTMAX_SPECS = [("softmax_features", "softmax_keys", False), ("softmax_features", "softmax_features", True),
                 ("", "softmax_keys", False), ("softmax_features", "", True), ("softmax_features", "relu", False)]


@pytest.mark.parametrize("phi_a,phi_b,causal", SOFTMAX_SPECS)
@pytest.mark.parametrize("length", [1, 5, 70])
def test_softmax_maps_on_the_torch_path_in_float64(phi_a, phi_b, causal, length):
    """q's softmax over the features, k's over the features or (non-causal) the sequence, applied by
    the operator: equal to the quadratic form on the softmaxed operands, gradients by gradcheck
    (softmax's Jacobian-vector product on each line); the normaliser too."""
    g = torch.Generator().manual_seed(2)
    a = torch.randn(2, length, 3, generator=g, dtype=torch.float64)
    bt = torch.randn(2, 3, length, generator=g, dtype=torch.float64)
    v = torch.randn(2, length, 4, generator=g, dtype=torch.float64)
    maps = {"softmax_features": {"a": lambda x: x.softmax(-1), "bt": lambda x: x.softmax(-2)},
            "softmax_keys": {"bt": lambda x: x.softmax(-1)}, "relu": {"bt": torch.relu}, "": {"a": lambda x: x, "bt": lambda x: x}}
    s = maps[phi_a]["a"](a) @ maps[phi_b]["bt"](bt)
    s = s.tril() if causal else s
    op = torch.ops.fxfuse.linear_attention
    for values in (v, None):
        spec = LinearAttentionSpec(causal, values is not None, "softmax", 4, phi_a=phi_a, phi_b=phi_b).to_json()
        want = s @ v if values is not None else s.sum(-1, keepdim=True)
        torch.testing.assert_close(op(a, bt, values, spec), want, rtol=1e-12, atol=1e-12)
        ins = [t[:, :, :3].clone().requires_grad_() if t is bt else t[:, :3].clone().requires_grad_()
               for t in (a, bt, values) if t is not None]
        assert torch.autograd.gradcheck(lambda *x: op(x[0], x[1], x[2] if len(x) > 2 else None, spec), ins)
    mm = LinearAttentionSpec(causal, True, "softmax", 4, phi_a=phi_a, phi_b=phi_b).to_json()  # a single mm
    torch.testing.assert_close(op(a[0], bt[0], v[0], mm), (s @ v)[0], rtol=1e-12, atol=1e-12)


def test_keys_softmax_over_the_sequence_is_non_causal_only():
    with pytest.raises(ValueError, match="non-causal only"):
        LinearAttentionSpec(True, True, "softmax", phi_b="softmax_keys")
    with pytest.raises(ValueError, match="bt only"):
        LinearAttentionSpec(False, True, "softmax", phi_a="softmax_keys")


@pytest.mark.parametrize("style", [styles.efficient_attention, styles.efficient_attention_heads_last],
                         ids=lambda s: s.__name__)
def test_training_saves_q_and_k_not_their_softmaxes(style):
    """Efficient attention: autograd keeps the operator's inputs (q, k before their softmaxes),
    never softmax(q) or softmax(k); the gradients still equal eager's."""
    q, k, v = _inputs(grad=True)
    res = fxfuse.rewrite(style, (q, k, v), passes=PASSES)
    assert [(m.spec.phi_a, m.spec.phi_b) for m in res.matches] == [("softmax_features", "softmax_keys")], res.report()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = res.module(q, k, v)

    def holds(t, x):  # (B*H, L, D) views or copies of the (B, H, L, D) tensors, or k's transpose
        return any(t.numel() == y.numel() and torch.equal(t.detach().reshape(y.shape), y.detach())
                   for y in (x, x.transpose(-2, -1).contiguous()))

    assert saved and not any(holds(t, q.softmax(-1)) or holds(t, k.softmax(-2)) for t in saved)
    assert any(holds(t, q) for t in saved) and any(holds(t, k) for t in saved)
    ours = torch.autograd.grad(out.sum(), (q, k, v))
    eager = torch.autograd.grad(style(q, k, v).sum(), (q, k, v))
    for got, want in zip(ours, eager):
        torch.testing.assert_close(got, want, **dict(zip(("rtol", "atol"), tolerance(torch.float64))))


@pytest.mark.parametrize("style", styles.LINEAR_ORDER, ids=lambda s: s.__name__)
def test_efficient_attention_in_the_linear_order_takes_its_softmaxes_in(style):
    """q_s @ (k_s^T @ v), or the paper code's context^T @ q_s channels first: one operator, both
    softmaxes applied in it; output and gradients equal eager's in float64."""
    q, k, v = _inputs(grad=True)
    res = fxfuse.rewrite(style, (q, k, v), passes=PASSES)
    assert [(m.kind, m.spec.causal, m.spec.phi_a, m.spec.phi_b) for m in res.matches] == \
        [("linear_attention", False, "softmax_features", "softmax_keys")] and not res.misses, res.report()
    assert "linear order" in res.matches[0].notes[0]
    left = {n.target for n in res.graph.graph.nodes if n.op == "call_function"}
    assert not left & {torch.ops.aten._softmax.default, torch.ops.aten.bmm.default}, left
    rtol, atol = tolerance(torch.float64)
    out = res.module(q, k, v)
    torch.testing.assert_close(out, style(q, k, v), rtol=rtol, atol=atol)
    for got, want in zip(torch.autograd.grad(out.pow(2).sum(), (q, k, v)),
                         torch.autograd.grad(style(q, k, v).pow(2).sum(), (q, k, v))):
        torch.testing.assert_close(got, want, rtol=rtol, atol=atol)


@pytest.mark.parametrize("style", [styles.two_products_without_feature_maps, styles.context_used_twice],
                         ids=lambda s: s.__name__)
def test_two_products_that_are_not_a_linear_attention_site_are_left_as_written(style):
    q, k, v = _inputs()
    res = fxfuse.rewrite(style, (q, k, v), passes=PASSES)
    assert not res.matches and not res.misses, res.report()
    got, want = res.module(q, k, v), style(q, k, v)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_the_linear_order_in_float32_and_bfloat16_within_the_table():
    q, k, v = _inputs(length=200)
    style = styles.efficient_attention_paper_code
    for dtype in (torch.float32, torch.bfloat16):
        low = [t.to(dtype) for t in (q, k, v)]
        res = fxfuse.rewrite(style, tuple(low), passes=PASSES)
        assert res.matches, res.report()
        assert_close_to_reference(res.module(*low), style(*low), style(q, k, v), f"paper code {dtype}")
