"""Dynamic Tanh (DyT) fusion: ``weight * tanh(alpha * x) + bias`` with a learnable one-element
alpha (Zhu et al. 2025, "Transformers without Normalization") becomes one ``fxfuse::dyt`` whose
backward recomputes ``tanh(alpha * x)`` from x instead of keeping it.

Recognition anchors on ``tanh`` of ``alpha * x`` and proves: alpha is a one-element tensor not
computed from x, each intermediate feeds only the next step, and weight/bias are per-feature
(they broadcast along the last dimension only, so the result has x's shape). Opt-in, like the
gated MLP: under torch.compile, Inductor fuses these pointwise ops and recomputes them itself.
Norm variants live here, not in passes/norm.py, which fuses the mean/rsqrt family.
"""
from __future__ import annotations

import dataclasses
import math

import torch
from torch.fx import Node

from fxfuse.passes.graph import depends_on, dtype, insert_call, is_op, shape, source_of
from fxfuse.passes.pipeline import Match, Miss, PassResult
from fxfuse.spec import dtype_name
from fxfuse.spec_dyt import DyTSpec

aten = torch.ops.aten


class Declined(Exception):
    pass


def _per_feature(p, x: Node) -> bool:
    s = shape(p)
    return (isinstance(p, Node) and s is not None and 0 < len(s) <= len(shape(x)) and s[-1] == shape(x)[-1]
            and all(d == 1 for d in s[:-1]) and not depends_on(p, x))


def _other(node: Node, cur: Node):
    a, b = node.args[:2]
    return b if a is cur else a if b is cur else None


def _find(tanh: Node):
    u = tanh.args[0]
    if not is_op(u, aten.mul.Tensor) or len(u.users) != 1:
        return None
    a, b = u.args
    found = [(al, x) for al, x in ((a, b), (b, a)) if isinstance(al, Node) and isinstance(x, Node)
             and shape(al) is not None and len(shape(al)) <= 1 and math.prod(shape(al)) == 1 and shape(x) == shape(u)]
    if not found:
        return None
    alpha, x = found[0]
    if depends_on(alpha, x):
        raise Declined("alpha is computed from the input, so it is not DyT's learnable scalar")
    if len(tanh.users) != 1:
        raise Declined("tanh(alpha * x) is also used elsewhere, so it is kept anyway and fusing saves nothing")
    cur, weight, bias = tanh, None, None
    user = next(iter(cur.users))
    if is_op(user, aten.mul.Tensor) and _per_feature(_other(user, cur), x):
        weight, cur = _other(user, cur), user
    if len(cur.users) == 1:
        user = next(iter(cur.users))
        if is_op(user, aten.add.Tensor) and user.kwargs.get("alpha", 1) == 1 and _per_feature(_other(user, cur), x):
            bias, cur = _other(user, cur), user
    if shape(cur) != shape(x):
        raise Declined("the result does not have the input's shape")
    return x, alpha, weight, bias, cur


@dataclasses.dataclass(frozen=True)
class FuseDyT:
    name: str = "fuse-dyt"

    def __call__(self, gm: torch.fx.GraphModule) -> PassResult:
        result = PassResult(self.name)
        for node in list(gm.graph.nodes):
            if not is_op(node, aten.tanh.default):
                continue
            source, code = source_of(node)
            try:
                site = _find(node)
                if site is None:
                    continue
                x, alpha, weight, bias, out = site
                spec = DyTSpec(weight=weight is not None, bias=bias is not None, out_dtype=dtype_name(dtype(out)))
            except (Declined, ValueError) as why:
                result.misses.append(Miss("dyt", source, str(why), code))
                continue
            fused = insert_call(gm, torch.ops.fxfuse.dyt.default, (x, alpha, weight, bias, spec.to_json()), out)
            if node.meta.get("stack_trace"):
                fused.meta["stack_trace"] = node.meta["stack_trace"]
            out.replace_all_uses_with(fused)
            result.matches.append(Match("dyt", source, spec, fused.name, code, shape=f"{list(shape(x))}"))
            result.changed += 1
        return result
