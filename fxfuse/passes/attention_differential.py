"""Differential attention (Ye et al., Differential Transformer; Motif 2.6B): two fused attentions
combined as ``o1 - lambda * o2`` become one ``fxfuse.attention_differential`` call, whose kernel
runs both softmaxes over the same key tiles and reads v once.

Runs after fuse-attention (and before fuse-rope: a half's RoPE then stays as the user wrote it),
on the graph's ``fxfuse.attention`` calls. The site is ``sub(o1, mul(lambda, o2))`` (the product
either way round), each of o1 and o2 a fused attention's output, or that output through reshapes
that end at its own shape (the bmm lowering's flatten and unflatten of (B, H): identities, since a
reshape keeps the elements' row-major order). What is proved, from the graph and ``meta``:

- both attentions have the same spec (so the same scale, mask kinds, casts and softmax), none of
  the features the combined operator does not carry (dropout, sink logits, sigmoid), one output
  layout (both laid out for a head merge, as SDPA's CPU outputs are, or neither), and their outputs
  are read by this combination only;
- they read the very same v node and the very same extra tensors (masks, biases): equal by
  identity, not by value;
- their q and k have equal shapes (one key length, one head count);
- lambda is a floating tensor not computed from either output, broadcasting over the output as one
  value or one per (batch, head): right-aligned its last two dims are 1 (a Python number becomes a
  0-dim float32 tensor, as ATen reads a scalar operand);
- the product, the difference and both outputs share one dtype (no promotion in between), and the
  fused output has the difference's shape and strides.

``o1 + lambda * o2`` and ``lambda * o2 - o1`` are other computations: a sum is declined with its
reason, the reversed difference is not this form (its first operand is not an attention's output).
The official code's other style, one softmax over 2H heads whose probabilities are split with
``view(B, H, 2, L, L)`` and combined before one value product, is declined by fuse-attention
("probabilities also used elsewhere"): see docs/limitations.md.
"""
from __future__ import annotations

import dataclasses
import operator

import torch
from torch.fx import Node

from fxfuse.passes.graph import depends_on, dtype, insert_call, is_op, is_python_scalar, same_layout, shape, source_of, val
from fxfuse.passes.pipeline import Match, Miss, PassResult
from fxfuse.passes.symbolic import same
from fxfuse.spec_attention import AttentionSpec

aten = torch.ops.aten
_RESHAPES = (aten.view.default, aten._unsafe_view.default, aten.reshape.default)


class NotDifferential(Exception):
    """The combination looks like differential attention but breaks a rule: the reason (a miss)."""


def _attention_behind(node) -> tuple[Node, list[Node]] | None:
    """(the fused attention, the reshapes between it and ``node``) when ``node`` is that
    attention's output through reshapes ending at its own shape, else None."""
    chain = []
    while is_op(node, *_RESHAPES):
        chain.append(node)
        node = node.args[0]
    if not is_op(node, torch.ops.fxfuse.attention.default):
        return None
    if chain and not same(tuple(shape(chain[0])), tuple(shape(node))):
        return None  # a real reshape of the output (a head merge): not o itself
    return node, chain


def _args(att: Node) -> dict:
    names = ("q", "k", "v", "extras", "spec", "seed", "merge_heads")
    got = dict(zip(names, att.args))
    got.update(att.kwargs)
    return got


def _only_feeds(att: Node, chain: list[Node], user: Node) -> None:
    nodes = [att, *reversed(chain)]
    for n, nxt in zip(nodes, nodes[1:] + [user]):
        if list(n.users) != [nxt]:
            others = [u.name for u in n.users if u is not nxt]
            raise NotDifferential(f"the attention output {n.name} is also used by {others[0]}; fusing the two "
                                  "attentions would drop that use")


