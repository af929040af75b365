"""Every LM-head + cross-entropy style is fused into one chunked operator and the rewritten module
equals eager (loss and gradients) within the float64-referenced tolerances; near-misses are left
as written with the reason."""
import copy

import pytest
import torch

import fxfuse
import fxfuse.ops.linear_cross_entropy as lce
from tests.loss_styles import NEAR_MISSES, STYLES
from tests.tolerances import assert_close_to_reference

B, T, H, V = 2, 5, 12, 37  # V not a multiple of the chunk: the tail chunk is exercised
PASSES = "canonicalize,fuse-linear-cross-entropy"


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    monkeypatch.setattr(lce, "CHUNK_ELEMENTS", 8 * B * T)  # 8 vocabulary columns per chunk


def _inputs(dtype):
    h = torch.randn(B, T, H, dtype=dtype)
    labels = torch.randint(0, V, (B, T))
    labels[0, :2] = -100
    return h, labels


def _loss_and_grads(model, h, labels):
    h = h.clone().requires_grad_()
    model.zero_grad()
    loss = model(h, labels)
    loss.backward()
    return loss, [h.grad] + [p.grad for p in model.parameters()]


def _check(style, dtype):
    model = style(H, V).to(dtype)
    h, labels = _inputs(dtype)
    res = fxfuse.rewrite(model, (h, labels), passes=PASSES)
    got, got_grads = _loss_and_grads(res.module, h, labels)
    eager, eager_grads = _loss_and_grads(model, h, labels)
    ref64 = copy.deepcopy(model).double()
    expected, expected_grads = _loss_and_grads(ref64, h.double(), labels)
    assert got.dtype == eager.dtype
    assert_close_to_reference(got, eager, expected, "loss")
    for g, e, r in zip(got_grads, eager_grads, expected_grads):
        assert_close_to_reference(g, e, r, "gradient")
    return res


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("style", STYLES, ids=lambda s: s.__name__)
def test_style_is_fused_and_exact(style, dtype):
    res = _check(style, dtype)
    assert [m.kind for m in res.matches] == ["linear_cross_entropy"], res.report()
    assert not res.misses, res.report()
    code = res.graph.code
    assert "fxfuse.linear_cross_entropy" in code and "_log_softmax" not in code and "aten.mm" not in code


def test_spec_records_what_the_site_computes():
    names = {}
    for style in STYLES:
        res = fxfuse.rewrite(style(H, V).to(torch.bfloat16), _inputs(torch.bfloat16), passes=PASSES)
        names[style.__name__] = res.matches[0].spec
    assert [s.op for s in names["Softcapped"].steps] == ["div", "tanh", "mul", "cast"]
    assert names["Softcapped"].steps[0].dtype == "bfloat16"  # softcapped in bf16, as written
    assert names["LabelSmoothing"].outputs == ("nll", "sum_logp")
    assert names["ZLoss"].outputs == ("nll", "lse")
    assert names["WithBias"].bias and not names["LinearThenFloat"].bias
    assert names["NoUpcast"].compute_dtype == "bfloat16" and names["LinearThenFloat"].compute_dtype == "float32"


@pytest.mark.parametrize("style", list(NEAR_MISSES), ids=lambda s: s.__name__)
def test_near_miss_is_declined_with_reason(style):
    model = style(H, V)
    h, labels = _inputs(torch.float32)
    res = fxfuse.rewrite(model, (h, labels), passes=PASSES)
    assert not res.matches, res.report()
    reasons = [m.reason for m in res.misses if m.kind == "linear_cross_entropy"]
    assert reasons and NEAR_MISSES[style] in reasons[0], res.report()
    torch.testing.assert_close(res.module(h, labels), model(h, labels))


def test_plain_log_softmax_is_not_a_candidate():
    res = fxfuse.rewrite(lambda x, y: torch.nn.functional.cross_entropy(x, y), (torch.randn(4, V), torch.randint(0, V, (4,))),
                         passes=PASSES)
    assert not res.matches and not res.misses


def test_all_labels_ignored_gives_nan_like_eager():
    model = STYLES[0](H, V)
    h, labels = _inputs(torch.float32)
    labels[:] = -100
    res = fxfuse.rewrite(model, (h, labels), passes=PASSES)
    assert res.matches and torch.isnan(res.module(h, labels)) and torch.isnan(model(h, labels))


def test_out_of_range_label_raises_like_eager():
    model = STYLES[0](H, V)
    h, labels = _inputs(torch.float32)
    res = fxfuse.rewrite(model, (h, labels), passes=PASSES)
    labels[1, 1] = V
    with pytest.raises(IndexError, match="out of bounds"):
        model(h, labels)
    with pytest.raises(IndexError, match="out of bounds"):
        res.module(h, labels)
