"""Linear + cross-entropy fusion: the LM head's matmul and the loss on its logits become one chunked
operator (``fxfuse::linear_cross_entropy``) that never holds the (tokens, vocab) logits.

Recognition anchors on ``aten._log_softmax`` (what ``F.cross_entropy`` decomposes into, with
``nll_loss_forward``), walks back to an ``mm``/``addmm`` whose last dimension is the vocabulary,
and proves each step between them: views and slices that keep the vocabulary the last dimension
(rows are only regrouped or selected, so the same views are replayed on the hidden states), casts,
scaling by a constant and ``tanh`` (softcapping), each recorded with its dtype so the operator
rounds where the user's code rounds. The logits and log-probabilities must feed nothing but the
loss: the negative log-likelihood, label smoothing's row sum and a z-loss's ``logsumexp``; if the
logits are returned or used elsewhere the site is declined (they would exist anyway).

The operator returns per-token vectors; the reduction is rebuilt from them exactly as
``nll_loss`` defines it (mean over non-ignored labels, sum, or none), and everything after it
(label smoothing's mix, ``/ num_items_in_batch``, a z-loss's square and mean) stays as written.
"""
from __future__ import annotations

import dataclasses
import operator

import torch
from torch.fx import Node

from fxfuse.passes.graph import dtype, insert_call, is_op, is_python_scalar, plain_cast, shape, source_of
from fxfuse.passes.pipeline import Match, Miss, PassResult
from fxfuse.spec import dtype_name
from fxfuse.spec_loss import LinearCrossEntropySpec, LogitStep

aten = torch.ops.aten

_MATMULS = (aten.mm.default, aten.addmm.default)
_VIEWS = (aten.view.default, aten._unsafe_view.default, aten.reshape.default)
_SAME_VALUES = (aten.alias.default, aten.clone.default)  # clone: contiguous() after a slice
_REDUCTIONS = {0: "none", 1: "mean", 2: "sum"}


class Declined(Exception):
    """Raised inside recognition with the reason a site is left as written."""


@dataclasses.dataclass
class _Site:
    anchor: Node  # the log-softmax
    mm: Node
    h: Node
    weight: Node  # (V, H), or the (H, V) operand to transpose
    weight_is_transposed: bool  # ``weight`` is (H, V): a t() is inserted
    bias: Node | None
    labels: Node
    row_ops: list[Node]  # views / slices / clones on the logits, replayed on the hidden states
    nll: Node  # nll_loss_forward's output 0
    reduction: int
    sums: list[Node]  # label smoothing's log_softmax.sum(-1)
    lses: list[Node]  # a z-loss's logsumexp(logits, -1)
    spec: LinearCrossEntropySpec


def _dtype_name(node: Node) -> str:
    try:
        return dtype_name(dtype(node))
    except ValueError as err:
        raise Declined(str(err)) from None


def _last_dim(node: Node) -> int | None:
    s = shape(node)
    return s[-1] if s else None


def _keeps_rows(node: Node, vocab: int) -> bool:
    """A view, slice or copy that only regroups or selects rows: the vocabulary stays last, whole."""
    src = node.args[0]
    if _last_dim(node) != vocab or _last_dim(src) != vocab:
        return False
    if is_op(node, *_VIEWS, aten.alias.default):
        return True
    if is_op(node, aten.clone.default):
        return node.kwargs.get("memory_format") in (None, torch.contiguous_format)
    if is_op(node, aten.slice.Tensor):
        dim = node.args[1] if len(node.args) > 1 else 0
        return dim % len(shape(src)) != len(shape(src)) - 1
    return False


def _step(node: Node) -> LogitStep | None:
    """The elementwise logit step ``node`` is (cast, scale by a constant, tanh), or None."""
    out = _dtype_name(node)
    if plain_cast(node):
        return LogitStep("cast", out)
    if is_op(node, aten.tanh.default):
        return LogitStep("tanh", out)
    if is_op(node, aten.div.Tensor, aten.div.Scalar) and is_python_scalar(node.args[1]) and not node.kwargs:
        return LogitStep("div", out, float(node.args[1]))
    if is_op(node, aten.mul.Tensor, aten.mul.Scalar):
        a, b = node.args
        c = b if is_python_scalar(b) else a if is_python_scalar(a) else None
        if c is not None:
            return LogitStep("mul", out, float(c))
    return None


def _walk_to_matmul(x: Node, vocab: int) -> list[Node] | None:
    """[mm, ..., x]: the chain from the LM head's matmul to the log-softmax input, or None when
    ``x`` is not computed from a matmul over the vocabulary at all (no candidate)."""
    chain, cur = [x], x
    while not is_op(cur, *_MATMULS):
        if not isinstance(cur, Node) or cur.op != "call_function" or not cur.args or not isinstance(cur.args[0], Node):
            return None
        if _step(cur) is None and not _keeps_rows(cur, vocab):
            if _reaches_matmul(cur, vocab):
                raise Declined(f"`{cur.name}` ({cur.target}) between the LM head's matmul and the log-softmax is not "
                               "one the fused loss computes (views or slices keeping the vocabulary last, casts, "
                               "scaling by a constant, tanh)")
            return None
        cur = cur.args[0]
        chain.append(cur)
    return chain[::-1] if _last_dim(cur) == vocab else None


