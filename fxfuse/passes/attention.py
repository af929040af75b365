"""Attention fusion: ``softmax(score terms(q @ k^T)) @ v``, written any way, becomes one operator.

Recognition anchors on ``aten._softmax`` and walks back through the score terms (scalar and
tensor factors, boolean fills, additive masks and biases, casts) and a layout-only chain (views,
permutes, expands) to the ``bmm`` of queries and keys, then forward through casts and a
layout-only chain to the ``bmm`` with the values. The operator computes on the products' own
operands, so whatever built q, k and v (head splits, einsum's permutes, a scaled query) cannot be
misread; where an operand is a copy, permutation or head-repeat of an earlier tensor, that tensor
is read in place instead (grouped-query attention's kv heads are never materialised).

What is proved, from ``meta`` and by replaying layout chains on index tensors (exact at the
graph's static shapes): the chains between the products and the softmax only rename elements (a
plain reshape of q @ k^T, and of the probabilities into the value product), so the softmax runs
over the key axis and the value product contracts it; every score term keeps the scores' shape,
broadcasts the way the operator reads it (aligned on the right) and is not computed from v; no
removed value (scores, probabilities) is used anywhere else; a mask is replaced by the causal
(or sliding-window) rule only when its values, computed by a small deterministic constant
subgraph, are exactly that rule (those replays and evaluations live in ``attention_layout.py``);
any other mask or bias computed from positions becomes an index expression the kernel computes
only when it is derived from the ops and its evaluation equals the subgraph's values bit for bit
(``attention_index.py``), else it stays a tensor input, with a note when it was a constant.
Anything unproven is a miss with its reason.
"""
from __future__ import annotations

import dataclasses
import math

import torch
from torch.fx import Node

from fxfuse import index_expr
from fxfuse.passes.attention_index import Derived, NotIndex, derive, reads_graph_input
from fxfuse.passes.attention_layout import (LAYOUT, causal_window, constant_value, is_plain_reshape, layout_chain_back,
                                           source_operand)
from fxfuse.passes.graph import (broadcasts_to, depends_on, dtype, insert_call, is_op, is_python_scalar, shape,
                                  source_of, val)
from fxfuse.passes.pipeline import Match, Miss, PassResult
from fxfuse.spec import dtype_name
from fxfuse.spec_attention import AttentionSpec, ScoreStep

aten = torch.ops.aten

_BMM = (aten.bmm.default,)
_CAST = (aten._to_copy.default,)


class Declined(Exception):
    """Raised inside recognition with the reason a site is left as written."""


@dataclasses.dataclass
class _Site:
    softmax: Node
    qk: Node  # bmm(q_op (N, Lq, D), k_op (N, D, Lk))
    pv: Node  # bmm(p (N, Lq, Lk), v_op (N, Lk, Dv))
    lead: tuple[int, int]  # (B, H): the scores' leading dims, a rank-3 site's N as (1, N)
    extras: list[Node]
    spec: AttentionSpec
    interior: set[Node]
    sources: dict  # "q"/"k"/"v" -> (source, permutation, groups) or None, see source_operand
    notes: tuple = ()  # why a constant mask or bias stayed a tensor input


def _plain_cast(node) -> bool:
    if not is_op(node, *_CAST):
        return False
    extra = set(node.kwargs) - {"dtype", "layout", "device", "memory_format"}
    v, src = val(node), val(node.args[0])
    return not extra and v is not None and src is not None and v.device == src.device and v.dtype.is_floating_point


def _scalar_fill(node) -> float | None:
    """The value of a 0-dim constant (``torch.where(m, s, float('-inf'))`` makes a scalar_tensor)."""
    if is_python_scalar(node):
        return float(node)
    if is_op(node, aten.scalar_tensor.default) and is_python_scalar(node.args[0]):
        return float(node.args[0])
    if is_op(node, aten.full.default) and list(node.args[0]) == [] and is_python_scalar(node.args[1]):
        return float(node.args[1])
    return None