def lambda_rules(lam, out: Node) -> None:
    """Raise NotDifferential unless ``lam`` is a number, or a floating tensor broadcasting over the
    4-d ``out`` as a scalar or one value per (batch, head)."""
    if not isinstance(lam, Node):
        if not is_python_scalar(lam):
            raise NotDifferential(f"lambda is {lam!r}, neither a tensor nor a number")
        return
    lv, ov = val(lam), val(out)
    if lv is None or not lv.dtype.is_floating_point:
        raise NotDifferential("lambda is not a floating tensor; fused differential attention takes a floating "
                              "scalar or per-head lambda")
    if lv.dim() > 4:
        raise NotDifferential(f"lambda has {lv.dim()} dims, more than the output's 4")
    pad = (1,) * (4 - lv.dim()) + tuple(lv.shape)
    b, h = ov.shape[:2]
    if not (same(pad[2], 1) and same(pad[3], 1) and (same(pad[0], 1) or same(pad[0], b))
            and (same(pad[1], 1) or same(pad[1], h))):
        raise NotDifferential(f"lambda of shape {list(lv.shape)} broadcasts over the (B, H, L, D) output along the "
                              "query or feature dims; fused differential attention takes a scalar or one lambda per "
                              "(batch, head) (shape (), (H, 1, 1) or (B, H, 1, 1))")


def _form(sub: Node) -> tuple | None:
    """(att1, chain1, att2, chain2, lambda, mul) when ``sub`` combines two fused attentions with
    a product, else None (not a candidate)."""
    first, second = sub.args[:2]
    mul = second
    one = _attention_behind(first)
    if one is None or not is_op(mul, aten.mul.Tensor):
        return None
    for o2, lam in ((mul.args[0], mul.args[1]), (mul.args[1], mul.args[0])):
        two = _attention_behind(o2)
        if two is not None:
            return (*one, *two, lam, mul)
    return None


def _prove(sub: Node, att1, chain1, att2, chain2, lam, mul) -> AttentionSpec:
    if att1 is att2:
        raise NotDifferential("both terms are the same attention's output: o - lambda * o is not differential "
                              "attention")
    a1, a2 = _args(att1), _args(att2)
    if a1["spec"] != a2["spec"]:
        d1, d2 = AttentionSpec.from_json(a1["spec"]).describe(), AttentionSpec.from_json(a2["spec"]).describe()
        raise NotDifferential(f"the two attentions compute different scores ({d1} vs {d2}); fused differential "
                              "attention shares the scale, mask and softmax between its halves")
    spec = AttentionSpec.from_json(a1["spec"])
    if spec.dropout or spec.sinks >= 0 or spec.normalizer != "softmax":
        raise NotDifferential("the attentions have dropout, sink logits or a sigmoid, which fused differential "
                              "attention does not carry")
    if bool(a1.get("merge_heads")) != bool(a2.get("merge_heads")):
        raise NotDifferential("one attention's output is laid out for a head merge and the other's is not")
    if a1["v"] is not a2["v"]:
        raise NotDifferential(f"the two attentions read different values ({a1['v'].name} and {a2['v'].name}); "
                              "fused differential attention shares one v")
    if len(a1["extras"]) != len(a2["extras"]) or any(x is not y for x, y in zip(a1["extras"], a2["extras"])):
        raise NotDifferential("the two attentions read different mask or bias tensors; fused differential attention "
                              "shares them")
    if not (same(tuple(shape(a1["q"])), tuple(shape(a2["q"]))) and same(tuple(shape(a1["k"])),
                                                                      tuple(shape(a2["k"])))):
        raise NotDifferential("the two attentions' q (or k) shapes differ")
    if isinstance(lam, Node) and (depends_on(lam, att1) or depends_on(lam, att2)):
        raise NotDifferential("lambda is computed from an attention's output")
    lambda_rules(lam, sub)
    if not (dtype(sub) == dtype(mul) == dtype(att1) == dtype(att2)):
        raise NotDifferential(f"the combination changes dtype ({dtype(att1)} outputs, lambda * o2 in {dtype(mul)}, "
                              f"the difference in {dtype(sub)}); fused differential attention keeps the outputs' dtype")
    _only_feeds(att1, chain1, sub)
    _only_feeds(att2, chain2, mul)
    return dataclasses.replace(spec, differential=True)


