"""``F.scaled_dot_product_attention`` calls in the graph are claimed as ``fxfuse.attention``: each
argument combination becomes one fused operator whose outputs and gradients equal eager SDPA
(against a float64 reference), on the torch reference and on the interpreted Triton kernels; the
calls the operator cannot reproduce are declined with their reason."""
import operator

import pytest
import torch
import torch.nn.functional as F

import fxfuse
from fxfuse.ops.attention import reference
from fxfuse.passes.canonicalize import Canonicalize
from fxfuse.passes.sdpa import ClaimSDPA
from tests.tolerances import assert_close_to_reference

PASSES = [Canonicalize(), ClaimSDPA()]
B, H, L, D = 1, 2, 4, 8


def _qkv(lq=L, kv_heads=H, seed=0):
    """q with ``lq`` queries, k and v with L keys."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, lq, D, generator=g), torch.randn(B, kv_heads, L, D, generator=g),
            torch.randn(B, kv_heads, L, D, generator=g)]


def _padding_mask():
    """A runtime boolean mask (True takes part) whose second query row sees no key at all."""
    mask = torch.tensor([[True, False, True, True], [False] * 4, [True, True, False, True], [True] * 4])
    return mask.view(1, 1, L, L)


def _bias():
    """A runtime additive mask with a -inf entry and a row of -inf (SDPA gives 0 there)."""
    bias = torch.randn(L, L, generator=torch.Generator().manual_seed(5))
    bias[0, 2] = float("-inf")
    bias[1] = float("-inf")
    return bias


def _tril(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=torch.ones(L, L, dtype=torch.bool).tril())


# name -> (function, extra inputs, words the spec must show)
CASES = {
    "plain": (lambda q, k, v: F.scaled_dot_product_attention(q, k, v), [], "scale 0.353553"),
    "scale": (lambda q, k, v: F.scaled_dot_product_attention(q, k, v, scale=0.7), [], "scale 0.7"),
    "causal": (lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True), [], "causal (fill -inf)"),
    "constant_tril_mask": (_tril, [], "causal (fill -inf)"),
    "bool_mask": (lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, attn_mask=m), [_padding_mask()],
                  "masked_fill(~mask0, -inf)"),
    "key_padding_mask": (lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, attn_mask=m),
                         [torch.tensor([True, True, False, True]).view(1, 1, 1, L)], "masked_fill(~mask0, -inf)"),
    "float_mask": (lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, attn_mask=m), [_bias()], "+ bias0"),
    # SDPA's causal mask is top-left aligned: with Lq != Lk it is not the spec's rule but an
    # index expression (no mask tensor).
    "causal_fewer_queries": (lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True), [],
                             "masked_fill(j > i, -inf)"),
    "causal_more_queries": (lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True), [],
                            "masked_fill(j > i, -inf)"),
    # A constant mask computed from positions (a 2-key chunk) becomes an index expression too.
    "chunk_mask": (lambda q, k, v: F.scaled_dot_product_attention(
        q, k, v, attn_mask=torch.arange(L)[:, None] // 2 == torch.arange(L)[None, :] // 2), [],
        "masked_fill(i // 2 != j // 2, -inf)"),
    "gqa_causal_scale": (lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.5,
                                                                         enable_gqa=True), [],
                         "GQA 2 query heads per kv head"),
    # transformers' repeat_kv before SDPA (expand + reshape; repeat_interleave): the kv heads are
    # read in place, the repeated copies never made.
    "gqa_repeat_kv": (lambda q, k, v: F.scaled_dot_product_attention(q, _repeat_kv(k, 2), _repeat_kv(v, 2),
                                                                      is_causal=True), [],
                      "GQA 2 query heads per kv head"),
    "gqa_repeat_interleave": (lambda q, k, v: F.scaled_dot_product_attention(
        q, k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)), [], "GQA 2 query heads per kv head"),
    # A causal mask that the mask builder expanded over the batch (transformers' (B, 1, L, L)):
    # one pattern for every batch row, so the causal rule.
    "batch_expanded_tril_mask": (lambda q, k, v: F.scaled_dot_product_attention(
        q, k, v, attn_mask=torch.ones(L, L, dtype=torch.bool).tril().expand(3, 1, L, L)), [], "causal (fill -inf)"),
}


def _repeat_kv(x, groups):
    """transformers' repeat_kv: (B, Hkv, L, D) -> (B, Hkv * groups, L, D), each head repeated."""
    b, hkv, n, d = x.shape
    return x[:, :, None, :, :].expand(b, hkv, groups, n, d).reshape(b, hkv * groups, n, d)


