"""PolyNorm fusion: ``w_a * norm(x^a) + w_b * norm(x^b) + w_c * norm(x^c) + bias`` with
{a, b, c} = {1, 2, 3} (PolyCom; Motif 2.6B's MLP activation) becomes one ``fxfuse.polynorm``.

Runs before ``fuse-norm`` and asks its recogniser for the RMS norms (so each norm is proved as
``fuse-norm`` proves one: over the last dimension only, eps a constant inside the root, the
normalized value the one the statistic was taken of), then proves the rest from ``meta``: the three
norms' inputs are x, ``x ** 2`` and ``x ** 3`` of one x, in x's own dtype (no upcast) with one eps
and one root form; each norm's output is multiplied by a one-element weight that does not depend
on x, the three products are added (in any order; the kernel adds them in the order written) and
a one-element bias is added last; nothing in between is used elsewhere. A site that is not all of
that is left to ``fuse-norm``, which fuses each norm on its own.
"""
from __future__ import annotations

import dataclasses

import torch
from torch.fx import Node

from fxfuse.passes.graph import depends_on, dtype, insert_call, is_op, match_layout, shape, source_of, val
from fxfuse.passes.norm import Declined, _hand_written
from fxfuse.passes.pipeline import Match, Miss, PassResult
from fxfuse.spec import dtype_name
from fxfuse.spec_polynorm import PolyNormSpec

aten = torch.ops.aten


def _plain_rms(site) -> bool:
    s = site.spec
    return (site.kind == "rms_norm" and not s.steps and s.statistic == "mean" and s.scale == 1.0
            and s.inverse in ("rsqrt", "div_sqrt") and s.compute_dtype == s.norm_dtype == dtype_name(dtype(site.x))
            and site.output is not None and dtype(site.output) == dtype(site.x))


def _base_power(u: Node) -> tuple[Node, int]:
    if is_op(u, aten.pow.Tensor_Scalar) and isinstance(u.args[0], Node) and u.args[1] in (2, 3):
        return u.args[0], int(u.args[1])
    return u, 1


def _scalar_param(p, x: Node, dt) -> bool:
    """A one-element tensor of x's dtype that x does not flow into (a learned weight or bias)."""
    v = val(p) if isinstance(p, Node) else None
    return v is not None and v.numel() == 1 and v.dtype == dt and not depends_on(p, x)


def _weighted(site, x: Node) -> tuple[Node, Node]:
    """(the product node, the weight) for ``w * norm(...)``."""
    users = list(site.output.users)
    m = users[0] if len(users) == 1 else None
    if not is_op(m, aten.mul.Tensor) or shape(m) != shape(site.output):
        raise Declined("a norm's output is not multiplied by a weight alone")
    w = m.args[0] if m.args[1] is site.output else m.args[1]
    if not _scalar_param(w, x, dtype(x)):
        raise Declined(f"a norm's weight is not a one-element {dtype(x)} tensor independent of x "
                       "(PolyNorm's weights are scalars)")
    return m, w


def _single_add_user(n: Node):
    users = list(n.users)
    u = users[0] if len(users) == 1 else None
    return u if is_op(u, aten.add.Tensor) and u.kwargs.get("alpha", 1) == 1 else None


def _combine(products: dict[Node, int], x: Node) -> tuple[list[Node], Node, Node]:
    """(the products in the order added, the bias, the result) for ((p + p) + p) + bias."""
    first = {_single_add_user(m) for m in products}
    first.discard(None)
    pair = next((a for a in first if set(a.args) <= set(products) and a.args[0] is not a.args[1]), None)
    if pair is None:
        raise Declined("the weighted norms are not added to one another first")
    rest = next(m for m in products if m not in pair.args)
    second = _single_add_user(pair)
    if second is None or set(second.args) != {pair, rest}:
        raise Declined("the third weighted norm is not added to the sum of the other two")
    last = _single_add_user(second)
    bias = None if last is None else last.args[1] if last.args[0] is second else last.args[0]
    if last is None or not _scalar_param(bias, x, dtype(x)) or shape(last) != shape(x):
        raise Declined("no one-element bias is added to the sum of the weighted norms")
    return [pair.args[0], pair.args[1], rest], bias, last


def _find(x: Node, by_power: dict[int, object]) -> tuple[PolyNormSpec, list[Node], Node, Node, set[Node]]:
    sites = list(by_power.values())
    if len({s.spec.eps for s in sites}) != 1 or len({s.spec.inverse for s in sites}) != 1:
        raise Declined("the three norms differ in eps or in their root (rsqrt / sqrt)")
    products, weights = {}, {}
    for p, site in by_power.items():
        m, w = _weighted(site, x)
        products[m], weights[m] = p, w
    order, bias, out = _combine(products, x)
    if dtype(out) != dtype(x):
        raise Declined(f"the result has dtype {dtype(out)}, not x's {dtype(x)}")
    interior = {out, *products}
    for site in sites:
        interior |= site.interior | ({site.x} if site.x is not x else set())
    interior |= _adds_between(out, set(products))
    escaped = [(n, u) for n in interior - {out} for u in n.users if u not in interior]
    if escaped:
        n, u = escaped[0]
        raise Declined(f"the intermediate `{n.name}` is also used by `{u.name}` outside the PolyNorm")
    spec = PolyNormSpec(powers=tuple(products[m] for m in order), eps=sites[0].spec.eps,
                        inverse=sites[0].spec.inverse, dtype=dtype_name(dtype(x)))
    return spec, [weights[m] for m in order], bias, out, interior


def _adds_between(out: Node, products: set[Node]) -> set[Node]:
    found, todo = set(), [out]
    while todo:
        n = todo.pop()
        if n in products or n in found or not is_op(n, aten.add.Tensor):
            continue
        found.add(n)
        todo.extend(a for a in n.args if isinstance(a, Node))
    return found


@dataclasses.dataclass(frozen=True)
class FusePolyNorm:
    name: str = "fuse-polynorm"

    def __call__(self, gm: torch.fx.GraphModule) -> PassResult:
        result = PassResult(self.name)
        groups: dict[Node, dict[int, object]] = {}
        for node in list(gm.graph.nodes):
            if not is_op(node, aten.rsqrt.default, aten.sqrt.default):
                continue
            try:
                site = _hand_written(node)
            except Declined:
                continue  # fuse-norm reports it
            if site is None or not _plain_rms(site):
                continue
            base, power = _base_power(site.x)
            groups.setdefault(base, {}).setdefault(power, site)
        order = {n: i for i, n in enumerate(gm.graph.nodes)}
        for x, by_power in groups.items():
            if set(by_power) != {1, 2, 3}:
                continue  # not PolyNorm's three powers of one tensor: fuse-norm fuses each norm
            anchor = by_power[1].anchor
            source, code = source_of(anchor)
            try:
                spec, weights, bias, out, interior = _find(x, by_power)
            except Declined as why:
                result.misses.append(Miss("polynorm", source, str(why), code))
                continue
            last = max([x, *weights, bias], key=order.__getitem__)
            new = insert_call(gm, torch.ops.fxfuse.polynorm.default, (x, weights, bias, spec.to_json()), last.next)
            if anchor.meta.get("stack_trace"):
                new.meta["stack_trace"] = anchor.meta["stack_trace"]
            out.replace_all_uses_with(match_layout(gm, new, val(out), last.next))
            result.matches.append(Match("polynorm", source, spec, new.name, code))
            result.changed += 1
        return result
