"""QK-norm fused into attention on a CUDA GPU: the generated kernels normalise (then rotate) q and k
in their loads, and the gradients go back through the norm (``pytest -m gpu``; skipped without
CUDA like tests/test_gpu.py). Not run here yet: no GPU was lent to the session that wrote it."""
import pytest
import torch

from fxfuse.ops import attention_rope as rope
from tests.passes.test_attention_qk_norm_op import _double, _grads, _inputs, _norm, _spec
from tests.tolerances import assert_close_as_a_whole, assert_close_to_reference

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("kind", ["rms", "gemma", "layer"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("lq,lk,d", [(5, 5, 16), (128, 300, 64), (1, 513, 128)])
def test_qk_norm_kernels_on_cuda(dtype, kind, lq, lk, d):
    import fxfuse.runtime.attention as kernels

    name = str(dtype).removeprefix("torch.")
    spec, spec64 = _spec(name, kind), _spec("float64", kind)
    operands, tables = _inputs(dtype, kind, lq=lq, lk=lk, d=d)
    operands = [t.cuda() for t in operands]
    tables = [t.detach().cuda().requires_grad_(t.requires_grad) for t in tables]
    n_tables = len(tables)
    calls = []
    forward = kernels.forward
    kernels.forward = lambda *a, **kw: calls.append(len(kw.get("tables", ()))) or forward(*a, **kw)
    try:
        got = _grads(lambda q, k, v, t: torch.ops.fxfuse.attention_rope(q, k, v, [], t, spec.to_json()), operands, tables)
    finally:
        kernels.forward = forward
    assert n_tables in calls  # the kernels normalised and rotated (no torch copy first)
    eager = _grads(lambda q, k, v, t: rope.reference(spec, q, k, v, [], t), operands, tables)
    expected = _grads(lambda q, k, v, t: rope.reference(spec64, q, k, v, [], t), [t.double() for t in operands],
                      _double(tables))
    assert len(got) == 4 + 2 * len(_norm(kind, "float32").params)
    for i, (a, e, r) in enumerate(zip(got, eager, expected)):
        if i == 0 or dtype == torch.float32:
            assert_close_to_reference(a, e, r, f"result {i}")
        else:
            assert_close_as_a_whole(a, e, r, dtype, f"result {i}")
