"""A split whose one chunk is the whole tensor, read as the tensor itself.

Vision towers (Qwen2-VL and the families that copy its attention) split q, k and v per image with
``torch.split(x, lengths.tolist(), dim)``. With one image the one chunk is all of x: the split is a
view of x with x's shape, strides and offset, so reading x instead is exact. What the split also
did is check its sizes: eager raises unless they sum to x's length. The sizes come from a tensor's
values (unbacked symbols under a trace), so that check is kept as a runtime assert on the size
(``aten._assert_scalar``), which eager, AOTAutograd and Inductor all run. With the split out of the
way the attention reads the rotation directly, and the RoPE pass can fuse it.

Several chunks (several images) stay as written: each chunk is its own attention site.
"""
from __future__ import annotations

import operator

import torch
from torch.fx import Node

from fxfuse.passes.graph import is_op, val
from fxfuse.passes.symbolic import known, size_node

aten = torch.ops.aten


def whole_chunk(node: Node) -> tuple[Node, Node | None, int] | None:
    """For ``getitem(split(x, sizes, dim), 0)`` whose split has one chunk that is provably all of
    x (same shape, strides and offset under the shape environment): (x, the size node to check at
    run time or None for a constant size, dim). None otherwise."""
    if not (is_op(node, operator.getitem) and node.args[1] == 0):
        return None
    split = node.args[0]
    if not is_op(split, aten.split_with_sizes.default, aten.split.Tensor):
        return None
    x, sizes = split.args[0], split.args[1]
    dim = split.args[2] if len(split.args) > 2 else split.kwargs.get("dim", 0)
    chunks, vx, vc = split.meta.get("val"), val(split.args[0]), val(node)
    if not (isinstance(chunks, (list, tuple)) and len(chunks) == 1 and vx is not None and vc is not None):
        return None
    if split.target is aten.split_with_sizes.default:
        if len(sizes) != 1:
            return None
        checked = sizes[0] if isinstance(sizes[0], Node) else None
    elif isinstance(sizes, int):
        checked = None  # split.Tensor by a constant chunk size at least the length: no check in eager either
    else:
        return None  # a chunk size from data: eager's result depends on it and checks nothing
    same = (len(vx.shape) == len(vc.shape)
            and all(known(a == b) for a, b in zip(vx.shape, vc.shape))
            and all(known(a == b) for a, b in zip(vx.stride(), vc.stride()))
            and known(vx.storage_offset() == vc.storage_offset()))
    return (x, checked, dim % vx.dim()) if same else None


def replace_whole_chunk(gm: torch.fx.GraphModule, node: Node, x: Node, checked: Node | None, dim: int) -> bool:
    """Read x where the chunk was read; keep eager's size check as an assert. False (and nothing
    changed) when no node computes x's length for the check."""
    if checked is not None:
        length = size_node(gm, val(x).shape[dim], node)
        if length is None:
            return False
        with gm.graph.inserting_before(node):
            same = gm.graph.call_function(operator.eq, (checked, length))
            same.meta["val"] = checked.meta.get("val") == (length.meta["val"] if isinstance(length, Node) else length)
            message = (f"fxfuse: split sizes [{checked.name}] must sum to the length of dim {dim} "
                       "(as torch.split checks); this graph read the one chunk as the whole tensor")
            gm.graph.call_function(aten._assert_scalar.default, (same, message))
    node.replace_all_uses_with(x)
    gm.graph.erase_node(node)
    return True
