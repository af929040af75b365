"""Masks that only the sizes decide, at symbolic sizes (spec field ``size_mask``): the pass marks a
boolean mask built from arange and the lengths by ops the index deriver does not know (the
packed-sequence cumsum and self-indexing of transformers' mask builders), and the operator compares
it with the causal rule once per shape, then runs that rule (no mask read). Near-misses: masks read
from an input, masks whose values depend on a size that is not one of their dims, masks that are
not causal."""
import copy
import dataclasses

import pytest
import torch
import torch.nn as nn

from fxfuse.backend import Backend
from fxfuse.ops import size_masks
from fxfuse.spec_attention import AttentionSpec, ScoreStep
from tests.tolerances import assert_close_to_reference

D, H = 16, 2
NEG_INF = float("-inf")


@pytest.fixture(autouse=True)
def _fresh():
    torch._dynamo.reset()
    size_masks._verdicts.clear()
    yield
    torch._dynamo.reset()


def _spec(*, bias_first=False, invert=True):
    fill = ScoreStep("fill", "float32", value=NEG_INF, input=1 if bias_first else 0, invert=invert)
    steps = (ScoreStep("mul", "float32", value=0.25),)
    if bias_first:
        return AttentionSpec("float32", steps + (ScoreStep("add", "float32", input=0), fill), inputs=("bias", "mask"),
                             size_mask=1, size_key="test")
    return AttentionSpec("float32", steps + (fill, ScoreStep("add", "float32", input=1)), inputs=("mask", "bias"),
                         size_mask=0, size_key="test")


def _visible(lq, lk, window=0):
    return ~size_masks.causal_mask(lq, lk, "cpu", window)


def test_a_causal_mask_becomes_the_rule_and_the_other_inputs_are_renumbered():
    bias = torch.randn(1, H, 6, 6)
    for spec, extras, kept in ((_spec(), [_visible(6, 6)[None, None].expand(2, 1, 6, 6), bias], 0),
                               (_spec(bias_first=True), [bias, _visible(6, 6)[None, None]], 0)):
        resolved, left, dropped = size_masks.resolve(spec, extras, 6, 6)
        assert dropped == spec.size_mask and resolved.causal and resolved.size_mask == -1
        assert resolved.inputs == ("bias",) and left == [bias]
        assert [s.input for s in resolved.steps if s.op == "add"] == [kept]


def test_sliding_window_masks_keep_their_window_and_other_masks_stay():
    resolved, _, _ = size_masks.resolve(_spec(), [_visible(8, 8, 3), torch.zeros(8, 8)], 8, 8)
    assert [s.window for s in resolved.steps if s.causal] == [3]
    padded = _visible(5, 5)[None, None].repeat(2, 1, 1, 1)
    padded[1, ..., 0] = False  # one sequence's first key is padding: not one causal pattern
    for mask, lq, lk in ((padded, 5, 5), (_visible(6, 4), 6, 4)):  # more queries than keys: whole rows hidden
        spec, extras = _spec(), [mask, torch.zeros(lq, lk)]
        resolved, left, dropped = size_masks.resolve(spec, extras, lq, lk)
        assert (left, dropped) == (extras, -1)  # the spec read as the plain mask site it is at this shape
        assert resolved == dataclasses.replace(spec, size_mask=-1, size_key="")
    assert size_masks._verdicts[("test", (2, 1, 5, 5), "cpu", True, 5, 5)] is None


def test_the_verdict_is_taken_once_per_shape():
    calls = []
    real = size_masks.causal_window
    size_masks.causal_window = lambda *a: calls.append(a) or real(*a)
    try:
        for _ in range(3):
            size_masks.resolve(_spec(), [_visible(6, 6), torch.zeros(6, 6)], 6, 6)
        size_masks.resolve(_spec(), [_visible(7, 7), torch.zeros(7, 7)], 7, 7)
    finally:
        size_masks.causal_window = real
    assert len(calls) == 2


def _written(q, k, v, mask, bias):
    return ((q @ k.transpose(-1, -2) * 0.25).masked_fill(~mask, NEG_INF) + bias).softmax(-1) @ v


