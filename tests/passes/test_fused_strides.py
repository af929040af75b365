"""Layouts: every fused operator's real outputs have the strides its fake implementation promises
(AOTAutograd and Inductor plan views on the fake ones), forward and backward, on the torch path and
on the interpreted kernels; and a rewrite gives the code after a fused site the strides the code it
replaced produced (a ``view`` traced on them must still work).

The corpus: every attention and norm style of tests/attention_styles.py and tests/norm_styles.py,
each also with its inputs in a permuted memory layout, and SDPA calls with masks (claim-sdpa's
guard for rows with no key), run through ``fxfuse.rewrite`` with a training step."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils._pytree as pytree
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

import fxfuse
from tests import norm_styles
from tests.attention_styles import STYLES

# ---- recording every fused call --------------------------------------------------------------------


class _RecordFused(TorchDispatchMode):
    """Records (operator, args, kwargs, outputs) of each ``torch.ops.fxfuse.*`` call it sees."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func.namespace == "fxfuse":
            self.calls.append((func, args, kwargs, out))
        return out


def _strides(tree):
    return [(tuple(t.shape), t.stride(), t.dtype) for t in pytree.tree_leaves(tree) if isinstance(t, torch.Tensor)]


def _check_fake_matches_real(calls) -> None:
    for func, args, kwargs, out in calls:
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            fake_args, fake_kwargs = pytree.tree_map_only(torch.Tensor, mode.from_tensor, (args, kwargs))
            fake = func(*fake_args, **fake_kwargs)
        assert _strides(fake) == _strides(out), f"{func}: fake (shape, strides, dtype) {_strides(fake)}, real {_strides(out)}"


def _run_and_check(module, inputs, kind: str, grad_inputs: int | None = None) -> None:
    """Run forward and backward of ``module`` recording the fused calls, and check each one; the
    first ``grad_inputs`` inputs (all by default) that are floating point require grad."""
    n = len(inputs) if grad_inputs is None else grad_inputs
    leaves = [t.detach().clone().requires_grad_(t.is_floating_point() and i < n) for i, t in enumerate(inputs)]
    with _RecordFused() as rec:
        out = module(*leaves)
        out = out[0] if isinstance(out, (tuple, list)) else out
        out.backward(torch.randn_like(out).transpose(0, -1).contiguous().transpose(0, -1))  # a strided upstream too
    names = {c[0].name() for c in rec.calls}
    assert {f"fxfuse::{kind}", f"fxfuse::{kind}_backward"} <= names, names
    _check_fake_matches_real(rec.calls)


def _permuted(t: torch.Tensor) -> torch.Tensor:
    """The same values with the memory order of the last two dims swapped (and the first two for
    rank 4): a strided layout like a transposed-heads or channels-last activation."""
    if t.dim() < 2 or not t.is_floating_point():
        return t
    order = list(range(t.dim()))
    order[-2], order[-1] = order[-1], order[-2]
    if t.dim() == 4:
        order[0], order[1] = order[1], order[0]
    return t.permute(order).contiguous().permute([order.index(d) for d in range(t.dim())])


# ---- the corpus ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["given", "permuted"])
@pytest.mark.parametrize("style", STYLES, ids=lambda s: s.__name__)
def test_attention_styles_keep_the_stride_contract(style, layout):
    model = style()
    inputs = model.inputs(torch.float32)
    if layout == "permuted":
        inputs = [_permuted(t) for t in inputs]
    res = fxfuse.rewrite(model, tuple(inputs), passes="canonicalize,fuse-attention")
    _run_and_check(res.module, inputs, kind="attention")


@pytest.mark.parametrize("layout", ["given", "permuted"])
@pytest.mark.parametrize("style", norm_styles.RMS_STYLES + norm_styles.LAYER_STYLES, ids=lambda s: s.__name__)
def test_norm_styles_keep_the_stride_contract(style, layout):
    model = norm_styles.build(style, 8)
    x = torch.randn(2, 3, 4, 8)
    res = fxfuse.rewrite(model, (x if layout == "given" else _permuted(x),), passes="canonicalize,fuse-norm")
    _run_and_check(res.module, [x if layout == "given" else _permuted(x)], kind="norm")


class _SdpaHeadMerge(nn.Module):
    """transformers' sdpa_attention_forward then BERT's merge: SDPA with a padding mask, the output
    transposed to (B, L, H, D) and viewed as (B, L, H * D). SDPA's CPU kernel returns (B, L, H, D)
    memory order, so the graph holds a plain ``view`` after the transpose."""

    def forward(self, q, k, v, mask):
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        out = out.transpose(1, 2).contiguous()
        return out.reshape(out.shape[0], out.shape[1], -1)


