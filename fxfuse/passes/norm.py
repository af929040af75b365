"""Normalization fusion: RMSNorm and LayerNorm, written any way, become one ``fxfuse`` operator.

Recognition anchors on the ``rsqrt``/``sqrt`` of a norm (or on ``aten.native_layer_norm``, or on the
``linalg_vector_norm`` of ``F.normalize``: x / max(||x||, eps), x-transformers' RMSNorm), walks
back to the statistic (mean of squares, variance, or mean of squared deviations) and the input,
forward through the normalization to the per-feature weight/bias and casts, and proves each step
from ``meta``: the reduction is over the last dimension only, eps is a scalar inside the root, the
parameters broadcast along the normalized dimension only and do not depend on the input, and no
value the rewrite removes is used anywhere else. Anything unproven is recorded as a miss.
"""
from __future__ import annotations

import dataclasses
import operator

import torch
from torch.fx import Node

from fxfuse.passes.graph import (FLOAT_FORMATS, depends_on, dtype, holds_values_of, insert_call, is_op,
                                 is_python_scalar, keepdim_of, last_dim_only, match_layout, plain_cast, shape,
                                 source_of, strip_cast, val)
from fxfuse.passes.norm_residual import try_residual
from fxfuse.passes.pipeline import Match, Miss, PassResult
from fxfuse.spec import NormSpec, ParamPrep, Step, dtype_name

aten = torch.ops.aten

_MEAN = (aten.mean.dim,)
_ADD = (aten.add.Tensor, aten.add.Scalar)


class Declined(Exception):
    """Raised inside recognition with the reason a site is left as written."""


@dataclasses.dataclass
class _Site:
    kind: str
    anchor: Node  # gives the site its source line
    x: Node
    residual: Node | None
    params: list[Node]
    spec: NormSpec
    output: Node
    interior: set[Node]  # nodes the rewrite makes dead; none may be used outside the site
    notes: list[str]  # parts left outside the fused op, with reasons
    terms: list[Node] | None = None  # fxfuse.sum_norm's terms (a scaled or multi-input residual sum)
    sum_node: Node | None = None  # the residual sum folded into the site


def _dtype_name(node: Node) -> str:
    try:
        return dtype_name(dtype(node))
    except ValueError as err:
        raise Declined(str(err)) from None


def _square_of(node) -> Node | None:
    if is_op(node, aten.pow.Tensor_Scalar) and node.args[1] == 2:
        return node.args[0]
    if is_op(node, aten.mul.Tensor):
        a, b = node.args
        if a is b:
            return a
        # x.float() * x.float(): two casts of one tensor to one dtype hold the same values.
        if plain_cast(a) and plain_cast(b) and a.args[0] is b.args[0] and dtype(a) == dtype(b):
            return a
        if isinstance(a, Node) and isinstance(b, Node):
            raise Declined(f"the statistic is the mean of a product of two different tensors (`{a.name}` * "
                           f"`{b.name}`), not of a square, so it is not a norm's mean of squares")
    return None


def _check_reduction(node: Node, dims, keepdim: bool, of: Node, what: str = "the statistic") -> None:
    rank = len(shape(of) or ())
    if not last_dim_only(dims, rank):
        listed = "all" if dims is None else [dims] if isinstance(dims, int) else list(dims)
        raise Declined(
            f"{what} reduces over dims {listed} of a rank-{rank} "
            "tensor; fused norms reduce over the last dimension only"
        )
    if not keepdim:
        raise Declined(f"{what} is reduced without keepdim=True, so it does not broadcast back over the row "
                       "(write .mean(-1, keepdim=True))")
    # mean(..., dtype=float32) accumulates in another dtype than its input; the spec has no field for that.
    wanted = node.kwargs.get("dtype")
    if wanted is not None and wanted != dtype(of):
        raise Declined(f"{what} is taken with dtype={wanted} on a {dtype(of)} input; fused norms compute the "
                       "statistic in the input's dtype. Upcast the input instead (x.float().pow(2).mean(...))")


