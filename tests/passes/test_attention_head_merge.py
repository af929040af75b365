"""The head merge after attention, ``y.transpose(1, 2).reshape(B, L, H * D)``, is a copy in eager
code; when the pass proves that this is all that reads the output, the fused operator writes its
output in (B, L, H, D) memory order and the merge becomes a view of it. The fake implementation
promises exactly the real strides (AOTAutograd plans on them), and the backward takes a
gradient of any strides."""
import pytest
import torch

import fxfuse
from fxfuse.spec_attention import AttentionSpec, ScoreStep

B, H, L, D = 2, 3, 5, 8
MERGED_STRIDES = (L * H * D, D, H * D, 1)  # (B, H, L, D) viewed from (B, L, H, D) memory


def merged_heads(q, k, v):  # (B, H, L, D) in, (B, L, H * D) out
    y = (q @ k.transpose(-1, -2) * 0.3).softmax(-1) @ v
    return y.transpose(1, 2).reshape(B, L, H * D)


def fairseq_merge(q, k, v):  # (B*H, L, D) in, (L, B, H * D) out: fairseq's time-first layout
    y = torch.bmm(torch.softmax(torch.bmm(q, k.transpose(1, 2)), dim=-1), v)
    return y.transpose(0, 1).contiguous().view(L, B, H * D)


def also_read_per_head(q, k, v):  # the (B, H, L, D) output is read as it is too: no merged layout
    y = (q @ k.transpose(-1, -2)).softmax(-1) @ v
    return y.transpose(1, 2).reshape(B, L, H * D), y.sum(-1)


def other_swap(q, k, v):  # swaps the feature and query dims: not a head merge
    y = (q @ k.transpose(-1, -2)).softmax(-1) @ v
    return y.transpose(2, 3).reshape(B, H, D * L)


def _inputs(fn):
    shape = (B * H, L, D) if fn is fairseq_merge else (B, H, L, D)
    return [torch.randn(shape) for _ in range(3)]


class _Recorder(torch.fx.Interpreter):
    """Runs a graph keeping every node's value, to compare storages."""

    def run_node(self, n):
        self.values = getattr(self, "values", {})
        self.values[n] = super().run_node(n)
        return self.values[n]


def _fused_and_output(res, inputs):
    gm = res.graph
    rec = _Recorder(gm)
    out = rec.run(*inputs)
    fused = next(n for n in gm.graph.nodes if n.target == torch.ops.fxfuse.attention.default)
    return fused, rec.values[fused], out