def _sum_miss(node: Node) -> str | None:
    """Why ``o1 + lambda * o2`` of two fused attentions is left as written (a sum: not this form)."""
    if len(node.args) < 2 or not isinstance(node.args[1], Node):
        return None
    for a, b in ((node.args[0], node.args[1]), (node.args[1], node.args[0])):
        if _attention_behind(a) is not None and is_op(b, aten.mul.Tensor) and \
                any(_attention_behind(x) is not None for x in b.args[:2]):
            return ("two attentions are combined as o1 + lambda * o2, not o1 - lambda * o2: fused differential "
                    "attention subtracts (write the difference, or a negated lambda, if that is what is meant)")
    return None


def lambda_tensor(gm, value: float, before: Node) -> Node:
    """A number lambda as a 0-dim tensor (float32, float64 for a float64 site: how ATen reads a
    scalar operand), made before ``before``, a node of the site's output dtype and device."""
    kwargs = {"dtype": torch.float64 if dtype(before) == torch.float64 else torch.float32, "device": val(before).device}
    with gm.graph.inserting_before(before):
        made = gm.graph.call_function(aten.full.default, ([], float(value)), kwargs)
    with val(before).fake_mode:
        made.meta["val"] = aten.full.default([], float(value), **kwargs)
    return made


def _replace(gm, sub: Node, att1: Node, att2: Node, lam, spec: AttentionSpec) -> Node:
    a1, a2 = _args(att1), _args(att2)
    made = None if isinstance(lam, Node) else lambda_tensor(gm, lam, sub)
    lam = made if made is not None else lam
    args = (a1["q"], a1["k"], a2["q"], a2["k"], a1["v"], lam, list(a1["extras"]), spec.to_json(),
            *([True] if a1.get("merge_heads") else []))
    call = insert_call(gm, torch.ops.fxfuse.attention_differential.default, args, sub)
    new = insert_call(gm, operator.getitem, (call, 0), sub)  # the output (then what its backward reads)
    call.meta["stack_trace"] = new.meta["stack_trace"] = sub.meta.get("stack_trace") or att1.meta.get("stack_trace")
    if not same_layout(val(new), val(sub)):
        gm.graph.erase_node(new)
        gm.graph.erase_node(call)
        if made is not None:
            gm.graph.erase_node(made)
        raise NotDifferential(f"the difference has strides {list(val(sub).stride())}, not the fused output's")
    sub.replace_all_uses_with(new)
    return new


@dataclasses.dataclass(frozen=True)
class FuseDifferential:
    name: str = "fuse-differential"

    def __call__(self, gm: torch.fx.GraphModule) -> PassResult:
        import fxfuse.ops  # noqa: F401  (the rewritten graph calls torch.ops.fxfuse.attention_differential)

        result = PassResult(self.name)
        for node in list(gm.graph.nodes):
            if is_op(node, aten.add.Tensor) and (reason := _sum_miss(node)):
                source, code = source_of(node)
                result.misses.append(Miss("differential", source, reason, code))
                continue
            if not is_op(node, aten.sub.Tensor) or node.kwargs.get("alpha", 1) != 1 or len(node.args) < 2:
                continue
            form = _form(node)
            if form is None:
                continue
            source, code = source_of(node)
            try:
                spec = _prove(node, *form)
                new = _replace(gm, node, form[0], form[2], form[4], spec)
            except NotDifferential as why:
                result.misses.append(Miss("differential", source, str(why), code))
                continue
            for dead in [node, form[5], *form[3], form[2], *form[1], form[0]]:
                gm.graph.erase_node(dead)
            b, h, lq, dv = val(new).shape
            call = new.args[0]  # the operator's node (``new`` takes its output)
            result.matches.append(Match("differential", source, spec, call.name, code,
                                        shape=f"B {b}, H {h}, Lq {lq}, Lk {val(call.args[1]).shape[2]}, Dv {dv}"))
            result.changed += 1
        return result
