"""Masks and biases computed from positions become index expressions the kernel computes: the
mask or bias is no longer an operator input (only ALiBi's per-head slopes are, as (1, H, 1, 1)),
the tile plan skips hidden tiles and skips the mask on unmasked ones, and outputs and gradients
equal the float64 reference. Near-misses keep the tensor, and say why when it was a constant."""
import copy
import math

import pytest
import torch

import fxfuse
from fxfuse.codegen.attention import generate
from fxfuse.lowering.attention_tiles import tile_plan
from fxfuse.spec_attention import AttentionSpec, ScoreStep
from tests.attention_styles import INDEX_STYLES
from tests.tolerances import assert_close_to_reference, tolerance

L = 37  # three 16-wide tiles, the last one partly past the end
H = 2


def _fused_node(res):
    return next(n for n in res.graph.graph.nodes if "fxfuse.attention" in str(n.target))


@pytest.mark.parametrize("style", INDEX_STYLES, ids=lambda s: s.__name__)
def test_index_mask_or_bias_is_no_operator_input(style):
    model = style()
    res = fxfuse.rewrite(model, tuple(model.inputs(torch.float32)))
    spec = res.matches[0].spec
    assert set(spec.inputs) <= {"head"}, spec
    assert any(s.expr is not None or s.causal for s in spec.steps), spec
    for extra in _fused_node(res).args[3]:  # per-head values only: nothing of size Lq x Lk
        assert tuple(extra.meta["val"].shape[-2:]) == (1, 1), res.graph.code


# ---- tile plans and kernels at several tiles ------------------------------------------------------

def _positions(q, k):
    return torch.arange(q.size(-2))[:, None], torch.arange(k.size(-2))[None, :]


