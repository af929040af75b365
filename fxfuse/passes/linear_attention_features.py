"""The feature maps of a linear-attention site (fxfuse.passes.linear_attention): which ones are
provably non-negative (for the normaliser), and which ones the operator applies itself (spec
``phi_a`` / ``phi_b``): elementwise maps and softmaxes, whose axis is followed through the layout
ops to the product's operand. Absorbing one replays those layout ops on phi's input, so the
operator receives q (or k^T) and phi(q) is never written."""
from __future__ import annotations

import math

import torch
from torch.fx import Node

from fxfuse.passes.attention_layout import LAYOUT, layout_chain_back
from fxfuse.passes.graph import dtype, insert_call, is_op, is_python_scalar, plain_cast, same_layout, shape, val
from fxfuse.passes.symbolic import same
from fxfuse.spec_linear_attention import SOFTMAX_MAPS

aten = torch.ops.aten


def nonnegative_feature_map(node: Node, depth: int = 12) -> str | None:
    """The name of a feature map whose values are provably >= 0, or None."""
    for _ in range(depth):
        if is_op(node, *LAYOUT) or plain_cast(node):  # they keep each value's sign
            node = node.args[0]
            continue
        break
    if is_op(node, aten.add.Tensor) and is_op(node.args[0], aten.elu.default) and is_python_scalar(node.args[1]) \
            and node.kwargs.get("alpha", 1) == 1:
        alpha = node.args[0].args[1] if len(node.args[0].args) > 1 else 1.0
        scales = node.args[0].args[2:] or (1,)
        if all(s == 1 for s in scales) and node.args[1] >= alpha >= 0:
            return "elu + 1"
    if is_op(node, aten.relu.default):
        return "relu"
    if is_op(node, aten._softmax.default, aten.softmax.int):
        return "softmax"
    if is_op(node, aten.exp.default):
        return "exp"
    if is_op(node, aten.sigmoid.default):
        return "sigmoid"
    if is_op(node, aten.pow.Tensor_Scalar) and node.args[1] == 2:
        return "square"
    if is_op(node, aten.mul.Tensor) and node.args[0] is node.args[1]:
        return "square"
    return None


def _feature_map_input(node: Node) -> tuple[str, Node] | None:
    """(kind, x) when ``node`` is phi(x) for an elementwise feature map the operator can apply
    itself (spec FEATURE_MAPS), computed in x's dtype and shape; None otherwise."""
    kind, x = None, None
    if is_op(node, aten.add.Tensor) and is_op(node.args[0], aten.elu.default) and node.args[1] == 1 and \
            node.kwargs.get("alpha", 1) == 1 and all(c == 1 for c in node.args[0].args[1:]):
        kind, x = "elu1", node.args[0].args[0]
    elif is_op(node, aten.relu.default, aten.exp.default, aten.sigmoid.default):
        kind, x = {aten.relu.default: "relu", aten.exp.default: "exp", aten.sigmoid.default: "sigmoid"}[node.target], \
            node.args[0]
    elif (is_op(node, aten.pow.Tensor_Scalar) and node.args[1] == 2) or \
            (is_op(node, aten.mul.Tensor) and node.args[0] is node.args[1]):
        kind, x = "square", node.args[0]
    if kind is None or not isinstance(x, Node) or dtype(x) != dtype(node) or shape(x) is None or \
            len(shape(x)) != len(shape(node)) or not all(same(p, q) for p, q in zip(shape(x), shape(node))):
        return None
    return kind, x