def _statistic(stat: Node) -> tuple[str, Node, Node | None, set[Node]]:
    """(kind, xc, mean_node, nodes) for a norm statistic, xc being the (maybe upcast) input.

    Returns kind "" when ``stat`` is not a norm statistic at all (an unrelated sqrt). How it was
    computed (the spec's ``statistic``) is ``_statistic_form``'s answer.
    """
    if is_op(stat, *_MEAN):
        sq = stat.args[0]
        y = _square_of(sq)
        if y is None:
            return "", stat, None, set()
        _check_reduction(stat, stat.args[1], keepdim_of(stat, 2), sq)
        if is_op(y, aten.sub.Tensor) and y.kwargs.get("alpha", 1) == 1:
            xc, mean = y.args
            if is_op(mean, *_MEAN) and mean.args[0] is xc:
                _check_reduction(mean, mean.args[1], keepdim_of(mean, 2), xc, "the mean subtracted from the input")
                return "layer_norm", xc, mean, {stat, sq, y, mean}
        return "rms_norm", y, None, {stat, sq}
    pair = None  # torch.var_mean(...): the statistic is item 0 of a (var, mean) pair
    if (stat.op == "call_function" and stat.target is operator.getitem and stat.args[1] == 0
            and is_op(stat.args[0], aten.var_mean.correction)):
        pair = stat.args[0]
    if pair is not None or is_op(stat, aten.var.correction, aten.var.dim):
        var = pair if pair is not None else stat
        xc = var.args[0]
        if var.target == aten.var.dim:
            correction = 1 if var.kwargs.get("unbiased", var.args[2] if len(var.args) > 2 else True) else 0
            keepdim = keepdim_of(var, 3)
        else:
            correction = var.kwargs.get("correction")
            correction = 1 if correction is None else correction  # None is torch.var's default, unbiased
            keepdim = bool(var.kwargs.get("keepdim", False))
        _check_reduction(var, var.args[1] if len(var.args) > 1 else None, keepdim, xc)
        if correction != 0:
            raise Declined(
                f"the variance is unbiased (correction={correction}, torch.var's default); LayerNorm divides "
                "by N, not N-1. Write x.var(-1, unbiased=False, keepdim=True) if that was meant"
            )
        if pair is None:
            return "layer_norm", xc, None, {stat}
        items = {u.args[1]: u for u in pair.users if u.target is operator.getitem}
        return "layer_norm", xc, items.get(1), {pair, *items.values()}
    return "", stat, None, set()


def _statistic_form(stat: Node) -> str:
    """The spec's ``statistic`` for a statistic node ``_statistic`` accepted."""
    if is_op(stat, aten.var.correction, aten.var.dim):
        return "var"
    if stat.op == "call_function" and stat.target is operator.getitem:
        return "var_mean"
    return "mean"


def _split_eps(inner: Node) -> tuple[Node, float | None]:
    if is_op(inner, *_ADD) and inner.kwargs.get("alpha", 1) == 1:
        a, b = inner.args[0], inner.args[1]
        if is_python_scalar(b) and isinstance(a, Node):
            return a, float(b)
        if is_python_scalar(a) and isinstance(b, Node):
            return b, float(a)
        if isinstance(a, Node) and isinstance(b, Node):
            stat = a if _statistic(a)[0] else b
            if _statistic(stat)[0]:
                raise Declined("eps is a tensor, not a constant; fused norms take eps as a constant from the graph")
    return inner, None


def _normalize_node(anchor: Node, operand_ok) -> tuple[Node, Node, str]:
    """The node that multiplies by rsqrt (or divides by sqrt): (node, operand, inverse form)."""
    users = list(anchor.users)
    if len(users) != 1:
        raise Declined(f"the {anchor.target.__name__.split('.')[0]} is used {len(users)} times; fusing would drop its other uses")
    user = users[0]
    if anchor.target == aten.rsqrt.default and is_op(user, aten.mul.Tensor):
        a, b = user.args
        operand = b if a is anchor else a
        form = "rsqrt"
    elif anchor.target == aten.sqrt.default and is_op(user, aten.div.Tensor) and user.args[1] is anchor:
        operand, form = user.args[0], "div_sqrt"
    elif anchor.target == aten.sqrt.default and is_op(user, *_ADD):
        raise Declined("eps is added outside the square root (x / (sqrt(var) + eps)); fused norms compute x / sqrt(var + eps)")
    else:
        raise Declined(f"the normalizer feeds {user.target} rather than multiplying/dividing the input")
    if not isinstance(operand, Node) or not operand_ok(operand):
        raise Declined("the value normalized is not the one the statistic was computed from")
    return user, operand, form


