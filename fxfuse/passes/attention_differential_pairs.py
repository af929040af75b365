"""Differential attention as the official naive code writes it (microsoft/unilm's
``multihead_diffattn.py``): one softmax over 2H heads, its probabilities split in pairs of heads
and combined before a single value product::

    p = softmax(q @ k^T * s + mask)                        # (B, 2H, L, Lk): heads 2h and 2h + 1 pair up
    p = p.view(B, H, 2, L, Lk)
    out = (p[:, :, 0] - lambda * p[:, :, 1]) @ v           # v (B, H, Lk, Dv)

Runs before fuse-attention. Since ``(p1 - lambda * p2) @ v = p1 @ v - lambda * (p2 @ v)`` (a
reassociation, as any fused kernel's summation order is), the site is rewritten into one attention
over the 2H heads whose values repeat each v head for its pair, then split in pairs and combined;
fuse-attention's own recognition is asked about that attention at once, and the site becomes one
``fxfuse.attention_differential`` call over the halves' heads (q[:, 0::2], q[:, 1::2], same for k)
reading v itself. When fuse-attention declines the softmax, the rewrite is undone (the site stays
exactly as written, and fuse-attention's reason is reported); when the halves cannot be split
(grouped kv heads, a mask or bias with a head dim), the 2H-head attention stays fused with the
combination after it, and a miss says why.

What is proved before anything changes: the view splits the softmax's head dim 2H into (H, 2) and
is read by exactly two ``select``s of that new dim, indices 0 and 1, each read once, by
``sub(p0, mul(lambda, p1))`` (the product either way round); the difference reaches a ``bmm`` as
its left operand through reshapes and same-shape expands only (matmul's lowering), with v the
bmm's right operand of (B*H, Lk, Dv); lambda, the product and the difference obey the rules of
fuse-differential (a floating scalar or per-(batch, head) lambda not computed from the
probabilities, one dtype throughout).
"""
from __future__ import annotations

import dataclasses
import operator

import torch
from torch.fx import Node

from fxfuse.passes import attention as attention_pass
from fxfuse.passes.attention_differential import NotDifferential, lambda_rules, lambda_tensor
from fxfuse.passes.graph import depends_on, dtype, insert_call, is_op, plain_cast, shape, source_of, val
from fxfuse.passes.pipeline import Match, Miss, PassResult
from fxfuse.passes.symbolic import same, size_args
from fxfuse.spec_attention import AttentionSpec

aten = torch.ops.aten
_RESHAPES = (aten.view.default, aten._unsafe_view.default, aten.reshape.default)
_SOFTMAX = (aten._softmax.default, aten._safe_softmax.default)


@dataclasses.dataclass
class _Pairs:
    softmax: Node
    probs: Node  # (B, 2H, L, Lk): the softmax's output after its casts
    split: Node  # probs viewed (B, H, 2, L, Lk)
    selects: tuple[Node, Node]
    mul: Node
    sub: Node
    chain: list[Node]  # sub -> ... -> the bmm's left operand
    bmm: Node
    lam: object


def _softmax_behind(node: Node) -> Node | None:
    while plain_cast(node):
        node = node.args[0]
    return node if is_op(node, *_SOFTMAX) else None


def _select_index(node: Node, split: Node) -> int | None:
    if not is_op(node, aten.select.int) or node.args[0] is not split or node.args[1] not in (2, -3):
        return None
    return node.args[2] if node.args[2] in (0, 1) else None


