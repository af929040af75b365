"""Golden files for the PolyNorm kernel's source (see test_golden.py for how to regenerate)."""
import pytest

from fxfuse.codegen.polynorm import generate
from fxfuse.spec_polynorm import PolyNormSpec
from tests.codegen.test_golden import GOLDEN_DIR, assert_matches_golden

SPECS = {
    # Motif / PolyCom in float32: the powers descending, u * rsqrt(mean(u^2) + eps).
    "polynorm_rsqrt_f32": PolyNormSpec(powers=(3, 2, 1), eps=1e-6, inverse="rsqrt", dtype="float32"),
    # bf16 without an upcast, divided by sqrt: every op's result rounded to bf16 where eager rounds it.
    "polynorm_div_sqrt_bf16": PolyNormSpec(powers=(3, 2, 1), eps=1e-6, inverse="div_sqrt", dtype="bfloat16"),
}


@pytest.mark.parametrize("case", sorted(SPECS))
def test_polynorm_source_matches_golden_file(case):
    assert_matches_golden(generate(SPECS[case]), GOLDEN_DIR / "polynorm" / f"{case}.py", ("_forward", "_backward"))


def test_one_read_of_x_per_row():
    source = generate(SPECS["polynorm_rsqrt_f32"]).source
    forward = source.split("_forward(")[1].split("@triton.jit")[0]
    assert forward.count("tl.load(X") == 1 and forward.count("tl.store(") == 1
    assert source.split("_backward(")[1].count("tl.load(X") == 1