def test_the_operator_with_a_resolved_mask_matches_the_float64_reference_forward_and_backward():
    leaves = [torch.randn(2, H, 6, D) for _ in range(3)] + [torch.randn(1, H, 6, 6)]
    mask = _visible(6, 6)[None, None].expand(2, 1, 6, 6)
    runs = []
    for fn, dtype in ((None, torch.float32), (_written, torch.float32), (_written, torch.float64)):
        q, k, v, bias = (t.detach().clone().to(dtype).requires_grad_() for t in leaves)
        out = torch.ops.fxfuse.attention(q, k, v, [mask, bias], _spec().to_json()) if fn is None else fn(q, k, v, mask, bias)
        out.pow(2).sum().backward()
        runs.append([out.detach()] + [t.grad for t in (q, k, v, bias)])
    for what, got, eager, ref in zip(("out", "dq", "dk", "dv", "dbias"), *runs):
        assert_close_to_reference(got, eager, ref, what)
    assert size_masks._verdicts[("test", (2, 1, 6, 6), "cpu", True, 6, 6)] == 0


class _MaskBuiltFromSizes(nn.Module):
    """Attention whose mask is built the way transformers' builders do it at symbolic sizes: position
    ids from arange, a packed-sequence check by cumsum over their differences, and self-indexing."""

    def __init__(self, style="packed"):
        super().__init__()
        self.style, self.qkv = style, nn.Linear(D * H, 3 * D * H)

    def mask(self, x, positions, other):
        b, n = x.shape[:2]
        if self.style == "from_input":  # positions are an input: its values may be anything
            pos = positions
        else:
            pos = torch.arange(n, device=x.device)[None].expand(b, n)
        packed = (torch.diff(pos, prepend=pos[:, :1] - 1, dim=-1) != 1).cumsum(-1)
        bi = torch.arange(b)[:, None, None, None]
        qi = torch.arange(n)[None, None, :, None]
        ki = torch.arange(n)[None, None, None, :]
        visible = (pos[bi, ki] <= pos[bi, qi]) & (packed[bi, qi] == packed[bi, ki])
        if self.style == "window":
            visible = visible & (pos[bi, qi] - pos[bi, ki] < 3)
        if self.style == "anticausal":
            visible = pos[bi, ki] >= pos[bi, qi]
        if self.style == "other_size":  # reads another tensor's length, which is not a dim of the mask
            visible = visible | (torch.arange(other.shape[0])[-1:] < 0)
        return visible.expand(b, 1, n, n)

    def forward(self, x, positions, other):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, H, D).permute(2, 0, 3, 1, 4)
        return nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=self.mask(x, positions, other))


def _compiled_specs(style, lengths):
    torch.manual_seed(0)
    model, be = _MaskBuiltFromSizes(style), Backend()
    compiled = torch.compile(model, backend=be, dynamic=True)
    reference_model = copy.deepcopy(model).double()
    for n in lengths:
        x = torch.randn(2, n, D * H, requires_grad=True)
        positions, other = torch.arange(n)[None].expand(2, n), torch.zeros(2 * n + 1)
        out = compiled(x, positions, other)
        eager = model(x, positions, other)
        ref = reference_model(x.double(), positions, other)
        assert_close_to_reference(out, eager, ref, f"{style} at L={n}")
        (gx,) = torch.autograd.grad(out.sum(), x)
        (ge,) = torch.autograd.grad(eager.sum(), x)
        (gr,) = torch.autograd.grad(ref.sum(), x)
        assert_close_to_reference(gx, ge, gr, f"{style} gradient at L={n}")
    return [m.spec for r in be.reports for m in r.matches if m.kind == "attention"]


def test_a_mask_built_from_sizes_runs_the_causal_rule_at_every_length():
    specs = _compiled_specs("packed", (5, 7, 9, 12))
    assert specs and all(s.size_mask == 0 for s in specs), specs
    assert {key[1][-1] for key, window in size_masks._verdicts.items() if window == 0} == {5, 7, 9, 12}


def test_masks_computing_other_values_have_other_keys_and_verdicts():
    causal, again, window = (_compiled_specs(style, (6, 8)) for style in ("packed", "packed", "window"))
    assert {s.size_key for s in causal} == {s.size_key for s in again} != {s.size_key for s in window}
    assert all(s.size_mask == 0 for s in causal + window)
    verdicts = {(key[0], key[1][-1]): w for key, w in size_masks._verdicts.items()}
    assert verdicts == {(causal[0].size_key, 6): 0, (causal[0].size_key, 8): 0,
                        (window[0].size_key, 6): 3, (window[0].size_key, 8): 3}


@pytest.mark.parametrize("style", ["from_input", "anticausal", "other_size"])
def test_near_misses_keep_the_mask(style):
    specs = _compiled_specs(style, (5, 7))
    assert specs and all(s.size_mask == -1 and not s.causal for s in specs), specs


