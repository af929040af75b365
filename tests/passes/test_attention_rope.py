"""RoPE fused into attention: every style's rotation is taken into the operator (no rotated copy,
no cat left in the graph) and the rewritten module equals eager, outputs and gradients, against a
float64 reference, on the torch path and on the interpreted Triton kernels; near-misses keep the
rotation they name as written."""
import copy

import pytest
import torch

import fxfuse
from fxfuse.passes.attention import FuseAttention
from fxfuse.passes.attention_rope import FuseRope
from fxfuse.passes.canonicalize import Canonicalize
from tests.rope_styles import NEAR_MISSES, STYLES
from tests.tolerances import assert_close_to_reference

PASSES = [Canonicalize(), FuseAttention(), FuseRope()]


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def _run(model, inputs):
    out = _first(model(*inputs))
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    (out.double() * upstream).sum().backward()
    return out, [t.grad for t in inputs if t.requires_grad]


def _leaves(inputs, dtype=None, constant=()):
    # The tables are inputs too (float): they take part in the gradient check, unless constant.
    return [(t.to(dtype) if dtype and t.is_floating_point() else t.clone()).requires_grad_(
        t.is_floating_point() and i not in constant) for i, t in enumerate(inputs)]


def _check(style, dtype):
    model = style()
    inputs = model.inputs(dtype)
    res = fxfuse.rewrite(model, tuple(inputs), passes=PASSES)
    constant = getattr(style, "CONSTANT_INPUTS", ())
    expected, expected_grads = _run(copy.deepcopy(model), _leaves(inputs, torch.float64, constant))
    eager, eager_grads = _run(model, _leaves(inputs, constant=constant))
    got, got_grads = _run(res.module, _leaves(inputs, constant=constant))
    assert got.dtype == eager.dtype
    assert_close_to_reference(got, eager, expected, "output")
    assert len(got_grads) == len(eager_grads) == len(expected_grads)
    for i, (g, e, r) in enumerate(zip(got_grads, eager_grads, expected_grads)):
        assert_close_to_reference(g, e, r, f"gradient {i}")
    return res


def _rope_specs(res):
    return [m.spec for m in res.matches if m.kind == "rope"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("style", STYLES, ids=lambda s: s.__name__)
def test_rope_is_fused_and_exact(style, dtype, cpu_path):
    res = _check(style, dtype)
    specs = _rope_specs(res)
    assert len(specs) == 1 and bool(specs[0].rope_q) and bool(specs[0].rope_k), res.report()
    assert not res.misses, res.report()
    code = res.graph.code
    assert "fxfuse.attention_rope" in code and "aten.cat" not in code and "aten.stack" not in code, code
    assert "aten.neg" not in code, code  # the rotated copies are not computed


@pytest.mark.parametrize("style", NEAR_MISSES, ids=lambda s: s.__name__)
def test_near_misses_keep_their_rotation(style, cpu_path):
    res = _check(style, torch.float32)
    specs = _rope_specs(res)
    rotated = "".join(n for n in "qk" if specs and getattr(specs[0], f"rope_{n}"))
    assert rotated == style.ROTATED, res.report()
    assert [m.kind for m in res.matches if m.kind == "attention"] == ["attention"], res.report()


def test_rotated_key_in_a_cache_is_a_miss_with_its_reason():
    from tests.rope_styles import RotatedKeysAlsoReturned

    model = RotatedKeysAlsoReturned()
    res = fxfuse.rewrite(model, tuple(model.inputs(torch.float32)), passes=PASSES)
    reasons = [m.reason for m in res.misses if m.kind == "rope"]
    assert len(reasons) == 1 and "RoPE on k stays as written" in reasons[0] and "KV cache" in reasons[0], reasons


def test_per_head_tables_are_declined_with_their_reason():
    from tests.rope_styles import PerHeadTables

    model = PerHeadTables()
    res = fxfuse.rewrite(model, tuple(model.inputs(torch.float32)), passes=PASSES)
    reasons = [m.reason for m in res.misses if m.kind == "rope"]
    assert len(reasons) == 2 and all("does not broadcast over the heads" in r for r in reasons), reasons


def test_rope_is_in_the_default_pipeline():
    from tests.rope_styles import NeoXChunkTable

    model = NeoXChunkTable()
    res = fxfuse.rewrite(model, tuple(model.inputs(torch.float32)))
    assert len(_rope_specs(res)) == 1 and "RoPE on q (half) and k (half)" in res.report(), res.report()


@pytest.mark.inductor
def test_compiled_with_the_backend_on_cpu_rope_goes_to_inductor_and_trains_like_eager(tmp_path):
    """Under torch.compile on CPU the site is handed to Inductor as the rotation (pointwise ops)
    in front of the attention form: no fxfuse operator call is left, and values and gradients
    equal eager's."""
    from tests.rope_styles import GroupedQueryLlama

    torch._dynamo.reset()
    model = GroupedQueryLlama()
    inputs = model.inputs(torch.float32)
    be = fxfuse.Backend(debug_dir=str(tmp_path))
    compiled = torch.compile(model, backend=be)
    got, got_grads = _run(compiled, _leaves(inputs, constant=model.CONSTANT_INPUTS))
    eager, eager_grads = _run(model, _leaves(inputs, constant=model.CONSTANT_INPUTS))
    expected, expected_grads = _run(model, _leaves(inputs, torch.float64, model.CONSTANT_INPUTS))
    assert [m.kind for m in be.matches].count("rope") == 1, be.report()
    forward = "\n".join(p.read_text() for p in sorted((tmp_path / "graphs").glob("*_aot_forward.txt")))
    assert "_scaled_dot_product_flash_attention_for_cpu" in forward and "attention_rope" not in forward, forward
    assert_close_to_reference(got, eager, expected, "output")
    for i, (g, e, r) in enumerate(zip(got_grads, eager_grads, expected_grads)):
        assert_close_to_reference(g, e, r, f"gradient {i}")
    torch._dynamo.reset()


def test_rewritten_module_runs_cpu_rope_sites_as_the_rotation_then_the_attention_call():
    """On CPU the operator's backward recomputes the rotation and the attention forward, slower in
    training than the code it replaced (a Llama step took 1.5x eager's time): the module's direct
    call rotates with the user's torch ops, which autograd differentiates as before, then runs the
    attention site's own CPU call. The reported graph keeps the operator."""
    model = STYLES[0]()
    inputs = model.inputs(torch.float32)
    res = fxfuse.rewrite(model, tuple(inputs), passes=PASSES)
    (graph,) = res.module._graphs.values()
    assert "fxfuse.attention_rope" in res.graph.code
    assert "torch.ops.fxfuse" not in graph.run.__self__.code  # the executed copy
    _check(STYLES[0], torch.float32)  # outputs and gradients (tables' too) against float64


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["f32", "bf16", "f16"])
def test_meta_complex_rope_is_the_interleaved_rotation(dtype, cpu_path):
    """Meta's view_as_complex form is fused as the interleaved rotation (tables built in the graph
    from freqs_cis's parts); on a 16-bit q/k it rotates in float32 and rounds once (``type_as``),
    which the operator does too ("interleaved/float32")."""
    from tests.rope_styles import MetaComplex

    res = _check(MetaComplex, dtype)
    specs = _rope_specs(res)
    style = "interleaved" if dtype == torch.float32 else "interleaved/float32"
    assert len(specs) == 1 and specs[0].rope_q == specs[0].rope_k == style, res.report()
    assert "view_as_complex" not in res.graph.code and not res.misses, res.graph.code


