"""Swin's shifted windows addressed by index (issue 12, item 6, step 3): ``address-windows``.

A Swin block rolls the image, cuts it into windows (views, a permute, a copy), applies the q, k, v
linears to the windows' rows, attends per window, applies the output linear, and undoes the
windows and the roll. The pass proves by replay on index tensors that the partition is a renaming
of the image's rows and moves the linears across it (a linear treats each row alone), so that
``fxfuse.window_attention`` reads q, k, v as image tensors and writes its output at the un-shifted
image positions: no roll, partition or reverse copies remain in the graph. Outputs and gradients
equal eager's against float64; near-misses (a shift not rolled back, a permute mixing window and
channel dims, strip windows, a window-layout tensor read elsewhere) stay as fuse-attention wrote
them, with the reason."""
import copy
import dataclasses
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxfuse
from fxfuse.codegen.attention_decode import splittable
from fxfuse.passes.attention_windows import AddressWindows
from fxfuse.passes.pipeline import DEFAULT_PIPELINE, parse_pipeline
from fxfuse.runtime.attention_windows import partition, reverse
from fxfuse.spec_attention import AttentionSpec, ScoreStep
from tests.passes.test_attention_swin_masks import _check_equal, _Hidden, _swin
from tests.tolerances import assert_close_to_reference

WS, HEADS, DIM = 2, 2, 8
aten = torch.ops.aten
# The default pipeline addresses windows where the kernels run (CUDA, or interpreted); on the CPU
# torch path only when asked, as here, to test that path too.
ON_CPU = [*parse_pipeline(DEFAULT_PIPELINE.replace(",address-windows", "")), AddressWindows(on_cpu=True)]


