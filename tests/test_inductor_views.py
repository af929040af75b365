"""The graph the backend hands Inductor keeps no view chosen against the capture's strides
(fxfuse.inductor.views_as_reshapes): Inductor traces it again with its own decompositions, and
those can lay a tensor out otherwise. Found by benchmarks/model_sweep.py on Phi-3 (transformers),
whose RoPE concatenates the rotated half with an empty pass-through part: Inductor's ``cat`` of one
non-empty tensor is a ``clone`` that keeps the rotated tensor's transposed strides, and the
attention's ``view`` of it failed ("Cannot view a tensor with shape ...")."""
import pytest
import torch
import torch.nn as nn
from torch.fx.experimental.proxy_tensor import make_fx

import fxfuse
from fxfuse.inductor import views_as_reshapes
from tests.tolerances import assert_close_as_a_whole, assert_close_to_reference


class EmptyPassRope(nn.Module):
    """Phi-3's attention block in miniature: heads split from a projection and transposed, RoPE
    over the whole head with ``cat([rotated, x[..., rotary_dim:]])`` (an empty second part), an
    additive mask, softmax attention written by hand."""

    def __init__(self, dim=32, heads=4):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=False)

    def rope(self, x, cos, sin):
        rot, rest = x[..., : self.head_dim], x[..., self.head_dim:]
        half = rot.shape[-1] // 2
        rotated = torch.cat([-rot[..., half:], rot[..., :half]], dim=-1)
        return torch.cat([rot * cos + rotated * sin, rest], dim=-1)

    def forward(self, x, mask):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, self.head_dim).unbind(2)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        angles = torch.arange(n, dtype=x.dtype)[:, None] * torch.arange(1, self.head_dim + 1, dtype=x.dtype)
        q, k = self.rope(q, angles.cos(), angles.sin()), self.rope(k, angles.cos(), angles.sin())
        scores = torch.matmul(q, k.transpose(2, 3)) / self.head_dim ** 0.5 + mask
        out = torch.matmul(scores.softmax(-1), v)
        return self.out(out.transpose(1, 2).reshape(b, n, -1))


def test_views_become_reshapes_except_those_written_through():
    def fn(x, y):
        flat = x.view(-1)
        flat.add_(1)  # writes x through the view: that one must stay a view
        return y.view(-1) * 2

    gm = make_fx(fn)(torch.zeros(2, 3), torch.ones(3, 2))
    views = [n for n in gm.graph.nodes if n.target is torch.ops.aten.view.default]
    assert len(views) == 2
    assert views_as_reshapes(gm) == 1
    assert views[0].target is torch.ops.aten.view.default  # x.view(-1), written by add_
    assert views[1].target is torch.ops.aten.reshape.default
    x, y = torch.zeros(2, 3), torch.arange(6.0).view(3, 2)
    assert torch.equal(gm(x, y), y.view(-1) * 2) and torch.equal(x, torch.ones(2, 3))


@pytest.mark.inductor
def test_rope_with_an_empty_pass_through_part_compiles_and_trains():
    torch._dynamo.reset()
    model = EmptyPassRope()
    x = torch.randn(2, 8, 32)
    mask = torch.zeros(2, 1, 8, 8)
    mask[1, ..., -2:] = torch.finfo(torch.float32).min  # the second sequence is padded
    ref = EmptyPassRope().double()
    ref.load_state_dict(model.state_dict())
    be = fxfuse.Backend()
    compiled = torch.compile(model, backend=be)

    outs = []
    for fn, m, dtype in ((compiled, model, torch.float32), (model, model, torch.float32), (ref, ref, torch.float64)):
        m.zero_grad()
        xi = x.detach().to(dtype).clone().requires_grad_()
        out = fn(xi, mask.to(dtype))
        out.pow(2).sum().backward()
        outs.append([out.detach(), xi.grad, *(p.grad for p in m.parameters())])
    assert any(m.kind == "attention" for m in be.matches), be.report()
    got, eager, expected = outs
    assert_close_to_reference(got[0], eager[0], expected[0], "output")
    for i, (g, e, r) in enumerate(zip(got[1:], eager[1:], expected[1:])):
        assert_close_as_a_whole(g, e, r, torch.float32, f"gradient {i}")
