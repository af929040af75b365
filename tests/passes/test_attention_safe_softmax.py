"""The fused operator with a safe softmax (``aten._safe_softmax``: a query row whose every score is
-inf gives 0, not NaN): on the torch path (SDPA where it is exact, else the reference) and on the
interpreted Triton kernels, the output and every gradient equal a float64 computation written with
torch's own ``_safe_softmax``, with rows that a mask, the causal rule or a bias hides entirely;
nothing is NaN. And the flag's JSON form: left out when off, so other specs keep their kernel names."""
import math

import pytest
import torch

import fxfuse.ops  # noqa: F401  (registers torch.ops.fxfuse.attention)
from fxfuse.spec_attention import AttentionSpec, ScoreStep
from tests.tolerances import assert_close_to_reference

B, H, D = 1, 2, 8
INF = math.inf


def _case(kind, lq, lk):
    """(spec, extras, float64 scores function of (q, k, extras)) with whole rows hidden."""
    g = torch.Generator().manual_seed(1)
    keep = torch.rand(B, 1, lq, lk, generator=g) > 0.3
    keep[..., 0] = True
    keep[..., 1, :] = False  # query 1 sees no key
    scale = ScoreStep("mul", "float32", value=0.5)
    if kind == "mask":  # one -inf boolean fill: the torch path is SDPA
        steps = (scale, ScoreStep("fill", "float32", value=-INF, input=0, invert=True))
        inputs, extras = ("mask",), [keep]
    elif kind == "mask_causal":  # two fills: the torch path is the reference; lq > lk hides the first rows too
        steps = (scale, ScoreStep("fill", "float32", value=-INF, input=0, invert=True),
                 ScoreStep("fill", "float32", value=-INF, input=-1))
        inputs, extras = ("mask",), [keep]
    else:  # a learned bias with a row of -inf: its gradient is 0 there
        bias = torch.randn(1, 1, lq, lk, generator=g)
        bias[..., 1, :] = -INF
        steps, inputs, extras = (scale, ScoreStep("add", "float32", input=0)), ("bias",), [bias.requires_grad_()]

    def scores(q, k, extras):
        s = q @ k.mT * 0.5
        if kind == "bias":
            return s + extras[0]
        s = s.masked_fill(~extras[0], -INF)
        if kind == "mask_causal":
            s = s.masked_fill(torch.ones(lq, lk, dtype=torch.bool).tril(lk - lq).logical_not(), -INF)
        return s

    spec = AttentionSpec(score_dtype="float32", steps=steps, prob_dtype="float32", inputs=inputs, safe_softmax=True)
    return spec, extras, scores


def _run(fn, q, k, v, extras):
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    extras = [e.detach().requires_grad_(e.requires_grad) for e in extras]
    out = fn(*leaves, extras)
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    (out.double() * upstream).sum().backward()
    return out, [t.grad for t in leaves] + [e.grad for e in extras if e.requires_grad]


@pytest.mark.parametrize("kind,lq,lk", [("mask", 5, 7), ("mask_causal", 6, 4), ("bias", 5, 5)])
def test_fully_hidden_rows_give_zero_output_and_gradients(kind, lq, lk, cpu_path):
    spec, extras, scores = _case(kind, lq, lk)
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(B, H, lq, D, generator=g), torch.randn(B, H, lk, D, generator=g), \
        torch.randn(B, H, lk, D, generator=g)
    fused = lambda q, k, v, e: torch.ops.fxfuse.attention(q, k, v, e, spec.to_json())  # noqa: E731
    safe = lambda q, k, v, e: torch.ops.aten._safe_softmax(scores(q, k, e), -1) @ v  # noqa: E731
    got, got_grads = _run(fused, q, k, v, extras)
    wide = [e.double() if e.is_floating_point() else e for e in extras]
    ref, ref_grads = _run(safe, q.double(), k.double(), v.double(), wide)
    eager, eager_grads = _run(safe, q, k, v, extras)
    dead = torch.isinf(scores(q, k, extras)).all(-1)  # (B, H, Lq): rows with no finite score
    assert dead[..., 1].all() and (kind != "mask_causal" or dead[..., 0].all())
    assert not got.isnan().any() and not any(t.isnan().any() for t in got_grads)
    assert (got[dead] == 0).all() and (got_grads[0][dead] == 0).all()
    assert_close_to_reference(got, eager, ref, "output")
    assert len(got_grads) == len(ref_grads) == 3 + (kind == "bias")
    for what, g_, e, r in zip(["q", "k", "v", "bias"], got_grads, eager_grads, ref_grads):
        assert_close_to_reference(g_, e, r, f"gradient of {what}")


def test_safe_softmax_flag_in_json_and_words():
    plain = AttentionSpec(score_dtype="float32", steps=(ScoreStep("mul", "float32", value=0.5),))
    safe = AttentionSpec(score_dtype="float32", steps=plain.steps, safe_softmax=True)
    assert "safe_softmax" not in plain.to_json()  # existing specs keep their JSON and kernel names
    assert AttentionSpec.from_json(safe.to_json()) == safe and safe.to_json() != plain.to_json()
    assert "safe softmax (fully masked rows give 0)" in safe.describe()
    assert "safe" not in plain.describe()
