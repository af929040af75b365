"""Linear attention written quadratically: ``(phi(q) @ phi(k)^T) @ v / normaliser`` becomes
``phi(q) @ (phi(k)^T @ v)`` (``fxfuse::linear_attention``), so the (L, L) matrix never exists.

Katharopoulos et al.'s ``elu(x) + 1`` features, Shen et al.'s efficient attention (softmax of q
over the features, of k over the sequence), ReBased's ``(gamma * x + beta) ** 2``: all are a
product S = A @ B^T whose (L, L) result reaches a second product S' @ V through steps that
commute with it, read from the graph:

- layout: a view keeping S's last two dims (it regroups only the batch/head dims);
- a causal mask: ``masked_fill(hidden, 0)``, a multiplication by a 0/1 matrix, ``tril``, its values
  proved equal to the causal mask (a constant, evaluated at capture; static L only);
- a row scale: S times or divided by a scalar or an (..., L, 1) tensor (``S / S.sum(-1)``): it
  moves past the product with V, ``(r * S) @ V = r * (S @ V)``;
- and on the way, row sums ``S.sum(-1)`` (the normaliser), replaced by ``A @ B^T.sum(keys)``.

Efficient attention written in the linear order already (``q_s @ (k_s^T @ v)``, its paper code's
``context^T @ q_s``) is found too (``linear_attention_linear_form``), for its softmaxes: the
feature maps the operator applies move into it on either form (``linear_attention_features``).

Any other use of the (L, L) matrix declines the site (it would have to exist anyway); a softmax in
between is ordinary attention (fuse-attention), not this. The rewrite is exact in real arithmetic
but reassociates floating point, hence opt-in: the sums run in another order (in float32 for
16-bit inputs). A normaliser is only rewritten when phi is provably non-negative on both sides
(elu + 1, relu, softmax, exp, sigmoid, a square): then its terms cannot cancel and both orders
have a small relative error; with features of either sign the normaliser can be near zero, where
any reordering changes the quotient by more than its value.
"""
from __future__ import annotations

import dataclasses

import torch
from torch.fx import Node

from fxfuse.passes.attention_index import reads_graph_input
from fxfuse.passes.attention_layout import LAYOUT, constant_value, is_plain_reshape
from fxfuse.passes.graph import (dtype, insert_call, is_op, is_python_scalar, match_layout, shape,
                                 source_of, val)
from fxfuse.passes import linear_attention_linear_form as linear_form
from fxfuse.passes.linear_attention_features import absorb_feature_map, nonnegative_feature_map
from fxfuse.passes.pipeline import Match, Miss, PassResult
from fxfuse.passes.symbolic import is_static, same, size_args
from fxfuse.spec_linear_attention import LinearAttentionSpec

aten = torch.ops.aten



class Declined(Exception):
    pass


@dataclasses.dataclass
class _Step:
    kind: str  # "layout", "mask", "scale"
    node: Node
    scale: object = None  # the scalar or (..., L, 1) node of a "scale" step
    divide: bool = False


@dataclasses.dataclass
class _Site:
    product: Node  # S = bmm(A, Bt)
    pv: Node  # bmm(S', V)
    steps: list
    rowsums: list  # (sum node, index into steps: the steps applied before it, causal at that point)
    causal: bool
    problems: list  # why the site is declined, found on the way (a site only once the walk reaches V)


def _reshape_end(node: Node, cur: Node, limit: int = 8) -> Node | None:
    """The end of a chain of layout ops from ``cur`` (each the only user of the one before) that is
    a row-major reshape of ``cur`` keeping its last two dims (einsum's unit-dim permutes, the
    views around a bmm): it only regroups the batch/head dims, so it commutes with the product."""
    chain = []
    while is_op(node, *LAYOUT) and len(chain) < limit:
        chain.append(node)
        s, c = shape(node), shape(cur)
        if s is not None and len(s) >= 2 and all(same(x, y) for x, y in zip(s[-2:], c[-2:])) and \
                is_plain_reshape(chain, c, s):
            return node
        if len(node.users) != 1:
            return None
        node = next(iter(node.users))
    return None


def _other(node: Node, cur: Node):
    a, b = node.args[:2]
    return b if a is cur else a if b is cur else None


def _causal_values(mask: Node, gm, length: int, hidden: bool) -> bool:
    """Whether ``mask`` (a constant) is the causal mask: True where key j > query i (``hidden``),
    or its complement, in 0/1 or boolean values, broadcast over the leading dims."""
    value = constant_value(mask, gm)
    if value is None or value.dim() < 2 or any(n != 1 for n in value.shape[:-2]):
        return False
    value = value.reshape(value.shape[-2:]).expand(length, length)
    i = torch.arange(length)
    want = i[None, :] > i[:, None]
    if not hidden:
        want = ~want
    return bool(torch.equal(value.bool(), want) and ((value == 0) | (value == 1)).all())


