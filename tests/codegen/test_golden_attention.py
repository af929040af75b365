"""Golden files for generated attention kernel source: the text fxfuse generates for a handful
of representative AttentionSpecs must match ``tests/codegen/golden/attention_<case>.py`` byte for
byte (the same mechanism as ``test_golden.py``, which covers the norm kernels).

A change to the attention template shows up here as a diff a reviewer can read. When the change is
intended, regenerate the files and commit them with the template change:

    FXFUSE_UPDATE_GOLDEN=1 python -m pytest -q tests/codegen/test_golden_attention.py

If the change alters what an already-cached kernel computes, also bump ``CODEGEN_VERSION`` in
``fxfuse/codegen/kernel.py``; the kernel names in the golden files change with it.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest

from fxfuse.codegen.attention import _source, backward_source, generate
from fxfuse.lowering.attention import lower_attention
from fxfuse.spec_attention import AttentionSpec, ScoreStep
from tests.codegen.test_golden import GOLDEN_DIR, assert_matches_golden

PREFIX = "attention_"
F32, BF16 = "float32", "bfloat16"
NEG_INF = -math.inf

# Specs of the kind the attention pass produces, written out so these tests depend on codegen alone.
SPECS = {
    # softmax(q @ k^T * d**-0.5) @ v in float32.
    "plain_f32": AttentionSpec(F32, (ScoreStep("mul", F32, value=0.125),), F32),
    # Decoder self-attention: the scale as a division, then a causal mask proved from its values.
    "causal_f32": AttentionSpec(F32, (ScoreStep("div", F32, value=8.0), ScoreStep("fill", F32, value=NEG_INF)), F32),
    # Mistral-style sliding window: causal, and keys 4 or more positions back hidden too.
    "causal_window_f32": AttentionSpec(
        F32, (ScoreStep("mul", F32, value=0.125), ScoreStep("fill", F32, value=NEG_INF, window=4)), F32),
    # Encoder with a boolean padding mask (torch.where(keep, s, -inf)) and an additive position bias.
    "padding_mask_bias_f32": AttentionSpec(
        F32, (ScoreStep("mul", F32, value=0.125), ScoreStep("fill", F32, value=NEG_INF, input=0, invert=True),
              ScoreStep("add", F32, input=1)),
        F32, inputs=("mask", "bias")),
    # Gemma 2 logit soft-capping 50 * tanh(s / 50), then causal.
    "softcap_causal_f32": AttentionSpec(
        F32, (ScoreStep("mul", F32, value=0.125), ScoreStep("div", F32, value=50.0), ScoreStep("tanh", F32),
              ScoreStep("mul", F32, value=50.0), ScoreStep("fill", F32, value=NEG_INF)), F32),
    # Grouped-query attention: two query heads per kv head, kv read in place.
    "gqa2_causal_f32": AttentionSpec(
        F32, (ScoreStep("mul", F32, value=0.125), ScoreStep("fill", F32, value=NEG_INF)), F32, kv_groups=2),
    # Hugging Face eager: bf16 scores, softmax(dtype=float32), probabilities cast back to bf16.
    "bf16_scores_f32_softmax": AttentionSpec(
        BF16, (ScoreStep("mul", BF16, value=0.125), ScoreStep("add", BF16, input=0), ScoreStep("cast", F32)),
        BF16, inputs=("bias",)),
    # Training: causal, dropout 0.1 on the probabilities (a Philox draw shared by all three kernels).
    "dropout_causal_f32": AttentionSpec(
        F32, (ScoreStep("mul", F32, value=0.125), ScoreStep("fill", F32, value=NEG_INF)), F32, dropout=0.1),
    # Hugging Face eager attention in bf16 under a causal mask: scores rounded to bf16 at each step.
    "causal_bf16": AttentionSpec(
        BF16, (ScoreStep("mul", BF16, value=0.125), ScoreStep("fill", BF16, value=NEG_INF)), BF16),
    # SDPA's math decomposition: a padding mask and aten._safe_softmax (a row with every key hidden
    # gives 0: the forward divides by 1 where the row's sum is 0, the backward recomputes p = 0).
    "safe_padding_mask_f32": AttentionSpec(
        F32, (ScoreStep("mul", F32, value=0.125), ScoreStep("fill", F32, value=NEG_INF, input=0, invert=True)),
        F32, inputs=("mask",), safe_softmax=True),
}
# Index expressions (see fxfuse.index_expr): ALiBi's slopes[h] * (j - i), then a 64-key chunk mask.
_I, _J = ("var", "int64", "i"), ("var", "int64", "j")
_ALIBI = ("mul", F32, ("load", F32, 0), ("cast", F32, ("sub", "int64", _J, _I)))
_CHUNK = ("ne", "bool", ("floordiv", "int64", _I, ("const", "int64", 64)), ("floordiv", "int64", _J, ("const", "int64", 64)))
SPECS["index_alibi_chunk_f32"] = AttentionSpec(
    F32, (ScoreStep("mul", F32, value=0.125), ScoreStep("add", F32, expr=_ALIBI),
          ScoreStep("fill", F32, value=NEG_INF, expr=_CHUNK)), F32, inputs=("head",))
KERNEL_FUNCTIONS = ("_forward", "_backward_dkdv", "_backward_dq")


def _golden(case: str) -> Path:
    return GOLDEN_DIR / f"{PREFIX}{case}.py"


@pytest.mark.parametrize("case", sorted(SPECS))
def test_generated_attention_source_matches_golden_file(case):
    assert_matches_golden(generate(SPECS[case]), _golden(case), KERNEL_FUNCTIONS)


def test_attention_golden_files_have_a_spec_each():
    """A golden file whose spec was removed would otherwise never be compared again."""
    on_disk = {p.stem[len(PREFIX):] for p in GOLDEN_DIR.glob(f"{PREFIX}*.py")}
    assert on_disk == set(SPECS)


def test_attention_golden_sources_differ_where_the_specs_do():
    """Guards the golden files themselves: each records a different kernel."""
    sources = [generate(spec).source for spec in SPECS.values()]
    assert len(set(sources)) == len(sources)


@pytest.mark.parametrize("case", sorted(SPECS))
def test_same_attention_spec_gives_same_bytes_and_name(case):
    spec = SPECS[case]
    again = AttentionSpec.from_json(spec.to_json())  # an equal spec built independently
    first, second = generate(spec), generate(again)
    assert first.name == second.name
    assert first.source.encode() == second.source.encode()
    plan = lower_attention(again)
    assert _source(first.name, again, plan) + backward_source(first.name, again, plan) == first.source


def test_attention_kernel_name_changes_with_scale_and_with_any_field():
    base = SPECS["causal_f32"]
    scale, causal = base.steps
    names = {generate(base).name}
    for changed in (
        dataclasses.replace(base, steps=(dataclasses.replace(scale, value=4.0), causal)),
        dataclasses.replace(base, steps=(dataclasses.replace(scale, value=8.0 * (1 + 2**-40)), causal)),  # last bits
        dataclasses.replace(base, steps=(scale, dataclasses.replace(causal, window=4))),
        dataclasses.replace(base, steps=(scale, dataclasses.replace(causal, value=-1e9))),
        dataclasses.replace(base, kv_groups=2),
        dataclasses.replace(base, prob_dtype=BF16),
        dataclasses.replace(base, dropout=0.1),
    ):
        kernel = generate(changed)
        assert kernel.name not in names, changed
        assert kernel.name in kernel.source  # the kernel functions carry the name
        names.add(kernel.name)


def test_window_kernel_hides_old_keys_and_bf16_kernel_rounds_only_before_the_f32_cast():
    window = generate(SPECS["causal_window_f32"]).source
    # Key j is hidden after query i (causal) and also 4 or more keys before it (the window).
    assert "(offs_n[None, :] > offs_m[:, None] + (LK - LQ)) | (offs_n[None, :] <= offs_m[:, None] + (LK - LQ) - 4)" \
        in window
    bf16 = generate(SPECS["bf16_scores_f32_softmax"]).source
    forward = bf16[:bf16.index("_backward_dkdv(")]
    # The product, the scale and the bias each round to bf16 as in the user's graph; after the
    # cast to float32 the softmax sees unrounded float32 scores.
    # (in each of the two key loops: full tiles and masked ones)
    assert forward.count("s = tl.dot(q, k)") == 2 and forward.count("s = s.to(tl.bfloat16).to(tl.float32)") == 6
    assert "p = tl.exp(s - m_safe[:, None])" in forward  # rounded scores: no log2(e) folded into them


def test_log2e_is_folded_only_where_no_rounding_or_huge_finite_score_meets_it():
    plain = generate(SPECS["plain_f32"]).source
    assert "s = s * 0.18033688011112042  # scale * log2(e)" in plain and "p = tl.exp2(s - m_safe[:, None])" in plain
    assert "m_i * 0.6931471805599453" in plain  # the saved row max is in natural units
    assert "row_max = row_max * 1.4426950408889634" in plain  # and the backward goes back to log2 units
    assert "s = s * 0.18033688011112042" in generate(SPECS["causal_f32"]).source  # a division by 8 folded too
    for case in ("padding_mask_bias_f32", "bf16_scores_f32_softmax", "index_alibi_chunk_f32"):
        source = generate(SPECS[case]).source  # a bias may hold finfo.min: times log2(e) it would be -inf
        assert "tl.exp2" not in source and "log2" not in source, case
    # bf16 rounds the scaled scores: log2(e) multiplies them after the last rounding, not the scale.
    bf16 = generate(SPECS["causal_bf16"]).source
    assert "s = s * 0.125" in bf16 and "s = s * 1.4426950408889634  # log2 units" in bf16


def test_full_tiles_skip_mask_and_bounds_math_and_causal_rows_run_longest_first():
    causal = generate(SPECS["causal_f32"]).source
    forward = causal[:causal.index("_backward_dkdv(")]
    full = forward[forward.index("for start_n in range(full_lo, full_hi"):forward.index("for start_n in range(full_hi, hi")]
    assert "in_bounds" not in full and "flag1" not in full and "< LK" not in full  # no causal rule, no bounds
    assert "pid_m = tl.num_programs(0) - 1 - tl.program_id(0)" in forward  # the longest rows first
    window = generate(SPECS["causal_window_f32"]).source  # every windowed row does the same work
    assert "tl.num_programs(0) - 1" not in window and "for start_n in range(lo, full_lo" in window
