"""RoPE fused into attention on a CUDA GPU: the generated kernels rotate q and k in their loads and
the gradients back (``pytest -m gpu``; skipped without CUDA like tests/test_gpu.py)."""
import pytest
import torch

from fxfuse.ops import attention_rope as rope
from tests.passes.test_attention_rope_op import _grads, _inputs, _spec
from tests.tolerances import assert_close_to_reference

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("style", rope.STYLES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
@pytest.mark.parametrize("lq,lk,d", [(5, 5, 16), (128, 300, 64), (1, 513, 128)])
def test_rope_kernels_on_cuda(dtype, style, lq, lk, d):
    import fxfuse.runtime.attention as kernels

    name = str(dtype).removeprefix("torch.")
    spec, spec64 = _spec(name, style), _spec("float64", style)
    operands, tables = _inputs(dtype, lq=lq, lk=lk, d=d)
    operands, tables = [t.cuda() for t in operands], [t.detach().cuda() for t in tables]
    calls = []
    forward = kernels.forward
    kernels.forward = lambda *a, **kw: calls.append(len(kw.get("tables", ()))) or forward(*a, **kw)
    try:
        got = _grads(lambda q, k, v, t: torch.ops.fxfuse.attention_rope(q, k, v, [], t, spec.to_json()), operands, tables)
    finally:
        kernels.forward = forward
    assert 4 in calls  # the kernels rotated (no torch rotation first)
    eager = _grads(lambda q, k, v, t: rope.reference(spec, q, k, v, [], t), operands, tables)
    expected = _grads(lambda q, k, v, t: rope.reference(spec64, q, k, v, [], t), [t.double() for t in operands],
                      [t.double() for t in tables])
    for i, (a, e, r) in enumerate(zip(got, eager, expected)):
        assert_close_to_reference(a, e, r, f"result {i}")