def _run(fn, qkv, extras):
    out = fn(*qkv, *extras)
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    (out.double() * upstream).sum().backward()
    return out, [t.grad for t in qkv]


def _leaves(tensors, dtype):
    return [t.detach().to(dtype).requires_grad_() for t in tensors]


def _extras(extras, dtype):
    return [e.to(dtype) if e.is_floating_point() else e for e in extras]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("name", list(CASES))
def test_sdpa_is_claimed_and_exact(name, dtype, cpu_path):
    fn, extras, words = CASES[name]
    lq = {"causal_fewer_queries": 2, "causal_more_queries": 6}.get(name, L)
    qkv = _qkv(lq=lq, kv_heads=1 if name.startswith("gqa") else H)
    if name == "batch_expanded_tril_mask":
        qkv = [t.expand(3, *t.shape[1:]).contiguous() for t in qkv]
    res = fxfuse.rewrite(fn, (*_leaves(qkv, dtype), *_extras(extras, dtype)), passes=PASSES)
    assert [m.kind for m in res.matches] == ["attention"] and not res.misses, res.report()
    assert words in res.matches[0].describe(), res.report()
    assert "scaled_dot_product" not in res.graph.code and "fxfuse.attention" in res.graph.code, res.graph.code

    expected, expected_grads = _run(fn, _leaves(qkv, torch.float64), _extras(extras, torch.float64))
    eager, eager_grads = _run(fn, _leaves(qkv, dtype), _extras(extras, dtype))
    got, got_grads = _run(res.module, _leaves(qkv, dtype), _extras(extras, dtype))
    assert got.dtype == eager.dtype and got.shape == eager.shape
    assert not got.isnan().any() and not any(g.isnan().any() for g in got_grads)
    assert_close_to_reference(got, eager, expected, "output")
    for what, g, e, r in zip("qkv", got_grads, eager_grads, expected_grads):
        assert_close_to_reference(g, e, r, f"gradient of {what}")


def test_fully_masked_rows_are_zero_as_in_sdpa():
    # The user-written softmax gives NaN on a row with no key; SDPA gives 0, and so must the claim.
    fn, extras, _ = CASES["bool_mask"]
    qkv = _qkv()
    res = fxfuse.rewrite(fn, (*qkv, *extras), passes=PASSES)
    out = res.module(*qkv, *extras)
    assert torch.equal(out[:, :, 1], torch.zeros_like(out[:, :, 1]))
    assert torch.equal(fn(*qkv, *extras)[:, :, 1], out[:, :, 1])


def test_constant_mask_with_every_row_alive_needs_no_guard():
    res = fxfuse.rewrite(_tril, tuple(_qkv()), passes=PASSES)
    code = res.graph.code
    assert "fxfuse.attention" in code and "logical_or" not in code and "aten.where" not in code, code


def test_constant_causal_mask_hiding_whole_rows_is_guarded_not_causal():
    # Six queries, four keys, aligned bottom-right: the first two queries see no key. SDPA gives 0
    # there; the spec's causal rule alone would give NaN, so the mask stays an input, guarded.
    def fn(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=torch.ones(6, L, dtype=torch.bool).tril(-2))

    qkv = tuple(_qkv(lq=6))
    res = fxfuse.rewrite(fn, qkv, passes=PASSES)
    assert len(res.matches) == 1 and "causal" not in res.matches[0].describe(), res.report()
    got = res.module(*qkv)
    assert not got.isnan().any() and torch.allclose(got, fn(*qkv), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_bf16_spec_softmax_runs_in_f32(dtype):
    # SDPA accumulates q @ k^T and runs the softmax in float32 for half inputs: the spec's
    # reference, in those dtypes, lands as close to float64 as eager SDPA does.
    res = fxfuse.rewrite(CASES["plain"][0], tuple(t.to(dtype) for t in _qkv()), passes=PASSES)
    spec = res.matches[0].spec
    assert spec.softmax_dtype == "float32" and spec.prob_dtype == str(dtype).removeprefix("torch.")
    qkv = [t.to(dtype) for t in _qkv(seed=3)]
    got = reference(spec, *qkv, [])
    expected = F.scaled_dot_product_attention(*(t.double() for t in qkv))
    assert_close_to_reference(got, F.scaled_dot_product_attention(*qkv), expected, "reference")


def _misses(fn, inputs):
    res = fxfuse.rewrite(fn, inputs, passes=PASSES)
    assert not res.matches, res.report()
    assert "fxfuse.attention" not in res.graph.code
    return [m.reason for m in res.misses]


@pytest.mark.parametrize("causal", [False, True])
def test_math_fallback_with_dropout_is_claimed_where_every_row_keeps_a_key(causal, cpu_path):
    # On CPU SDPA with dropout_p decomposes into plain ops with _safe_softmax: fused as the
    # attention it is (no row can lose every key here), with a mask the operator draws.
    from fxfuse.ops.attention import keep_mask

    def fn(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, dropout_p=0.25, is_causal=causal)

    qkv = _leaves(_qkv(), torch.float32)
    res = fxfuse.rewrite(fn, tuple(qkv))
    assert [m.spec.dropout for m in res.matches] == [0.25] and not res.misses, res.report()
    assert "aten._safe_softmax" not in res.graph.code and "bernoulli" not in res.graph.code
    torch.manual_seed(4)
    got, grads = _run(res.module, qkv, [])
    torch.manual_seed(4)
    seed = torch.randint(0, 2**62, (), dtype=torch.int64)
    keep = keep_mask(res.matches[0].spec, seed, (B, H, L, L), "cpu", triton=cpu_path == "interpret")

    def expected(q, k, v):
        scores = q @ k.mT / D ** 0.5
        if causal:
            scores = scores.masked_fill(torch.ones(L, L, dtype=torch.bool).triu(1), float("-inf"))
        return (scores.softmax(-1) * keep / 0.75) @ v

    ref, ref_grads = _run(expected, _leaves(qkv, torch.float64), [])
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g.double(), r, rtol=1e-5, atol=1e-5)