def _same_shape(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dim() == b.dim() and all(same(x, y) for x, y in zip(a.shape, b.shape))


def _track_axis(chain: list[Node], axis: int) -> int | None:
    """The dim of ``chain``'s result that holds dim ``axis`` of its input line by line (each line
    along it is one line along ``axis``, in order), or None when a layout op mixes it with others."""
    for op in chain:
        src, dst = shape(op.args[0]), shape(op)
        if src is None or dst is None:
            return None
        if is_op(op, aten.transpose.int):
            d0, d1 = (d % len(src) for d in op.args[1:3])
            axis = d1 if axis == d0 else d0 if axis == d1 else axis
        elif is_op(op, aten.permute.default):
            axis = [d % len(src) for d in op.args[1]].index(axis)
        elif is_op(op, aten.t.default):
            axis = len(src) - 1 - axis
        elif is_op(op, aten.view.default, aten._unsafe_view.default, aten.reshape.default):
            # row-major order: index i along ``axis`` is the flat offset i * inner within its line, so
            # a dim of the same size with the same product of sizes after it holds the line
            inner = math.prod(src[axis + 1:])
            found = [j for j in range(len(dst)) if same(dst[j], src[axis]) and same(math.prod(dst[j + 1:]), inner)]
            if not found:
                return None
            axis = found[-1]
        elif is_op(op, aten.unsqueeze.default):
            axis += op.args[1] % len(dst) <= axis
        elif is_op(op, aten.squeeze.dim):
            d = op.args[1] % len(src)
            if d == axis or len(dst) == len(src):
                return None if d == axis else axis
            axis -= d < axis
        elif is_op(op, aten.expand.default):  # broadcasting other dims repeats whole lines
            new = axis + len(dst) - len(src)
            if not same(src[axis], dst[new]):
                return None
            axis = new
        elif not is_op(op, aten.clone.default, aten.alias.default):
            return None
    return axis


def _softmax_input(node: Node, chain: list[Node], side: str, causal: bool) -> tuple[str, Node] | str | None:
    """(kind, x) when ``node`` is a softmax of x in x's dtype over the dim that the layout ``chain``
    takes to a dim the operator normalises (spec SOFTMAX_MAPS: a's features; bt's features or
    keys); why not (a note) when it is a softmax the operator does not apply; None otherwise."""
    if not is_op(node, aten._softmax.default, aten.softmax.int):
        return None
    x, dim = node.args[:2]
    if not isinstance(x, Node) or shape(x) is None or dtype(x) != dtype(node):
        return "a softmax in another dtype than its input's stays in the graph"
    axis = _track_axis(chain, dim % len(shape(x)))
    rank = len(shape(chain[-1]) if chain else shape(x))
    kinds = {"a": {rank - 1: "softmax_features"}, "bt": {rank - 1: "softmax_keys", rank - 2: "softmax_features"}}[side]
    kind = kinds.get(axis) if axis is not None else None
    operand = "q" if side == "a" else "k"
    if kind is None:
        return f"the softmax of {operand} is over an axis the operator does not normalise; it stays in the graph"
    if kind == "softmax_keys" and causal:
        return ("k's softmax over the sequence stays in the graph at a causal site: each key's features would "
                "depend on later keys, which a causal (chunked) kernel does not read")
    return kind, x


def _replay_chain(gm, chain: list[Node], x: Node, before: Node, reshape_views: bool) -> Node | None:
    """The layout ops of ``chain`` applied to ``x`` (views as reshapes with ``reshape_views``);
    None when a view does not apply to x's strides (the caller erases what was inserted)."""
    cur = x
    try:
        for op in chain:
            target = aten.reshape.default if reshape_views and is_op(op, aten.view.default) else op.target
            cur = insert_call(gm, target, (cur, *op.args[1:]), before, dict(op.kwargs))
    except Exception:
        return None
    return cur


def absorb_feature_map(gm, operand: Node, before: Node, side: str, causal: bool, notes: list) -> tuple[str, Node] | None:
    """(kind, operand before phi) when ``operand`` is phi(x), an elementwise map or a softmax the
    operator applies (``side``, "a" or "bt", decides which axis a softmax may take), taken
    through layout ops only: phi commutes with them (a softmax's axis followed through them), so
    the same layout ops replayed on x give the operator q (or k^T) to apply phi to itself. None
    (phi stays in the graph) when there is a cast on the way (phi in another dtype than the
    product's) or the replayed layouts do not give the operand's shape and strides (its shape,
    for a softmax: see below); a softmax the operator could not apply adds its reason to ``notes``."""
    node, chain = layout_chain_back(operand)
    found = _feature_map_input(node)
    if found is None:
        found = _softmax_input(node, chain, side, causal)
        if isinstance(found, str):
            notes.append(found)
            return None
        if found is None:
            return None
    kind, x = found
    existing = set(gm.graph.nodes)

    def undo():
        for n in reversed([n for n in gm.graph.nodes if n not in existing]):
            gm.graph.erase_node(n)

    cur = _replay_chain(gm, chain, x, before, reshape_views=False)
    if kind in SOFTMAX_MAPS:
        # softmax writes a dense result, which the model's views may need where x's strides (heads
        # split from (B, L, H, D)) refuse them: reshape x instead (a copy of q or k, as phi(q) was
        # one). The operator reads any strides, so x's own layout, the same shape, is kept.
        if cur is None:
            undo()
            cur = _replay_chain(gm, chain, x, before, reshape_views=True)
        if cur is not None and _same_shape(val(cur), val(operand)):
            return kind, cur
    elif cur is not None and same_layout(val(cur), val(operand)):
        return kind, cur
    undo()
    return None