def _reaches_matmul(node: Node, vocab: int, depth: int = 6) -> bool:
    todo = [(node, 0)]
    while todo:
        n, d = todo.pop()
        if is_op(n, *_MATMULS) and _last_dim(n) == vocab:
            return True
        if d < depth and isinstance(n, Node):
            todo.extend((a, d + 1) for a in n.all_input_nodes)
    return False


def _dead(node: Node) -> bool:
    return is_op(node, aten.detach.default) and not node.users


def _lse_user(u: Node, node: Node) -> bool:
    if not is_op(u, aten.logsumexp.default) or u.args[0] is not node:
        return False
    dims = u.args[1] if len(u.args) > 1 else u.kwargs.get("dim")
    dims = [dims] if isinstance(dims, int) else list(dims or ())
    return len(dims) == 1 and dims[0] % len(shape(node)) == len(shape(node)) - 1


def _escaped(n: Node, u: Node) -> Declined:
    where = "returned by the model" if u.op == "output" else f"also used by `{u.name}` ({u.target})"
    return Declined(f"the logits are used elsewhere: `{n.name}` is {where}, so they would be materialised "
                    "anyway; return only the loss (e.g. `model(..., labels=...).loss`) to fuse the LM head "
                    "with its cross-entropy")


def _find(ls: Node) -> _Site | None:
    x = ls.args[0]
    if not isinstance(x, Node) or shape(x) is None or len(shape(x)) != 2:
        return None
    vocab = shape(x)[1]
    chain = _walk_to_matmul(x, vocab)
    if chain is None:
        return None
    mm = chain[0]
    if ls.args[1] % 2 != 1 or ls.args[2]:
        raise Declined("the log-softmax is not over the vocabulary in the logits' own dtype")
    if is_op(mm, aten.addmm.default):
        bias, h, rhs = mm.args[:3]
        if mm.kwargs.get("beta", 1) != 1 or mm.kwargs.get("alpha", 1) != 1:
            raise Declined("the LM head is an addmm with beta/alpha other than 1")
        if shape(bias) != (vocab,):
            raise Declined(f"the LM head's bias has shape {list(shape(bias) or ())}, not ({vocab},)")
    else:
        (h, rhs), bias = mm.args[:2], None
    weight, transposed = rhs, True
    if is_op(rhs, aten.t.default) or (is_op(rhs, aten.transpose.int) and sorted(a % 2 for a in rhs.args[1:3]) == [0, 1]):
        weight, transposed = rhs.args[0], False
    # Between the matmul and the log-softmax: every node feeds only the next one, except that a
    # logsumexp (z-loss) may read the final logits, views of them included.
    steps, row_ops, lses = [], [], []
    last_step = max([i for i, n in enumerate(chain) if i and _step(n) is not None], default=0)
    last_slice = max([i for i, n in enumerate(chain) if is_op(n, aten.slice.Tensor)], default=0)
    for i, n in enumerate(chain):
        if i:
            step = _step(n)
            if step is not None:
                if step.op != "cast" and step.dtype != _dtype_name(chain[i - 1]):
                    raise Declined(f"`{n.name}` changes the logits' dtype ({dtype(chain[i - 1])} to {dtype(n)})")
                steps.append(step)
            else:
                row_ops.append(n)
        for u in n.users:
            if (i + 1 < len(chain) and u is chain[i + 1]) or _dead(u) or (n is x and u is ls):
                continue
            if i >= max(last_step, last_slice) and _lse_user(u, n):
                lses.append(u)
                continue
            raise _escaped(n, u)
    compute = _dtype_name(x)
    nll, reduction, sums = None, 0, []
    for u in ls.users:
        if _dead(u):
            continue
        if is_op(u, aten.nll_loss_forward.default) and u.args[0] is ls and nll is None:
            _, labels, class_weight, reduction, ignore_index = u.args[:5]
            if class_weight is not None:
                raise Declined("the cross-entropy has class weights; the fused loss computes the unweighted one")
            if reduction not in _REDUCTIONS:
                raise Declined(f"nll_loss reduction {reduction} is not none/mean/sum")
            outs = {g.args[1]: g for g in u.users if g.target is operator.getitem}
            if 0 not in outs or set(outs) - {0, 1} or (1 in outs and outs[1].users):
                raise Declined("nll_loss's total weight is read by other code")
            nll = outs[0]
        elif is_op(u, aten.sum.dim_IntList) and u.args[0] is ls and not u.kwargs.get("dtype") and \
                [d % 2 for d in u.args[1]] == [1]:
            sums.append(u)
        else:
            raise Declined(f"the log-probabilities are also used by `{u.name}` ({u.target}); the fused loss "
                           "computes only the negative log-likelihood, label smoothing's sum and logsumexp")
    if nll is None:
        raise Declined("the log-softmax of the LM head's logits feeds no nll_loss, so it is not a cross-entropy")
    if shape(labels) != (shape(x)[0],) or dtype(labels) != torch.int64:
        raise Declined(f"the labels have shape {list(shape(labels) or ())} and dtype {dtype(labels)}, not one int64 label per row")
    outputs = ("nll",) + (("lse",) if lses else ()) + (("sum_logp",) if sums else ())
    spec = LinearCrossEntropySpec(matmul_dtype=_dtype_name(mm), compute_dtype=compute, ignore_index=int(ignore_index),
                                  vocab=vocab, bias=bias is not None, steps=tuple(steps), outputs=outputs)
    return _Site(ls, mm, h, weight, transposed, bias, labels, row_ops, nll, reduction, sums, lses, spec)