def test_math_fallback_with_dropout_and_a_runtime_mask_is_fused_with_a_safe_softmax(cpu_path):
    # A runtime mask may hide a whole row (here the second), where SDPA's _safe_softmax gives 0 and
    # a plain softmax NaN: fuse-attention reads the decomposition with a safe softmax, so that row
    # is 0 in the output and in every gradient, as in eager.
    from fxfuse.ops.attention import keep_mask

    def fn(q, k, v, m):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=m, dropout_p=0.25)

    mask = _padding_mask()
    qkv = _leaves(_qkv(), torch.float32)
    res = fxfuse.rewrite(fn, (*qkv, mask))
    assert len(res.matches) == 1 and not res.misses, res.report()
    spec = res.matches[0].spec
    assert spec.dropout == 0.25 and spec.safe_softmax and "aten._safe_softmax" not in res.graph.code
    torch.manual_seed(4)
    got, grads = _run(res.module, qkv, [mask])
    torch.manual_seed(4)
    seed = torch.randint(0, 2**62, (), dtype=torch.int64)
    keep = keep_mask(spec, seed, (B, H, L, L), "cpu", triton=cpu_path == "interpret")

    def expected(q, k, v):
        scores = (q @ k.mT / D ** 0.5).masked_fill(~mask, float("-inf"))
        return (torch.ops.aten._safe_softmax(scores, -1) * keep / 0.75) @ v

    ref, ref_grads = _run(expected, _leaves(qkv, torch.float64), [])
    assert not got.isnan().any() and not any(g.isnan().any() for g in grads)
    assert torch.equal(got[:, :, 1], torch.zeros_like(got[:, :, 1])) and torch.equal(grads[0][:, :, 1],
                                                                                    torch.zeros_like(grads[0][:, :, 1]))
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g.double(), r, rtol=1e-5, atol=1e-5)


def _eager_and_fused(fn, inputs):
    """(fused, eager, float64 eager) outputs and gradients of every floating input."""
    res = fxfuse.rewrite(fn, tuple(t.detach().requires_grad_(t.is_floating_point()) for t in inputs))
    runs = []
    for module, dtype in ((res.module, None), (fn, None), (fn, torch.float64)):
        leaves = [t.detach().to(dtype or t.dtype).requires_grad_(t.is_floating_point()) for t in inputs]
        out = module(*leaves)
        upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
        (out.double() * upstream).sum().backward()
        runs.append((out, [t.grad for t in leaves if t.requires_grad]))
    return res, runs


def test_mask_requiring_grad_falls_back_to_math_and_is_fused_with_its_gradient():
    # SDPA decomposes into plain ops when the mask needs a gradient (no call left to claim):
    # fuse-attention reads it, with a safe softmax (the bias's last row is all -inf: 0 there, as
    # SDPA gives), and the mask gets its gradient.
    res, runs = _eager_and_fused(lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, attn_mask=m),
                                 [*_qkv(), _bias()])
    assert len(res.matches) == 1 and not res.misses, res.report()
    assert res.matches[0].spec.safe_softmax and "+ bias0" in res.matches[0].describe(), res.report()
    (got, got_grads), (eager, eager_grads), (ref, ref_grads) = runs
    assert not got.isnan().any() and not any(g.isnan().any() for g in got_grads)
    assert_close_to_reference(got, eager, ref, "output")
    assert len(got_grads) == 4
    for what, g, e, r in zip(["q", "k", "v", "mask"], got_grads, eager_grads, ref_grads):
        assert_close_to_reference(g, e, r, f"gradient of {what}")


