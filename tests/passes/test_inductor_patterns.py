"""fxfuse against the list of attention patterns PyTorch's Inductor rewrites (``_sfdp_pattern_N`` in
torch/_inductor/fx_passes/fuse_attention.py), each re-written as a module in tests/inductor_patterns.py.

Every pattern fxfuse fuses is checked like the styles of test_attention_styles.py: one attention
match and no miss, and the rewritten module's output and gradients (inputs and parameters, under a
fixed upstream gradient) within the tolerance table of a float64 reference; so are three of them on
grouped-query keys and values (Inductor's list has no such pattern). Dropout patterns run in
eval mode, where dropout is the identity and the site is the pattern's inference form; in training
they are fused with the kernel's own dropout (the output is not the dropout-free one). Every pattern
is fused: a change that makes fxfuse decline one fails here (docs/comparison.md keeps the count).
"""
import copy

import pytest
import torch

import fxfuse
from tests.inductor_patterns import (GQA_VARIANTS, H, KV_HEADS, PATTERNS, DistilBertMaskFill, Gpt2WhereCausalAndMask,
                                     SplitScaleMask, T5Bias)
from tests.tolerances import assert_close_to_reference

PASSES = "canonicalize,claim-sdpa,fuse-attention"  # the default pipeline less the norms

FUSED = PATTERNS + GQA_VARIANTS
CASES = [(p, torch.float32) for p in FUSED] + [(p, torch.bfloat16) for p in FUSED if p.CASTS]


def _outputs(out):
    return out if isinstance(out, tuple) else (out,)


def _run(model, inputs):
    outs = _outputs(model(*inputs))
    # A fixed upstream gradient per output (see test_attention_styles._run for why not out.pow(2)).
    gen = torch.Generator().manual_seed(2)
    loss = sum((o.double() * torch.randn(o.shape, generator=gen, dtype=torch.float64)).sum() for o in outs)
    loss.backward()
    return outs, [t.grad for t in inputs if t.requires_grad] + [p.grad for p in model.parameters()]


def _leaves(inputs, dtype=None):
    return [(t.to(dtype) if dtype and t.is_floating_point() else t.clone()).requires_grad_(t.is_floating_point())
            for t in inputs]


@pytest.mark.parametrize("pattern,dtype", CASES, ids=lambda c: getattr(c, "__name__", str(c).replace("torch.", "")))
def test_pattern_is_fused_and_exact(pattern, dtype):
    model = pattern().to(dtype).eval()
    inputs = model.inputs(dtype)
    res = fxfuse.rewrite(model, tuple(inputs), passes=PASSES)
    assert [m.kind for m in res.matches] == ["attention"], res.report()
    assert not res.misses, res.report()
    assert "fxfuse.attention" in res.graph.code and "softmax.default" not in res.graph.code, res.graph.code

    expected, expected_grads = _run(copy.deepcopy(model).double(), _leaves(inputs, torch.float64))
    eager, eager_grads = _run(copy.deepcopy(model), _leaves(inputs))
    got, got_grads = _run(res.module, _leaves(inputs))
    assert len(got) == len(eager)
    for i, (g, e, r) in enumerate(zip(got, eager, expected)):
        assert g.dtype == e.dtype and g.shape == e.shape
        assert_close_to_reference(g, e, r, f"output {i}")
    assert len(got_grads) == len(eager_grads) > 0
    for i, (g, e, r) in enumerate(zip(got_grads, eager_grads, expected_grads)):
        if e is None:  # a float mask that only enters through a comparison has no gradient
            assert g is None and r is None, f"gradient {i}"
            continue
        # A float32 input of a bf16 site (T5's bias) gets a gradient computed in bf16 arithmetic:
        # it is held to the site's tolerance, not to float32's.
        assert_close_to_reference(g.to(dtype), e.to(dtype), r, f"gradient {i}")


