"""Gated-MLP fusion: the activation product ``act(gate) * up`` of SwiGLU / GeGLU MLPs becomes one
``fxfuse::gated_act`` whose backward recomputes the activation instead of keeping it (memory).

Recognition anchors on the ``mul`` of an activation (``silu``, ``gelu`` either approximation, or
``g * sigmoid(g)`` written by hand) with another tensor, and proves: the two factors have one
shape and one dtype (no broadcasting, no promotion), and the activation's value feeds nothing
but this product (otherwise it is kept for that other use anyway and nothing is saved). The
gate and up tensors may be anything, including the two halves of one fused ``gate_up_proj``
split with ``chunk``. Opt-in (not in the default pipeline): the operator is opaque to Inductor,
which fuses this product into one pointwise kernel itself and recomputes it in backward.
"""
from __future__ import annotations

import dataclasses

import torch
from torch.fx import Node

from fxfuse.passes.graph import dtype, insert_call, is_op, shape, source_of
from fxfuse.passes.pipeline import Match, Miss, PassResult
from fxfuse.spec import dtype_name
from fxfuse.spec_mlp import GatedActSpec

aten = torch.ops.aten


def _activation(node) -> tuple[str, Node, set[Node]] | None:
    """(act, gate, nodes of the activation) when ``node`` is an activation of one tensor."""
    if is_op(node, aten.silu.default):
        return "silu", node.args[0], {node}
    if is_op(node, aten.gelu.default):
        approx = node.kwargs.get("approximate", node.args[1] if len(node.args) > 1 else "none")
        return ("gelu_tanh" if approx == "tanh" else "gelu"), node.args[0], {node}
    if is_op(node, aten.mul.Tensor):
        a, b = node.args
        for g, s in ((a, b), (b, a)):
            if is_op(s, aten.sigmoid.default) and s.args[0] is g and isinstance(g, Node) and len(s.users) == 1:
                return "silu_by_sigmoid", g, {node, s}
    return None


@dataclasses.dataclass(frozen=True)
class FuseGatedMLP:
    name: str = "fuse-gated-mlp"

    def __call__(self, gm: torch.fx.GraphModule) -> PassResult:
        result = PassResult(self.name)
        claimed: set[Node] = set()
        for node in list(gm.graph.nodes):
            if node in claimed or not is_op(node, aten.mul.Tensor) or _activation(node) is not None:
                continue
            a, b = node.args
            found = next(((x, y, _activation(x)) for x, y in ((a, b), (b, a)) if _activation(x) is not None), None)
            if found is None or not isinstance(found[1], Node):
                continue
            act_node, up, (act, gate, nodes) = found
            source, code = source_of(node)
            reason = None
            if len(act_node.users) != 1:
                reason = f"{act}(gate) is also used elsewhere, so it is kept anyway and fusing saves nothing"
            elif not (shape(gate) == shape(up) == shape(node)):
                reason = (f"the gate {list(shape(gate) or ())} and up {list(shape(up) or ())} factors differ in shape "
                          "(broadcasting); the fused product takes two tensors of one shape")
            elif not (dtype(gate) == dtype(up) == dtype(act_node) == dtype(node)) or dtype(node) not in (
                    torch.float32, torch.bfloat16, torch.float16, torch.float64):
                reason = f"the factors' dtypes differ ({dtype(gate)}, {dtype(up)}); the product would promote"
            if reason is not None:
                result.misses.append(Miss("gated_mlp", source, reason, code))
                continue
            spec = GatedActSpec(act=act, dtype=dtype_name(dtype(node)))
            fused = insert_call(gm, torch.ops.fxfuse.gated_act.default, (gate, up, spec.to_json()), node)
            if node.meta.get("stack_trace"):
                fused.meta["stack_trace"] = node.meta["stack_trace"]
            node.replace_all_uses_with(fused)
            claimed |= nodes | {node}
            result.matches.append(Match("gated_mlp", source, spec, fused.name, code, shape=f"{list(shape(node))}"))
            result.changed += 1
        return result