def _row_param(p: Node, x: Node, n: int, rank: int) -> tuple[Node, ParamPrep]:
    """A per-feature parameter: broadcasts along the last dimension only, independent of x."""
    s = shape(p)
    if s is None or len(s) == 0 or s[-1] != n or any(d != 1 for d in s[:-1]) or len(s) > rank:
        raise Declined(f"a tensor of shape {list(s) if s is not None else '?'} is not a per-feature parameter of size {n} "
                       "(it broadcasts along another dimension), so it is applied after the fused norm")
    if depends_on(p, x):
        raise Declined("the weight is computed from the normalized input, so it is applied after the fused norm")
    offset, base = 0.0, p
    if is_op(base, *_ADD) and base.kwargs.get("alpha", 1) == 1:
        a, b = base.args[0], base.args[1]
        if is_python_scalar(b) and isinstance(a, Node):
            offset, base = float(b), a
        elif is_python_scalar(a) and isinstance(b, Node):
            offset, base = float(a), b
    base = strip_cast(base)
    if not dtype(base).is_floating_point:
        raise Declined(f"the weight has dtype {dtype(base)}; fused norms take floating-point weights")
    return base, ParamPrep(dtype=_dtype_name(p), offset=offset)


def _epilogue(start: Node, x: Node, site_steps: list, params: list, prepared: list, notes: list) -> Node:
    """Walk forward from the normalized value through casts and per-feature mul/add."""
    cur = start
    n, rank = shape(x)[-1], len(shape(x))
    while len(cur.users) == 1:
        user = next(iter(cur.users))
        if plain_cast(user):
            site_steps.append(Step("cast", _dtype_name(user)))
            cur = user
            continue
        if is_op(user, aten.mul.Tensor) and any(is_python_scalar(a) for a in user.args) and shape(user) == shape(cur):
            # LayerNorm Scaling (Curse of Depth): the output times a constant such as 1/sqrt(layer).
            # Only a multiply: x / c and x * (1 / c) round differently.
            value = next(a for a in user.args if is_python_scalar(a))
            site_steps.append(Step("scale", _dtype_name(user), value=float(value)))
            cur = user
            continue
        if is_op(user, aten.mul.Tensor, aten.add.Tensor) and user.kwargs.get("alpha", 1) == 1:
            a, b = user.args
            other = b if a is cur else a
            if not isinstance(other, Node) or other is cur or shape(user) != shape(cur):
                break
            try:
                base, prep = _row_param(other, x, n, rank)
            except Declined as why:
                v = val(other)
                if v is not None and v.numel() < val(cur).numel():  # parameter-like, worth a note
                    notes.append(str(why))
                break
            op = "mul" if user.target == aten.mul.Tensor else "add"
            site_steps.append(Step(op, _dtype_name(user), param=len(params)))
            params.append(base)
            prepared.append(prep)
            cur = user
            continue
        break
    return cur


