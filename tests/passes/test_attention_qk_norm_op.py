"""``fxfuse.attention_rope`` with QK-norm (``norm_q``/``norm_k``) against the float64 reference (the
norm as fxfuse.norm computes it, then RoPE, then attention), forward and backward (q, k, v and the
norm weights), on the torch path and on the interpreted Triton kernels, which normalise the rows
they load."""
import dataclasses

import pytest
import torch

import fxfuse
from fxfuse.ops import attention_rope as rope
from fxfuse.spec import NormSpec, ParamPrep, Step
from fxfuse.spec_attention import AttentionSpec, ScoreStep
from tests.tolerances import assert_close_as_a_whole, assert_close_to_reference


def _norm(kind: str, dtype: str) -> NormSpec:
    """Qwen3's RMSNorm (float32 statistics, cast back, times the weight), Gemma3's (1 + w) form, or a
    LayerNorm with weight and bias, for an operand of ``dtype``."""
    stats = "float64" if dtype == "float64" else "float32"
    if kind == "rms":
        return NormSpec("rms_norm", 1e-6, stats, stats, steps=(Step("cast", dtype), Step("mul", dtype, 0)),
                        params=(ParamPrep(dtype),))
    if kind == "gemma":
        return NormSpec("rms_norm", 1e-6, stats, stats, steps=(Step("mul", stats, 0), Step("cast", dtype)),
                        params=(ParamPrep(stats, 1.0),))
    return NormSpec("layer_norm", 1e-5, stats, stats, steps=(Step("mul", stats, 0), Step("add", stats, 1), Step("cast", dtype)),
                    params=(ParamPrep(stats), ParamPrep(stats)))


def _spec(dtype: str, kind: str, style: str = "half", on: str = "qk") -> AttentionSpec:
    steps = (ScoreStep("mul", dtype, value=0.25), ScoreStep("fill", dtype, value=float("-inf")))  # causal
    norm = _norm(kind, dtype).to_json()
    return AttentionSpec(dtype, steps, prob_dtype=dtype, kv_groups=2, rope_q=style, rope_k=style,
                         norm_q=norm if "q" in on else "", norm_k=norm if "k" in on else "")


def _inputs(dtype, kind, lq=5, lk=5, d=16, on="qk"):
    g = torch.Generator().manual_seed(0)
    q = 2 * torch.randn(2, 2, lq, d, generator=g, dtype=dtype) + 0.5  # off-centre, not unit scale: the norm matters
    k = 2 * torch.randn(2, 1, lk, d, generator=g, dtype=dtype) + 0.5
    v = torch.randn(2, 1, lk, d, generator=g, dtype=dtype)
    angles = torch.randn(2, max(lq, lk), d, generator=g)
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    tables = [cos[:, -lq:], sin[:, -lq:], cos[:1, -lk:], sin[:1, -lk:]]
    prep = _norm(kind, str(dtype).removeprefix("torch.")).params[0].dtype  # Qwen3's weight is q's dtype
    for _ in on:
        tables += [(1 + 0.5 * torch.randn(d, generator=g)).to(getattr(torch, prep)) for _ in _norm(kind, "float32").params]
    return [q, k, v], [t.clone().requires_grad_(i >= 4) for i, t in enumerate(tables)]


def _grads(fn, operands, tables):
    leaves = [t.clone().requires_grad_() for t in operands]
    out = fn(*leaves, tables)
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64).to(out.device)
    wrt = leaves + [t for t in tables if t.requires_grad]
    return [out, *torch.autograd.grad((out.double() * upstream).sum(), wrt)]


def _double(tables):
    return [t.detach().double().requires_grad_(t.requires_grad) for t in tables]


@pytest.mark.parametrize("kind", ["rms", "gemma", "layer"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_operator_matches_float64(dtype, kind, cpu_path):
    name = str(dtype).removeprefix("torch.")
    spec, spec64 = _spec(name, kind), _spec("float64", kind)
    operands, tables = _inputs(dtype, kind)
    got = _grads(lambda q, k, v, t: torch.ops.fxfuse.attention_rope(q, k, v, [], t, spec.to_json()), operands, tables)
    eager = _grads(lambda q, k, v, t: rope.reference(spec, q, k, v, [], t), operands, tables)
    expected = _grads(lambda q, k, v, t: rope.reference(spec64, q, k, v, [], t), [t.double() for t in operands],
                      _double(tables))
    n_weights = 2 * len(_norm(kind, "float32").params)
    assert len(got) == len(expected) == 4 + n_weights
    for i, (a, e, r) in enumerate(zip(got, eager, expected)):
        assert a.shape == r.shape and a.dtype == e.dtype
        if i == 0 or dtype == torch.float32:
            assert_close_to_reference(a, e, r, f"result {i}")
        else:
            assert_close_as_a_whole(a, e, r, dtype, f"result {i}")

