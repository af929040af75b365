"""The torch reference of fused attention (the CPU path where SDPA is not exact, and the torch
backward formula) computes the scores a chunk of query rows at a time, bounded to
``SCORE_CHUNK_ELEMENTS``. Every step and rounding is the same per row; what chunking may change
is the order in which float32 sums are added: MKL's gemm picks its kernel by the matrix shape, so
q @ k^T of 2 rows can differ from the same rows of a 7-row product in the last bit (measured:
p @ v did not), and dk, dv and the reduced extras' gradients add up chunk by chunk. So results are
compared to float32 ulps (one bfloat16 ulp after a bf16 rounding), which a wrong row, a shifted
causal rule or a missed chunk would exceed by orders of magnitude."""
import pytest
import torch

import fxfuse.ops.attention as ops
from fxfuse.spec_attention import AttentionSpec, ScoreStep

B, H, HKV, LQ, LK, D = 2, 4, 2, 7, 9, 8

SPECS = {
    # causal with a window: the rule needs each chunk's row positions
    "causal_window": (AttentionSpec("float32", (ScoreStep("mul", "float32", value=0.3),
                                                ScoreStep("fill", "float32", value=float("-inf"), window=3))),
                      []),
    # a bias with a query dim (sliced per chunk) and a padding mask without one (read whole)
    "bias_and_mask": (AttentionSpec("float32", (ScoreStep("add", "float32", input=0),
                                                ScoreStep("fill", "float32", value=float("-inf"), input=1)),
                                    inputs=("bias", "mask")),
                      [(H, LQ, LK), (B, 1, 1, LK)]),
    # a factor tensor with no query dim (its gradient sums over every chunk), grouped kv heads
    "factor_gqa": (AttentionSpec("float32", (ScoreStep("mul", "float32", input=0),), inputs=("factor",),
                                 kv_groups=H // HKV),
                   [(1, H, 1, 1)]),
    # bf16: the roundings of each step, per chunk as for the whole
    "bf16_cast": (AttentionSpec("bfloat16", (ScoreStep("mul", "bfloat16", value=0.5), ScoreStep("cast", "float32")),
                                prob_dtype="bfloat16"),
                  []),
}


def _inputs(spec, shapes):
    dtype = torch.bfloat16 if spec.score_dtype == "bfloat16" else torch.float32
    heads_kv = H // spec.kv_groups
    q = torch.randn(B, H, LQ, D, dtype=dtype)
    k, v = (torch.randn(B, heads_kv, LK, D, dtype=dtype) for _ in range(2))
    extras = []
    for kind, shape in zip(spec.inputs, shapes):
        if kind == "mask":
            mask = torch.zeros(shape, dtype=torch.bool)
            mask[1, ..., 5:] = True  # the second sequence is padded; every row still sees key 0
            extras.append(mask)
        else:
            extras.append(torch.rand(shape, dtype=dtype) + 0.5)
    return q, k, v, extras


@pytest.mark.parametrize("name", sorted(SPECS))
def test_chunked_reference_equals_unchunked(name, monkeypatch):
    spec, shapes = SPECS[name]
    q, k, v, extras = _inputs(spec, shapes)
    grad_out = torch.randn(B, H, LQ, D, dtype=q.dtype)
    whole = ops.reference(spec, q, k, v, extras)
    whole_grads = ops.reference_backward(spec, grad_out, q, k, v, extras)
    monkeypatch.setattr(ops, "SCORE_CHUNK_ELEMENTS", B * H * LK * 2)  # 2 query rows per chunk: 4 chunks
    assert len(ops._row_chunks(q, LK)) == 4
    chunked = ops.reference(spec, q, k, v, extras)
    chunked_grads = ops.reference_backward(spec, grad_out, q, k, v, extras)
    tol = 2e-6 if q.dtype == torch.float32 else 8e-3  # float32 ulps; one bf16 ulp
    torch.testing.assert_close(chunked, whole, rtol=tol, atol=tol)
    names = ["dq", "dk", "dv", *(f"d extra {i}" for i in range(len(extras)))]
    for what, got, want in zip(names, chunked_grads, whole_grads):
        assert got.shape == want.shape and got.dtype == want.dtype, what
        torch.testing.assert_close(got, want, rtol=tol, atol=tol, msg=what)


def test_the_scores_never_exceed_the_budget(monkeypatch):
    # Every scores tensor the reference materialises, forward and backward, is one chunk's:
    # counted through a hook on the function that builds them.
    spec, shapes = SPECS["bias_and_mask"]
    q, k, v, extras = _inputs(spec, shapes)
    budget = B * H * LK * 3
    monkeypatch.setattr(ops, "SCORE_CHUNK_ELEMENTS", budget)
    sizes, real = [], ops._scores
    monkeypatch.setattr(ops, "_scores", lambda *a, **kw: (lambda s: sizes.append(s.numel()) or s)(real(*a, **kw)))
    ops.reference(spec, q, k, v, extras)
    ops.reference_backward(spec, torch.randn(B, H, LQ, D), q, k, v, extras)
    assert sizes == [B * H * LK * 3, B * H * LK * 3, B * H * LK * 1] * 2, sizes  # 7 rows: 3 + 3 + 1, twice
    assert max(sizes) <= budget < B * H * LQ * LK


def test_the_operator_runs_chunked_on_cpu(monkeypatch):
    # Through torch.ops.fxfuse.attention (a spec SDPA cannot run: the torch reference) and its
    # autograd: the same output and gradients with tiny chunks as in one piece.
    spec, shapes = SPECS["causal_window"]
    spec = AttentionSpec("float32", spec.steps + (ScoreStep("cast", "float32"), ScoreStep("tanh", "float32")))
    q, k, v, _ = _inputs(spec, shapes)

    def run():
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = torch.ops.fxfuse.attention(*leaves, [], spec.to_json())
        out.sum().backward()
        return out.detach(), [t.grad for t in leaves]

    whole, whole_grads = run()
    monkeypatch.setattr(ops, "SCORE_CHUNK_ELEMENTS", 1)  # one query row per chunk
    chunked, chunked_grads = run()
    torch.testing.assert_close(chunked, whole, rtol=2e-6, atol=2e-6)
    torch.testing.assert_close(chunked_grads, whole_grads, rtol=2e-6, atol=2e-6)
