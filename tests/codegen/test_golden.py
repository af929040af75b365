"""Golden files for generated kernel source: the text fxfuse generates for a handful of
representative specs must match ``tests/codegen/golden/<case>.py`` byte for byte.

A change to a template shows up here as a diff a reviewer can read. When the change is intended,
regenerate the files and commit them with the template change:

    FXFUSE_UPDATE_GOLDEN=1 python -m pytest -q tests/codegen/test_golden.py

(with the variable set, each test writes its file and then compares against what it wrote). If
the change alters what an already-cached kernel computes, also bump ``CODEGEN_VERSION`` in
``fxfuse/codegen/kernel.py``; the kernel names in the golden files change with it.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from fxfuse.codegen.kernel import kernel_name
from fxfuse.runtime.cache import load
from fxfuse.codegen.norm import _source, generate
from fxfuse.lowering.norm import lower_norm
from fxfuse.spec import NormSpec, ParamPrep, Step

GOLDEN_DIR = Path(__file__).parent / "golden"
UPDATE = os.environ.get("FXFUSE_UPDATE_GOLDEN", "") == "1"

# The specs the norm pass produces for the styles in tests/norm_styles.py (checked by printing
# ``rewrite(...).matches``), written out so these tests depend on codegen alone.
SPECS = {
    # Llama: float32 statistics, cast back to bf16 *before* the bf16 weight multiply.
    "llama_rms_bf16": NormSpec(
        kind="rms_norm", eps=1e-6, compute_dtype="float32", norm_dtype="float32",
        steps=(Step("cast", "bfloat16"), Step("mul", "bfloat16", 0)), params=(ParamPrep("bfloat16"),),
    ),
    # Gemma: (1 + w) in float32, multiplied in float32, cast to bf16 last.
    "gemma_rms_bf16": NormSpec(
        kind="rms_norm", eps=1e-6, compute_dtype="float32", norm_dtype="float32",
        steps=(Step("mul", "float32", 0), Step("cast", "bfloat16")), params=(ParamPrep("float32", offset=1.0),),
    ),
    # nn.LayerNorm in float32 with weight and bias.
    "layer_norm_affine_f32": NormSpec(
        kind="layer_norm", eps=1e-5, compute_dtype="float32", norm_dtype="float32",
        steps=(Step("mul", "float32", 0), Step("add", "float32", 1)),
        params=(ParamPrep("float32"), ParamPrep("float32")),
    ),
    # Pre-norm block: h = x + delta (bf16, used again) feeding a Llama RMSNorm.
    "residual_rms_bf16": NormSpec(
        kind="rms_norm", eps=1e-6, compute_dtype="float32", norm_dtype="float32",
        steps=(Step("cast", "bfloat16"), Step("mul", "bfloat16", 0)), params=(ParamPrep("bfloat16"),),
        sum_dtype="bfloat16",
    ),
    # RMSNorm without a weight, float32 throughout.
    "rms_no_weight_f32": NormSpec(kind="rms_norm", eps=1e-6, compute_dtype="float32", norm_dtype="float32"),
    # LayerNorm in float64: the kernel must accumulate in float64 and use 1/sqrt, not tl.rsqrt.
    "layer_norm_affine_f64": NormSpec(
        kind="layer_norm", eps=1e-5, compute_dtype="float64", norm_dtype="float64",
        steps=(Step("mul", "float64", 0), Step("add", "float64", 1)),
        params=(ParamPrep("float64"), ParamPrep("float64")),
    ),
    # LayerNorm Scaling (Curse of Depth): nn.LayerNorm's output times 1/sqrt(3), then cast to bf16.
    "layer_norm_scaled_bf16": NormSpec(
        kind="layer_norm", eps=1e-5, compute_dtype="float32", norm_dtype="float32",
        steps=(Step("mul", "float32", 0), Step("add", "float32", 1), Step("scale", "float32", value=3 ** -0.5),
               Step("cast", "bfloat16")),
        params=(ParamPrep("float32"), ParamPrep("float32")),
    ),
    # DeepNorm: LN(alpha * x + f(x)) in bf16, alpha = (2 * 6) ** 0.25; the product and the sum round to bf16.
    "deepnorm_layer_norm_bf16": NormSpec(
        kind="layer_norm", eps=1e-5, compute_dtype="float32", norm_dtype="float32",
        steps=(Step("mul", "float32", 0), Step("add", "float32", 1), Step("cast", "bfloat16")),
        params=(ParamPrep("float32"), ParamPrep("float32")), sum_dtype="bfloat16", sum_scales=(12 ** 0.25, 1.0),
    ),
    # B2T: LN(f(h) + h + x), three float32 terms added left to right.
    "b2t_layer_norm_f32": NormSpec(
        kind="layer_norm", eps=1e-5, compute_dtype="float32", norm_dtype="float32",
        steps=(Step("mul", "float32", 0), Step("add", "float32", 1)),
        params=(ParamPrep("float32"), ParamPrep("float32")), sum_dtype="float32", sum_scales=(1.0, 1.0, 1.0),
    ),
    # DeepNorm with alpha a 0-d bf16 parameter: LN(f(x) + alpha * x), alpha read from its pointer (C0).
    "deepnorm_tensor_alpha_layer_norm_bf16": NormSpec(
        kind="layer_norm", eps=1e-5, compute_dtype="float32", norm_dtype="float32",
        steps=(Step("mul", "float32", 0), Step("add", "float32", 1), Step("cast", "bfloat16")),
        params=(ParamPrep("float32"), ParamPrep("float32")), sum_dtype="bfloat16", sum_scales=(1.0, 1.0),
        sum_tensor_scales=(1,),
    ),
}


def assert_matches_golden(kernel, golden: Path, functions: tuple[str, ...]) -> None:
    """``kernel``'s source equals the golden file byte for byte (rewritten first under
    FXFUSE_UPDATE_GOLDEN=1) and loads as Triton defining ``kernel.name + f`` for each suffix."""
    if UPDATE:
        golden.write_bytes(kernel.source.encode())
    assert golden.exists(), f"no golden file {golden}; create it with FXFUSE_UPDATE_GOLDEN=1 (see module docstring)"
    expected = golden.read_bytes().decode()
    assert kernel.source == expected, (
        f"generated source for {golden.stem} differs from {golden}; if the template change is intended, "
        "rerun with FXFUSE_UPDATE_GOLDEN=1 and commit the new file"
    )
    module = load(kernel)  # the golden text is loadable Triton, not just a string that happens to match
    assert {kernel.name + f for f in functions} <= set(vars(module))


@pytest.mark.parametrize("case", sorted(SPECS))
def test_generated_source_matches_golden_file(case):
    assert_matches_golden(generate(SPECS[case]), GOLDEN_DIR / f"{case}.py", ("_forward", "_backward"))


def test_golden_files_have_a_spec_each():
    """A golden file whose spec was removed would otherwise never be compared again."""
    # attention_*.py belong to test_golden_attention.py.
    on_disk = {p.stem for p in GOLDEN_DIR.glob("*.py") if not p.stem.startswith("attention_")}
    assert on_disk == set(SPECS)


def test_golden_sources_differ_where_the_specs_do():
    """Guards the golden files themselves: each records a different kernel."""
    sources = [generate(spec).source for spec in SPECS.values()]
    assert len(set(sources)) == len(sources)


def test_f64_kernel_accumulates_in_f64_and_llama_rounds_before_the_weight():
    f64 = generate(SPECS["layer_norm_affine_f64"]).source
    assert "ACC: tl.constexpr = tl.float64" in f64 and "tl.rsqrt" not in f64
    llama = generate(SPECS["llama_rms_bf16"]).source
    # v1 is the bf16-rounded normalized value and the weight multiplies it (Llama's order).
    assert "v1 = (v0).to(tl.bfloat16).to(ACC)" in llama and "v2 = (v1 * p0).to(tl.bfloat16).to(ACC)" in llama


@pytest.mark.parametrize("case", sorted(SPECS))
def test_same_spec_gives_same_bytes_and_name(case):
    spec = SPECS[case]
    again = NormSpec.from_json(spec.to_json())  # an equal spec built independently
    first, second = generate(spec), generate(again)
    assert first.name == second.name
    assert first.source.encode() == second.source.encode()
    assert _source(first.name, again, lower_norm(again)) == first.source


def test_kernel_name_changes_with_eps_and_with_any_field():
    base = SPECS["llama_rms_bf16"]
    names = {generate(base).name}
    for changed in (
        dataclasses.replace(base, eps=1e-5),
        dataclasses.replace(base, eps=1e-6 * (1 + 2**-40)),  # eps differing in the last bits
        dataclasses.replace(base, kind="layer_norm"),
        dataclasses.replace(base, sum_dtype="bfloat16"),
        dataclasses.replace(base, params=(ParamPrep("bfloat16", offset=1.0),)),
    ):
        kernel = generate(changed)
        assert kernel.name not in names, changed
        assert kernel.name in kernel.source  # the kernel functions carry the name
        names.add(kernel.name)


def test_kernel_name_is_a_hash_of_version_and_key(monkeypatch):
    from fxfuse.codegen import kernel as cache

    name = kernel_name("rms_norm", "key")
    assert name == kernel_name("rms_norm", "key")
    assert name.startswith("fxfuse_rms_norm_") and len(name) == len("fxfuse_rms_norm_") + 12
    assert kernel_name("rms_norm", "key2") != name
    monkeypatch.setattr(cache, "CODEGEN_VERSION", "test-bump")
    assert kernel_name("rms_norm", "key") != name  # a version bump never reuses old names