def _score_steps(softmax_in: Node, score_shape: tuple) -> tuple[Node, list[tuple[Node, ScoreStep, Node | None]]]:
    """Walk back from the softmax's input through the score terms to the first non-term node.

    Returns (that node, [(node, step, extra tensor or None)] in program order).
    """
    steps = []
    x = softmax_in
    while True:
        if shape(x) != score_shape:
            if not _near_product(x):
                raise _NotAttention
            raise Declined(f"a score term broadcasts the scores from {list(shape(x) or ())} to {list(score_shape)}; "
                           "attention's score terms keep the scores' shape")
        d = dtype_name(dtype(x))
        a = x.args[0] if isinstance(x, Node) and x.args else None
        if is_op(x, aten.mul.Tensor, aten.mul.Scalar, aten.div.Tensor, aten.div.Scalar) and is_python_scalar(x.args[1]):
            op = "mul" if x.target in (aten.mul.Tensor, aten.mul.Scalar) else "div"
            steps.append((x, ScoreStep(op, d, value=float(x.args[1])), None))
        elif is_op(x, aten.masked_fill.Scalar, aten.masked_fill.Tensor) and _scalar_fill(x.args[2]) is not None:
            steps.append((x, ScoreStep("fill", d, value=_scalar_fill(x.args[2])), x.args[1]))
        elif is_op(x, aten.where.self) and _scalar_fill(x.args[2]) is not None and isinstance(x.args[1], Node):
            a = x.args[1]  # where(mask, s, fill): fill where the mask is False
            steps.append((x, ScoreStep("fill", d, value=_scalar_fill(x.args[2]), invert=True), x.args[0]))
        elif is_op(x, aten.where.self) and _scalar_fill(x.args[1]) is not None and isinstance(x.args[2], Node):
            a = x.args[2]  # where(mask, fill, s): fill where the mask is True
            steps.append((x, ScoreStep("fill", d, value=_scalar_fill(x.args[1])), x.args[0]))
        elif is_op(x, aten.add.Tensor, aten.mul.Tensor) and x.kwargs.get("alpha", 1) == 1 and \
                all(isinstance(t, Node) for t in x.args[:2]):
            s0, s1 = x.args[:2]
            # The scores are the operand of the score shape; when both are, the one from a product.
            first = shape(s0) == score_shape and (shape(s1) != score_shape or _near_product(s0))
            a, other = (s0, s1) if first else (s1, s0)
            steps.append((x, ScoreStep("add" if x.target == aten.add.Tensor else "mul", d), other))
        elif is_op(x, aten.div.Tensor) and isinstance(x.args[1], Node) and shape(x.args[0]) == score_shape:
            steps.append((x, ScoreStep("div", d), x.args[1]))
        elif _plain_cast(x):
            steps.append((x, ScoreStep("cast", d), None))
        elif is_op(x, aten.tanh.default):
            steps.append((x, ScoreStep("tanh", d), None))
        else:
            return x, steps[::-1]
        x = a


def _near_product(node, depth: int = 8) -> bool:
    """Whether a bmm is among the nearest ancestors: the softmax may belong to an attention."""
    frontier = [node]
    for _ in range(depth):
        if any(is_op(n, *_BMM) for n in frontier):
            return True
        frontier = [a for n in frontier if isinstance(n, Node) for a in n.all_input_nodes]
    return False


def _check_extra(t: Node, step: ScoreStep, score_shape: tuple, v_root: Node) -> None:
    s = shape(t)
    kind = {"fill": "mask", "add": "bias"}.get(step.op, "factor")
    if not broadcasts_to(s, score_shape):
        raise Declined(f"a {kind} of shape {list(s) if s else '?'} does not broadcast to the scores' shape "
                       f"{list(score_shape)} aligned on the right")
    if step.op == "fill" and dtype(t) != torch.bool:
        raise Declined(f"masked_fill/where takes a {dtype(t)} mask; fused attention reads boolean masks")
    if step.op != "fill" and not dtype(t).is_floating_point:
        raise Declined(f"a score {kind} of dtype {dtype(t)} is not floating point")
    if depends_on(t, v_root):
        raise Declined(f"a score {kind} is computed from the values; attention's score terms depend on "
                       "positions, masks and biases, not on v")


def _probabilities_to_pv(softmax: Node) -> tuple[list[Node], list[Node], Node]:
    """Walk forward from the softmax through casts and a layout chain to the value product.

    Returns (casts, layout chain, pv bmm); raises Declined for attention-like sites it cannot fuse.
    """
    casts, x = [], softmax
    while len(x.users) == 1 and _plain_cast(next(iter(x.users))):
        x = next(iter(x.users))
        casts.append(x)
    chain = []
    while len(x.users) == 1 and is_op(next(iter(x.users)), *LAYOUT):
        x = next(iter(x.users))
        chain.append(x)
    users = list(x.users)
    if any(_is_dropout(u) for n in (softmax, *casts, *chain) for u in n.users):
        raise Declined("the probabilities are multiplied by a random mask (dropout in training is not fused yet)")
    pv = [u for u in users if is_op(u, *_BMM)]
    if len(users) == 1 and pv and pv[0].args[0] is x:
        return casts, chain, pv[0]
    if pv and pv[0].args[1] is x:
        raise Declined("the probabilities are the right operand of the product (p^T-like: it contracts the "
                       "query axis); attention contracts the key axis with the values")
    if len(users) > 1 and any(_reaches_bmm(u) for u in users):
        raise Declined("the probabilities are also used elsewhere (returned or reused); fusing would drop that use")
    user = users[0] if len(users) == 1 else None
    if user is not None and _reaches_bmm(user):
        raise Declined(f"the probabilities are modified by {user.target} after the softmax (a mask, scale or "
                       "bias must act on the scores)")
    raise _NotAttention