def _replace(gm: torch.fx.GraphModule, site: _Site) -> Node:
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    inputs = [n for n in (site.h, site.weight, site.bias, site.labels) if isinstance(n, Node)]
    first_use = min([site.nll, *site.sums, *site.lses], key=order.__getitem__)
    if max(order[n] for n in inputs) >= order[first_use]:
        raise Declined("the labels are computed after the logits are first used; the fused op cannot be placed")
    at = first_use
    h = site.h
    # The logits' row views replayed on the hidden states: rows of h and of the logits stay paired.
    # Views alone keep the rows in order (row-major, vocabulary last), so only slices need it.
    hidden = shape(site.h)[-1]
    sliced = any(is_op(op, aten.slice.Tensor) for op in site.row_ops)
    for op in site.row_ops if sliced else ():
        if is_op(op, *_VIEWS):
            h = insert_call(gm, aten.reshape.default, (h, [*op.args[1][:-1], hidden]), at)
        elif is_op(op, aten.slice.Tensor):
            h = insert_call(gm, aten.slice.Tensor, (h, *op.args[1:]), at)
    if len(shape(h)) != 2:
        h = insert_call(gm, aten.reshape.default, (h, [-1, hidden]), at)
    weight = insert_call(gm, aten.t.default, (site.weight,), at) if site.weight_is_transposed else site.weight
    fused = insert_call(gm, torch.ops.fxfuse.linear_cross_entropy.default,
                        (h, weight, site.bias, site.labels, site.spec.to_json()), at)
    nll, lse, sum_logp = (insert_call(gm, operator.getitem, (fused, i), at) for i in range(3))
    new_nodes = [fused, nll, lse, sum_logp]
    if site.reduction == 0:
        loss = nll
    else:
        loss = insert_call(gm, aten.sum.default, (nll,), site.nll)
        if site.reduction == 1:  # nll_loss's mean: divided by the number of labels not ignored
            kept = insert_call(gm, aten.ne.Scalar, (site.labels, site.spec.ignore_index), site.nll)
            count = insert_call(gm, aten.sum.default, (kept,), site.nll)
            count = insert_call(gm, aten._to_copy.default, (count,), site.nll, {"dtype": dtype(site.nll)})
            loss = insert_call(gm, aten.div.Tensor, (loss, count), site.nll)
    site.nll.replace_all_uses_with(loss)
    for s in site.sums:
        s.replace_all_uses_with(sum_logp if len(shape(s)) == 1 else insert_call(gm, aten.reshape.default, (sum_logp, list(shape(s))), s))
    for z in site.lses:
        v = lse if dtype(z) == dtype(lse) else insert_call(gm, aten._to_copy.default, (lse,), z, {"dtype": dtype(z)})
        z.replace_all_uses_with(insert_call(gm, aten.reshape.default, (v, list(shape(z))), z))
    trace = site.anchor.meta.get("stack_trace")
    for n in gm.graph.nodes:
        if trace and n.op == "call_function" and "stack_trace" not in n.meta and order.get(n) is None:
            n.meta["stack_trace"] = trace
    return fused


@dataclasses.dataclass(frozen=True)
class FuseLinearCrossEntropy:
    name: str = "fuse-linear-cross-entropy"

    def __call__(self, gm: torch.fx.GraphModule) -> PassResult:
        result = PassResult(self.name)
        for node in list(gm.graph.nodes):
            if not is_op(node, aten._log_softmax.default):
                continue
            source, code = source_of(node)
            try:
                site = _find(node)
                if site is None:
                    continue
                fused = _replace(gm, site)
            except Declined as why:
                result.misses.append(Miss("linear_cross_entropy", source, str(why), code))
                continue
            shape_words = f"tokens {shape(fused.args[0])[0]}, hidden {shape(fused.args[0])[1]}, vocab {site.spec.vocab}"
            result.matches.append(Match("linear_cross_entropy", source, site.spec, fused.name, code, shape=shape_words))
            result.changed += 1
        return result
