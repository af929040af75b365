"""Normalisers of attention other than a plain softmax over the keys, recognised around the anchor
the attention pass starts from (its ``_recognise`` asks this module what it stands on):

- **attention sinks** (gpt-oss; transformers' eager attention): a learned per-head logit is joined
  to each query row's scores as one more column, ``torch.cat([scores, sinks], dim=-1)``, the row max
  is optionally subtracted (softmax is unchanged by that shift; it only guards overflow), the
  softmax runs over the joined row and the sink's column is sliced off after it. The sink so enters
  the row's max and denominator only (it has no value row): the spec's ``sinks`` names the column.
- **sigmoid attention** (Ramapuram et al., "Theory, Analysis, and Best Practices for Sigmoid
  Self-Attention"): ``sigmoid(scores) @ v`` with no row normalisation (the spec's ``normalizer``).

What is proved, from ``meta``: the concatenation is of the scores and one column along the key
axis, with the scores first; the slice keeps exactly the scores' columns (start 0, step 1, the
scores' shape); a max subtracted is the joined row's own max over the key axis, kept as a column;
nothing but the site reads the joined scores, the max or the probabilities before the slice. A
sigmoid is taken for a normaliser only when its scores come from a batched product (``bmm``: two
batched operands, as attention's are) through score-sized ops and its result reaches a batched
product within a few ops; a sigmoid over a 2-D product (an MLP's gate, ``sigmoid(x @ W) @ W2``) is
not looked at, so models full of gated activations get no misses from it.
"""
from __future__ import annotations

import dataclasses
import operator

import torch
from torch.fx import Node

from fxfuse.passes.graph import dtype, is_op, shape, val
from fxfuse.passes.symbolic import same

aten = torch.ops.aten

_MAX = (aten.max.dim, aten.amax.default)


class NotVariant(Exception):
    """The site looks like a variant but breaks one of its rules: the reason (a miss)."""


@dataclasses.dataclass
class Sink:
    scores: Node  # the scores before the concatenation (B, H, Lq, Lk) (or rank 2/3)
    column: Node  # the sink logits as concatenated, (.., Lq, 1)
    slice: Node  # the probabilities with the sink's column dropped
    nodes: list[Node]  # cat, max (and its getitem), sub: replaced with the site


def _last(dim, rank: int) -> bool:
    return isinstance(dim, int) and dim % rank == rank - 1


def _row_max_of(node, cat: Node, rank: int) -> list[Node] | None:
    """The nodes of ``cat.max(dim=-1, keepdim=True).values`` (or ``amax``) when ``node`` is that, else None."""
    if is_op(node, operator.getitem) and node.args[1] == 0 and is_op(node.args[0], aten.max.dim):
        mx = node.args[0]
        keep = mx.args[2] if len(mx.args) > 2 else mx.kwargs.get("keepdim", False)
        if mx.args[0] is cat and _last(mx.args[1], rank) and keep and len(mx.users) == 1:
            return [mx, node]
    if is_op(node, aten.amax.default) and node.args[0] is cat:
        dims = list(node.args[1]) if len(node.args) > 1 else []
        keep = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
        if len(dims) == 1 and _last(dims[0], rank) and keep:
            return [node]
    return None