class _NotAttention(Exception):
    """The softmax is not an attention's (its result never meets a product): no miss is recorded."""


def _reaches_bmm(node: Node, depth: int = 6) -> bool:
    for _ in range(depth):
        if is_op(node, *_BMM):
            return True
        if len(node.users) != 1:
            return any(is_op(u, *_BMM) for u in node.users)
        node = next(iter(node.users))
    return False


def _is_dropout(node: Node) -> bool:
    """``p * mask`` where the mask comes from a random draw (how dropout is traced in training)."""
    random = [n for n in node.graph.nodes if is_op(n, aten.bernoulli.p, aten.rand.default, aten.native_dropout.default)]
    return is_op(node, aten.mul.Tensor) and any(depends_on(a, r) for a in node.args for r in random)


def _root(node: Node) -> Node:
    """The tensor an operand is a view/copy of (for the "computed from the values" check)."""
    while is_op(node, *LAYOUT, aten.repeat_interleave.self_int) and isinstance(node.args[0], Node):
        node = node.args[0]
    return node


def _recognise(softmax: Node, gm: torch.fx.GraphModule) -> _Site:
    x, dim = softmax.args[0], softmax.args[1]
    score_shape = shape(x)
    if score_shape is None:
        raise _NotAttention
    if not all(isinstance(n, int) for n in score_shape):
        # Comparing symbolic sizes here would add guards the compiled graph does not check.
        if _near_product(x):
            raise Declined("the scores have symbolic (dynamic) sizes; fused attention needs static shapes for now")
        raise _NotAttention
    start, steps = _score_steps(x, score_shape)
    qk, score_chain = layout_chain_back(start)
    if not is_op(qk, *_BMM):
        if _near_product(start):
            _probabilities_to_pv(softmax)  # not attention at all (no value product): stays silent
            raise Declined(f"the scores pass through {getattr(start.target, '__name__', start.target)} between "
                           "q @ k^T and the softmax; fused attention takes scales, masks, biases, casts and "
                           "tanh soft-capping there")
        raise _NotAttention
    rank = len(score_shape)
    casts, p_chain, pv = _probabilities_to_pv(softmax)
    if dim % rank != rank - 1:
        raise Declined(f"the softmax runs over dim {dim} (the query axis) of the {rank}-d scores; attention "
                       "normalizes each query's scores over the keys (the last dim)")
    if softmax.args[2]:
        raise Declined("the softmax upcasts half to float internally (half_to_float); not fused yet")
    if rank not in (3, 4):
        raise Declined(f"the scores have rank {rank}; fused attention reads (B*H, L, L) or (B, H, L, L) scores")
    n, lq, lk = shape(qk)
    if math.prod(score_shape[:-2]) != n or tuple(score_shape[-2:]) != (lq, lk) or not \
            is_plain_reshape(score_chain, (n, lq, lk), score_shape):
        raise Declined("the scores reach the softmax through a layout change that is not a plain reshape of "
                       "q @ k^T (transposed or permuted), so the softmax does not run over the key axis")
    p_node = casts[-1] if casts else softmax
    if shape(pv.args[0]) != (n, lq, lk) or not is_plain_reshape(p_chain, tuple(shape(p_node)), (n, lq, lk)):
        raise Declined("the probabilities reach the value product through a layout change (transposed, "
                       "permuted or broadcast), so the product does not contract the key axis")
    v_op = pv.args[1]
    extras, kinds, spec_steps, notes = [], [], [], []
    for node, step, extra in steps:
        if extra is not None:
            _check_extra(extra, step, score_shape, _root(v_op))
            mask = constant_value(extra, gm) if step.op == "fill" else None
            window = causal_window(~mask if step.invert else mask, lq, lk) if mask is not None else None
            derived = None
            if window is None and step.op in ("fill", "add"):
                derived = _index_form(extra, step, score_shape, gm, mask, notes)
            if window is not None:
                step = dataclasses.replace(step, input=-1, invert=False, window=window)
            elif derived is not None:
                # The per-head inputs it loads, numbered as extras.
                expr = index_expr.relabel_loads(derived.expr, {k: len(extras) + k for k in range(len(derived.heads))})
                extras += derived.heads
                kinds += ["head"] * len(derived.heads)
                if step.op == "fill" and step.invert:
                    expr = index_expr.negate(expr)
                step = dataclasses.replace(step, input=-1, invert=False, expr=expr)
            else:
                step = dataclasses.replace(step, input=len(extras))
                extras.append(extra)
                kinds.append({"fill": "mask", "add": "bias"}.get(step.op, "factor"))
        spec_steps.append(step)
    lead = (1, n) if rank == 3 else tuple(score_shape[:2])
    q_op, k_op = qk.args
    sources = {"q": source_operand(q_op, lead, False, False), "k": source_operand(k_op, lead, True, True),
               "v": source_operand(v_op, lead, False, True)}
    k_groups = sources["k"][2] if sources["k"] else 1
    v_groups = sources["v"][2] if sources["v"] else 1
    if k_groups != v_groups:  # the operator maps one kv head to a group of query heads for both
        sources["k"] = sources["v"] = None
    spec = AttentionSpec(
        score_dtype=dtype_name(dtype(qk)), steps=tuple(spec_steps), prob_dtype=dtype_name(dtype(p_node)),
        inputs=tuple(kinds), kv_groups=k_groups if k_groups == v_groups else 1,
    )
    interior = {qk, *score_chain, *(s[0] for s in steps), softmax, *casts, *p_chain, pv}
    site = _Site(softmax, qk, pv, lead, extras, spec, interior, sources, tuple(notes))
    _check_no_escape(site, {softmax, *casts, *p_chain})
    return site