def _form(split: Node) -> _Pairs | None:
    """The site around ``split`` (a 5-d view of probabilities), or None when it is not this form;
    raises NotDifferential when it is but a rule fails."""
    probs = split.args[0]
    softmax = _softmax_behind(probs)
    ps, ss = shape(probs), shape(split)
    if softmax is None or ps is None or ss is None or len(ps) != 4 or len(ss) != 5:
        return None
    b, h2, lq, lk = ps
    if not (same(ss[0], b) and same(ss[2], 2) and same(ss[1] * 2, h2) and same(ss[3], lq) and same(ss[4], lk)):
        return None
    users = list(split.users)
    index = {_select_index(u, split): u for u in users}
    if len(users) != 2 or set(index) != {0, 1}:
        return None
    p0, p1 = index[0], index[1]
    if len(p1.users) != 1 or len(p0.users) != 1:
        raise NotDifferential("a half of the split probabilities is also used elsewhere")
    mul = next(iter(p1.users))
    sub = next(iter(p0.users))
    if not is_op(mul, aten.mul.Tensor) or not is_op(sub, aten.sub.Tensor) or sub.args[:2] != (p0, mul) or \
            sub.kwargs.get("alpha", 1) != 1 or list(mul.users) != [sub]:
        return None
    lam = mul.args[1] if mul.args[0] is p1 else mul.args[0]
    chain, x = [], sub
    while len(x.users) == 1:
        user = next(iter(x.users))
        if is_op(user, *_RESHAPES) or (is_op(user, aten.expand.default) and same(tuple(shape(user)),
                                                                                   tuple(shape(x)))):
            chain.append(user)
            x = user
            continue
        break
    bmm = next(iter(x.users)) if len(x.users) == 1 else None
    if bmm is None or not is_op(bmm, aten.bmm.default) or bmm.args[0] is not x:
        return None
    if not same(tuple(shape(bmm.args[0])), (b * ss[1], lq, lk)):
        return None
    return _Pairs(softmax, probs, split, (p0, p1), mul, sub, chain, bmm, lam)


def _check(site: _Pairs) -> None:
    lam = site.lam
    if isinstance(lam, Node) and depends_on(lam, site.softmax):
        raise NotDifferential("lambda is computed from the probabilities")
    lambda_rules(lam, site.sub)
    if not (dtype(site.sub) == dtype(site.mul) == dtype(site.probs) == dtype(site.bmm)):
        raise NotDifferential(f"the combination changes dtype (probabilities in {dtype(site.probs)}, the difference "
                              f"in {dtype(site.sub)}, the product in {dtype(site.bmm)})")


def _rewrite(gm, site: _Pairs) -> tuple[Node, Node, Node, Node]:
    """``p @ v2`` over 2H heads, split in pairs and combined, in place of the bmm; returns (the new
    bmm, the difference (B, H, Lq, Dv), the repeated values' source v (B, H, Lk, Dv), what now
    stands for the bmm)."""
    b, h2, lq, lk = shape(site.probs)
    h = shape(site.split)[1]
    v3 = site.bmm.args[1]
    dv = shape(v3)[-1]
    at = site.bmm
    p3 = insert_call(gm, aten.reshape.default, (site.probs, size_args(gm, [b * h2, lq, lk], at)), at)
    v5 = insert_call(gm, aten.reshape.default, (v3, size_args(gm, [b, h, 1, lk, dv], at)), at)
    v_heads = insert_call(gm, aten.select.int, (v5, 2, 0), at)
    pairs = insert_call(gm, aten.expand.default, (v5, size_args(gm, [b, h, 2, lk, dv], at)), at)
    v2 = insert_call(gm, aten.reshape.default, (pairs, size_args(gm, [b * h2, lk, dv], at)), at)
    o3 = insert_call(gm, aten.bmm.default, (p3, v2), at)
    o5 = insert_call(gm, aten.view.default, (o3, size_args(gm, [b, h, 2, lq, dv], at)), at)
    o1 = insert_call(gm, aten.select.int, (o5, 2, 0), at)
    o2 = insert_call(gm, aten.select.int, (o5, 2, 1), at)
    lam_first = site.mul.args[0] is not site.selects[1]
    scaled = insert_call(gm, aten.mul.Tensor, (site.lam, o2) if lam_first else (o2, site.lam), at)
    diff = insert_call(gm, aten.sub.Tensor, (o1, scaled), at)
    out = insert_call(gm, aten.reshape.default, (diff, size_args(gm, list(shape(site.bmm)), at)), at)
    for n in (o3, diff, out):
        n.meta["stack_trace"] = site.sub.meta.get("stack_trace")
    site.bmm.replace_all_uses_with(out)
    return o3, diff, v_heads, out


def _saved(nodes: list[Node]) -> list[tuple]:
    return [(n, n.target, n.args, dict(n.kwargs), dict(n.meta)) for n in nodes]


def _restore(gm, saved: list[tuple], before: Node) -> Node:
    """Re-create the erased nodes (in their order) before ``before``; returns the new bmm."""
    env: dict[Node, Node] = {}
    with gm.graph.inserting_before(before):
        for old, target, args, kwargs, meta in saved:
            new = gm.graph.call_function(target, torch.fx.node.map_arg(args, lambda a: env.get(a, a)),
                                         torch.fx.node.map_arg(kwargs, lambda a: env.get(a, a)))
            new.meta.update(meta)
            env[old] = new
    return env[saved[-1][0]]