def sink_form(softmax: Node) -> Sink | None:
    """The attention-sink form around ``softmax`` (see the module docstring), None when the softmax
    does not read a concatenation; raises NotVariant when it does but a rule fails."""
    x = softmax.args[0]
    nodes = []
    if is_op(x, aten.sub.Tensor) and isinstance(x.args[0], Node) and is_op(x.args[0], aten.cat.default) and \
            x.kwargs.get("alpha", 1) == 1:
        cat = x.args[0]
        row_max = _row_max_of(x.args[1], cat, len(shape(cat) or ()))
        if row_max is None:
            raise NotVariant("the concatenated scores have something other than their own row max (over the key "
                             "axis, keepdim) subtracted before the softmax; fused attention sinks take that shift "
                             "or none")
        nodes += [cat, *row_max, x]
    elif is_op(x, aten.cat.default):
        cat = x
        nodes.append(cat)
    else:
        return None
    tensors, dim = cat.args[0], cat.args[1] if len(cat.args) > 1 else cat.kwargs.get("dim", 0)
    rank = len(shape(cat) or ())
    if len(tensors) != 2 or not _last(dim, rank) or not all(isinstance(t, Node) for t in tensors):
        raise NotVariant("the softmax runs over a concatenation that is not the scores and one sink column along "
                         "the key axis; fused attention sinks are torch.cat([scores, sinks], dim=-1)")
    scores, column = tensors
    s, c = shape(scores), shape(column)
    if s is None or c is None or len(c) != len(s) or not same(c[-1], 1) or not same(tuple(c[:-1]), tuple(s[:-1])):
        raise NotVariant(f"the column joined to the scores has shape {list(c or ())}, not the scores' "
                         f"{list(s or ())} with one key: fused attention sinks join one logit per query row, "
                         "after the scores")
    if not (dtype(scores) == dtype(column) == dtype(cat)) or not dtype(cat).is_floating_point:
        raise NotVariant(f"the sink column ({dtype(column)}) and the scores ({dtype(scores)}) differ in dtype "
                         "(torch.cat promotes them); fused attention sinks join them in one floating dtype")
    users = list(softmax.users)
    sl = users[0] if len(users) == 1 else None
    if sl is None or not is_op(sl, aten.slice.Tensor) or not _last(sl.args[1] if len(sl.args) > 1 else 0, rank) \
            or (sl.args[2] if len(sl.args) > 2 else 0) not in (0, None) or (sl.args[4] if len(sl.args) > 4 else 1) != 1 \
            or not same(tuple(shape(sl)), tuple(s)):
        raise NotVariant("the softmax of the scores joined with a sink column is used other than by dropping that "
                         "column (probs[..., :-1]); fused attention sinks drop the sink's probability after the "
                         "softmax")
    for n in nodes[:-1] if len(nodes) > 1 else []:
        outside = [u for u in n.users if u not in nodes]
        if outside:
            raise NotVariant(f"the scores joined with the sink ({n.name}) are also used by {outside[0].name}; "
                             "fusing would drop that use")
    return Sink(scores, column, sl, nodes)


def _product_near(node: Node, numel: int, products, limit: int = 32) -> bool:
    """Whether one of ``products`` is reached walking back only through score-sized tensors."""
    frontier, seen = [node], set()
    for _ in range(limit):
        if any(is_op(n, *products) for n in frontier):
            return True
        seen.update(frontier)
        frontier = [a for n in frontier for a in n.all_input_nodes
                    if a not in seen and val(a) is not None and val(a).numel() == numel]
        if not frontier:
            return False
    return False


def reaches(node: Node, *targets, depth: int = 6) -> bool:
    """Whether one of ``targets`` is among the users of ``node`` within ``depth`` ops (every path)."""
    frontier = [node]
    for _ in range(depth):
        if any(is_op(n, *targets) for n in frontier):
            return True
        frontier = [u for n in frontier for u in n.users]
    return False


def sigmoid_candidate(node: Node) -> bool:
    """Whether a sigmoid may be attention's normaliser (see the module docstring)."""
    v = val(node)
    if v is None or v.dim() < 3 or not v.dtype.is_floating_point:
        return False
    return _product_near(node.args[0], v.numel(), (aten.bmm.default,)) and reaches(node, aten.bmm.default)


def sigmoid_decline(node: Node) -> None:
    """Raise NotVariant for a sigmoid whose result is divided by its own row sum (another normaliser)."""
    rank = len(shape(node))
    for user in node.users:
        if is_op(user, aten.sum.dim_IntList) and len(user.args) > 1 and len(user.args[1]) == 1 and \
                _last(user.args[1][0], rank):
            raise NotVariant("the sigmoid's result is divided by its own sum over the keys: a normaliser other than "
                             "sigmoid attention's (none) or a softmax; fused attention computes either of those")