def _index_form(extra: Node, step: ScoreStep, score_shape, gm, value, notes: list) -> Derived | None:
    """The proved index expression of a mask or bias, or None (it stays a tensor input). A mask or
    bias that reads no graph input but is not derived or not proved gets a note saying why."""
    kind = "mask" if step.op == "fill" else "bias"
    try:
        # A mask's expression loads nothing: the tile lists are made from the spec alone.
        return derive(extra, score_shape, gm, allow_heads=step.op == "add", value=value)
    except NotIndex as why:
        if not reads_graph_input(extra):
            notes.append(f"the {kind} {extra.name} stays a tensor input: {why}")
        return None


def _check_no_escape(site: _Site, probabilities: set[Node]) -> None:
    for node in site.interior - {site.pv}:
        outside = [u for u in node.users if u not in site.interior]
        if outside:
            what = "probabilities" if node in probabilities else "scores"
            raise Declined(f"the attention {what} ({node.name}) are also used by {outside[0].name} (returned or "
                           "reused); fusing would drop that use")



def _operand_4d(gm, operand: Node, site: _Site, role: str) -> Node:
    """The operand as the operator reads it, (B, H or Hkv, L, D): its source when one is proved
    (no copy, kv heads not repeated), else a view of the operand itself."""
    transposed = role == "k"
    if site.sources[role] is not None:
        root, perm, _ = site.sources[role]
        return root if perm == [0, 1, 2, 3] else insert_call(gm, aten.permute.default, (root, perm), site.pv)
    b, h = site.lead
    if transposed:
        operand = insert_call(gm, aten.transpose.int, (operand, 1, 2), site.pv)
    return insert_call(gm, aten.view.default, (operand, [b, h, *shape(operand)[1:]]), site.pv)


def _replace(gm: torch.fx.GraphModule, site: _Site) -> Node:
    q_op, k_op = site.qk.args
    v_op = site.pv.args[1]
    b, h = site.lead
    lq, dv = shape(q_op)[1], shape(v_op)[2]
    q = _operand_4d(gm, q_op, site, "q")
    k = _operand_4d(gm, k_op, site, "k")
    v = _operand_4d(gm, v_op, site, "v")
    # A per-head input of an index expression is read as its (1|B, 1|H, 1, 1) view.
    extras = [insert_call(gm, aten.reshape.default, (e[0], list(e[1])), site.pv) if isinstance(e, tuple) else e
              for e in site.extras]
    fused = insert_call(gm, torch.ops.fxfuse.attention.default, (q, k, v, extras, site.spec.to_json()), site.pv)
    if site.softmax.meta.get("stack_trace"):
        fused.meta["stack_trace"] = site.softmax.meta["stack_trace"]
    out = insert_call(gm, aten.view.default, (fused, [b * h, lq, dv]), site.pv)
    site.pv.replace_all_uses_with(out)
    return fused


@dataclasses.dataclass(frozen=True)
class FuseAttention:
    name: str = "fuse-attention"

    def __call__(self, gm: torch.fx.GraphModule) -> PassResult:
        import fxfuse.ops  # noqa: F401  (the rewritten graph calls torch.ops.fxfuse.attention)

        result = PassResult(self.name)
        for node in list(gm.graph.nodes):
            if not is_op(node, aten._softmax.default) or node.graph is not gm.graph:
                continue
            source, code = source_of(node)
            try:
                site = _recognise(node, gm)
            except _NotAttention:
                continue
            except Declined as why:
                result.misses.append(Miss("attention", source, str(why), code))
                continue
            fused = _replace(gm, site)
            result.matches.append(Match("attention", source, site.spec, fused.name, code, site.notes))
            result.changed += 1
        return result