def _hand_written(anchor: Node) -> _Site | None:
    stat, eps = _split_eps(anchor.args[0])
    kind, xc, mean, stat_nodes = _statistic(stat)
    if not kind:
        return None
    if eps is None:
        if anchor.target == aten.sqrt.default and any(is_op(u, *_ADD) for u in anchor.users):
            raise Declined("eps is added outside the square root (x / (sqrt(var) + eps)); fused norms compute x / sqrt(var + eps)")
        raise Declined("there is no eps inside the square root; fused norms compute rsqrt(var + eps)")
    x = strip_cast(xc)

    def holds_stat_input(op: Node) -> bool:
        """``op`` holds exactly the values the statistic was computed from."""
        if holds_values_of(op, xc) or (holds_values_of(op, x) and holds_values_of(xc, x)):
            return True
        if isinstance(op, Node) and strip_cast(op) is x:
            raise Declined(f"the statistic is computed on a {dtype(xc)} copy of the input but the {dtype(op)} "
                           "copy is normalized; the two differ by rounding, so the site is left as written")
        return False

    def operand_ok(op: Node) -> bool:
        if kind == "rms_norm":
            return holds_stat_input(op)
        if not is_op(op, aten.sub.Tensor) or op.kwargs.get("alpha", 1) != 1:
            return False
        centered_of, m = op.args
        # The centering must round like the reference's (xc - mean) in the statistic's dtype.
        return (m is mean or _row_mean_of(m, xc)) and holds_stat_input(centered_of) and dtype(op) == dtype(xc)

    normalized, operand, form = _normalize_node(anchor, operand_ok)
    interior = {anchor, normalized, *stat_nodes, anchor.args[0]}
    if kind == "layer_norm":
        interior |= {operand, operand.args[1]}
    steps, params, prepared, notes = [], [], [], []
    output = _epilogue(normalized, x, steps, params, prepared, notes)
    interior |= _chain(normalized, output)
    interior |= _dead_casts(interior, keep={x, *params})
    statistic = _statistic_form(stat)
    if statistic == "var_mean" and operand.args[1] is not mean:  # centered by a mean of its own
        statistic = "var"
    spec = NormSpec(kind=kind, eps=eps, compute_dtype=_dtype_name(xc), norm_dtype=_dtype_name(normalized),
                    inverse=form, steps=tuple(steps), params=tuple(prepared), statistic=statistic)
    return _Site(kind, anchor, x, None, params, spec, output, interior, notes)


def _l2_normalized(anchor: Node) -> _Site | None:
    """``x / max(||x||_2, eps)`` over the last dim (``F.normalize(x, dim=-1)``), then an optional
    constant factor (x-transformers' RMSNorm: ``F.normalize(x, dim=-1) * sqrt(d) * g``) and the
    per-feature steps. Not x * rsqrt(mean(x^2) + eps): eps clamps the norm (spec inverse "max_l2")."""
    xc = anchor.args[0]
    order = anchor.args[1] if len(anchor.args) > 1 else anchor.kwargs.get("ord", 2)
    dims = anchor.args[2] if len(anchor.args) > 2 else anchor.kwargs.get("dim")
    keepdim = bool(anchor.args[3] if len(anchor.args) > 3 else anchor.kwargs.get("keepdim", False))
    users = list(anchor.users)
    clamp = users[0] if len(users) == 1 else None
    if not is_op(clamp, aten.clamp_min.default) or not is_python_scalar(clamp.args[1]):
        return None  # a norm used as a value (a loss, a gradient clip): not a normalization
    if order != 2:
        raise Declined(f"F.normalize with p={order}; fused norms divide by the L2 norm only")
    if not isinstance(xc, Node) or dtype(xc) not in FLOAT_FORMATS:
        return None
    _check_reduction(anchor, dims, keepdim, xc, "the vector norm")
    if anchor.kwargs.get("dtype") is not None:
        raise Declined("the vector norm is taken with a dtype= argument; fused norms compute it in the input's dtype")
    eps = float(clamp.args[1])
    if eps <= 0:
        raise Declined(f"the norm is clamped below by {eps:g}, not a positive eps; a zero row would divide by zero")
    denominator, interior = clamp, {anchor, clamp}
    if len(clamp.users) == 1 and is_op(next(iter(clamp.users)), aten.expand.default):
        denominator = next(iter(clamp.users))
        interior.add(denominator)
    users = list(denominator.users)
    div = users[0] if len(users) == 1 else None
    if not is_op(div, aten.div.Tensor) or div.args[1] is not denominator:
        raise Declined("the clamped norm does not divide the input (x / max(||x||, eps)); only that is a "
                       "normalization")
    x = strip_cast(xc)
    if not (holds_values_of(div.args[0], xc) or (holds_values_of(div.args[0], x) and holds_values_of(xc, x))):
        raise Declined("the value divided by the norm is not the one the norm was computed from")
    interior.add(div)
    normalized, scale = div, 1.0
    if len(div.users) == 1:
        user = next(iter(div.users))
        if is_op(user, aten.mul.Tensor, aten.mul.Scalar) and user.args[0] is div and is_python_scalar(user.args[1]) \
                and dtype(user) == dtype(div):
            normalized, scale = user, float(user.args[1])
            interior.add(user)
    steps, params, prepared, notes = [], [], [], []
    output = _epilogue(normalized, x, steps, params, prepared, notes)
    interior |= _chain(normalized, output)
    interior |= _dead_casts(interior, keep={x, *params})
    spec = NormSpec(kind="rms_norm", eps=eps, compute_dtype=_dtype_name(xc), norm_dtype=_dtype_name(div),
                    inverse="max_l2", steps=tuple(steps), params=tuple(prepared), scale=scale)
    return _Site("rms_norm", anchor, x, None, params, spec, output, interior, notes)


