"""Golden files for attention kernels with RoPE (``tests/codegen/golden/rope/``): q and k rotated
in their loads (halves, or pairs), the gradients rotated back before the stores. Regenerate with
``FXFUSE_UPDATE_GOLDEN=1`` as in test_golden_attention.py."""
from __future__ import annotations

import dataclasses
import math

import pytest

from fxfuse.codegen.attention import generate
from fxfuse.spec_attention import AttentionSpec, ScoreStep
from tests.codegen.test_golden import GOLDEN_DIR, assert_matches_golden
from tests.codegen.test_golden_attention import KERNEL_FUNCTIONS, SPECS as PLAIN

F32, BF16 = "float32", "bfloat16"
_CAUSAL_BF16 = (ScoreStep("mul", BF16, value=0.125), ScoreStep("fill", BF16, value=-math.inf))
SPECS = {
    # Llama: rotate_half on q and k, GQA, causal, bf16.
    "half_gqa2_causal_bf16": AttentionSpec(BF16, _CAUSAL_BF16, BF16, kv_groups=2, rope_q="half", rope_k="half"),
    # GPT-J's rotate_every_two on q only (k's rotation stored in a cache stays as written).
    "interleaved_q_f32": dataclasses.replace(PLAIN["plain_f32"], rope_q="interleaved"),
    # Meta's complex RoPE on bf16 q and k: rotated in float32, rounded once.
    "interleaved_f32_rotation_causal_bf16": AttentionSpec(BF16, _CAUSAL_BF16, BF16, rope_q="interleaved/float32",
                                                          rope_k="interleaved/float32"),
}


@pytest.mark.parametrize("case", sorted(SPECS))
def test_generated_rope_source_matches_golden_file(case):
    assert_matches_golden(generate(SPECS[case]), GOLDEN_DIR / "rope" / f"{case}.py", KERNEL_FUNCTIONS)


def test_rope_golden_files_have_a_spec_each():
    assert {p.stem for p in (GOLDEN_DIR / "rope").glob("*.py")} == set(SPECS)


def test_rotation_appears_where_the_spec_says():
    both = generate(SPECS["half_gqa2_causal_bf16"]).source
    # forward: q once, k in each of its key loops; backward: q and k loads, and dq and dk rotated back
    # (the dK/dV kernel rotates q in each of its query loops: masked before, full, masked after)
    assert both.count("rope_rotate(q, cq, sq") == 5 and both.count("rope_unrotate(dk,") == 1
    assert both.count("rope_unrotate(dq,") == 1 and "rope_rotate(tl.trans(k), ck, sk" in both
    q_only = generate(SPECS["interleaved_q_f32"]).source
    assert "CK, SK" not in q_only and "ck = " not in q_only and "rope_unrotate(dk" not in q_only and "BLOCK_D, False)" in q_only
    assert generate(PLAIN["plain_f32"]).name != generate(SPECS["interleaved_q_f32"]).name
    # a float32 rotation: rope_rotate's F32 flag set on every load of q and k
    meta = generate(SPECS["interleaved_f32_rotation_causal_bf16"]).source
    calls = [line for line in meta.splitlines() if "rope_rotate(" in line and "def rope_rotate" not in line]
    assert len(calls) >= 5 and all("BLOCK_D, False, True)" in line for line in calls), calls