@pytest.mark.parametrize("pattern", [p for p in PATTERNS if p.DROPOUT], ids=lambda p: p.__name__)
def test_dropout_in_training_is_never_rewritten_away(pattern):
    # In training the probabilities are dropped at random: the site is fused with the kernel's
    # dropout at the pattern's rate, and the rewritten module still drops (its output is not the
    # dropout-free one). (Exactness given the mask: tests/passes/test_attention_dropout*.py.)
    model = pattern().train()
    inputs = model.inputs(torch.float32)
    res = fxfuse.rewrite(model, tuple(inputs), passes=PASSES)
    assert [m.kind for m in res.matches] == ["attention"] and not res.misses, res.report()
    assert res.matches[0].spec.dropout > 0, res.report()
    trained = _outputs(res.module(*inputs))[0]
    without_dropout = _outputs(copy.deepcopy(model).eval()(*inputs))[0]
    assert not torch.allclose(trained, without_dropout), "dropout disappeared from the training graph"


@pytest.mark.parametrize("pattern", [DistilBertMaskFill, Gpt2WhereCausalAndMask, T5Bias, SplitScaleMask],
                         ids=lambda p: p.__name__)
def test_mask_forms_on_the_generated_kernel(pattern):
    # The mask forms Inductor's list adds over plain scaled attention (a 2-d padding mask compared,
    # viewed and expanded; where(causal, s, finfo.min) plus an additive mask; a float32 bias on the
    # T5 scores; SDPA's math form with _safe_softmax) through the Triton kernel, run by the interpreter.
    model = pattern().eval()
    inputs = model.inputs(torch.float32)
    with fxfuse.config.patch(interpret=True):
        res = fxfuse.rewrite(model, tuple(inputs), passes=PASSES)
        assert [m.kind for m in res.matches] == ["attention"], res.report()
        got = _outputs(res.module(*inputs))[0]
    eager = _outputs(model(*inputs))[0]
    expected = _outputs(copy.deepcopy(model).double()(*[t.double() if t.is_floating_point() else t for t in inputs]))[0]
    assert_close_to_reference(got, eager, expected, "output")


@pytest.mark.parametrize("pattern", GQA_VARIANTS, ids=lambda p: p.__name__)
def test_repeated_kv_heads_are_read_in_place(pattern):
    # Inductor's patterns on keys and values repeated for grouped-query attention: fxfuse folds the
    # repeat into the operator (kv_groups) instead of keeping the repeated copies.
    model = pattern().eval()
    res = fxfuse.rewrite(model, tuple(model.inputs(torch.float32)), passes=PASSES)
    assert res.matches[0].spec.kv_groups == H // KV_HEADS, res.report()
    before_op = res.graph.code.split("fxfuse.attention")[0]
    assert "expand" not in before_op and "repeat_interleave" not in before_op, res.graph.code


# Inductor registers these patterns a second time for batch size 1, whose graph differs (a reshape
# that needs no copy); fxfuse reads shapes, so the same modules must fuse at B=1 as well.
BATCH_ONE = [p for p in PATTERNS if set(p.SFDP) & {16, 18, 21, 22, 23, 25, 26, 27, 29, 30}]


@pytest.mark.parametrize("pattern", BATCH_ONE, ids=lambda p: p.__name__)
def test_batch_of_one_is_fused_and_exact(pattern):
    model = pattern().eval()
    inputs = [t[:1] for t in model.inputs(torch.float32)]  # every input leads with the batch (or a 1)
    res = fxfuse.rewrite(model, tuple(inputs), passes=PASSES)
    assert [m.kind for m in res.matches] == ["attention"] and not res.misses, res.report()
    got, eager = _outputs(res.module(*inputs)), _outputs(model(*inputs))
    expected = _outputs(copy.deepcopy(model).double()(*[t.double() if t.is_floating_point() else t for t in inputs]))
    for i, (g, e, r) in enumerate(zip(got, eager, expected)):
        assert g.shape[0] == 1
        assert_close_to_reference(g, e, r, f"output {i}")