def _row_mean_of(m, xc: Node) -> bool:
    """``m`` is ``xc.mean(-1, keepdim=True)`` in xc's own dtype."""
    return (is_op(m, *_MEAN) and m.args[0] is xc and last_dim_only(m.args[1], len(shape(xc) or ()))
            and keepdim_of(m, 2) and m.kwargs.get("dtype") in (None, dtype(xc)))


def _dead_casts(interior: set[Node], keep: set[Node]) -> set[Node]:
    """Casts feeding the site that only the site reads: they die with it, so they are not "other
    uses" of the input (a residual sum read only through such a cast is not used elsewhere)."""
    found, todo = set(), list(interior)
    while todo:
        for a in todo.pop().all_input_nodes:
            if a in keep or a in found or a in interior or not plain_cast(a):
                continue
            if all(u in interior or u in found for u in a.users):
                found.add(a)
                todo.append(a)
    return found


def _chain(first: Node, last: Node) -> set[Node]:
    nodes, cur = {first}, first
    while cur is not last:
        cur = next(iter(cur.users))
        nodes.add(cur)
    return nodes


def _native_layer_norm(node: Node) -> _Site | None:
    x, normalized_shape, weight, bias, eps = node.args[:5]
    if len(normalized_shape) != 1:
        raise Declined(f"layer_norm over the last {len(normalized_shape)} dimensions; fused norms normalize over the last one only")
    outs = {u.args[1]: u for u in node.users if u.target.__name__ == "getitem"}
    if set(outs) - {0} and any(outs[i].users for i in outs if i != 0):
        raise Declined("layer_norm's saved mean/rstd are used by other code")
    if 0 not in outs:
        return None
    # ATen computes layer_norm in float32 for 16-bit inputs (its "opmath" type) and in float64 for float64.
    acc = "float64" if dtype(x) == torch.float64 else "float32"
    steps, params, prepared = [], [], []
    for op, p in (("mul", weight), ("add", bias)):
        if p is not None:
            steps.append(Step(op, acc, param=len(params)))
            params.append(p)
            prepared.append(ParamPrep(dtype=acc))
    out_dtype = _dtype_name(outs[0])
    if out_dtype != acc:
        steps.append(Step("cast", out_dtype))
    spec = NormSpec(kind="layer_norm", eps=float(eps), compute_dtype=acc, norm_dtype=acc, inverse="rsqrt",
                    steps=tuple(steps), params=tuple(prepared))
    more, notes = [], []
    # Casts and affine terms written after the layer_norm call fuse too.
    output = _epilogue(outs[0], x, more, params, prepared, notes)
    spec = dataclasses.replace(spec, steps=spec.steps + tuple(more), params=tuple(prepared))
    return _Site("layer_norm", node, x, None, params, spec, output, {node, *outs.values()} | _chain(outs[0], output), notes)


def _order(gm) -> dict[Node, int]:
    return {n: i for i, n in enumerate(gm.graph.nodes)}