def test_complex_rope_rounded_to_another_dtype_is_declined_with_its_reason():
    """A bf16 q rotated in float32 and rounded to float16: not one rounding back to q's dtype."""
    from tests.rope_styles import B, D, H, L, _attend, freqs_cis

    class ToHalf(torch.nn.Module):
        def forward(self, q, k, v, freqs):
            xq = torch.view_as_complex(q.float().reshape(*q.shape[:-1], -1, 2))
            q = torch.view_as_real(xq * freqs.view(1, q.shape[1], 1, -1)).flatten(3).half()
            return _attend(q.transpose(1, 2), k.half().transpose(1, 2), v.half().transpose(1, 2))

    model = ToHalf()
    inputs = [torch.randn(B, L, H, D, dtype=torch.bfloat16) for _ in range(3)] + [freqs_cis()]
    res = fxfuse.rewrite(model, tuple(inputs), passes=PASSES)
    reasons = [m.reason for m in res.misses if m.kind == "rope" and "float16" in m.reason]
    assert reasons and "rounds the rotation back to its dtype once" in reasons[0], res.report()
    assert not _rope_specs(res) and "view_as_complex" in res.graph.code, res.report()


def test_complex_freqs_per_head_are_declined_with_their_reason():
    from tests.rope_styles import ComplexPerHeadFreqs

    model = ComplexPerHeadFreqs()
    res = fxfuse.rewrite(model, tuple(model.inputs(torch.float32)), passes=PASSES)
    reasons = [m.reason for m in res.misses if m.kind == "rope"]
    assert len(reasons) == 2 and all("not one value per pair and position" in r for r in reasons), reasons


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["f32", "bf16", "f16"])
def test_vision_rope_in_float32_is_the_half_rotation_in_float32(dtype, cpu_path):
    """Qwen2-VL's vision RoPE: a 16-bit q/k rotated in float32 (float32 tables) and cast back once is
    "half/float32" (in float32 the casts are no-ops: "half")."""
    from tests.rope_styles import VisionRotaryInFloat32

    specs = _rope_specs(_check(VisionRotaryInFloat32, dtype))
    style = "half" if dtype == torch.float32 else "half/float32"
    assert len(specs) == 1 and specs[0].rope_q == specs[0].rope_k == style, specs


def test_rotation_in_float32_cast_to_another_dtype_is_declined_with_its_reason():
    from tests.rope_styles import B, D, H, L, _attend, _tables, rotate_half

    class ToHalf(torch.nn.Module):
        def forward(self, q, k, v, cos, sin):
            qf, cos, sin = q.float(), cos[:, None].float(), sin[:, None].float()
            q = (qf * cos + rotate_half(qf) * sin).half()
            return _attend(q.transpose(1, 2), k.half().transpose(1, 2), v.half().transpose(1, 2))

    inputs = [torch.randn(B, L, H, D, dtype=torch.bfloat16) for _ in range(3)] + list(_tables(torch.bfloat16))
    res = fxfuse.rewrite(ToHalf(), tuple(inputs), passes=PASSES)
    reasons = [m.reason for m in res.misses if m.kind == "rope"]
    assert reasons and "cast back to its dtype once" in reasons[0], res.report()
    assert not _rope_specs(res), res.report()