def _differential(gm, fused: Node, diff: Node, v_heads: Node, lam, spec: AttentionSpec) -> Node:
    """The 2H-head attention and its pair combination as one differential call; raises
    NotDifferential (leaving the graph as it is) when the halves cannot be split."""
    if spec.kv_groups != 1:
        raise NotDifferential("the 2H-head attention reads grouped kv heads; its halves are not split (the "
                              "attention stays fused, the combination after it)")
    extras = list(fused.args[3])
    for e in extras:
        s = shape(e)
        if s is None or (len(s) >= 3 and not same(s[-3], 1)):
            raise NotDifferential("a mask or bias of the 2H-head attention varies by head; its halves are not split "
                                  "(the attention stays fused, the combination after it)")
    if any(kind == "head" for kind in spec.inputs) or len(fused.args) > 5:
        raise NotDifferential("the 2H-head attention reads per-head inputs, dropout or a head-merge layout")
    q, k = fused.args[:2]
    b, h2, lq, d = shape(q)
    _, _, lk, _ = shape(k)
    h = h2 // 2
    halves = []
    for x, length in ((q, lq), (k, lk)):
        x5 = insert_call(gm, aten.view.default, (x, size_args(gm, [b, h, 2, length, d], diff)), diff)
        halves.append([insert_call(gm, aten.select.int, (x5, 2, i), diff) for i in (0, 1)])
    (q1, q2), (k1, k2) = halves
    lam = lam if isinstance(lam, Node) else lambda_tensor(gm, lam, diff)
    call = insert_call(gm, torch.ops.fxfuse.attention_differential.default,
                       (q1, k1, q2, k2, v_heads, lam, extras, dataclasses.replace(spec, differential=True).to_json()),
                       diff)
    new = insert_call(gm, operator.getitem, (call, 0), diff)  # the output (then what its backward reads)
    call.meta["stack_trace"] = new.meta["stack_trace"] = diff.meta.get("stack_trace")
    diff.replace_all_uses_with(new)
    return new


@dataclasses.dataclass(frozen=True)
class FuseDifferentialPairs:
    name: str = "fuse-differential-pairs"

    def __call__(self, gm: torch.fx.GraphModule) -> PassResult:
        import fxfuse.ops  # noqa: F401

        result = PassResult(self.name)
        for node in list(gm.graph.nodes):
            if getattr(node, "_erased", False) or not is_op(node, *_RESHAPES) or len(shape(node) or ()) != 5:
                continue
            source, code = source_of(node)
            try:
                site = _form(node)
                if site is None:
                    continue
                _check(site)
            except NotDifferential as why:
                result.misses.append(Miss("differential", source, str(why), code))
                continue
            old = [site.split, *site.selects, site.mul, site.sub, *site.chain, site.bmm]
            order = {n: i for i, n in enumerate(gm.graph.nodes)}
            old.sort(key=order.__getitem__)
            saved = _saved(old)
            o3, diff, v_heads, stand_in = _rewrite(gm, site)
            for n in reversed(old):
                gm.graph.erase_node(n)
            try:
                attention = attention_pass._recognise(site.softmax, gm)
            except (attention_pass.Declined, attention_pass._NotAttention) as why:
                restored = _restore(gm, saved, o3)
                stand_in.replace_all_uses_with(restored)
                gm.graph.eliminate_dead_code()
                if isinstance(why, attention_pass.Declined):
                    result.misses.append(Miss("differential", source, f"the 2H-head attention is declined: {why}",
                                              code))
                continue
            fused = attention_pass._replace(gm, attention)
            s_source, s_code = source_of(site.softmax)
            result.matches.append(Match("attention", s_source, attention.spec, fused.name, s_code, attention.notes,
                                        attention_pass.site_shape(fused)))
            try:
                new = _differential(gm, fused, diff, v_heads, site.lam, attention.spec)
            except NotDifferential as why:
                result.misses.append(Miss("differential", source, str(why), code))
                continue
            gm.graph.eliminate_dead_code()
            spec = dataclasses.replace(attention.spec, differential=True)
            b, h, lq, dv = val(new).shape
            call = new.args[0]  # the operator's node (``new`` takes its output)
            result.matches.append(Match("differential", source, spec, call.name, code,
                                        shape=f"B {b}, H {h}, Lq {lq}, Lk {val(call.args[1]).shape[2]}, Dv {dv}"))
            result.changed += 1
        return result
