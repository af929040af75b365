"""Dropout inside the fused attention operator: exactness given the mask, and the mask's statistics.

(a) For a seed, the mask the operator draws is exposed (the Triton path's by a kernel calling the
same ``dropout_keep`` function as the attention kernels; the torch path's from its generator), and
the fused forward and backward must equal the reference of the spec with that mask: eager's
dropout written with the mask, differentiated by autograd, against a float64 copy.
(b) The masks are Bernoulli(1 - rate), independent per element: the kept fraction is within a
binomial bound, the dropped output averages to the undropped one, each seed and each (batch, head)
gets its own mask.
"""
import dataclasses
import math

import pytest
import torch

import fxfuse
from fxfuse import index_expr
from fxfuse.ops.attention import keep_mask, reference
from fxfuse.spec_attention import AttentionSpec, ScoreStep
from tests.tolerances import assert_close_to_reference

B, H, L, D = 1, 2, 19, 8  # 19: not a multiple of the 16-wide tiles
_CHUNKED = index_expr.compare("ne", index_expr.arith("floordiv", "int64", index_expr.var("i"), index_expr.const(8, "int64")),
                              index_expr.arith("floordiv", "int64", index_expr.var("j"), index_expr.const(8, "int64")))


def _spec(dtype, kind="causal", rate=0.25):
    steps = {"causal": (ScoreStep("mul", dtype, value=0.35), ScoreStep("fill", dtype, value=-math.inf, input=-1)),
             # A factor tensor needing a gradient: the backward takes the torch formula, which must
             # redraw the Triton forward's mask, not its own.
             "factor": (ScoreStep("mul", dtype, input=0),),
             # An index-expression mask (chunks of 8: the kernels skip tiles) with the merged output
             # layout: dropout's counters must not depend on which tiles are visited.
             "chunked": (ScoreStep("fill", dtype, value=-math.inf, expr=_CHUNKED),)}[kind]
    return AttentionSpec(dtype, steps, dtype, ("factor",) if kind == "factor" else (), dropout=rate)


def _wide(spec):
    return dataclasses.replace(spec, score_dtype="float64", prob_dtype="float64",
                               steps=tuple(dataclasses.replace(s, dtype="float64") for s in spec.steps))


def _mask(spec, seed, shape, path):
    return keep_mask(spec, seed, shape, "cpu", triton=path == "interpret")


def _outputs_and_grads(run, inputs, upstream):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = run(*leaves)
    (out.double() * upstream).sum().backward()
    return out, [t.grad for t in leaves]


@pytest.mark.parametrize("dtype,kind", [("float32", "causal"), ("bfloat16", "causal"), ("float32", "factor"),
                                        ("float32", "chunked")])
def test_operator_equals_the_reference_with_its_mask(dtype, kind, cpu_path):
    spec, t = _spec(dtype, kind), getattr(torch, dtype)
    q, k, v = (torch.randn(B, H, L, D).to(t) for _ in range(3))
    factor = [torch.rand(1, H, 1, 1).to(t) + 0.5] if kind == "factor" else []
    seed = torch.tensor(20241125)
    keep = _mask(spec, seed, (B, H, L, L), cpu_path)
    assert 0 < keep.sum() < keep.numel()
    upstream = torch.randn(B, H, L, D, dtype=torch.float64)
    inputs = (q, k, v, *factor)
    got, got_grads = _outputs_and_grads(
        lambda q, k, v, *f: torch.ops.fxfuse.attention(q, k, v, list(f), spec.to_json(), seed,
                                                       merge_heads=kind == "chunked"), inputs, upstream)
    eager, eager_grads = _outputs_and_grads(lambda q, k, v, *f: reference(spec, q, k, v, list(f), keep), inputs,
                                            upstream)
    wide, ref_grads = _outputs_and_grads(lambda q, k, v, *f: reference(_wide(spec), q, k, v, list(f), keep),
                                         tuple(x.double() for x in inputs), upstream)
    assert_close_to_reference(got, eager, wide, f"{cpu_path} output")
    for name, g, e, r in zip("qkvf", got_grads, eager_grads, ref_grads):
        assert_close_to_reference(g, e, r, f"{cpu_path} gradient of {name}")
    # The mask matters: the same inputs without dropout differ.
    undropped = reference(dataclasses.replace(spec, dropout=0.0), q, k, v, factor)
    assert not torch.allclose(got.float(), undropped.float(), atol=1e-2)


