"""Canonicalisation: make the many spellings of one computation converge before recognition.

Each rule is exact (same values, bit for bit), so canonicalisation never needs a proof beyond the
rule's own condition.
"""
from __future__ import annotations

import dataclasses

import torch
from torch.fx import Node

from fxfuse.passes.graph import is_op, is_python_scalar, val
from fxfuse.passes.pipeline import PassResult
from fxfuse.passes.whole_split import replace_whole_chunk, whole_chunk

aten = torch.ops.aten


def _functional_twin(target):
    """``aten.add_.Scalar`` → ``aten.add.Scalar``, when such an overload exists."""
    schema_name = getattr(target, "_schema", None) and target._schema.name
    if not schema_name or not schema_name.endswith("_") or not schema_name.startswith("aten::"):
        return None
    packet = getattr(aten, schema_name[len("aten::"):-1], None)
    return getattr(packet, target._overloadname, None) if packet is not None else None


def _inplace_on_temporary(node: Node) -> bool:
    """An in-place op whose mutated tensor is a temporary that nothing else reads.

    Decompositions (e.g. of ``F.rms_norm``) emit these after functionalisation has run; replacing
    them with the out-of-place op is exact because no other node can observe the mutation.
    """
    if node.op != "call_function" or _functional_twin(node.target) is None or not node.args:
        return False
    base = node.args[0]
    return (isinstance(base, Node) and base.op == "call_function" and len(base.users) == 1
            and not _may_alias(base) and _keeps_dtype_and_shape(node, base))


def _keeps_dtype_and_shape(node: Node, base: Node) -> bool:
    """Whether the out-of-place op gives a result of base's dtype and shape, as the in-place op
    does: ``t.mul_(w)`` keeps t's float16 where ``t.mul(w)`` would promote to w's float32."""
    vb = val(base)
    if vb is None:
        return False
    for arg in [*node.args[1:], *node.kwargs.values()]:
        if isinstance(arg, Node):
            va = val(arg)
            if va is None or va.dtype != vb.dtype or torch.broadcast_shapes(va.shape, vb.shape) != vb.shape:
                return False
        elif isinstance(arg, float) and not vb.dtype.is_floating_point:
            return False
    return True


def _may_alias(node: Node) -> bool:
    """Whether ``node``'s result may share memory with another tensor (a view such as ``view`` or
    ``transpose``, an in-place op, or an op whose schema is unknown): mutating it in place would
    also change that other tensor, so the mutation is observable and must stay."""
    schema = getattr(node.target, "_schema", None)
    if schema is None:
        return True
    return any(r.alias_info is not None for r in schema.returns)


def _is_identity(node: Node) -> bool:
    """``x * 1`` or ``x / 1`` with a Python scalar, where the result keeps x's dtype and shape."""
    if not is_op(node, aten.mul.Tensor, aten.div.Tensor, aten.mul.Scalar, aten.div.Scalar):
        return False
    x, other = node.args[0], node.args[1]
    if not (isinstance(x, Node) and is_python_scalar(other) and other == 1):
        return False
    vx, vn = val(x), val(node)
    return vx is not None and vn is not None and vx.dtype == vn.dtype and vx.shape == vn.shape


@dataclasses.dataclass(frozen=True)
class Canonicalize:
    name: str = "canonicalize"

    def __call__(self, gm: torch.fx.GraphModule) -> PassResult:
        result = PassResult(self.name)
        for node in list(gm.graph.nodes):
            if _inplace_on_temporary(node):
                node.target = _functional_twin(node.target)
                result.changed += 1
            elif _is_identity(node):
                node.replace_all_uses_with(node.args[0])
                gm.graph.erase_node(node)
                result.changed += 1
            elif (chunk := whole_chunk(node)) is not None and replace_whole_chunk(gm, node, *chunk):
                result.changed += 1  # a one-chunk split of the whole tensor (one image in a vision tower)
        return result