def test_three_dimensional_inputs_fall_back_to_math_and_are_fused():
    q, k, v = (t[0] for t in _qkv())
    res, runs = _eager_and_fused(lambda q, k, v: F.scaled_dot_product_attention(q, k, v), [q, k, v])
    assert len(res.matches) == 1 and not res.misses, res.report()
    (got, got_grads), (eager, eager_grads), (ref, ref_grads) = runs
    assert_close_to_reference(got, eager, ref, "output")
    for what, g, e, r in zip("qkv", got_grads, eager_grads, ref_grads):
        assert_close_to_reference(g, e, r, f"gradient of {what}")


def test_unreadable_mask_shape_is_declined():
    # A mask SDPA reads but the operator cannot (it does not broadcast aligned on the right): made
    # by editing the traced mask's shape, as no valid eager call builds one on CPU.
    fn, extras, _ = CASES["float_mask"]
    gm = fxfuse.rewrite(fn, (*_qkv(), *extras), passes=[Canonicalize()]).graph
    mask = next(n for n in gm.graph.nodes if n.op == "placeholder" and n.meta["val"].shape == (L, L))
    mask.meta["val"] = mask.meta["val"].new_empty(3, L)
    result = ClaimSDPA()(gm)
    assert not result.matches and len(result.misses) == 1
    assert "does not broadcast" in result.misses[0].reason and "[3, 4]" in result.misses[0].reason