def window_partition(x, ws, strips=False, mix=False):
    b, h, w, c = x.shape
    if strips:  # the near-miss: 1 x ws*ws strips of a row, not ws x ws windows
        return x.reshape(b, h, w // (ws * ws), ws * ws, c).reshape(-1, ws * ws, c)
    x = x.view(b, h // ws, ws, w // ws, ws, c)
    if mix:  # the near-miss: a permute that moves channels among the tokens
        return x.permute(0, 1, 3, 2, 5, 4).contiguous().view(-1, ws * ws, c)
    return x.permute(0, 1, 3, 2, 4, 5).contiguous().view(-1, ws * ws, c)


def window_reverse(x, ws, h, w):
    c = x.shape[-1]
    x = x.view(-1, h // ws, w // ws, ws, ws, c)
    return x.permute(0, 1, 3, 2, 4, 5).contiguous().view(-1, h, w, c)


class SwinBlock(nn.Module):
    """A shifted-window attention block written as Swin's reference code writes it."""

    def __init__(self, shift=1, back=None, fused_qkv=False, strips=False, mix=False, pad=0, leak=False):
        super().__init__()
        self.shift, self.back = shift, shift if back is None else back
        self.fused_qkv, self.strips, self.mix, self.pad, self.leak = fused_qkv, strips, mix, pad, leak
        self.qkv = nn.Linear(DIM, 3 * DIM)
        self.q, self.k, self.v = (nn.Linear(DIM, DIM) for _ in range(3))
        self.proj = nn.Linear(DIM, DIM)

    def forward(self, x):  # x: (B, H, W, C)
        b, h, w, c = x.shape
        x = F.pad(x, (0, 0, 0, self.pad, 0, self.pad))
        hp, wp = h + self.pad, w + self.pad
        if self.shift:
            x = torch.roll(x, (-self.shift, -self.shift), (1, 2))
        win = window_partition(x, WS, self.strips, self.mix)
        bw, n, _ = win.shape
        if self.fused_qkv:
            q, k, v = self.qkv(win).view(bw, n, 3, HEADS, -1).permute(2, 0, 3, 1, 4).unbind(0)
        else:
            q, k, v = (lin(win).view(bw, n, HEADS, -1).transpose(1, 2) for lin in (self.q, self.k, self.v))
        s = q @ k.transpose(-2, -1) * (c // HEADS) ** -0.5
        o = (s.softmax(-1) @ v).transpose(1, 2).reshape(bw, n, c)
        o = self.proj(o)
        if self.strips:
            y = o.reshape(b, hp, wp, c)
        else:
            y = window_reverse(o, WS, hp, wp)
        if self.back:
            y = torch.roll(y, (self.back, self.back), (1, 2))
        y = y[:, :h, :w, :]
        return (y, o) if self.leak else y


def _x(side=4, dtype=torch.float32):
    return torch.randn(2, side, side, DIM, generator=torch.Generator().manual_seed(3), dtype=dtype)


def _check(model, x, interpret=False):
    """_check_equal with windows addressed: on the CPU torch path unless ``interpret``."""
    with fxfuse.config.patch(interpret=interpret):
        return _check_equal(model, x, passes=None if interpret else ON_CPU)


def _window_calls(res):
    return [n for n in res.graph.graph.nodes if n.target == torch.ops.fxfuse.window_attention.default]


def _copies_left(res):
    """The roll and partition/reverse ops still in the rewritten graph."""
    return [n for n in res.graph.graph.nodes if n.op == "call_function" and (
        n.target == aten.roll.default or
        (n.target in (aten.permute.default, aten.transpose.int) and len(n.meta["val"].shape) >= 6))]


# ---- the spec field and the operator ------------------------------------------------------------

def test_windows_field_is_absent_at_its_default_and_round_trips():
    spec = AttentionSpec(score_dtype="float32", steps=(ScoreStep("mul", "float32", 0.5),))
    assert "windows" not in spec.to_json()
    windowed = dataclasses.replace(spec, windows=(2, 1, 4, 4))
    assert AttentionSpec.from_json(windowed.to_json()) == windowed
    assert "windows 2x2 of a 4x4 image shifted by 1" in windowed.describe()
    # The fields that do not know windows decline them rather than drop them.
    assert windowed.without_input(0) is None
    assert "windows" in splittable(windowed)


def test_partition_is_swin_roll_and_window_partition_and_reverse_undoes_it():
    x = torch.arange(2 * 4 * 6 * 2 * 3).reshape(2, 4, 6, 2, 3)
    for shift in (0, 1):
        got = partition(x, (WS, shift, 4, 6))
        rolled = torch.roll(x, (-shift, -shift), (1, 2)).reshape(2, 4, 6, 6)
        want = window_partition(rolled, WS).view(-1, WS * WS, 2, 3).transpose(1, 2)
        assert torch.equal(got, want)
        assert torch.equal(reverse(got, (WS, shift, 4, 6)), x)


def test_operator_refuses_operands_that_do_not_fit_its_windows():
    spec = AttentionSpec(score_dtype="float32", windows=(3, 1, 4, 4)).to_json()
    q = torch.randn(1, 4, 4, 2, 2)
    with pytest.raises(ValueError, match="ws dividing Hp and Wp"):
        torch.ops.fxfuse.window_attention(q, q, q, [], spec)
    with pytest.raises(ValueError, match="call fxfuse.window_attention"):
        torch.ops.fxfuse.attention(q[0], q[0], q[0], [], spec)


# ---- the pass on a hand-written Swin block --------------------------------------------------------

@pytest.mark.parametrize("shift", [0, 1])
@pytest.mark.parametrize("fused_qkv", [False, True], ids=["q-k-v", "qkv"])
def test_swin_block_reads_windows_by_index_and_equals_eager(shift, fused_qkv):
    res = _check(SwinBlock(shift=shift, fused_qkv=fused_qkv), _x())
    [call] = _window_calls(res)
    assert AttentionSpec.from_json(call.args[4]).windows == (WS, shift, 4, 4)
    assert not _copies_left(res) and not res.misses, res.report()
    assert [m.kind for m in res.matches] == ["attention", "attention-windows"], res.report()


def test_swin_block_windows_through_the_interpreted_kernels():
    res = _check(SwinBlock(shift=1), _x(), interpret=True)
    assert len(_window_calls(res)) == 1 and not _copies_left(res), res.report()


def test_padded_image_reads_the_padded_rows_as_the_user_did():
    """F.pad before the partition: the padded tensor is the image (its zero rows go through the
    linear as the user's did) and the crop after the reverse stays; the windows are addressed."""
    res = _check(SwinBlock(shift=1, pad=1), _x(side=3))
    [call] = _window_calls(res)
    assert AttentionSpec.from_json(call.args[4]).windows == (WS, 1, 4, 4) and not _copies_left(res), res.report()


@pytest.mark.parametrize("kind,why", [
    (dict(back=0), "un-shifted image positions"),
    (dict(mix=True), "renaming of an image's rows"),
    (dict(strips=True), "not the 2x2 windows"),
], ids=["shift-not-rolled-back", "permute-mixes-channels", "strip-windows"])
def test_near_misses_keep_the_partition(kind, why):
    res = _check(SwinBlock(**kind), _x())
    assert not _window_calls(res), res.report()
    assert any(m.kind == "attention" for m in res.matches), res.report()
    [miss] = [m for m in res.misses if m.kind == "attention-windows"]
    assert why in miss.reason, miss.reason


def test_window_layout_output_read_elsewhere_keeps_the_partition():
    model = SwinBlock(shift=1, leak=True)
    x = _x()
    res = fxfuse.rewrite(model, (x,), passes=ON_CPU)
    assert not _window_calls(res)
    [miss] = [m for m in res.misses if m.kind == "attention-windows"]
    assert "one linear" in miss.reason or "un-shifted" in miss.reason, miss.reason
    expected = copy.deepcopy(model).double()(x.double())
    for got, eager, ref in zip(res.module(x), model(x), expected):
        assert_close_to_reference(got, eager, ref, "output")


# ---- transformers' Swin (tiny config, random weights) --------------------------------------------

@pytest.mark.parametrize("interpret", [False, True], ids=["torch", "interpreted"])
def test_transformers_swin_windows_addressed_and_equal_eager(interpret):
    model = _Hidden(_swin("swin"))
    x = torch.randn(2, 2, 4, 4, generator=torch.Generator().manual_seed(4))
    res = _check(model, x, interpret)
    assert not res.misses and [m.kind for m in res.matches].count("attention-windows") == 2, res.report()
    assert sorted(AttentionSpec.from_json(c.args[4]).windows for c in _window_calls(res)) == [(2, 0, 4, 4), (2, 1, 4, 4)]
    assert not _copies_left(res), [n.name for n in _copies_left(res)]


def test_transformers_swin_padded_image_windows_addressed():
    """A 6x6 image with windows of 4: transformers pads it to 8x8 (maybe_pad) and crops after."""
    from transformers import SwinConfig, SwinModel

    config = SwinConfig(image_size=6, patch_size=1, num_channels=2, embed_dim=4, depths=[2], num_heads=[2],
                        window_size=4, mlp_ratio=1.0)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = SwinModel(config, add_pooling_layer=False).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5)
    res = _check(_Hidden(model), torch.randn(2, 2, 6, 6, generator=torch.Generator().manual_seed(4)))
    assert not res.misses and len(_window_calls(res)) == 2, res.report()
    assert {AttentionSpec.from_json(c.args[4]).windows[2:] for c in _window_calls(res)} == {(8, 8)}


# ---- the kernels read the windows in place ----------------------------------------------------

def _operator_inputs(shift, dtype=torch.float32):
    """q, k, v as (B, Hp, Wp, H, D) views of one linear's output (fused qkv columns: not
    contiguous), and a (1, H, N, N) bias whose gradient the kernels give."""
    g = torch.Generator().manual_seed(7)
    qkv = torch.randn(2, 4, 6, 3, HEADS, 4, generator=g).to(dtype)
    q, k, v = (qkv[:, :, :, i] for i in range(3))
    bias = torch.randn(1, HEADS, WS * WS, WS * WS, generator=g).to(dtype)
    steps = (ScoreStep("mul", "float32", 0.5), ScoreStep("add", "float32", input=0))
    spec = AttentionSpec(score_dtype="float32", steps=steps, inputs=("bias",), prob_dtype="float32",
                         windows=(WS, shift, 4, 6))
    return spec, q, k, v, bias


@pytest.mark.parametrize("shift", [0, 1])
def test_interpreted_kernels_read_image_tensors_in_place(shift, monkeypatch):
    from fxfuse.ops import attention_windows
    from fxfuse.runtime import attention_windows as runtime_windows

    spec, q, k, v, bias = _operator_inputs(shift)
    upstream = torch.randn(2, 4, 6, HEADS, 4, generator=torch.Generator().manual_seed(8))

    def run(tensors, interpret):
        leaves = [t.detach().clone().requires_grad_() for t in tensors]
        with fxfuse.config.patch(interpret=interpret):
            out = torch.ops.fxfuse.window_attention(*leaves[:3], [leaves[3]], spec.to_json())
            (out.double() * upstream).sum().backward()
        return out, [t.grad for t in leaves]

    expected, expected_grads = run([t.double() for t in (q, k, v, bias)], False)
    eager, eager_grads = run([q, k, v, bias], False)  # the partition path (torch)

    partition = runtime_windows.partition

    def rows_only(t, windows):  # the backward's delta, one float per row, is reordered by partition
        assert t.shape[-1] == 1, "the interpreted kernels built a partition copy of an operand"
        return partition(t, windows)

    def no_copies(*args, **kwargs):
        raise AssertionError("the interpreted kernels built a reverse copy")

    for module in (attention_windows, runtime_windows):  # the operator's names and the runtime's
        monkeypatch.setattr(module, "partition", rows_only)
        monkeypatch.setattr(module, "reverse", no_copies)
    got, got_grads = run([q, k, v, bias], True)
    assert got.shape == (2, 4, 6, HEADS, 4) and got.is_contiguous()
    assert_close_to_reference(got, eager, expected, "output")
    for name, g, e, r in zip("q k v bias".split(), got_grads, eager_grads, expected_grads):
        assert_close_to_reference(g, e, r, f"d{name}")


# ---- under torch.compile ------------------------------------------------------------------------

@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "symbolic"])
def test_backend_reads_windows_and_declines_symbolic_sizes_with_a_warning(dynamic):
    """At static sizes the windows are addressed; at symbolic sizes (dynamic=True) they are not
    proved: the partition stays, with a warning saying why."""
    model = SwinBlock(shift=1)
    torch._dynamo.reset()
    backend = fxfuse.Backend(passes=ON_CPU, inner="eager")
    compiled = torch.compile(copy.deepcopy(model), backend=backend, dynamic=dynamic)
    x = _x()
    xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = compiled(xc)
    assert any("sizes are symbolic" in str(w.message) for w in caught) == dynamic, [str(w.message) for w in caught]
    assert [m.kind for m in backend.matches].count("attention-windows") == (not dynamic), backend.report()
    eager = model(xe)
    assert_close_to_reference(got, eager, copy.deepcopy(model).double()(x.double()), "output")
    eager.sum().backward(), got.sum().backward()
    torch.testing.assert_close(xc.grad, xe.grad)
    torch._dynamo.reset()


def test_default_pipeline_keeps_the_partition_on_the_cpu_torch_path():
    """Without kernels to read the windows in place the operator would build the partition itself
    (and again in its backward): the default pipeline leaves CPU sites as fuse-attention wrote them,
    silently, and addresses them when the kernels run (interpreted here)."""
    model, x = SwinBlock(shift=1), _x()
    res = fxfuse.rewrite(model, (x,))
    assert not _window_calls(res) and not res.misses and _copies_left(res), res.report()
    with fxfuse.config.patch(interpret=True):
        assert len(_window_calls(fxfuse.rewrite(model, (x,)))) == 1
