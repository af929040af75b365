"""AOTInductor packaging of a rewritten graph on CPU (torch.export, then aoti_compile_and_package
and aoti_load_package): its fused operators run through AOTInductor's proxy executor, which hands
an empty tensor list over as None (fxfuse/ops/optional_lists.py)."""
from __future__ import annotations

import copy
import time

import torch
import torch.nn as nn

import fxfuse
from tests.tolerances import assert_close_to_reference


class AttentionAndNorms(nn.Module):
    """Attention without a mask or any other extra tensor, an RMSNorm without a weight (a norm
    site with no parameters) and a LayerNorm: the fused calls whose tensor lists are empty."""

    def __init__(self, dim: int = 16, heads: int = 2):
        super().__init__()
        self.heads = heads
        self.qkv, self.out, self.ln = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim), nn.LayerNorm(dim)

    def forward(self, x):
        b, n, d = x.shape
        h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
        q, k, v = self.qkv(h).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        p = (q @ k.transpose(-2, -1) / (d // self.heads) ** 0.5).softmax(-1)
        return self.ln(x + self.out((p @ v).transpose(1, 2).reshape(b, n, d)))


def _fused_calls(gm: torch.fx.GraphModule) -> list[tuple[str, tuple]]:
    return [(str(n.target), n.args) for n in gm.graph.nodes if "fxfuse" in str(n.target)]


def test_a_call_with_none_for_its_empty_tensor_list_computes_what_the_empty_list_does():
    # What AOTInductor's runner passes; the operators' schemas declare these lists optional.
    q, k, v, x = torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8), torch.randn(3, 8)
    res = fxfuse.rewrite(AttentionAndNorms(dim=8), (torch.randn(1, 4, 8),))
    calls = _fused_calls(res.graph)
    (attention_spec,) = [args[4] for target, args in calls if target == "fxfuse.attention.default" and args[3] == []]
    (norm_spec,) = [args[2] for target, args in calls if target == "fxfuse.norm.default" and args[1] == []]
    torch.testing.assert_close(torch.ops.fxfuse.attention(q, k, v, None, attention_spec),
                               torch.ops.fxfuse.attention(q, k, v, [], attention_spec), rtol=0, atol=0)
    torch.testing.assert_close(torch.ops.fxfuse.norm(x, None, norm_spec), torch.ops.fxfuse.norm(x, [], norm_spec),
                               rtol=0, atol=0)


def test_aoti_package_of_a_rewritten_graph_runs_on_cpu_and_equals_the_rewritten_module(tmp_path):
    torch.manual_seed(0)
    model, x = AttentionAndNorms().eval(), torch.randn(2, 8, 16)
    res = fxfuse.rewrite(model, (x,))
    empty_lists = [(target, i) for target, args in _fused_calls(res.graph) for i, a in enumerate(args) if a == []]
    assert empty_lists == [("fxfuse.norm.default", 1), ("fxfuse.attention.default", 3)]
    args = (*model.parameters(), *model.buffers(), x)
    exported = torch.export.export(res.graph, args)
    start = time.perf_counter()
    path = torch._inductor.aoti_compile_and_package(exported, package_path=str(tmp_path / "model.pt2"))
    compiled = torch._inductor.aoti_load_package(path)
    (out,) = compiled(*args)
    print(f"AOTInductor compile and first run: {time.perf_counter() - start:.1f} s")
    with torch.no_grad():
        rewritten, eager = res.module(x), model(x)
        reference = copy.deepcopy(model).double()(x.double())
    assert_close_to_reference(out, eager, reference, "AOTInductor package")
    assert_close_to_reference(out, rewritten, reference, "AOTInductor package vs the rewritten module")
    torch.testing.assert_close(out, rewritten)