def chunk16(q, k, v):
    i, j = _positions(q, k)
    return (q @ k.transpose(-1, -2)).masked_fill(i // 16 != j // 16, float("-inf")).softmax(-1) @ v


def chunk8(q, k, v):
    i, j = _positions(q, k)
    return (q @ k.transpose(-1, -2) * 0.3).masked_fill(i // 8 != j // 8, float("-inf")).softmax(-1) @ v


def prefix16(q, k, v):
    i, j = _positions(q, k)
    return (q @ k.transpose(-1, -2)).masked_fill(~((j < 16) | (j <= i)), float("-inf")).softmax(-1) @ v


def prefix16_finite(q, k, v):  # a finite fill gives hidden keys a (tiny) weight: no tile is skipped
    i, j = _positions(q, k)
    s = q @ k.transpose(-1, -2)
    return torch.where((j < 16) | (j <= i), s, torch.finfo(s.dtype).min).softmax(-1) @ v


def dilated(q, k, v):
    i, j = _positions(q, k)
    keep = ((i - j) % 2 == 0) & (j <= i)
    return (q @ k.transpose(-1, -2)).masked_fill(~keep, float("-inf")).softmax(-1) @ v


def alibi(q, k, v):  # ALiBi: the slopes are the only input; the causal rule hides the future
    i, j = _positions(q, k)
    slopes = 2.0 ** (-8.0 * torch.arange(1, q.size(1) + 1) / q.size(1))
    s = q @ k.transpose(-1, -2) * q.size(-1) ** -0.5 + (slopes[:, None, None] * (j - i)).to(q.dtype)
    return s.masked_fill(j > i, float("-inf")).softmax(-1) @ v


def alibi_flat(q, k, v):  # fairseq-style (B*H, L, D) scores: the slopes are indexed by the flat head axis
    b, h, n, d = q.shape
    i, j = _positions(q, k)
    slopes = (2.0 ** (-8.0 * torch.arange(1, h + 1) / h)).repeat(b)
    s = torch.bmm(q.reshape(b * h, n, d), k.reshape(b * h, n, d).transpose(1, 2))
    s = s + (slopes[:, None, None] * (j - i)).to(q.dtype)
    return torch.bmm(s.softmax(-1), v.reshape(b * h, n, d)).view(b, h, n, d)


def row_bias(q, k, v):  # large past the last query: the kernel's unused rows must not reach dK
    i, j = _positions(q, k)
    return (q @ k.transpose(-1, -2) + (i * 50.0).to(q.dtype)).softmax(-1) @ v


# (empty, full, partial) of the 3 x 3 tiles (chunk8: the last tile, rows and keys 32-36, is one chunk)
PLANS = {chunk16: (6, 3, 0), chunk8: (6, 1, 2), prefix16: (3, 4, 2), prefix16_finite: (0, 4, 5), dilated: (3, 0, 6)}


def _grads(f, inputs, upstream):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = f(*leaves)
    (out.double() * upstream).sum().backward()
    return out, [t.grad for t in leaves]


# row_bias in float32 only: a bias of hundreds rounded to bf16 swamps the scores in eager too.
CASES = [(f, dtype) for f in [*PLANS, alibi, alibi_flat] for dtype in (torch.float32, torch.bfloat16)]
CASES.append((row_bias, torch.float32))


@pytest.mark.parametrize("f,dtype", CASES, ids=lambda x: getattr(x, "__name__", str(x).replace("torch.", "")))
def test_kernel_equals_reference_and_plan_skips_tiles(f, dtype):
    q, k, v = torch.randn(3, 1, H, L, 8, dtype=dtype).unbind(0)
    res = fxfuse.rewrite(f, (q, k, v))
    spec = res.matches[0].spec
    assert set(spec.inputs) <= {"head"} and not res.matches[0].notes, res.report()
    if f in PLANS:
        counts = tile_plan(spec, (1, H, L, L), 16, 16).counts
        assert (counts["empty"], counts["full"], counts["partial"]) == PLANS[f], counts
        source = generate(spec).source
        assert "KV_PARTIAL" in source and "Q_PARTIAL" in source and "if partial:" in source
    upstream = torch.randn(1, H, L, 8, dtype=torch.float64)
    expected, expected_grads = _grads(f, [t.double() for t in (q, k, v)], upstream)
    eager, eager_grads = _grads(f, (q, k, v), upstream)
    with fxfuse.config.patch(interpret=True):
        got, got_grads = _grads(res.module, (q, k, v), upstream)
    assert_close_to_reference(got, eager, expected, "output")
    for name, g, e, r in zip("qkv", got_grads, eager_grads, expected_grads):
        assert_close_to_reference(g, e, r, f"d{name}")


def test_tile_lists_list_the_visited_tiles_both_ways():
    q = torch.randn(1, H, L, 8)
    spec = fxfuse.rewrite(prefix16, (q, q, q)).matches[0].spec
    plan = tile_plan(spec, (1, H, L, L), 16, 16)
    num, idx, partial = plan.lists()
    assert num.tolist() == [1, 2, 3]  # query tile 0 sees key tile 0 only; tile 2 sees all
    assert idx[2].tolist() == [0, 1, 2] and partial[2].tolist() == [0, 0, 1]
    q_num, q_idx, _ = plan.lists(transposed=True)
    assert q_num.tolist() == [3, 2, 1] and q_idx[2, :1].tolist() == [2]  # key tile 2: query tile 2 only


def test_a_tile_is_empty_or_full_only_for_every_head():
    hidden = ("and", "bool", ("eq", "bool", ("var", "int64", "h"), ("const", "int64", 0)),
              ("gt", "bool", ("var", "int64", "j"), ("var", "int64", "i")))  # causal on head 0 only
    spec = AttentionSpec("float32", (ScoreStep("fill", "float32", value=-math.inf, expr=hidden),))
    counts = tile_plan(spec, (1, H, L, L), 16, 16).counts
    assert counts == {"empty": 0, "full": 3, "partial": 6}, counts  # head 1 sees every tile


def test_alibi_slopes_are_loaded_once_per_program():
    q = torch.randn(1, H, L, 8)
    res = fxfuse.rewrite(alibi, (q, q, q))
    spec = res.matches[0].spec
    assert spec.inputs == ("head",) and "+ bias (head0 * f32(j - i))" in spec.describe(), spec.describe()
    assert tuple(_fused_node(res).args[3][0].meta["val"].shape) == (1, H, 1, 1)
    source = generate(spec).source
    for kernel in source.split("@triton.jit")[1:]:  # forward, dK/dV, dQ: before the tile loop
        assert kernel.count("hv0 = tl.load(") == 1 and kernel.index("hv0 = tl.load(") < kernel.index("    for ")


def test_expression_spec_round_trips_and_names_its_kernel():
    q = torch.randn(1, H, L, 8)
    specs = [fxfuse.rewrite(f, (q, q, q)).matches[0].spec for f in (chunk16, chunk8)]
    for spec in specs:
        assert AttentionSpec.from_json(spec.to_json()) == spec
    assert "masked_fill(i // 16 != j // 16, -inf)" in specs[0].describe()
    assert generate(specs[0]).name != generate(specs[1]).name  # the expression is part of the name
    causal = fxfuse.rewrite(alibi, (q, q, q)).matches[0].spec
    assert '"expr"' in causal.to_json()  # the bias; the causal step has none
    assert causal.to_json().count('"expr"') == 1


# ---- near-misses -----------------------------------------------------------------------------------

def test_mask_reading_an_input_stays_a_tensor_and_is_still_fused():
    def padded_causal(q, k, v, keep):
        i, j = _positions(q, k)
        visible = (j <= i) & keep[:, None, None, :]
        return (q @ k.transpose(-1, -2)).masked_fill(~visible, float("-inf")).softmax(-1) @ v

    q = torch.randn(2, H, 5, 8)
    keep = torch.ones(2, 5, dtype=torch.bool)
    keep[1, 3:] = False
    res = fxfuse.rewrite(padded_causal, (q, q, q, keep))
    match = res.matches[0]
    assert match.spec.inputs == ("mask",) and not match.notes, res.report()
    torch.testing.assert_close(res.module(q, q, q, keep), padded_causal(q, q, q, keep))


def zero_dim_scale(q, k, v):  # torch keeps a 0-dim tensor at float32 in a bf16 op; the kernel rounds it
    i, j = _positions(q, k)
    return (q @ k.transpose(-1, -2) + (j - i).to(q.dtype) * torch.tensor(0.1)).softmax(-1) @ v


def overflowing(q, k, v):  # i * 70000 * j * 70000 does not fit the kernel's 32-bit integers
    i, j = _positions(q, k)
    return (q @ k.transpose(-1, -2)).masked_fill((i * 70000) * (j * 70000) % 7 == 1, -1e4).softmax(-1) @ v


def divided_by_three(q, k, v):  # a float division is approximate on GPUs: not computed in the kernel
    i, j = _positions(q, k)
    return (q @ k.transpose(-1, -2) + (j - i) / 3.0).softmax(-1) @ v


@pytest.mark.parametrize("f,dtype,reason", [
    (zero_dim_scale, torch.bfloat16, "does not reproduce the values"),
    (overflowing, torch.float32, "past 32 bits"),
    (divided_by_three, torch.float32, "a float division by 3"),
], ids=["zero_dim_bf16", "overflow", "division"])
def test_constant_not_proved_stays_a_tensor_with_its_reason(f, dtype, reason):
    q = torch.randn(1, H, L, 8, dtype=dtype)
    res = fxfuse.rewrite(f, (q, q, q))
    match = res.matches[0]
    assert len(match.spec.inputs) == 1 and match.spec.inputs[0] in ("mask", "bias"), match.spec
    assert len(match.notes) == 1 and reason in match.notes[0], match.notes
    assert reason in res.report() and reason in res.report_data.html()
    rtol, atol = tolerance(dtype)
    torch.testing.assert_close(res.module(q, q, q), f(q, q, q), rtol=rtol, atol=atol)


def test_zero_dim_scale_is_proved_in_float32():
    q = torch.randn(1, H, 5, 8)
    spec = fxfuse.rewrite(zero_dim_scale, (q, q, q)).matches[0].spec
    assert spec.inputs == () and "f32(j - i) * 0.1" in spec.describe(), spec.describe()
    assert math.isclose(next(s.expr for s in spec.steps if s.expr)[3][2], 0.1, rel_tol=1e-7)


# ---- integer division as compiled Triton does it --------------------------------------------------

class _CInt:
    """An integer tile whose ``//`` and ``%`` truncate toward zero, as compiled Triton's do (the
    interpreter floors like numpy, so the kernel tests above cannot tell the two apart)."""

    def __init__(self, t):
        self.t = t

    def __getitem__(self, index):
        return _CInt(self.t[index])

    def _bin(self, other, fn, swap=False):
        o = other.t if isinstance(other, _CInt) else other
        r = fn(o, self.t) if swap else fn(self.t, o)
        return _CInt(r) if r.dtype == torch.int64 else r

    __add__ = lambda s, o: s._bin(o, torch.add)  # noqa: E731
    __radd__ = lambda s, o: s._bin(o, torch.add, True)  # noqa: E731
    __sub__ = lambda s, o: s._bin(o, torch.sub)  # noqa: E731
    __rsub__ = lambda s, o: s._bin(o, lambda a, b: a - b, True)  # noqa: E731
    __mul__ = lambda s, o: s._bin(o, torch.mul)  # noqa: E731
    __floordiv__ = lambda s, o: s._bin(o, lambda a, b: torch.div(a, b, rounding_mode="trunc"))  # noqa: E731
    __mod__ = lambda s, o: s._bin(o, torch.fmod)  # noqa: E731
    __ge__ = lambda s, o: s._bin(o, torch.ge)  # noqa: E731
    __eq__ = lambda s, o: s._bin(o, torch.eq)  # noqa: E731
    __neg__ = lambda s: _CInt(-s.t)  # noqa: E731


class _TL:
    @staticmethod
    def where(c, a, b):
        return _CInt(torch.where(c, *(x.t if isinstance(x, _CInt) else x for x in (a, b))))


@pytest.mark.parametrize("op", ["floordiv", "mod", "truncdiv"])
def test_emitted_integer_division_rounds_as_torch_whatever_triton_rounds(op):
    from fxfuse import index_expr as ix
    from fxfuse.codegen.attention_index import emit

    diff = ("sub", "int64", ix.var("i"), ix.var("j"))  # negative above the diagonal
    expr = (op, "int64", diff, ix.const(3, "int64"))
    scope = {"offs_m": _CInt(torch.arange(9)), "offs_n": _CInt(torch.arange(9)), "tl": _TL}
    exec("\n".join(emit(expr, "out")), scope)
    want = ix.evaluate(expr, {"i": torch.arange(9)[:, None], "j": torch.arange(9)[None, :]}, [])
    d = torch.arange(9)[:, None] - torch.arange(9)
    naive = torch.fmod(d, 3) if op == "mod" else torch.div(d, 3, rounding_mode="trunc")
    assert op == "truncdiv" or not torch.equal(want, naive)  # C's // and % would be wrong here
    got = scope["out"]
    assert torch.equal(got.t if isinstance(got, _CInt) else got, want)


# ---- the ops an index expression is read from -------------------------------------------------------

def _hidden_by(n):
    """Masks (True: hidden) written with each op the deriver reads; none is the causal rule."""
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    sliced = torch.arange(32)
    grid = torch.arange(n)[None, :].expand(3, n)
    return {
        "triu": torch.triu(torch.ones(n, n, dtype=torch.bool), 2),
        "tril_float_eq_0": torch.tril(torch.ones(n, n), 1) == 0,
        "slices": (sliced[:n][None, :] + 1) > sliced[2:2 + n][:, None],
        "select_expand": grid[1][None, :] > i + 1,
        "transpose": (i.T - i).t() < -1,
        "abs": (i - j).abs() > 2,
        "clamp": torch.clamp(j - i, min=0) > 1,
        "min_max": torch.maximum(i, j) - torch.minimum(i, j) > 2,
        "trunc_div": torch.div(i - j, 3, rounding_mode="trunc") != 0,
        "rsub": (5 - j) < (5 - i) - 1,
        "per_head": (torch.arange(H)[:, None, None] == 0) & (j > i + 1),  # (H, L, L): head 0 only
    }


@pytest.mark.parametrize("name", sorted(_hidden_by(4)))
def test_each_index_op_is_derived_and_computed_as_written(name):
    def f(q, k, v):
        return (q @ k.transpose(-1, -2)).masked_fill(_hidden_by(q.size(-2))[name], float("-inf")).softmax(-1) @ v

    q, k, v = torch.randn(3, 1, H, 6, 8).unbind(0)
    res = fxfuse.rewrite(f, (q, k, v))
    spec = res.matches[0].spec
    assert spec.inputs == () and not spec.causal and not res.matches[0].notes, res.report()
    torch.testing.assert_close(res.module(q, k, v), f(q, k, v))  # the torch reference
    with fxfuse.config.patch(interpret=True):
        torch.testing.assert_close(res.module(q, k, v), f(q, k, v))  # the kernel


# ---- real model code: transformers' MPT builds ALiBi and its causal mask from positions --------------

def test_mpt_alibi_and_causal_mask_are_computed_in_the_kernels():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.MptConfig(d_model=32, n_heads=4, n_layers=2, expansion_ratio=2, max_seq_len=64,
                                    vocab_size=64)
    model = transformers.MptForCausalLM(config).train()  # no dropout configured: train mode is deterministic
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))
    res = fxfuse.rewrite(model, (ids,), example_kwargs={"labels": ids})
    attention = [m for m in res.matches if m.kind == "attention"]
    assert len(attention) == 2 and not res.misses, res.report()
    for match in attention:  # the slopes are the only input: no (L, L) bias or mask tensor
        assert match.spec.inputs == ("head",), match.describe()
        # MPT's causal mask, built for (B, 1, L, L), is one pattern for every batch row: the causal
        # rule (with its finfo.min fill), the kernel skipping the tiles above the diagonal
        assert "+ bias (f32(i32(j + -6)) * head0)" in match.describe() and "causal (fill" in match.describe()

    def step(run, m):
        m.zero_grad()
        out = run(ids, labels=ids)
        out.loss.backward()
        return out.logits, {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}

    with fxfuse.config.patch(interpret=True):
        got, got_grads = step(res.module, model)
    eager, eager_grads = step(model, model)
    wide = copy.deepcopy(model).double()
    reference, reference_grads = step(wide, wide)
    assert_close_to_reference(got, eager, reference, "logits")
    assert set(got_grads) == set(eager_grads)
    for n in got_grads:
        assert_close_to_reference(got_grads[n], eager_grads[n], reference_grads[n], f"gradient of {n}")


@pytest.mark.parametrize("window", [0, 5])
@pytest.mark.parametrize("lq,lk", [(37, 37), (5, 40), (40, 21)])
def test_tile_plan_with_the_causal_rule_equals_a_tile_by_tile_count(lq, lk, window):
    from fxfuse.ops.attention import causal_mask

    i, j = ("var", "int64", "i"), ("var", "int64", "j")
    chunk = ("ne", "bool", ("floordiv", "int64", i, ("const", "int64", 8)), ("floordiv", "int64", j, ("const", "int64", 8)))
    spec = AttentionSpec("float32", (ScoreStep("fill", "float32", -math.inf, window=window),
                                     ScoreStep("fill", "float32", -math.inf, expr=chunk)))
    plan = tile_plan(spec, (1, H, lq, lk), 16, 16)
    hidden = causal_mask(lq, lk, "cpu", window) | (torch.arange(lq)[:, None] // 8 != torch.arange(lk)[None, :] // 8)
    for m in range(plan.empty.shape[0]):
        for n in range(plan.empty.shape[1]):
            tile = hidden[m * 16:(m + 1) * 16, n * 16:(n + 1) * 16]
            assert plan.empty[m, n] == tile.all() and plan.full[m, n] == (~tile).all(), (m, n)
