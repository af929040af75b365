"""Random combinations of attention styles (hypothesis): layout (baddbmm with an ALiBi-like bias
among them) x scale placement (or soft-capping) x mask kind x GQA x softmax upcast x head merge x
dtype (float16 among them: 16-bit fills and statistics); every generated model's site is fused and
equals eager, and generated near-misses are declined. The generated models also run through the
interpreted Triton kernels (12 examples). The same models with NaN/inf in q, k or v give NaN and
inf exactly where eager does; sites with an empty size are declined and still run; SDPA claimed
in 16 bits equals eager SDPA. Also the torch.compile path (dropout: test_attention_dropout*.py)."""
import copy
import math

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import torch.nn.functional as F

import fxfuse
from fxfuse.passes.attention import FuseAttention
from fxfuse.passes.canonicalize import Canonicalize
from fxfuse.passes.sdpa import ClaimSDPA
from tests.attention_styles import MultiHeadProjections
from tests.tolerances import assert_close_to_reference, assert_close_with_nonfinite

PASSES = [Canonicalize(), FuseAttention()]
B, H, L, D = 2, 2, 5, 8
SETTINGS = settings(max_examples=30, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))

LAYOUTS = ["bhld", "blhd_einsum", "flat_bmm", "flat_baddbmm"]
SCALES = ["none", "on_q", "on_k", "mul_scores", "div_sqrt_d", "softcap"]
MASKS = ["none", "pad_fill_inf", "pad_where_min", "additive", "causal_tril", "sliding_window", "bias_hld", "chunked",
         "alibi"]
INDEX_MASKS = ("causal_tril", "sliding_window", "chunked", "alibi")  # computed in the kernel: no mask tensor
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
NEAR_MISSES = ["softmax_dim_-2", "mask_after_softmax", "scores_returned", "probs_transposed", "bias_from_v"]