def test_interpreted_kernels_get_the_causal_spec_without_the_mask(monkeypatch):
    import fxfuse
    import fxfuse.runtime.attention as kernels

    seen = []
    real_forward, real_backward = kernels.forward, kernels.backward
    monkeypatch.setattr(kernels, "forward", lambda s, q, k, v, extras, **kw: seen.append(("forward", s, len(extras))) or
                        real_forward(s, q, k, v, extras, **kw))
    monkeypatch.setattr(kernels, "backward", lambda s, g, q, k, v, extras, *a, **kw: seen.append(("backward", s, len(extras))) or
                        real_backward(s, g, q, k, v, extras, *a, **kw))
    leaves = [torch.randn(1, H, 5, D) for _ in range(3)] + [torch.randn(1, H, 5, 5)]
    mask = _visible(5, 5)[None, None]
    runs = []
    for kernel in (True, False):
        q, k, v, bias = (t.clone().requires_grad_() for t in leaves)
        with fxfuse.config.patch(interpret=kernel):
            out = torch.ops.fxfuse.attention(q, k, v, [mask, bias], _spec().to_json())
            out.pow(2).sum().backward()
        runs.append([out.detach()] + [t.grad for t in (q, k, v, bias)])
    assert {kind for kind, _, _ in seen} == {"forward", "backward"}
    assert all(s.causal and s.inputs == ("bias",) and n == 1 for _, s, n in seen), seen
    for got, want in zip(*runs):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.inductor  # the composed backend (conftest runs other tests' graphs with inner="eager")
def test_training_under_inductor_saves_the_flash_statistics_instead_of_rerunning_the_forward(monkeypatch):
    from fxfuse.ops import attention_saved

    calls = []

    class _Counting:
        def __getattr__(self, name):
            op = getattr(torch.ops.aten, name)
            return lambda *a, **kw: calls.append(name) or op(*a, **kw)

    monkeypatch.setattr(attention_saved, "_aten", _Counting())
    specs = _compiled_specs("packed", (6, 9, 11))  # outputs and input gradients checked against float64
    assert specs and all(s.size_mask == 0 for s in specs)
    forward, backward = "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention_for_cpu_backward"
    # the first length compiles a static graph (its mask proved causal at capture); then one
    # forward and one backward per step, at every symbolic length, and no forward rerun
    assert calls.count(backward) >= 2 and calls.count(forward) == calls.count(backward), calls


def test_the_saved_statistics_backward_reads_the_forwards_decision_instead_of_rechecking(monkeypatch):
    """fxfuse::attention_saved: the backward takes the forward's path from the statistics it saved
    (NaN where the flash kernel did not run), with no second pass over q, k and v; a shape whose
    mask is not the causal rule, and a non-finite query, take the exact formula both ways."""
    import fxfuse.ops.attention as attention_op

    checks = []
    real = attention_op._sdpa_exact_on
    monkeypatch.setattr(attention_op, "_sdpa_exact_on", lambda *a: checks.append(1) or real(*a))
    spec = AttentionSpec("float32", (ScoreStep("mul", "float32", value=0.25),
                                     ScoreStep("fill", "float32", value=NEG_INF, input=0, invert=True)),
                         inputs=("mask",), size_mask=0, size_key="test").to_json()
    padded = _visible(6, 6)[None, None].repeat(2, 1, 1, 1)
    padded[1, ..., 0] = False  # not one causal pattern: the plain mask
    for mask, poison, flash in ((_visible(6, 6)[None, None], False, True), (padded, False, False),
                                (_visible(6, 6)[None, None], True, False)):
        leaves = [torch.randn(2, H, 6, D) for _ in range(3)]
        if poison:
            leaves[0][0, 0, 3, 0] = float("inf")
        runs = []
        for dtype in (torch.float32, torch.float64):
            q, k, v = (t.clone().to(dtype).requires_grad_() for t in leaves)
            if dtype == torch.float32:
                checks.clear()
                out, lse = torch.ops.fxfuse.attention_saved(q, k, v, [mask], spec)
                assert bool(torch.isnan(lse).all()) != flash
            else:
                out = (q @ k.transpose(-1, -2) * 0.25).masked_fill(~mask, NEG_INF).softmax(-1) @ v
            out.nan_to_num().pow(2).sum().backward()
            if dtype == torch.float32 and flash:
                assert len(checks) == 1  # the forward's, none in the backward
            runs.append([out.detach()] + [t.grad for t in (q, k, v)])
        for what, got, ref in zip(("out", "dq", "dk", "dv"), *runs):
            torch.testing.assert_close(got, ref.float(), rtol=1e-4, atol=1e-5, equal_nan=True, msg=what)