def _mask_step(node: Node, cur: Node, gm, length):
    """None when ``node`` masks no part of ``cur``; else "" for the causal mask, or why not."""
    if is_op(node, aten.tril.default) and node.args[0] is cur:
        diagonal = node.args[1] if len(node.args) > 1 else node.kwargs.get("diagonal", 0)
        return "" if diagonal == 0 else "tril with a diagonal offset is not the causal mask"
    if is_op(node, aten.masked_fill.Scalar) and node.args[0] is cur:
        if node.args[2] != 0:
            return (f"the (L, L) product is filled with {node.args[2]}, not 0, where masked: without a softmax after "
                    "it, that is not a linear attention")
        mask, hidden = node.args[1], True
    elif is_op(node, aten.mul.Tensor) and isinstance(_other(node, cur), Node) and _other(node, cur) is not cur \
            and shape(_other(node, cur)) is not None and len(shape(_other(node, cur))) >= 2 \
            and not same(shape(_other(node, cur))[-1], 1):
        mask, hidden = _other(node, cur), False
    else:
        return None
    if shape(node) != shape(cur):
        return "the mask broadcasts the (L, L) product to a larger shape"
    if dtype(node) != dtype(cur):
        return f"multiplying by the mask promotes the (L, L) product from {dtype(cur)} to {dtype(node)}"
    if not isinstance(length, int):
        return "a mask at a symbolic length: its values at one length prove nothing about another"
    if reads_graph_input(mask):
        return ("the mask is read from a graph input (a buffer or an argument), whose values may change after capture; "
                "build it in forward (torch.tril(torch.ones(L, L))) to have it proved causal")
    if not _causal_values(mask, gm, length, hidden):
        return "the mask on the (L, L) product is not the causal mask (only causal masks are rewritten)"
    return ""


def _scale_step(node: Node, cur: Node):
    """(scale, divide) when ``node`` scales each row of ``cur`` by a scalar or an (..., L, 1) tensor."""
    if is_op(node, aten.div.Tensor, aten.div.Scalar) and node.args[0] is cur:
        r, divide = node.args[1], True
    elif is_op(node, aten.mul.Tensor, aten.mul.Scalar):
        r, divide = _other(node, cur), False
    else:
        return None
    if node.kwargs or shape(node) != shape(cur) or dtype(node) != dtype(cur):
        return None
    if is_python_scalar(r):
        return r, divide
    s = shape(r)
    if isinstance(r, Node) and s is not None and 1 <= len(s) <= len(shape(cur)) and same(s[-1], 1):
        return r, divide
    return None


def _rowsum(node: Node, cur: Node) -> bool:
    if not is_op(node, aten.sum.dim_IntList) or node.args[0] is not cur or node.kwargs.get("dtype") is not None:
        return False
    dims = node.args[1]
    rank = len(shape(cur))
    return isinstance(dims, (list, tuple)) and len(dims) == 1 and dims[0] % rank == rank - 1


def _walk(product: Node, gm) -> _Site | None:
    """The steps from S = product to the product with V; None when S goes elsewhere (not a site).
    Reasons to decline found on the way are kept, and count only once the walk reaches V."""
    length = shape(product)[-1]
    square = len(shape(product)) >= 2 and same(shape(product)[-2], length)
    cur, steps, rowsums, causal, problems = product, [], [], False, []
    while True:
        users = list(cur.users)
        sums = [u for u in users if _rowsum(u, cur)]
        rest = [u for u in users if u not in sums]
        rowsums += [(u, len(steps), causal) for u in sums]
        pv = [u for u in rest if is_op(u, aten.bmm.default, aten.mm.default) and u.args[0] is cur and u.args[1] is not cur]
        step = None
        if not pv:
            for u in rest:
                if (end := _reshape_end(u, cur)) is not None:
                    step = _Step("layout", end)
                elif square and (why := _mask_step(u, cur, gm, length)) is not None:
                    problems += [why] if why else ["two masks on the (L, L) product"] if causal else []
                    step, causal = _Step("mask", u), True
                elif (found := _scale_step(u, cur)) is not None:
                    step = _Step("scale", u, *found)
                if step is not None:
                    break
            if step is None:
                return None
        chosen = pv[0] if pv else step.node
        if len(rest) > 1:
            other = next(u for u in rest if u is not chosen)
            problems.append(f"the (L, L) product is also used by {other.name}; it would have to be formed anyway")
        if pv:
            if any(c != causal for _, _, c in rowsums):
                problems.append("the normaliser sums the product before the causal mask, the values after it")
            return _Site(product, pv[0], steps, rowsums, causal, problems)
        steps.append(step)
        cur = step.node


def _view_like(gm, node: Node, like: Node, last: object, before: Node) -> Node:
    sizes = list(shape(like)[:-1]) + [last]
    return insert_call(gm, aten.view.default, (node, size_args(gm, sizes, before)), before)


