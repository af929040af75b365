"""Golden files for attention kernels with QK-norm (``tests/codegen/golden/qk_norm/``): q and k
normalised over the head dim in their loads (then rotated, with RoPE). Regenerate with
``FXFUSE_UPDATE_GOLDEN=1`` as in test_golden_attention.py."""
from __future__ import annotations

import dataclasses

import pytest

from fxfuse.codegen.attention import generate
from fxfuse.spec import NormSpec, ParamPrep, Step
from tests.codegen.test_golden import GOLDEN_DIR, assert_matches_golden
from tests.codegen.test_golden_attention import KERNEL_FUNCTIONS, SPECS as PLAIN
from tests.codegen.test_golden_attention_rope import SPECS as ROPE

F32, BF16 = "float32", "bfloat16"
# Qwen3's RMSNorm in a bf16 model: float32 statistics, cast back, times the bf16 weight.
_QWEN3 = NormSpec("rms_norm", 1e-6, F32, F32, steps=(Step("cast", BF16), Step("mul", BF16, 0)),
                  params=(ParamPrep(BF16),)).to_json()
# A LayerNorm with weight and bias in float32.
_LAYER = NormSpec("layer_norm", 1e-5, F32, F32, steps=(Step("mul", F32, 0), Step("add", F32, 1)),
                  params=(ParamPrep(F32), ParamPrep(F32))).to_json()
SPECS = {
    "qwen3_rope_gqa2_causal_bf16": dataclasses.replace(ROPE["half_gqa2_causal_bf16"], norm_q=_QWEN3, norm_k=_QWEN3),
    "layer_k_only_f32": dataclasses.replace(PLAIN["plain_f32"], norm_k=_LAYER),
}


@pytest.mark.parametrize("case", sorted(SPECS))
def test_generated_qk_norm_source_matches_golden_file(case):
    assert_matches_golden(generate(SPECS[case]), GOLDEN_DIR / "qk_norm" / f"{case}.py", KERNEL_FUNCTIONS)


def test_qk_norm_golden_files_have_a_spec_each():
    assert {p.stem for p in (GOLDEN_DIR / "qk_norm").glob("*.py")} == set(SPECS)


def test_norm_appears_where_the_spec_says():
    both = generate(SPECS["qwen3_rope_gqa2_causal_bf16"]).source
    # q normalised before its rotation wherever it is loaded (forward once, dK/dV's three query
    # loops, dQ once), k likewise in the forward's key loops and the backward's loads
    assert both.count("nq_rstd = tl.rsqrt") == 5 and both.count("nq_rstd = tl.rsqrt") == both.count("rope_rotate(q, cq")
    assert both.index("q = nq_v.to(q.dtype)") < both.index("rope_rotate(q, cq")
    k_only = generate(SPECS["layer_k_only_f32"]).source
    assert "NQ0" not in k_only and "NK0, NK1" in k_only and "nk_xm = nk_x - tl.sum(nk_x, axis=1)" in k_only
    assert "norm" not in PLAIN["plain_f32"].to_json()  # sites without QK-norm keep their JSON (and kernels)
