"""Swin's shift mask computed in the kernel from positions (issue 12, item 6, step 2).

transformers' ``SwinLayer.get_attn_mask`` builds the mask in forward from ``arange``: each image
position's region ``(h >= H - ws) + (h >= H - s)`` (times 3, plus the column's), partitioned into
windows (views that split and merge dims, a transpose), ``-100`` where two tokens' regions differ.
The deriver reads those reshapes, so the mask is an index expression over (window = b % nW, i, j),
proved bit for bit at capture: no mask tensor is read. transformers then adds it to the
relative-position bias (gathered from a learned table) before the scores: that sum becomes one
step, the bias read as a (1, H, N, N) tensor and the mask computed, added as the user added them
(the (B*nW, H, N, N) sum is never built). Outputs and gradients (the table's included) equal eager's
against float64, on the torch path and the interpreted kernels."""
import copy
import dataclasses

import pytest
import torch
import torch.nn as nn

import fxfuse
from fxfuse.passes.attention_index import _regrouped
from fxfuse import index_expr as ix
from fxfuse.spec_attention import AttentionSpec
from tests.tolerances import assert_close_to_reference

WS, SHIFT, HEADS, DIM, SIDE = 2, 1, 2, 8, 4


def window_partition(x, ws):
    b, h, w, c = x.shape
    x = x.view(b, h // ws, ws, w // ws, ws, c)
    return x.transpose(2, 3).contiguous().view(-1, ws, ws, c)


def shift_mask(height, width, dtype, by_slices=False):
    """transformers' get_attn_mask (arange regions); ``by_slices``: the older loop of slice writes."""
    if by_slices:  # the near-miss: index_put writes, not an index expression; it stays a tensor
        img_mask = torch.zeros(1, height, width, 1, dtype=dtype)
        cnt = 0
        for h in (slice(0, -WS), slice(-WS, -SHIFT), slice(-SHIFT, None)):
            for w in (slice(0, -WS), slice(-WS, -SHIFT), slice(-SHIFT, None)):
                img_mask[:, h, w, :] = cnt
                cnt += 1
    else:
        h_idx, w_idx = torch.arange(height), torch.arange(width)
        h_region = (h_idx >= height - WS).long() + (h_idx >= height - SHIFT).long()
        w_region = (w_idx >= width - WS).long() + (w_idx >= width - SHIFT).long()
        img_mask = (h_region[None, :, None, None] * 3 + w_region[None, None, :, None]).to(dtype)
    mw = window_partition(img_mask, WS).view(-1, WS * WS)
    m = mw.unsqueeze(1) - mw.unsqueeze(2)
    return m.masked_fill(m != 0, -100.0).masked_fill(m == 0, 0.0)


class ShiftedWindowAttention(nn.Module):
    """Window attention as transformers' SwinAttention (eager) computes it, the mask built in forward."""

    def __init__(self, combined=True, by_slices=False, bias_dtype=None):
        super().__init__()
        self.combined, self.by_slices, self.bias_dtype = combined, by_slices, bias_dtype
        self.qkv = nn.Linear(DIM, 3 * DIM)
        self.table = nn.Parameter(torch.randn((2 * WS - 1) ** 2, HEADS))
        c = torch.stack(torch.meshgrid(torch.arange(WS), torch.arange(WS), indexing="ij")).flatten(1)
        rel = (c[:, :, None] - c[:, None, :]).permute(1, 2, 0) + (WS - 1)
        self.register_buffer("index", (rel[..., 0] * (2 * WS - 1) + rel[..., 1]).view(-1), persistent=False)

    def forward(self, x):
        bw, n, c = x.shape
        mask = shift_mask(SIDE, SIDE, x.dtype, self.by_slices)
        nw = mask.shape[0]
        q, k, v = self.qkv(x).view(bw, n, 3, HEADS, -1).permute(2, 0, 3, 1, 4).unbind(0)
        s = q @ k.transpose(-2, -1) * (c // HEADS) ** -0.5
        mask = mask.unsqueeze(1).unsqueeze(0).expand(bw // nw, -1, -1, -1, -1).reshape(-1, 1, n, n)
        if self.combined:
            rpb = self.table[self.index].view(n, n, -1).permute(2, 0, 1).contiguous().unsqueeze(0)
            if self.bias_dtype is not None:  # the near-miss: a promoting sum (rpb rounded first)
                rpb = rpb.to(self.bias_dtype)
            s = s + (rpb + mask)
        else:
            s = s + mask
        return (s.softmax(-1) @ v).transpose(1, 2).reshape(bw, n, c)


def _x(dtype=torch.float32):
    return torch.randn(2 * (SIDE // WS) ** 2, WS * WS, DIM, generator=torch.Generator().manual_seed(3), dtype=dtype)


def _run(model, x):
    x = x.clone().requires_grad_()
    out = model(x)
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    (out.double() * upstream).sum().backward()
    return out, [x.grad, *(p.grad for p in model.parameters())]


def _fused_specs(res):
    """(spec, extras' shapes) of each fused attention call (Swinv2's QK-norm sites are attention_rope's,
    Swin's with windows addressed window_attention's)."""
    calls = [n for n in res.graph.graph.nodes
             if n.target in (torch.ops.fxfuse.attention.default, torch.ops.fxfuse.attention_rope.default,
                             torch.ops.fxfuse.window_attention.default)]
    return [(AttentionSpec.from_json(next(a for a in n.args if isinstance(a, str))),
             [tuple(e.meta["val"].shape) for e in n.args[3]]) for n in calls]


def _check_equal(model, x, passes=None):
    """Rewrite ``model``; its output and every gradient match eager's against float64."""
    res = fxfuse.rewrite(model, (x,), passes=passes)
    expected, expected_grads = _run(copy.deepcopy(model).double(), x.double())
    eager, eager_grads = _run(copy.deepcopy(model), x)
    got, got_grads = _run(res.module, x)
    assert_close_to_reference(got, eager, expected, "output")
    for i, (g, e, r) in enumerate(zip(got_grads, eager_grads, expected_grads)):
        assert (g is None) == (e is None), f"gradient {i}"
        if g is not None:  # the table is unused when only the mask is added
            assert_close_to_reference(g, e, r, f"gradient {i}")
    return res


@pytest.mark.parametrize("combined", [False, True], ids=["mask", "bias-plus-mask"])
def test_shift_mask_from_arange_is_computed_in_the_kernel(cpu_path, combined):
    model = ShiftedWindowAttention(combined=combined)
    res = _check_equal(model, _x())
    assert [m.kind for m in res.matches] == ["attention"] and not res.misses, res.report()
    [(spec, shapes)] = _fused_specs(res)
    [step] = [s for s in spec.steps if s.op == "add"]
    assert step.expr is not None and "b % 4" in ix.text(step.expr), spec.describe()
    # No mask tensor: only the relative-position bias, (1, H, N, N), is read.
    assert shapes == ([(1, HEADS, WS * WS, WS * WS)] if combined else []), shapes
    assert (step.input >= 0) == combined


def test_shift_mask_written_by_slices_stays_a_tensor():
    model = ShiftedWindowAttention(by_slices=True)
    res = _check_equal(model, _x())
    [(spec, shapes)] = _fused_specs(res)
    [step] = [s for s in spec.steps if s.op == "add"]
    assert step.expr is None and shapes == [(2 * (SIDE // WS) ** 2, HEADS, WS * WS, WS * WS)], spec.describe()


def test_promoting_bias_plus_mask_is_not_split():
    model = ShiftedWindowAttention(bias_dtype=torch.bfloat16)
    res = _check_equal(model, _x())
    [(spec, shapes)] = _fused_specs(res)
    [step] = [s for s in spec.steps if s.op == "add"]
    assert step.expr is None and shapes[0][0] == 2 * (SIDE // WS) ** 2, spec.describe()


@pytest.mark.parametrize("old,new", [((1, 4, 2, 4, 2, 1), (16, 2, 2, 1)), ((16, 2, 2, 1), (16, 4)),
                                     ((2, 3, 4), (6, 4)), ((6, 4), (2, 3, 2, 2)), ((4, 6), (3, 8)),
                                     ((2, 1, 6), (3, 1, 4))])
def test_regrouped_reshape_renames_positions_as_view_does(old, new):
    """Each old dim's expression, at every position of the new shape, is where view reads it from."""
    mapping = _regrouped(old, new)
    grid = {f"t{k}": torch.arange(n).view([n if d == k else 1 for d in range(len(new))]) for k, n in enumerate(new)}
    source = torch.arange(int(torch.tensor(old).prod())).view(old)
    index = tuple(ix.evaluate(mapping[f"d{k}"], grid, []).expand(new) if f"d{k}" in mapping
                  else torch.zeros(new, dtype=torch.long) for k in range(len(old)))
    assert torch.equal(source[index], source.view(new))


# ---- transformers' Swin and Swinv2 (tiny configs, random weights) ----------------------------------

def _swin(kind: str, attn: str = "eager", frozen: bool = False):
    from transformers import Swinv2Config, Swinv2Model, SwinConfig, SwinModel

    config_cls, model_cls = (SwinConfig, SwinModel) if kind == "swin" else (Swinv2Config, Swinv2Model)
    config = config_cls(image_size=4, patch_size=1, num_channels=2, embed_dim=4, depths=[2], num_heads=[2],
                        window_size=2, mlp_ratio=1.0)
    config._attn_implementation = attn
    torch.manual_seed(0)
    model = model_cls(config, add_pooling_layer=False).eval()
    with torch.no_grad():  # the tables start at zero: random values make the bias and its gradient show
        for p in model.parameters():
            p.normal_(0, 0.5)
    return model.requires_grad_(not frozen)


class _Hidden(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(pixel_values=x).last_hidden_state


# The interpreter is slow: the interpreted kernels run for Swin (the bias-plus-mask step) and Swinv2
# (the mask on the 5-d view); Swin under SDPA's math path reaches the same step (torch path).
@pytest.mark.parametrize("kind,attn,interpret", [("swin", "eager", False), ("swin", "eager", True),
                                                 ("swin", "sdpa", False), ("swinv2", "eager", False),
                                                 ("swinv2", "eager", True)])
def test_transformers_swin_reads_no_mask_tensor_and_equals_eager(kind, attn, interpret):
    model = _Hidden(_swin(kind, attn))
    x = torch.randn(2, 2, 4, 4, generator=torch.Generator().manual_seed(4))
    with fxfuse.config.patch(interpret=interpret):
        res = _check_equal(model, x)
    assert not res.misses and [m.kind for m in res.matches].count("attention") == 2, res.report()
    unshifted, shifted = _fused_specs(res)
    # Only (1, H, N, N) biases (and Swinv2's (H, 1, 1) logit scales) reach the operator: no (B*nW, ...) tensor.
    assert all(len(s) < 4 or s[0] == 1 for _, shapes in (unshifted, shifted) for s in shapes), (unshifted, shifted)
    assert any(step.expr is not None for step in shifted[0].steps), shifted[0].describe()


def test_frozen_swin_under_sdpa_claims_the_bias_plus_mask():
    """Frozen weights: SDPA's own call is claimed (claim-sdpa), its float mask the bias plus the
    shift mask; the guard for rows with every key hidden reads the bias alone."""
    model = _Hidden(_swin("swin", "sdpa", frozen=True))
    x = torch.randn(2, 2, 4, 4, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        res = fxfuse.rewrite(model, (x,))
        unshifted, shifted = _fused_specs(res)
        assert shifted[1] == [(1, 2, 4, 4)] and shifted[0].steps[-1].expr is not None, shifted
        expected = copy.deepcopy(model).double()(x.double())
        assert_close_to_reference(res.module(x), model(x), expected, "output")


def test_bias_plus_mask_in_bfloat16_equals_eager(cpu_path):
    """The sum of the bias and the mask is rounded to bfloat16 before it meets the scores, as eager rounds it."""
    model = ShiftedWindowAttention().to(torch.bfloat16)
    res = _check_equal(model, _x(torch.bfloat16))
    [(spec, shapes)] = _fused_specs(res)
    assert spec.steps[-1].expr[1] == "bfloat16" and shapes == [(1, HEADS, WS * WS, WS * WS)], spec.describe()


def test_kernel_rounds_the_bias_plus_expression_sum_to_its_dtype():
    """256 + 0.75 is 256 in bfloat16 (its spacing there is 2): a kernel that added the two in float32
    would give those keys e^0.75 times the weight. Interpreted kernel against the torch reference."""
    from fxfuse.ops.attention import reference
    from fxfuse.spec_attention import ScoreStep

    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 2, 8, 4, generator=g).to(torch.bfloat16) for _ in range(3))
    bias = (torch.rand(1, 2, 8, 8, generator=g) < 0.5).to(torch.bfloat16) * 0.75
    step = ScoreStep("add", "float32", input=0, expr=("const", "bfloat16", 256.0))
    spec = AttentionSpec(score_dtype="float32", steps=(step,), prob_dtype="bfloat16", inputs=("bias",))
    want = reference(spec, q, k, v, [bias])
    with fxfuse.config.patch(interpret=True):
        got = torch.ops.fxfuse.attention(q, k, v, [bias], spec.to_json())
    unrounded = reference(dataclasses.replace(spec, steps=(dataclasses.replace(step, expr=("const", "float32", 256.0)),)),
                          q, k, v, [bias.float()])
    assert (want.float() - unrounded.float()).abs().max() > 0.05  # the rounding matters here
    torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=2e-2)


def test_a_mask_expression_reading_no_input_is_evaluated_once_per_shape(monkeypatch):
    """Swin's shift mask is a function of the sizes alone: the CPU path evaluates its expression once
    per shape (it was once per call: 1.5 ms of a 12 ms Swin forward), never while tracing, and the
    kept values give the same output as a fresh evaluation."""
    import fxfuse.ops.attention as ops

    ops._EXPR_VALUES.clear()
    calls = []
    real = ix.evaluate
    monkeypatch.setattr(ix, "evaluate", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    model = ShiftedWindowAttention(combined=True)
    x = _x()
    res = fxfuse.rewrite(model, (x,))
    calls.clear()
    with torch.no_grad():
        first, second = res.module(x), res.module(x)
        assert len(calls) == 1, calls
        torch.testing.assert_close(second, first, rtol=0, atol=0)
        ops._EXPR_VALUES.clear()
        torch.testing.assert_close(res.module(x), first, rtol=0, atol=0)
    assert len(calls) == 2
    [(spec, _)] = _fused_specs(res)
    [step] = [s for s in spec.steps if s.op == "add"]
    shape4 = (x.shape[0], HEADS, WS * WS, WS * WS)
    with torch._subclasses.FakeTensorMode():  # a traced call neither reads nor fills the cache
        fake = ops._expr_values(step.expr, [], shape4, torch.device("cpu"))
    assert type(fake) is not torch.Tensor and len(calls) == 3
    assert all(type(t) is torch.Tensor for t in ops._EXPR_VALUES.values())
