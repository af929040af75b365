"""``fxfuse.attention_rope`` against the float64 reference (the rotation as the user wrote it, then
attention), forward and backward, on the torch path and on the interpreted Triton kernels, which
rotate q and k in their loads and rotate the gradients back; tables that require grad get theirs."""
import pytest
import torch

import fxfuse
from fxfuse.ops import attention_rope as rope
from fxfuse.spec_attention import AttentionSpec, ScoreStep
from tests.tolerances import assert_close_to_reference


def _spec(dtype: str, style: str, on: str = "qk") -> AttentionSpec:
    steps = (ScoreStep("mul", dtype, value=0.25), ScoreStep("fill", dtype, value=float("-inf")))  # causal
    return AttentionSpec(dtype, steps, prob_dtype=dtype, kv_groups=2, rope_q=style if "q" in on else "",
                         rope_k=style if "k" in on else "")


def _inputs(dtype, lq=5, lk=5, d=16, table_grad=False):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 2, lq, d, generator=g, dtype=dtype)
    k, v = (torch.randn(2, 1, lk, d, generator=g, dtype=dtype) for _ in range(2))  # GQA: 2 query heads per kv head
    angles = torch.randn(2, max(lq, lk), d, generator=g)
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)  # a per-batch (B, L, D) table
    tables = [cos[:, -lq:], sin[:, -lq:], cos[:1, -lk:], sin[:1, -lk:]]  # k's shared by the batch
    return [q, k, v], [t.clone().requires_grad_(table_grad) for t in tables]


def _grads(fn, operands, tables):
    leaves = [t.clone().requires_grad_() for t in operands]
    out = fn(*leaves, tables)
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64).to(out.device)
    wrt = leaves + [t for t in tables if t.requires_grad]
    return [out, *torch.autograd.grad((out.double() * upstream).sum(), wrt)]


@pytest.mark.parametrize("table_grad", [False, True], ids=["constant-tables", "table-grads"])
@pytest.mark.parametrize("style", rope.STYLES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_operator_matches_float64(dtype, style, table_grad, cpu_path):
    name = str(dtype).removeprefix("torch.")
    spec, spec64 = _spec(name, style), _spec("float64", style)
    operands, tables = _inputs(dtype, table_grad=table_grad)
    got = _grads(lambda q, k, v, t: torch.ops.fxfuse.attention_rope(q, k, v, [], t, spec.to_json()), operands, tables)
    eager = _grads(lambda q, k, v, t: rope.reference(spec, q, k, v, [], t), operands, tables)
    tables64 = [t.detach().double().requires_grad_(table_grad) for t in tables]
    expected = _grads(lambda q, k, v, t: rope.reference(spec64, q, k, v, [], t), [t.double() for t in operands],
                      tables64)
    assert len(got) == len(expected) == 4 + 4 * table_grad
    for i, (a, e, r) in enumerate(zip(got, eager, expected)):
        assert a.shape == r.shape and a.dtype == e.dtype
        assert_close_to_reference(a, e, r, f"result {i}")


def test_kernels_rotate_in_their_loads(monkeypatch):
    """On the interpreted path with constant tables and D = 16 the kernels get the tables (no
    rotated copy is made in torch, forward or backward); at D = 8 the operator rotates in torch."""
    import fxfuse.runtime.attention as kernels

    calls = []
    for fn in ("forward", "backward"):
        original = getattr(kernels, fn)
        monkeypatch.setattr(kernels, fn, lambda *a, _f=original, _n=fn, **kw: calls.append((_n, len(kw.get("tables", ()))))
                            or _f(*a, **kw))
    monkeypatch.setattr(rope, "rotated_operands", lambda *a: pytest.fail("rotated in torch"))
    spec = _spec("float32", "half").to_json()
    with fxfuse.config.patch(interpret=True):
        operands, tables = _inputs(torch.float32, lq=3, lk=7)
        _grads(lambda q, k, v, t: torch.ops.fxfuse.attention_rope(q, k, v, [], t, spec), operands, tables)
    assert ("forward", 4) in calls and ("backward", 4) in calls, calls


def test_small_head_dim_rotates_in_torch_first():
    spec = _spec("float32", "interleaved")
    operands, tables = _inputs(torch.float32, d=8)
    with fxfuse.config.patch(interpret=True):
        got = torch.ops.fxfuse.attention_rope(*operands, [], tables, spec.to_json())
    torch.testing.assert_close(got, rope.reference(spec, *operands, [], tables))


def test_q_only_and_spec_words():
    spec = _spec("float32", "half", on="q")
    assert AttentionSpec.from_json(spec.to_json()) == spec and "RoPE on q (half)" in spec.describe()
    assert "rope" not in _spec("float32", "").to_json()  # sites without RoPE keep their JSON (and kernels)
    operands, tables = _inputs(torch.float32)
    with fxfuse.config.patch(interpret=True):
        got = torch.ops.fxfuse.attention_rope(*operands, [], tables[:2], spec.to_json())
    torch.testing.assert_close(got, rope.reference(spec, *operands, [], tables[:2]))
    with pytest.raises(ValueError, match="pass \\(cos, sin\\) for each rotated operand"):
        torch.ops.fxfuse.attention_rope(*operands, [], tables, spec.to_json())


def test_rope_specs_are_not_split_for_decoding():
    """The split-key decode kernel does not render RoPE: such specs keep the one-program forward."""
    from fxfuse.codegen.attention_decode import splittable

    assert "rope_q" in splittable(_spec("float32", "half")) and splittable(_spec("float32", "")) is None