def _replay(gm, out: Node, steps: list, last: object, before: Node) -> Node:
    """``out`` (N, L, last) taken through the steps' layouts and row scales (masks already applied)."""
    for step in steps:
        if step.kind == "layout" and shape(step.node)[:-2] != shape(out)[:-2]:
            out = _view_like(gm, out, step.node, last, before)
        elif step.kind == "scale":
            target = aten.div.Tensor if step.divide else aten.mul.Tensor
            args = (out, step.scale) if step.divide or step.node.args[0] is not step.scale else (step.scale, out)
            out = insert_call(gm, target, args, before)
    return out


def _rewrite(gm, site: _Site, features: str, a: Node, bt: Node, phi: tuple[str, str]) -> Node:
    v = site.pv.args[1]
    for node, count, _ in site.rowsums:
        spec = LinearAttentionSpec(site.causal, False, features, phi_a=phi[0], phi_b=phi[1]).to_json()
        den = insert_call(gm, torch.ops.fxfuse.linear_attention.default, (a, bt, None, spec), node)
        den = _replay(gm, den, site.steps[:count], 1, node)
        if shape(den) != shape(node):  # keepdim=False
            den = insert_call(gm, aten.view.default, (den, size_args(gm, list(shape(node)), node)), node)
        node.replace_all_uses_with(match_layout(gm, den, val(node), node))
    spec = LinearAttentionSpec(site.causal, True, features, phi_a=phi[0], phi_b=phi[1]).to_json()
    num = insert_call(gm, torch.ops.fxfuse.linear_attention.default, (a, bt, v, spec), site.pv)
    num = _replay(gm, num, site.steps, shape(site.pv)[-1], site.pv)
    if shape(num) != shape(site.pv):
        num = _view_like(gm, num, site.pv, shape(site.pv)[-1], site.pv)
    num = match_layout(gm, num, val(site.pv), site.pv)
    site.pv.replace_all_uses_with(num)
    return num


@dataclasses.dataclass(frozen=True)
class FuseLinearAttention:
    name: str = "fuse-linear-attention"

    def __call__(self, gm: torch.fx.GraphModule) -> PassResult:
        result = PassResult(self.name)
        for node in list(gm.graph.nodes):
            if not is_op(node, aten.bmm.default, aten.mm.default) or len(node.users) == 0:
                continue
            source, code = source_of(node)
            try:
                site = _walk(node, gm)
                if site is None:
                    continue
                if site.problems:
                    raise Declined(site.problems[0])
                a, bt = node.args[:2]
                phi = [nonnegative_feature_map(a), nonnegative_feature_map(bt)]
                if site.rowsums and None in phi:
                    side = "phi(q)" if phi[0] is None else "phi(k)"
                    raise Declined(f"{side} is not provably non-negative, so the normaliser's terms may cancel: near "
                                   "zero, summing them in another order changes the quotient by more than its value")
                if site.causal and not is_static(shape(node)):
                    raise Declined("a causal site at symbolic sizes")
            except Declined as why:
                result.misses.append(Miss("linear_attention", source, str(why), code))
                continue
            features = " / ".join(dict.fromkeys(p or "any" for p in phi))
            kept = []  # why a softmax feature map stays in the graph
            absorbed = [absorb_feature_map(gm, x, node, side, site.causal, kept) for x, side in ((a, "a"), (bt, "bt"))]
            operands = [found[1] if found else x for found, x in zip(absorbed, (a, bt))]
            kinds = tuple(found[0] if found else "" for found in absorbed)
            fused = _rewrite(gm, site, features, *operands, kinds)
            spec = LinearAttentionSpec(site.causal, True, features, phi_a=kinds[0], phi_b=kinds[1])
            notes = (f"normaliser rewritten ({len(site.rowsums)} row sum)",) if site.rowsums else ()
            if any(kinds):
                notes += (f"feature map applied in the operator ({', '.join(k for k in kinds if k)}): "
                          "phi(q), phi(k) not written",)
            notes += tuple(kept)
            result.matches.append(Match("linear_attention", source, spec, fused.name, code, notes=notes,
                                        shape=f"N {shape(node)[0]}, L {shape(node)[-2]}, S {shape(node)[-1]}, D {shape(a)[-1]}"))
            result.changed += 1
        for node in list(gm.graph.nodes):  # sites already in the linear order (efficient attention's paper code)
            if len(node.users) == 0 or (site := linear_form.find(node)) is None:
                continue
            done = linear_form.rewrite(gm, site)
            if done is not None:
                source, code = source_of(node)
                fused, spec, notes, sizes = done
                result.matches.append(Match("linear_attention", source, spec, fused.name, code, notes=notes, shape=sizes))
                result.changed += 1
        return result