def test_a_seed_is_required():
    q = torch.randn(1, 1, 3, 4)
    with pytest.raises(ValueError, match="seed"):
        torch.ops.fxfuse.attention(q, q, q, [], _spec("float32").to_json())


@pytest.mark.parametrize("rate", [0.1, 0.5])
def test_kept_fraction_is_binomial(rate, cpu_path):
    spec = _spec("float32", rate=rate)
    shape = (2, 2, 37, 37)
    n = math.prod(shape)
    for seed in (1, 2**40 + 3):
        kept = _mask(spec, torch.tensor(seed), shape, cpu_path).sum().item()
        sigma = math.sqrt(n * rate * (1 - rate))
        assert abs(kept - n * (1 - rate)) < 5 * sigma, (seed, kept / n)


def test_masks_differ_across_seeds_batches_and_heads(cpu_path):
    rate, shape = 0.5, (2, 3, 16, 16)
    spec = _spec("float32", rate=rate)
    first = _mask(spec, torch.tensor(7), shape, cpu_path).flatten(0, 1)
    second = _mask(spec, torch.tensor(8), shape, cpu_path).flatten(0, 1)
    assert _mask(spec, torch.tensor(7), shape, cpu_path).flatten(0, 1).equal(first)  # a function of the seed
    # Independent masks agree on about half the elements (rate 0.5); a repeated stream (a slice
    # equal to, or shifted from, another) agrees on far more of them.
    n = 16 * 16
    pairs = [(first[i], first[j]) for i in range(6) for j in range(i)] + [(first[i], second[i]) for i in range(6)]
    for a, b in pairs:
        agree = (a == b).sum().item()
        assert abs(agree - n / 2) < 5 * math.sqrt(n / 4), agree
    for i in range(6):  # nor is a row of one head the row after it
        assert (first[i, 1:] == first[i, :-1]).float().mean() < 0.7


def test_dropped_output_averages_to_the_undropped_output(cpu_path):
    # 32 identical heads: one call draws 32 independent masks; 4 calls give 128 samples per output.
    rate, heads, seeds = 0.5, 32, 4
    spec = AttentionSpec("float32", (ScoreStep("mul", "float32", value=0.35),), "float32", dropout=rate)
    q, k, v = (torch.randn(1, 1, 5, D).expand(1, heads, 5, D) for _ in range(3))
    samples = torch.cat([torch.ops.fxfuse.attention(q, k, v, [], spec.to_json(), torch.tensor(s))[0]
                         for s in range(seeds)])
    undropped = reference(dataclasses.replace(spec, dropout=0.0), q[:, :1], k[:, :1], v[:, :1], [])[0, 0]
    mean, spread = samples.mean(0), samples.std(0) / math.sqrt(len(samples))
    assert (spread > 0).all()
    assert ((mean - undropped).abs() < 5 * spread).all(), ((mean - undropped).abs() / spread).max()


def test_two_calls_of_a_rewritten_module_draw_different_masks():
    def f(q, k, v):
        return torch.nn.functional.dropout((q @ k.transpose(-1, -2)).softmax(-1), 0.5, training=True) @ v

    qkv = tuple(torch.randn(3, 1, 2, 6, D).unbind(0))
    res = fxfuse.rewrite(f, qkv)
    assert "dropout 0.5" in res.matches[0].describe()
    first, second = res.module(*qkv), res.module(*qkv)
    assert not torch.equal(first, second)
    torch.manual_seed(3)
    again = res.module(*qkv)
    torch.manual_seed(3)
    assert torch.equal(again, res.module(*qkv))  # the seed comes from torch's generator: reproducible
