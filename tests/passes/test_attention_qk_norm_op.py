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



def test_kernels_normalise_in_their_loads(monkeypatch):
    """On the interpreted path at D = 16 the kernels get the norm weights and q, k unnormalised (no
    normalised copy is made in torch, forward or backward); at D = 8 the operator normalises in torch."""
    import fxfuse.runtime.attention as kernels
    from fxfuse.ops import attention_qk_norm as qk_norm

    calls = []
    for fn in ("forward", "backward"):
        original = getattr(kernels, fn)
        monkeypatch.setattr(kernels, fn, lambda *a, _f=original, _n=fn, **kw: calls.append((_n, len(kw.get("tables", ()))))
                            or _f(*a, **kw))
    normalised = qk_norm.normalised
    monkeypatch.setattr(qk_norm, "normalised", lambda *a: pytest.fail("normalised in torch"))
    spec = _spec("float32", "layer").to_json()
    with fxfuse.config.patch(interpret=True):
        operands, tables = _inputs(torch.float32, "layer", lq=3, lk=7)
        _grads(lambda q, k, v, t: torch.ops.fxfuse.attention_rope(q, k, v, [], t, spec), operands, tables)
    assert ("forward", 8) in calls and ("backward", 8) in calls, calls
    monkeypatch.setattr(qk_norm, "normalised", normalised)
    operands, tables = _inputs(torch.float32, "rms", d=8)
    with fxfuse.config.patch(interpret=True):
        got = torch.ops.fxfuse.attention_rope(*operands, [], tables, _spec("float32", "rms").to_json())
    torch.testing.assert_close(got, rope.reference(_spec("float32", "rms"), *operands, [], tables))


def test_spec_words_json_and_split_decode():
    from fxfuse.codegen.attention_decode import splittable

    spec = _spec("float32", "rms", on="k")
    assert AttentionSpec.from_json(spec.to_json()) == spec and "norm_q" not in spec.to_json()
    assert "QK-norm on k before RoPE (rms_norm, eps=1e-06" in spec.describe() and "QK-norm on q" not in spec.describe()
    assert "norm_k" in splittable(dataclasses.replace(spec, rope_q="", rope_k=""))  # the split kernel does not render it
    operands, tables = _inputs(torch.float32, "rms", on="k")
    with pytest.raises(ValueError, match="then the norm parameters"):
        torch.ops.fxfuse.attention_rope(*operands, [], tables[:4], spec.to_json())