class Generated(torch.nn.Module):
    def __init__(self, layout, scale, mask, gqa, upcast, near_miss=None, merge=False):
        super().__init__()
        self.layout, self.scale, self.mask, self.gqa, self.upcast, self.near_miss = layout, scale, mask, gqa, upcast, near_miss
        self.merge = merge  # (B, H, L, D) output merged to (B, L, H * D): the operator writes that layout
        self.bias = torch.nn.Parameter(torch.randn(H, L, L)) if mask == "bias_hld" else None
        self.register_buffer("alibi", torch.tensor([0.5, 0.25]).repeat(B)[:, None, None] * torch.arange(L))

    def inputs(self, dtype):
        kv_heads = 1 if self.gqa else H
        shapes = {"bhld": [(B, H, L, D), (B, kv_heads, L, D)], "blhd_einsum": [(B, L, H, D), (B, L, H, D)],
                  "flat_bmm": [(B * H, L, D), (B * H, L, D)], "flat_baddbmm": [(B * H, L, D), (B * H, L, D)]}[self.layout]
        keep = torch.ones(B, L, dtype=torch.bool)
        keep[1, 3:] = False
        return [torch.randn(shapes[0], dtype=dtype), torch.randn(shapes[1], dtype=dtype),
                torch.randn(shapes[1], dtype=dtype), keep]

    def _scores_mask(self, keep, flat):
        m = keep.repeat_interleave(H, 0)[:, None, :] if flat else keep[:, None, None, :]
        return m

    def forward(self, q, k, v, keep):
        flat = self.layout.startswith("flat")
        if self.gqa:
            k, v = k.repeat_interleave(H, dim=1), v.repeat_interleave(H, dim=1)
        c = q.size(-1) ** -0.5
        q = q * c if self.scale == "on_q" else q
        k = k * c if self.scale == "on_k" else k
        if self.layout == "blhd_einsum":
            s = torch.einsum("bqhd,bkhd->bhqk", q, k)
        elif self.layout == "flat_baddbmm":
            s = torch.baddbmm(self.alibi.to(q.dtype), q, k.transpose(1, 2), beta=0.5, alpha=0.7)
        elif flat:
            s = torch.bmm(q, k.transpose(1, 2))
        else:
            s = q @ k.transpose(-2, -1)
        s = s * c if self.scale == "mul_scores" else s / math.sqrt(D) if self.scale == "div_sqrt_d" else s
        s = torch.tanh(s / 4.0) * 4.0 if self.scale == "softcap" else s
        keep_s = self._scores_mask(keep, flat)
        if self.mask == "pad_fill_inf":
            s = s.masked_fill(~keep_s, float("-inf"))
        elif self.mask == "pad_where_min":
            s = torch.where(keep_s, s, torch.finfo(s.dtype).min)
        elif self.mask == "additive":
            s = s + (1.0 - keep_s.to(s.dtype)) * -1e4
        elif self.mask == "causal_tril":
            s = s.masked_fill(~torch.tril(torch.ones(L, L, dtype=torch.bool)), float("-inf"))
        elif self.mask == "sliding_window":
            i, j = torch.arange(L)[:, None], torch.arange(L)[None, :]
            s = s.masked_fill((j > i) | (i - j >= 2), float("-inf"))
        elif self.mask == "chunked":
            i, j = torch.arange(L)[:, None], torch.arange(L)[None, :]
            s = s.masked_fill(i // 2 != j // 2, float("-inf"))
        elif self.mask == "alibi":
            i, j = torch.arange(L)[:, None], torch.arange(L)[None, :]
            slopes = 2.0 ** (-torch.arange(1, H + 1) / H)
            slopes = slopes.repeat(B) if flat else slopes  # (B*H,) for flat scores
            s = s + (slopes[:, None, None] * (j - i)).to(s.dtype)
        elif self.mask == "bias_hld":
            s = s + (self.bias.reshape(B * H // B * 1, L, L).repeat(B, 1, 1) if flat else self.bias)
        if self.near_miss == "bias_from_v":
            s = s + v.sum(-1).unsqueeze(-2)
        p = (s.float() if self.upcast else s).softmax(-2 if self.near_miss == "softmax_dim_-2" else -1).to(q.dtype)
        if self.near_miss == "mask_after_softmax":
            p = p.masked_fill(~keep_s, 0.0)
        if self.near_miss == "probs_transposed":
            p = p.transpose(-1, -2)
        if self.layout == "blhd_einsum":
            out = torch.einsum("bhqk,bkhd->bqhd", p, v)
        else:
            out = torch.bmm(p, v) if flat else p @ v
        if self.merge:
            out = out.transpose(1, 2).reshape(B, L, H * D)
        return (out, s) if self.near_miss == "scores_returned" else out


def _run(model, inputs):
    out = model(*inputs)
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    (out.double() * upstream).sum().backward()  # fixed upstream gradient: see test_attention_styles._run
    return out, inputs[0].grad


def _leaves(inputs, dtype=None):
    return [(t.to(dtype) if dtype else t.clone()).requires_grad_() if t.is_floating_point() else t for t in inputs]


@SETTINGS
@given(layout=st.sampled_from(LAYOUTS), scale=st.sampled_from(SCALES), mask=st.sampled_from(MASKS),
       gqa=st.booleans(), upcast=st.booleans(), merge=st.booleans(), dtype=st.sampled_from(DTYPES))
def test_generated_attention_is_fused_and_equals_eager(layout, scale, mask, gqa, upcast, merge, dtype):
    _check_generated(layout, scale, mask, gqa, upcast, merge, dtype, {})


# The same generated models through the generated Triton kernels (Triton's interpreter: slower, so
# fewer examples; the combinations meet the kernels' tile lists, merged output layout and GQA).
@settings(SETTINGS, max_examples=12)
@given(layout=st.sampled_from(LAYOUTS), scale=st.sampled_from(SCALES), mask=st.sampled_from(MASKS),
       gqa=st.booleans(), upcast=st.booleans(), merge=st.booleans(), dtype=st.sampled_from(DTYPES))
def test_generated_attention_on_the_kernels_equals_eager(layout, scale, mask, gqa, upcast, merge, dtype):
    _check_generated(layout, scale, mask, gqa, upcast, merge, dtype, {"interpret": True})


def _check_generated(layout, scale, mask, gqa, upcast, merge, dtype, options):
    model = Generated(layout, scale, mask, gqa and layout == "bhld", upcast, merge=merge and layout == "bhld").to(dtype)
    inputs = model.inputs(dtype)
    res = fxfuse.rewrite(model, tuple(inputs), passes=PASSES, options=options)
    assert [m.kind for m in res.matches] == ["attention"] and not res.misses, res.report()
    (fused,) = [n for n in res.graph.graph.nodes if n.target == torch.ops.fxfuse.attention.default]
    assert fused.args[5:] == ((None, True) if model.merge else ()), res.graph.code
    if mask in INDEX_MASKS:
        product_bias = {"bias"} if layout == "flat_baddbmm" else set()  # the baddbmm's own (ALiBi-like) input
        assert set(res.matches[0].spec.inputs) <= {"head"} | product_bias, res.report()
    expected, expected_dq = _run(copy.deepcopy(model).double(), _leaves(inputs, torch.float64))
    eager, eager_dq = _run(model, _leaves(inputs))
    got, got_dq = _run(res.module, _leaves(inputs))
    assert_close_to_reference(got, eager, expected, "output")
    assert_close_to_reference(got_dq, eager_dq, expected_dq, "dq")


# Non-finite inputs, on the torch path (the CPU fast path must follow the user's NaN semantics): one
# query or key vector NaN or inf, or a NaN value (which 0 * NaN spreads to every row, as in eager).
SPECIALS = ["nan_q", "inf_q", "nan_k", "inf_k", "nan_v"]


@settings(SETTINGS, max_examples=25)
@given(layout=st.sampled_from(LAYOUTS), scale=st.sampled_from(SCALES), mask=st.sampled_from(MASKS),
       upcast=st.booleans(), special=st.sampled_from(SPECIALS), row=st.integers(0, 3),
       dtype=st.sampled_from(DTYPES))
def test_generated_attention_with_nonfinite_inputs_gives_eagers_nan_and_inf(layout, scale, mask, upcast, special,
                                                                             row, dtype):
    model = Generated(layout, scale, mask, False, upcast).to(dtype)
    inputs = model.inputs(dtype)
    which = "qkv".index(special[-1])
    inputs[which].view(-1, inputs[which].shape[-1])[row] = float("nan" if special.startswith("nan") else "inf")
    res = fxfuse.rewrite(model, tuple(inputs), passes=PASSES)
    assert [m.kind for m in res.matches] == ["attention"] and not res.misses, res.report()
    expected = copy.deepcopy(model).double()(*(t.double() if t.is_floating_point() else t for t in inputs))
    assert_close_with_nonfinite(res.module(*inputs), model(*inputs), expected, f"{special} row {row}")


class EmptyGenerated(torch.nn.Module):
    """Attention in a few layouts and masks, on inputs where one size is 0."""

    def __init__(self, layout, mask):
        super().__init__()
        self.layout, self.mask = layout, mask

    def forward(self, q, k, v, keep):
        if self.layout == "sdpa":
            m = keep[:, None, None, :] if self.mask == "padding" else None
            return F.scaled_dot_product_attention(q, k, v, attn_mask=m, is_causal=self.mask == "causal", scale=0.5)
        s = torch.einsum("bhqd,bhkd->bhqk", q, k) if self.layout == "einsum" else q @ k.transpose(-1, -2)
        s = s * 0.5
        n = s.shape[-1]
        if self.mask == "causal":
            s = s.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
        elif self.mask == "padding":
            s = s.masked_fill(~keep[:, None, None, :], float("-inf"))
        p = s.softmax(-1)
        return torch.einsum("bhqk,bhkd->bhqd", p, v) if self.layout == "einsum" else p @ v


@settings(SETTINGS, max_examples=15)
@given(layout=st.sampled_from(["bhld", "einsum", "sdpa"]), mask=st.sampled_from(["none", "causal", "padding"]),
       empty=st.sampled_from("BHLD"))
def test_generated_empty_site_is_declined_and_runs(layout, mask, empty):
    sizes = dict(zip("BHLD", (B, H, L, D)), **{empty: 0})
    shape = [sizes[c] for c in "BHLD"]
    inputs = [torch.randn(shape) for _ in range(3)] + [torch.ones(sizes["B"], sizes["L"], dtype=torch.bool)]
    model = EmptyGenerated(layout, mask)
    res = fxfuse.rewrite(model, tuple(inputs), passes=[Canonicalize(), ClaimSDPA(), FuseAttention()])
    assert not res.matches and all("empty" in m.reason for m in res.misses), res.report()
    assert res.module(*inputs).shape == model(*inputs).shape


# SDPA claimed in 16 bits: the spec computes what SDPA computes (q @ k^T accumulated in float32,
# scaled and masked there, probabilities rounded once), on both CPU paths.
def _sdpa_claim(dtype, scale, mask, length, dim, options):
    g = torch.Generator().manual_seed(length * dim)
    q, k, v = (torch.randn(1, 2, length, dim, generator=g).to(dtype) for _ in range(3))
    extras = []
    if mask == "bool":
        extras = [torch.rand(1, 1, length, length, generator=g) > 0.3]
        extras[0][..., 0] = True  # every row keeps a key: SDPA's guard for empty rows is tested elsewhere
    elif mask == "float":
        extras = [torch.randn(1, 2, length, length, generator=g).to(dtype)]

    def fn(q, k, v, *m):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=m[0] if m else None, is_causal=mask == "causal",
                                              scale=scale)

    res = fxfuse.rewrite(fn, (q, k, v, *extras), passes=[Canonicalize(), ClaimSDPA()], options=options)
    assert [m.kind for m in res.matches] == ["attention"] and res.matches[0].spec.score_dtype == "float32", \
        res.report()
    expected = fn(q.double(), k.double(), v.double(), *(e.double() if e.is_floating_point() else e for e in extras))
    assert_close_to_reference(res.module(q, k, v, *extras), fn(q, k, v, *extras), expected, "output")


SDPA_CLAIMS = dict(dtype=st.sampled_from([torch.bfloat16, torch.float16]), scale=st.sampled_from([None, 0.3, 3.0]),
                   mask=st.sampled_from(["none", "causal", "bool", "float"]), length=st.sampled_from([3, 17, 33]),
                   dim=st.sampled_from([4, 16]))


@settings(SETTINGS, max_examples=20)
@given(**SDPA_CLAIMS)
def test_generated_sdpa_claim_in_16_bits_equals_eager(dtype, scale, mask, length, dim):
    _sdpa_claim(dtype, scale, mask, length, dim, {})


@settings(SETTINGS, max_examples=6)
@given(**SDPA_CLAIMS)
def test_generated_sdpa_claim_in_16_bits_on_the_kernels_equals_eager(dtype, scale, mask, length, dim):
    _sdpa_claim(dtype, scale, mask, length, dim, {"interpret": True})


@SETTINGS
@given(layout=st.sampled_from(["bhld", "flat_bmm", "flat_baddbmm"]), scale=st.sampled_from(SCALES),
       mask=st.sampled_from(["none", "pad_fill_inf", "additive"]), near_miss=st.sampled_from(NEAR_MISSES))
def test_generated_near_miss_is_declined(layout, scale, mask, near_miss):
    model = Generated(layout, scale, mask, False, False, near_miss)
    inputs = model.inputs(torch.float32)
    res = fxfuse.rewrite(model, tuple(inputs), passes=PASSES)
    assert not res.matches and len(res.misses) == 1, res.report()
    torch.testing.assert_close(res.module(*inputs), model(*inputs), equal_nan=True)


def test_torch_compile_backend_fuses_and_trains():
    torch._dynamo.reset()
    model = MultiHeadProjections()
    (x,) = model.inputs(torch.float32)
    backend = fxfuse.Backend(passes=PASSES)
    try:
        compiled = torch.compile(model, backend=backend)
        got = compiled(x)
        got.pow(2).sum().backward()
    finally:
        torch._dynamo.reset()
    assert [m.kind for m in backend.matches] == ["attention"], backend.report()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    eager = model(x)
    eager.pow(2).sum().backward()
    torch.testing.assert_close(got, eager)
    for g, p in zip(grads, model.parameters()):
        torch.testing.assert_close(g, p.grad)