@pytest.mark.parametrize("fn", [merged_heads, fairseq_merge], ids=lambda f: f.__name__)
def test_the_merge_is_a_view_of_the_operator_output(fn, cpu_path):
    inputs = _inputs(fn)
    res = fxfuse.rewrite(fn, tuple(inputs), passes="canonicalize,fuse-attention")
    after = res.graph.code.split("fxfuse.attention")[1]
    assert "clone" not in after and "transpose" not in after, res.graph.code  # the copy is gone
    fused, fused_out, (out,) = _fused_and_output(res, inputs)
    assert fused.args[5:] == (None, True), res.graph.code
    assert out.data_ptr() == fused_out.data_ptr() and out.untyped_storage().nbytes() == fused_out.untyped_storage().nbytes()
    assert fused_out.stride() == ((L * H * D, D, H * D, 1) if fn is merged_heads else (L * B * H * D, D, B * H * D, 1))
    torch.testing.assert_close(out, fn(*inputs), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(res.module(*inputs), fn(*inputs), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fn", [also_read_per_head, other_swap], ids=lambda f: f.__name__)
def test_no_merged_layout_unless_the_merge_is_the_only_reader(fn):
    inputs = _inputs(fn)
    res = fxfuse.rewrite(fn, tuple(inputs), passes="canonicalize,fuse-attention")
    fused, fused_out, outs = _fused_and_output(res, inputs)
    assert len(fused.args) == 5 and fused_out.is_contiguous(), res.graph.code
    want = fn(*inputs)
    for got, want in zip(outs, want if isinstance(want, tuple) else (want,), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


SPECS = {
    "sdpa": AttentionSpec("float32", (ScoreStep("mul", "float32", value=0.3),)),  # the CPU path runs SDPA
    "reference": AttentionSpec("float32", (ScoreStep("tanh", "float32"),)),  # SDPA cannot: the torch reference
}


@pytest.mark.parametrize("merge", [False, True])
@pytest.mark.parametrize("name", sorted(SPECS))
def test_fake_strides_are_the_real_strides(name, merge, cpu_path):
    from torch._subclasses.fake_tensor import FakeTensorMode

    q, k, v = (torch.randn(B, H, L, D) for _ in range(3))
    q = q.transpose(1, 2).contiguous().transpose(1, 2)  # the inputs' own strides must not matter
    spec = SPECS[name].to_json()
    real = torch.ops.fxfuse.attention(q, k, v, [], spec, merge_heads=merge)
    with FakeTensorMode() as mode:
        fake = torch.ops.fxfuse.attention(*(mode.from_tensor(t) for t in (q, k, v)), [], spec, merge_heads=merge)
    assert real.stride() == fake.stride() == (MERGED_STRIDES if merge else (H * L * D, L * D, D, 1))
    torch.testing.assert_close(real, torch.ops.fxfuse.attention(q, k, v, [], spec), rtol=1e-6, atol=1e-6)


def test_the_backward_takes_a_gradient_of_any_strides(cpu_path):
    q, k, v = (torch.randn(B, H, L, D) for _ in range(3))
    spec = SPECS["reference"].to_json()
    grad = torch.randn(B, H, L, D)
    merged_grad = grad.transpose(1, 2).contiguous().transpose(1, 2)  # what a merged output's gradient looks like
    contiguous = torch.ops.fxfuse.attention_backward(grad, q, k, v, [], [], spec)
    strided = torch.ops.fxfuse.attention_backward(merged_grad, q, k, v, [], [], spec)
    torch.testing.assert_close(strided, contiguous, rtol=1e-6, atol=1e-6)


def test_training_through_torch_compile(tmp_path):
    from tests.attention_styles import MultiHeadProjections

    torch._dynamo.reset()
    model = MultiHeadProjections()
    (x,) = model.inputs(torch.float32)
    compiled = torch.compile(model, backend="fxfuse", options={"debug_dir": str(tmp_path)})
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    out = compiled(x1)
    out.pow(2).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    eager = model(x2)
    eager.pow(2).sum().backward()
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-5, atol=1e-5)
    for n, p in model.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, rtol=1e-5, atol=1e-5, msg=n)
    forward = next((tmp_path / "graphs").glob("*_aot_forward.txt")).read_text().split("# graph")[0]
    call = forward[forward.index("fxfuse.attention.default("):]
    assert "True)" in call.splitlines()[0], forward  # the operator writes the merged layout
    assert "clone" not in call and "transpose" not in call, forward  # and the merge is a view
    assert "fxfuse.attention_backward" in next((tmp_path / "graphs").glob("*_aot_backward.txt")).read_text()


def test_claimed_sdpa_writes_the_merged_layout(cpu_path):
    def sdpa_block(q, k, v):
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return y.transpose(1, 2).contiguous().view(B, L, H * D)

    inputs = _inputs(merged_heads)
    res = fxfuse.rewrite(sdpa_block, tuple(inputs), passes="canonicalize,claim-sdpa")
    assert [m.kind for m in res.matches] == ["attention"], res.report()
    fused, fused_out, (out,) = _fused_and_output(res, inputs)
    assert fused.args[5:] == (None, True) and fused_out.stride() == MERGED_STRIDES, res.graph.code
    assert out.data_ptr() == fused_out.data_ptr()
    assert "clone" not in res.graph.code.split("fxfuse.attention")[1], res.graph.code
    torch.testing.assert_close(res.module(*inputs), sdpa_block(*inputs), rtol=1e-5, atol=1e-5)