@dataclasses.dataclass(frozen=True)
class FuseNorm:
    name: str = "fuse-norm"
    residual: bool = True  # also fuse a residual add whose sum feeds the norm and the residual stream

    def __call__(self, gm: torch.fx.GraphModule) -> PassResult:
        result = PassResult(self.name)
        claimed: set[Node] = set()
        for node in list(gm.graph.nodes):
            if node in claimed:
                continue
            if is_op(node, aten.native_layer_norm.default):
                kind, find = "layer_norm", _native_layer_norm
            elif is_op(node, aten.rsqrt.default, aten.sqrt.default):
                kind, find = "norm", _hand_written
            elif is_op(node, aten.linalg_vector_norm.default):
                kind, find = "rms_norm", _l2_normalized
            else:
                continue
            source, code = source_of(node)
            try:
                site = find(node)
                if site is None:
                    continue
                _check_site(site)
            except Declined as why:
                result.misses.append(Miss(kind if kind != "norm" else "rms_norm/layer_norm", source, str(why), code))
                continue
            if self.residual:
                try_residual(site, _order(gm))
            new = _replace(gm, site)
            claimed |= site.interior
            result.matches.append(Match(site.kind, source, site.spec, new.name, code))
            result.misses.extend(Miss(site.kind, source, note, code) for note in site.notes)
            result.changed += 1
        return result


def _check_site(site: _Site) -> None:
    if 0 in (shape(site.x) or ()):
        raise Declined(f"the input is empty (shape {list(shape(site.x))}): there is nothing to normalize; the site "
                       "is left as written (eager returns the empty result)")
    escaped = [(n, u) for n in site.interior - {site.output} for u in n.users if u not in site.interior]
    if escaped:
        n, u = escaped[0]
        raise Declined(f"the intermediate `{n.name}` ({n.target}) is also used by `{u.name}` outside the norm; "
                       "fusing would compute it twice, so the site is left as written")
    if shape(site.output) != shape(site.x):
        raise Declined(f"the result has shape {list(shape(site.output))}, not the input's {list(shape(site.x))}")
    if _dtype_name(site.output) != site.spec.out_dtype:
        raise Declined("the result's dtype does not follow from the casts recorded for the site")


def _replace(gm: torch.fx.GraphModule, site: _Site) -> Node:
    order = _order(gm)
    inputs = [*(site.terms or [site.x]), *site.params] + ([site.residual] if site.residual is not None else [])
    last_input = max(inputs, key=order.__getitem__)
    spec = site.spec.to_json()
    graph = gm.graph
    after = last_input.next
    if site.residual is None and site.terms is None:
        new = insert_call(gm, torch.ops.fxfuse.norm.default, (site.x, list(site.params), spec), after)
        new.meta.update({k: v for k, v in site.output.meta.items() if k != "val"})
        _copy_source(site.anchor, new)
        # The operator's output follows x's layout; the code it replaces may have produced another
        # (F.layer_norm returns a contiguous tensor for a permuted x): later views rely on it.
        site.output.replace_all_uses_with(match_layout(gm, new, val(site.output), after))
        return new
    if site.terms is not None:
        new = insert_call(gm, torch.ops.fxfuse.sum_norm.default, (list(site.terms), list(site.params), spec), after)
    else:
        new = insert_call(gm, torch.ops.fxfuse.add_norm.default, (site.x, site.residual, list(site.params), spec), after)
    _copy_source(site.anchor, new)
    with graph.inserting_after(new):
        y = graph.call_function(operator.getitem, (new, 0))
    with graph.inserting_after(y):
        s = graph.call_function(operator.getitem, (new, 1))
    y.meta.update(site.output.meta)
    s.meta.update(site.sum_node.meta)
    y.meta["val"], s.meta["val"] = new.meta["val"]
    site.output.replace_all_uses_with(match_layout(gm, y, val(site.output), after))
    # Only uses outside the site move to the fused sum: the site's own nodes (which read the sum
    # before the fused op exists) become dead and are removed.
    site.sum_node.replace_all_uses_with(match_layout(gm, s, val(site.sum_node), after),
                                        delete_user_cb=lambda user: user not in site.interior)
    return new


def _copy_source(src: Node, dst: Node) -> None:
    if src.meta.get("stack_trace"):
        dst.meta["stack_trace"] = src.meta["stack_trace"]