def _graph_calling(target, args, kwargs, inputs):
    """A graph ``target(*args, **kwargs)[0]`` over placeholders for ``inputs`` (names q, k, v, m)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    graph, mode = torch.fx.Graph(), FakeTensorMode()
    nodes = {}
    for name, t in zip("qkvm", inputs):
        nodes[name] = graph.placeholder(name)
        nodes[name].meta["val"] = mode.from_tensor(t)
    resolve = lambda a: nodes[a] if isinstance(a, str) else a  # noqa: E731
    call = graph.call_function(target, tuple(resolve(a) for a in args), {k: resolve(a) for k, a in kwargs.items()})
    graph.output(graph.call_function(operator.getitem, (call, 0)))
    return torch.fx.GraphModule(torch.nn.Module(), graph)


aten = torch.ops.aten
# The operators SDPA becomes on CUDA (and the composite one), written by hand: this machine's
# trace only ever picks the CPU flash kernel. name -> (target, args, kwargs, eager equivalent)
GPU_FORMS = {
    "efficient_bias_scale": (aten._scaled_dot_product_efficient_attention.default, ("q", "k", "v", "m", False, 0.0, False),
                             {"scale": 0.5}, lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, m, scale=0.5)),
    "flash_causal": (aten._scaled_dot_product_flash_attention.default, ("q", "k", "v", 0.0, True), {},
                     lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, is_causal=True)),
    "cudnn_bias": (aten._scaled_dot_product_cudnn_attention.default, ("q", "k", "v", "m", False), {},
                   lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, m)),
    "composite_bool_mask": (aten.scaled_dot_product_attention.default, ("q", "k", "v", "m"), {},
                            lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, m)),
}


@pytest.mark.parametrize("name", list(GPU_FORMS))
def test_gpu_operator_forms_are_claimed_and_exact(name):
    target, args, kwargs, eager = GPU_FORMS[name]
    inputs = [*_qkv(), _padding_mask() if name == "composite_bool_mask" else _bias()]
    gm = _graph_calling(target, args, kwargs, inputs)
    result = ClaimSDPA()(gm)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    assert [x.kind for x in result.matches] == ["attention"] and not result.misses, result.misses
    assert "scaled_dot_product" not in gm.code
    got = gm(*inputs)
    assert not got.isnan().any()
    assert torch.allclose(got, eager(*inputs), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("target,args", [
    (aten._scaled_dot_product_flash_attention.default, ("q", "k", "v", 0.25, True)),
    (aten._scaled_dot_product_efficient_attention.default, ("q", "k", "v", None, False, 0.25, True)),
])
def test_gpu_forms_with_dropout_are_claimed_with_the_operators_own_mask(target, args, cpu_path):
    # SDPA's dropout_p is the spec's dropout; the fused call draws a seed of its own in the graph,
    # so the result is SDPA's math with the mask that seed gives (replayed from torch's generator).
    from fxfuse.ops.attention import keep_mask

    inputs = _qkv()
    gm = _graph_calling(target, args, {}, inputs)
    result = ClaimSDPA()(gm)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    assert [m.spec.dropout for m in result.matches] == [0.25] and not result.misses
    assert "dropout 0.25" in result.matches[0].describe() and "aten.randint.low(" in gm.code
    torch.manual_seed(4)
    got = gm(*inputs)
    torch.manual_seed(4)
    seed = torch.randint(0, 2**62, (), dtype=torch.int64)
    keep = keep_mask(result.matches[0].spec, seed, (B, H, L, L), "cpu", triton=cpu_path == "interpret")
    q, k, v = (t.double() for t in inputs)
    scores = (q @ k.mT / D ** 0.5).masked_fill(torch.ones(L, L, dtype=torch.bool).triu(1), float("-inf"))
    expected = (scores.softmax(-1) * keep / 0.75) @ v
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)


def test_gpu_forms_with_unusable_dropout_or_used_logsumexp_are_declined():
    inputs = _qkv()
    gm = _graph_calling(aten._scaled_dot_product_flash_attention.default, ("q", "k", "v", 1.0, False), {}, inputs)
    assert "dropout_p=1.0" in ClaimSDPA()(gm).misses[0].reason
    gm = _graph_calling(aten._scaled_dot_product_flash_attention.default, ("q", "k", "v"), {}, inputs)
    call = next(n for n in gm.graph.nodes if n.target == aten._scaled_dot_product_flash_attention.default)
    out = next(iter(gm.graph.find_nodes(op="output")))
    with gm.graph.inserting_before(out):
        lse = gm.graph.call_function(operator.getitem, (call, 1))
    out.args = ((out.args[0], lse),)
    result = ClaimSDPA()(gm)
    assert not result.matches and "logsumexp" in result.misses[0].reason


class _CausalAttention(torch.nn.Module):
    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def test_report_names_the_user_line_and_the_spec_in_words():
    report = fxfuse.rewrite(_CausalAttention(), tuple(_qkv()), passes=PASSES).report()
    assert "test_claim_sdpa.py:" in report and "scaled_dot_product_attention(q, k, v, is_causal=True)" in report
    assert "attention: scores in f32, scale 0.353553, causal (fill -inf), softmax in f32, -> f32" in report, report


def test_repeated_kv_is_read_in_place_only_when_each_head_is_repeated_in_a_row():
    """k.repeat(1, 2, 1, 1) tiles the heads (h0 h1 h0 h1), which is not grouped-query attention's
    h0 h0 h1 h1: it must not be read as grouped; nor kv repeated by different factors."""
    q = torch.randn(1, 4, L, D)
    k, v = torch.randn(1, 2, L, D), torch.randn(1, 2, L, D)
    grouped = fxfuse.rewrite(lambda q, k, v: F.scaled_dot_product_attention(q, _repeat_kv(k, 2), _repeat_kv(v, 2)),
                             (q, k, v), passes=PASSES)
    assert grouped.matches[0].spec.kv_groups == 2
    assert "expand" not in grouped.graph.code and "clone" not in grouped.graph.code, grouped.graph.code
    for fn in (lambda q, k, v: F.scaled_dot_product_attention(q, k.repeat(1, 2, 1, 1), v.repeat(1, 2, 1, 1)),
               lambda q, k, v: F.scaled_dot_product_attention(q, _repeat_kv(k, 2), _repeat_kv(v[:, :1], 4))):
        res = fxfuse.rewrite(fn, (q, k, v), passes=PASSES)
        assert [m.spec.kv_groups for m in res.matches] == [1], res.report()
        torch.testing.assert_close(res.module(q, k, v), fn(q, k, v), rtol=1e-5, atol=1e-5)


def test_a_mask_differing_across_the_batch_stays_a_mask():
    mask = torch.ones(2, 1, L, L, dtype=torch.bool).tril()
    mask[1, :, :, 0] = False  # batch row 1 hides key 0 too (a padded sequence)
    mask[1, :, 0, 0] = True

    def fn(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    qkv = [t.expand(2, *t.shape[1:]).contiguous() for t in _qkv()]
    res = fxfuse.rewrite(fn, tuple(qkv), passes=PASSES)
    assert "causal" not in res.matches[0].describe(), res.report()
    torch.testing.assert_close(res.module(*qkv), fn(*qkv), rtol=1e-5, atol=1e-5)