def _sdpa_inputs(mask_kind: str):
    # (B, H, L, D) views of (B, L, H, D) projections, as models give them: SDPA's CPU kernel then
    # returns its output in (B, L, H, D) memory order, and the head merge is a plain view.
    q, k, v = (torch.randn(2, 5, 3, 4).transpose(1, 2) for _ in range(3))
    keep = torch.ones(2, 1, 5, 5, dtype=torch.bool)
    keep[1, ..., 3:] = False  # padding: the second sequence's last two keys
    if mask_kind == "dead_rows":
        keep[0, :, 2] = False  # a query row with no key: SDPA gives 0 there (the claim's guard)
    mask = keep if mask_kind != "additive" else torch.zeros(keep.shape).masked_fill(~keep, float("-inf"))
    return [q, k, v, mask]


@pytest.mark.parametrize("mask_kind", ["padding", "dead_rows", "additive"])
def test_claimed_sdpa_keeps_the_strides_sdpa_gave(mask_kind, cpu_path):
    model, inputs = _SdpaHeadMerge(), _sdpa_inputs(mask_kind)
    res = fxfuse.rewrite(model, tuple(inputs), passes="canonicalize,claim-sdpa")
    assert [m.kind for m in res.matches] == ["attention"], res.report()
    torch.testing.assert_close(res.module(*inputs), model(*inputs))
    _run_and_check(res.module, inputs, kind="attention", grad_inputs=3)  # a mask that needs grad is not SDPA's


def test_claimed_sdpa_with_a_mask_compiles_and_trains():
    model, inputs = _SdpaHeadMerge(), _sdpa_inputs("dead_rows")
    leaves = [t.clone().requires_grad_(t.is_floating_point()) for t in inputs]
    compiled = torch.compile(model, backend="fxfuse", fullgraph=True)
    out = compiled(*leaves)
    torch.testing.assert_close(out, model(*inputs))
    out.sum().backward()
    assert all(t.grad is not None for t in leaves[:3])


# ---- norms on permuted inputs, their layouts after the rewrite -------------------------------------

class _ConvTransposeLayerNorm(nn.Module):
    """wav2vec2's feature projection: a conv1d's (B, C, T) output transposed to (B, T, C), a
    LayerNorm, a Linear (whose ATen form flattens with a ``view``: it needs the LayerNorm's output
    contiguous, as F.layer_norm returns it)."""

    def __init__(self):
        super().__init__()
        self.conv, self.norm, self.proj = nn.Conv1d(3, 8, 3, padding=1), nn.LayerNorm(8), nn.Linear(8, 6)

    def forward(self, x):
        return self.proj(self.norm(self.conv(x).transpose(1, 2)))


class _HandWrittenChannelsLastNorm(nn.Module):
    """ConvNeXt's channels-first LayerNorm written by hand on a (B, H, W, C) permuted view: the
    result keeps the permuted layout, and the code after it views it as (B, C, H * W)."""

    def __init__(self):
        super().__init__()
        self.conv, self.w = nn.Conv2d(3, 8, 3, padding=1), nn.Parameter(torch.randn(8))

    def forward(self, x):
        h = self.conv(x).permute(0, 2, 3, 1)
        mu = h.mean(-1, keepdim=True)
        h = (h - mu) * torch.rsqrt(((h - mu) ** 2).mean(-1, keepdim=True) + 1e-5) * self.w
        return h.permute(0, 3, 1, 2).view(h.shape[0], 8, -1)


class _QKNorm(nn.Module):
    """QK-norm after the head transpose (OLMo-2/Qwen3-style per-head norms): the norm reads a
    (B, H, L, D) view of (B, L, H, D) memory; the merge transposes back and views."""

    def __init__(self):
        super().__init__()
        self.q, self.norm = nn.Linear(16, 16), nn.LayerNorm(4)

    def forward(self, x):
        b, n, _ = x.shape
        q = self.norm(self.q(x).view(b, n, 4, 4).transpose(1, 2))
        return q.transpose(1, 2).reshape(b, n, 16)


@pytest.mark.parametrize("model, shape", [(_ConvTransposeLayerNorm, (2, 3, 7)), (_HandWrittenChannelsLastNorm, (2, 3, 4, 5)),
                                          (_QKNorm, (2, 5, 16))], ids=["conv_transpose_ln", "channels_last", "qk_norm"])
def test_norm_on_a_permuted_input_runs_rewritten_and_compiled(model, shape, cpu_path):
    model, x = model(), torch.randn(shape)
    expected = model(x)
    res = fxfuse.rewrite(model, (x,), passes="canonicalize,fuse-norm")
    assert len(res.matches) == 1, res.report()
    torch.testing.assert_close(res.module(x), expected)
    _run_and_check(res.module, [x], kind="norm")
    # Compiled training: AOTAutograd traces the backward on the fake layouts.
    model.zero_grad(set_to_none=True)
    x_leaf = x.clone().requires_grad_()
    out = torch.compile(model, backend="fxfuse")(x_leaf)
    torch.testing.assert_close(out, expected)
    out.sum().backward()
    expected_grad = torch.autograd.grad(model(x.clone().requires_grad_()).sum(), model.parameters())
    got_grad = [p.grad for p in model.parameters()]
    for g, e in zip(got_grad, expected_grad):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5)
