"""Golden files for differential attention's kernels (``tests/codegen/golden/differential/``): the
two-softmax forward (writing its row statistics and float32 halves for the backward) and the two
backward kernels that take both halves over one key tile (dK/dV) or one query tile (dQ).
Regenerate with ``FXFUSE_UPDATE_GOLDEN=1`` as in test_golden_attention.py."""
from __future__ import annotations

import dataclasses

import pytest

from fxfuse.codegen.attention import generate
from tests.codegen.test_golden import GOLDEN_DIR, assert_matches_golden
from tests.codegen.test_golden_attention import KERNEL_FUNCTIONS, SPECS as PLAIN

DIR = GOLDEN_DIR / "differential"
SPECS = {  # the Differential Transformer's decoder in bf16 (causal, GQA); an encoder with a padding mask
    "gqa2_causal_bf16": dataclasses.replace(PLAIN["causal_bf16"], kv_groups=2, differential=True),
    "safe_padding_mask_f32": dataclasses.replace(PLAIN["safe_padding_mask_f32"], differential=True),
}


@pytest.mark.parametrize("case", sorted(SPECS))
def test_generated_differential_source_matches_golden_file(case):
    assert_matches_golden(generate(SPECS[case]), DIR / f"{case}.py", KERNEL_FUNCTIONS)


def test_differential_golden_files_have_a_spec_each():
    assert {p.stem for p in DIR.glob("*.py")} == set(SPECS)


def test_the_backward_folds_lambda_into_the_second_half():
    source = generate(SPECS["gqa2_causal_bf16"]).source
    backward = source[source.index("_backward_dkdv("):]
    # One dO v^T for both halves; half 2's dS scaled by -lambda; dv from the combined probabilities.
    assert backward.count("dp = tl.dot(do, tl.trans(vt)") == backward.count("ds = -lam * p2 * (dp - delta2[:, None])")
    assert backward.count("p_v = (p1 - lam * p2).to(V.dtype.element_ty)") == 3  # dK/dV's three query loops
    assert "tl.store(STATS2 + " in source and "tl.store(O2F + " in source  # the forward saves what the backward reads
