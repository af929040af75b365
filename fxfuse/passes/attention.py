"""Attention fusion: ``softmax(score terms(q @ k^T)) @ v``, written any way, becomes one operator.

Recognition anchors on ``aten._softmax``, or ``aten._safe_softmax`` (SDPA's math decomposition emits
it: a row whose every score is -inf gives 0, not NaN; the spec's ``safe_softmax``), and walks back
through the score terms (scalar and tensor factors, boolean fills, additive masks and biases, casts;
between them, views that only split or merge the scores' leading dims, as MBart's) and a layout-only
chain (views, permutes, expands) to the product of queries and keys (``bmm``, ``mm`` for 2-D
single-head code, or ``baddbmm``/``addmm``, whose scale and bias become the first score steps), then
forward through casts, at most one dropout (training; what counts as dropout is in
``attention_dropout.py``) and a layout-only chain to the ``bmm`` (or ``mm``) with the values.
When the output is read only through a head merge, the operator is asked to write it in that order
(the merge is a view). The operator computes on the products' own operands, so whatever built q, k
and v (head splits, einsum's permutes, a scaled query) cannot be misread; where an operand is a
copy, permutation or head-repeat of an earlier tensor, that tensor is read in place instead
(grouped-query attention's kv heads are never materialised).

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
from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols

from fxfuse import index_expr
from fxfuse.passes.attention_dropout import Dropout, NotDropout, drawn_nearby, dropout_of, metadata_only
from fxfuse.passes.attention_index import Derived, NotIndex, derive, reads_graph_input
from fxfuse.passes.attention_variants import NotVariant, reaches, sigmoid_candidate, sigmoid_decline, sink_form
from fxfuse.passes.attention_layout import (LAYOUT, causal_window, constant_value, head_merge_chain, is_plain_reshape,
                                           layout_chain_back, size_mask_key, source_operand)
from fxfuse.passes.graph import (broadcasts_to, depends_on, dtype, insert_call, insert_seed, is_op, is_python_scalar,
                                 plain_cast, scalar_value, shape, source_of, val)
from fxfuse.passes.pipeline import Match, Miss, PassResult
from fxfuse.passes.symbolic import is_static, known, reroute_size_reads, same, size_args
from fxfuse.spec import dtype_name, to_dtype
from fxfuse.spec_attention import AttentionSpec, ScoreStep

aten = torch.ops.aten

# The products: batched, and 2-D for single-head code (``q @ k.T`` on (L, D) tensors).
_BMM = (aten.bmm.default, aten.mm.default)
# ``beta * bias + alpha * (q @ k^T)`` in one op (BLOOM's ALiBi): recognised as the score product
# followed by a scale and a bias step (see _added_product).
_ADDED = (aten.baddbmm.default, aten.addmm.default)
_PRODUCTS = _BMM + _ADDED
_LOW_PRECISION = (torch.bfloat16, torch.float16)
_FLOATS = (torch.float64, torch.float32, torch.bfloat16, torch.float16)


class Declined(Exception):
    """Raised inside recognition with the reason a site is left as written."""

    def __init__(self, reason: str, shapes: bool = False):
        super().__init__(reason)
        self.shapes = shapes  # the sizes are why (a warning under torch.compile)


@dataclasses.dataclass
class _Site:
    softmax: Node
    qk: Node  # bmm(q_op (N, Lq, D), k_op (N, D, Lk)), or mm of 2-D operands, or baddbmm/addmm
    pv: Node  # bmm(p (N, Lq, Lk), v_op (N, Lk, Dv)), or mm
    lead: tuple[int, int]  # (B, H): the scores' leading dims, a rank-3 site's N as (1, N), rank 2 (1, 1)
    extras: list[Node]
    spec: AttentionSpec
    interior: set[Node]
    sources: dict  # "q"/"k"/"v" -> (source, permutation, groups) or None, see source_operand
    dropout: Dropout | None = None
    product_bias: dict = dataclasses.field(default_factory=dict)  # extra index -> beta: a baddbmm's bias
    notes: tuple = ()  # why a constant mask or bias stayed a tensor input
    split_lead: frozenset = frozenset()  # extras added on flat (B*H, Lq, Lk) scores: viewed as (B, H, …)
    # Extras added on a (B, nW, H, Lq, Lk) view (Swin's windows), by index -> that 5-d shape: read
    # broadcast to (B, nW) and merged to (B*nW, …).
    merge_lead: dict = dataclasses.field(default_factory=dict)


def _scalar_fill(node) -> float | None:
    """The value of a 0-dim constant (``torch.where(m, s, float('-inf'))`` makes a scalar_tensor)."""
    if is_python_scalar(node):
        return float(node)
    # A constant tensor holds its value in its own dtype (a float32 -1e38 is not the Python float).
    value = None
    if is_op(node, aten.scalar_tensor.default) and is_python_scalar(node.args[0]):
        value = float(node.args[0])
    if is_op(node, aten.full.default) and list(node.args[0]) == [] and is_python_scalar(node.args[1]):
        value = float(node.args[1])
    if value is None and isinstance(node, Node) and _zero_dim_float(node):
        # ``torch.tensor(finfo.min)`` in forward (GPT-Neo): a constant the graph holds, lifted
        # (lift_fresh_copy of a get_attr); its value is fixed, so it is read once here.
        t = constant_value(node, node.graph.owning_module, limit=1)
        if isinstance(t, torch.Tensor) and t.dim() == 0 and not isinstance(t, torch._subclasses.FakeTensor):
            value = float(t)
    if value is not None and dtype(node) in (torch.float64, torch.float32, torch.bfloat16, torch.float16):
        value = _fill_in(value, dtype_name(dtype(node)))
    return value



def _zero_dim_float(node: Node) -> bool:
    v = node.meta.get("val")
    return isinstance(v, torch.Tensor) and v.dim() == 0 and v.dtype.is_floating_point


def _fill_in(value: float, dtype: str) -> float:
    """The fill value as the scores' dtype holds it: ``torch.where(m, -1e9, s)`` on float16 scores
    fills -inf (the constant rounds on conversion), and the spec records what is filled, so the
    reference, the backward's float32 recomputation and the kernels all fill that value."""
    return float(torch.tensor(value, dtype=torch.float64).to(to_dtype(dtype)))


class _ScoreLayout(Exception):
    """A layout change between score steps that is not a plain reshape of the leading dims (the
    reason); the caller turns it into a miss once the softmax is known to be an attention's."""


def _score_steps(softmax_in: Node, score_shape: tuple) -> tuple[Node, list[tuple[Node, ScoreStep, Node | None, tuple]],
                                                                  list[Node]]:
    """Walk back from the softmax's input through the score terms to the first non-term node.

    Between two steps the scores may be viewed with their leading dims split or merged (MBart
    adds its mask on a (B, H, Lq, Lk) view of the (B*H, Lq, Lk) scores); each such layout chain is
    proved a row-major reshape that keeps (Lq, Lk), so no element moves between queries or keys.
    Returns (that node, [(node, step, extra tensor or None, the scores' shape at that step)] in
    program order, the layout nodes walked through).
    """
    steps, views = [], []
    x, here = softmax_in, score_shape
    while True:
        if not same(shape(x), here):
            raise _ScoreLayout(f"a score term broadcasts the scores from {list(shape(x) or ())} to {list(here)}; "
                               "attention's score terms keep the scores' shape")
        if dtype(x) not in _FLOATS:  # an integer or boolean tensor is not the scores: the walk ends
            return x, steps[::-1], views
        d = dtype_name(dtype(x))
        a = x.args[0] if isinstance(x, Node) and x.args else None
        if is_op(x, aten.mul.Tensor, aten.mul.Scalar, aten.div.Tensor, aten.div.Scalar) and \
                (factor := scalar_value(x.args[1])) is not None:  # a constant, or a size's (a symbolic head dim's)
            op = "mul" if x.target in (aten.mul.Tensor, aten.mul.Scalar) else "div"
            steps.append((x, ScoreStep(op, d, value=factor), None, here))
        elif is_op(x, aten.add.Tensor, aten.sub.Tensor) and is_python_scalar(x.args[1]) and \
                x.kwargs.get("alpha", 1) == 1:  # s + b, s - b (exactly s + (-b)): sigmoid attention's -log(L)
            value = float(x.args[1]) if x.target == aten.add.Tensor else -float(x.args[1])
            steps.append((x, ScoreStep("add", d, value=value), None, here))
        elif is_op(x, aten.masked_fill.Scalar, aten.masked_fill.Tensor) and _scalar_fill(x.args[2]) is not None:
            steps.append((x, ScoreStep("fill", d, value=_fill_in(_scalar_fill(x.args[2]), d)), x.args[1], here))
        elif is_op(x, aten.where.self) and _scalar_fill(x.args[2]) is not None and isinstance(x.args[1], Node):
            a = x.args[1]  # where(mask, s, fill): fill where the mask is False
            steps.append((x, ScoreStep("fill", d, value=_fill_in(_scalar_fill(x.args[2]), d), invert=True), x.args[0],
                          here))
        elif is_op(x, aten.where.self) and _scalar_fill(x.args[1]) is not None and isinstance(x.args[2], Node):
            a = x.args[2]  # where(mask, fill, s): fill where the mask is True
            steps.append((x, ScoreStep("fill", d, value=_fill_in(_scalar_fill(x.args[1]), d)), x.args[0], here))
        elif is_op(x, aten.add.Tensor, aten.mul.Tensor) and x.kwargs.get("alpha", 1) == 1 and \
                all(isinstance(t, Node) for t in x.args[:2]):
            s0, s1 = x.args[:2]
            # The scores are the operand of the score shape; when both are, the one from a product.
            first = same(shape(s0), here) and (not same(shape(s1), here) or _scores_side(s0, s1, math.prod(here)))
            a, other = (s0, s1) if first else (s1, s0)
            steps.append((x, ScoreStep("add" if x.target == aten.add.Tensor else "mul", d), other, here))
        elif is_op(x, aten.div.Tensor) and isinstance(x.args[1], Node) and same(shape(x.args[0]), here):
            steps.append((x, ScoreStep("div", d), x.args[1], here))
        elif plain_cast(x):
            steps.append((x, ScoreStep("cast", d), None, here))
        elif is_op(x, aten.tanh.default):
            steps.append((x, ScoreStep("tanh", d), None, here))
        elif is_op(x, *LAYOUT) and not is_op(layout_chain_back(x)[0], *_PRODUCTS) and \
                not _outer_product(layout_chain_back(x)[0]):
            # A layout chain between score steps, or between the last one and the softmax (the chain
            # next to the product is the caller's: it may be any proved plain reshape).
            a, chain = layout_chain_back(x)
            _check_lead_reshape(chain, shape(a), here)
            views += chain
            here = shape(a)
        else:
            return x, steps[::-1], views
        x = a


def _window_merge(a: tuple, b: tuple) -> bool:
    """Whether 5-d ``a`` is 4-d ``b`` with its batch dim split in two: Swin's shifted windows view the
    (B*nW, H, Lq, Lk) scores as (B, nW, H, Lq, Lk) to add the per-window mask."""
    return len(a) == 5 and len(b) == 4 and a[0] * a[1] == b[0] and tuple(a[2:]) == tuple(b[1:])


def _check_lead_reshape(chain: list[Node], src: tuple | None, dst: tuple) -> None:
    """Raise _ScoreLayout unless ``chain`` is a row-major reshape of (…, Lq, Lk) scores to (…, Lq, Lk)
    that only splits or merges the leading dims, into a rank of 2 to 4, or of 5 when the first two
    dims merge into the batch dim."""
    ops = ", ".join(dict.fromkeys(getattr(n.target, "__name__", str(n.target)) for n in chain))
    if src is None or not same(tuple(src[-2:]), tuple(dst[-2:])):
        raise _ScoreLayout(f"the scores are reshaped from {list(src or ())} to {list(dst)} ({ops}) between score "
                           "steps, which splits or merges the query or key axis; fused attention takes views "
                           "that only split or merge the leading (batch, head) dims there")
    for a, b in ((src, dst), (dst, src)):
        if len(a) == 5 and not _window_merge(tuple(a), tuple(b)):
            raise _ScoreLayout(f"the scores are viewed from {list(src)} to {list(dst)} ({ops}) between score steps: "
                               "a rank-5 view other than the batch dim split in two (as Swin's windows, (B*nW, H, "
                               "Lq, Lk) as (B, nW, H, Lq, Lk)); fused attention reads that, or views of rank 2 to 4")
        if len(a) not in (2, 3, 4, 5):
            raise _ScoreLayout(f"the scores are viewed from {list(src)} to {list(dst)} ({ops}) between score steps, "
                               f"as rank {len(a)}; fused attention reads views of rank 2 to 4, or the batch dim "
                               "split in two (rank 5, Swin's windows)")
    if not is_plain_reshape(chain, tuple(src), tuple(dst)):
        raise _ScoreLayout(f"the scores pass through a layout change ({ops}) between score steps that reorders "
                           f"them ({list(src)} to {list(dst)}, not a plain reshape of the leading dims); fused "
                           "attention takes views that only split or merge the leading (batch, head) dims there")


def _product_distance(node: Node, numel: int, limit: int = 256) -> int | None:
    """How many ops back the nearest product (q @ k^T) is, walking only through tensors with the
    scores' number of elements (the score steps and their views); None when there is none."""
    frontier, seen = [node], set()
    for depth in range(limit):
        if any(is_op(n, *_PRODUCTS) for n in frontier):
            return depth
        seen.update(frontier)
        frontier = [a for n in frontier for a in n.all_input_nodes
                    if a not in seen and val(a) is not None and val(a).numel() == numel]
        if not frontier:
            return None
    return None


def _scores_side(s0: Node, s1: Node, numel: int) -> bool:
    """Of two operands of a score term that both have the scores' shape (``s + bias`` with a full
    (B, H, Lq, Lk) bias), whether ``s0`` is the scores: the one nearer a product through
    score-sized tensors (however many steps come before it), the left one when neither is."""
    d0, d1 = _product_distance(s0, numel), _product_distance(s1, numel)
    return d0 is not None and (d1 is None or d0 <= d1) or d0 is None and d1 is None


def _outer_product(node) -> bool:
    """``a * b`` of two broadcast operands: einsum's (and matmul's) lowering of a product over a
    dimension of size 1 (attention with head dim 1)."""
    return is_op(node, aten.mul.Tensor) and all(isinstance(a, Node) and shape(a) != shape(node) for a in node.args[:2])


def _near_product(node, depth: int = 8) -> bool:
    """Whether a bmm is among the nearest ancestors: the softmax may belong to an attention."""
    frontier = [node]
    for _ in range(depth):
        if any(is_op(n, *_PRODUCTS) for n in frontier):
            return True
        frontier = [a for n in frontier if isinstance(n, Node) for a in n.all_input_nodes]
    return False


def _check_extra(t: Node, step: ScoreStep, score_shape: tuple, v_root: Node) -> None:
    s = shape(t)
    kind = {"fill": "mask", "add": "bias"}.get(step.op, "factor")
    if not broadcasts_to(s, score_shape):
        raise Declined(f"a {kind} of shape {list(s) if s else '?'} does not broadcast to the scores' shape "
                       f"{list(score_shape)} aligned on the right", shapes=True)
    if step.op == "fill" and dtype(t) != torch.bool:
        raise Declined(f"masked_fill/where takes a {dtype(t)} mask; fused attention reads boolean masks")
    if step.op != "fill" and not dtype(t).is_floating_point:
        raise Declined(f"a score {kind} of dtype {dtype(t)} is not floating point")
    if depends_on(t, v_root):
        raise Declined(f"a score {kind} is computed from the values; attention's score terms depend on "
                       "positions, masks and biases, not on v")
    if kind == "factor" and drawn_nearby(t):
        raise Declined("the scores are multiplied by a random tensor (dropout on the scores, before the softmax); "
                       "fused attention applies dropout to the probabilities, after the softmax")


@dataclasses.dataclass
class _Probabilities:
    """The path from the softmax to the value product."""

    casts: list[Node]
    dropout: Dropout | None
    node: Node  # the probabilities as they enter the layout chain (after casts and dropout)
    chain: list[Node]
    pv: Node


def _probabilities_to_pv(softmax: Node) -> _Probabilities:
    """Walk forward from the softmax through casts and at most one dropout, then a layout chain,
    to the value product; raises Declined for attention-like sites it cannot fuse."""
    try:
        return _walk_probabilities(softmax)
    except NotDropout as why:
        raise Declined(str(why)) from None


def _walk_probabilities(softmax: Node) -> _Probabilities:
    casts, dropout, x = [], None, softmax
    while True:
        users = [u for u in x.users if not metadata_only(x, u)]
        if len(users) != 1:
            break
        user = users[0]
        if plain_cast(user) and len(x.users) == 1:
            casts.append(user)
            x = user
        elif dropout is None and (found := dropout_of(x, user)) is not None:
            dropout = found
            x = found.out
        else:
            break
    p_node, chain = x, []
    while len(x.users) == 1 and is_op(next(iter(x.users)), *LAYOUT):
        x = next(iter(x.users))
        chain.append(x)
    users = list(x.users)
    if dropout is None:
        for n in (softmax, *casts, *chain):
            for u in n.users:
                dropout_of(n, u)  # a random factor that is not dropout says why
    pv = [u for u in users if is_op(u, *_BMM)]
    if len(users) == 1 and pv and pv[0].args[0] is x:
        return _Probabilities(casts, dropout, p_node, chain, pv[0])
    if len(users) == 1 and is_op(users[0], *_ADDED) and users[0].args[1] is x:
        raise Declined(f"the value product is {users[0].target.__name__.split('.')[0]}, which adds a tensor to "
                       "p @ v; fused attention ends with the plain product (add the tensor after it)")
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
        if is_op(node, *_PRODUCTS):
            return True
        if len(node.users) != 1:
            return any(is_op(u, *_PRODUCTS) for u in node.users)
        node = next(iter(node.users))
    return False


def _root(node: Node) -> Node:
    """The tensor an operand is a view/copy of (for the "computed from the values" check)."""
    while is_op(node, *LAYOUT, aten.repeat_interleave.self_int) and isinstance(node.args[0], Node):
        node = node.args[0]
    return node


def _added_product(qk: Node, v_root: Node) -> tuple[str, list[tuple[ScoreStep, Node | None]], float]:
    """``baddbmm(bias, q, k^T, beta=b, alpha=a)`` (or ``addmm``) as (score dtype, steps, beta).

    The op computes ``b * bias + a * (q @ k^T)`` with one rounding: in bfloat16/float16 the
    product is accumulated in float32 and rounded only after alpha and the bias are applied (on
    CPU and in cuBLAS alike). So the steps are, in the float32 scores: ``* a``, ``+ bias`` (the
    operator is given ``b * bias``, computed in float32 before the call), then one cast back;
    in float32/float64 the same steps in that dtype. ``beta=0`` reads no bias (its NaN and inf are
    ignored, as in eager); alpha=0 is declined.
    """
    bias, beta, alpha = qk.args[0], qk.kwargs.get("beta", 1), qk.kwargs.get("alpha", 1)
    name = qk.target.__name__.split(".")[0]
    if not (is_python_scalar(beta) and is_python_scalar(alpha)):
        raise Declined(f"{name}'s beta or alpha is not a constant; fused attention takes them from the graph")
    if alpha == 0:
        raise Declined(f"{name} with alpha=0 ignores q @ k^T: the scores are the bias alone, not attention")
    if beta == 0 and any(n.op == "placeholder" for n in _ancestors(bias)):
        # Eager gives such an input a zero gradient through baddbmm; the fused operator would not
        # read it at all, and its gradient would be missing instead (None), which optimizers treat
        # differently (no weight decay, no momentum step).
        raise Declined(f"{name} with beta=0 ignores its input tensor, which is computed from a graph input "
                       "(it may need eager's zero gradient); pass a tensor built in forward (torch.empty) instead")
    d = dtype(qk)
    acc = torch.float32 if d in _LOW_PRECISION else d
    steps: list[tuple[ScoreStep, Node | None]] = []
    if alpha != 1:
        steps.append((ScoreStep("mul", dtype_name(acc), value=float(alpha)), None))
    if beta != 0:
        _check_extra(bias, ScoreStep("add", dtype_name(acc)), shape(qk), v_root)
        steps.append((ScoreStep("add", dtype_name(acc)), bias))
    if not steps:  # a plain product: one rounding of q @ k^T, as a bmm
        return dtype_name(d), [], beta
    if acc != d:
        steps.append((ScoreStep("cast", dtype_name(d)), None))
    return dtype_name(acc), steps, beta


def _ancestors(node: Node) -> set[Node]:
    seen, todo = set(), [node]
    while todo:
        n = todo.pop()
        if isinstance(n, Node) and n not in seen:
            seen.add(n)
            todo.extend(n.all_input_nodes)
    return seen


def _recognise(softmax: Node, gm: torch.fx.GraphModule) -> _Site:
    sigmoid = softmax.target == aten.sigmoid.default
    try:  # a sink column joined to the scores (gpt-oss), or sigmoid attention (attention_variants.py)
        sink = None if sigmoid else sink_form(softmax)
        if sigmoid:
            sigmoid_decline(softmax)
    except NotVariant as why:
        if not reaches(softmax, *_BMM):  # its result meets no value product: not attention, stays silent
            raise _NotAttention from None
        raise Declined(str(why)) from None
    x = sink.scores if sink else softmax.args[0]
    dim = -1 if sigmoid else softmax.args[1]
    after = sink.slice if sink else softmax  # the probabilities' walk to the value product starts here
    score_shape = shape(x)
    if score_shape is None:
        raise _NotAttention
    # Sizes may be symbols (dynamic shapes): every comparison below holds for all their values
    # (symbolic.same), so the rewrite is valid for every shape the compiled graph serves.
    # A softmax whose probabilities reach a value product is a candidate: whatever its scores are,
    # it is fused or declined with a reason (_probabilities_to_pv raises _NotAttention otherwise,
    # and the site stays silent; how far the score side's product is decides nothing).
    try:
        start, steps, views = _score_steps(x, score_shape)
    except _ScoreLayout as why:
        _probabilities_to_pv(after)  # not attention at all (no value product): stays silent
        raise Declined(str(why), shapes=True) from None
    qk, score_chain = layout_chain_back(start)
    if not is_op(qk, *_PRODUCTS):
        _probabilities_to_pv(after)
        if _outer_product(qk):
            raise Declined("q @ k^T is computed as a broadcast elementwise product (einsum or matmul over a head "
                           "dim of size 1 lowers to mul), not a matrix product; fused attention reads bmm/matmul "
                           "scores (with head dim 1 there is little to gain from fusing)")
        raise Declined(f"the scores pass through {getattr(start.target, '__name__', start.target)} between "
                       "q @ k^T and the softmax; fused attention takes scales, masks, biases, casts and "
                       "tanh soft-capping there")
    rank = len(score_shape)
    probs = _probabilities_to_pv(after)
    casts, p_chain, pv, p_node = probs.casts, probs.chain, probs.pv, probs.node
    if dim % rank != rank - 1:
        raise Declined(f"the softmax runs over dim {dim} (the query axis) of the {rank}-d scores; attention "
                       "normalizes each query's scores over the keys (the last dim)")
    safe = softmax.target == aten._safe_softmax.default
    upcast = _safe_softmax_dtype(softmax, x) if safe else None
    if sigmoid and probs.dropout:
        raise Declined("dropout on sigmoid attention's probabilities: not fused yet")
    if sigmoid and not is_op(qk, aten.bmm.default):
        raise _NotAttention  # a sigmoid of a 2-D or added product: an MLP's gate as often as attention
    if not safe and not sigmoid and len(softmax.args) > 2 and softmax.args[2]:  # _softmax's half_to_float
        raise Declined("the softmax upcasts half to float internally (half_to_float); not fused yet")
    start_shape = tuple(shape(start))  # the scores as the first step (or the softmax) reads them
    shapes = [tuple(score_shape), start_shape, *(tuple(here) for *_, here in steps)]
    windows = [s for s in shapes if len(s) == 5]  # (B, nW, H, Lq, Lk) views of (B*nW, H, Lq, Lk) scores
    if any(len(s) not in (2, 3, 4, 5) for s in shapes):
        bad = next(len(s) for s in shapes if len(s) not in (2, 3, 4, 5))
        raise Declined(f"the scores have rank {bad}; fused attention reads (L, L), (B*H, L, L) or (B, H, L, L) "
                       "scores (and (B, nW, H, L, L) views of (B*nW, H, L, L) ones)", shapes=True)
    product_shape = tuple(shape(qk))  # (N, Lq, Lk) of a batched product, (Lq, Lk) of a 2-D one
    n, (lq, lk) = math.prod(product_shape[:-2]), product_shape[-2:]
    if not same(math.prod(start_shape[:-2]), n) or not same(start_shape[-2:], (lq, lk)) or not \
            is_plain_reshape(score_chain, product_shape, start_shape):
        raise Declined("the scores reach the softmax through a layout change that is not a plain reshape of "
                       "q @ k^T (transposed or permuted), so the softmax does not run over the key axis", shapes=True)
    if not same(shape(pv.args[0]), product_shape) or not is_plain_reshape(p_chain, tuple(shape(p_node)), product_shape):
        raise Declined("the probabilities reach the value product through a layout change (transposed, "
                       "permuted or broadcast), so the product does not contract the key axis", shapes=True)
    v_op = pv.args[1]
    operands = {"q": qk.args[-2], "k": qk.args[-1], "v": v_op}
    sizes_from_data = [n for t in (x, *operands.values()) for n in (shape(t) or ())
                       if isinstance(n, torch.SymInt) and free_unbacked_symbols(n) and not known(n != 0)]
    if sizes_from_data:
        raise Declined(f"a size of the site ({sizes_from_data[0]}) is read from a tensor's values (e.g. a torch.split by "
                       "lengths.tolist(), as vision towers split per image) and may be 0, which the fused kernel "
                       "does not compute as eager does; it is left as written", shapes=True)
    if any(known(n == 0) for t in (x, *operands.values()) for n in (shape(t) or ())):
        sizes = ", ".join(f"{name} {list(shape(t) or ())}" for name, t in operands.items())
        raise Declined(f"the site is empty ({sizes}, scores {list(score_shape)}): a size is 0, so there is "
                       "nothing to compute; it is left as written (eager returns the empty result)")
    if dtype(qk) not in _FLOATS:
        raise Declined(f"q @ k^T is a {dtype(qk)} product; fused attention computes floating-point scores")
    score_dtype, head, beta = dtype_name(dtype(qk)), [], 1
    if is_op(qk, *_ADDED):
        score_dtype, head, beta = _added_product(qk, _root(v_op))
    # (B, H): the split of every 4-d view of the scores (one split only: a step's tensor is read
    # aligned on the right of (B, H, Lq, Lk), so two splits would read it two ways).
    splits = []
    for s in shapes:
        if len(s) == 4 and not any(same(s[:2], seen) for seen in splits):
            splits.append(tuple(s[:2]))
    if len(splits) > 1:
        raise Declined(f"the scores are viewed with two different (batch, head) splits {sorted(splits) if all(map(is_static, splits)) else splits} between "
                       "q @ k^T and the softmax; fused attention reads one (B, H) split", shapes=True)
    lead = splits.pop() if splits else (1, n)
    op_shape = (*lead, lq, lk)  # the scores as the operator reads them
    if any(not _window_merge(w, op_shape) for w in windows):
        raise Declined(f"the scores are viewed as {list(windows[0])}, which is not their (B, H) = {list(lead)} "
                       "split with the batch dim split in two; fused attention cannot read a step there")
    extras, kinds, spec_steps, product_bias, notes, split_lead, merge_lead = [], [], [], None, [], set(), {}
    size_mask, size_key = -1, ""
    for step, extra in head:  # the added product's own steps: its bias has the product's shape
        if extra is not None:
            step = dataclasses.replace(step, input=len(extras))
            product_bias = len(extras)
            extras.append(extra)
            kinds.append("bias")
        spec_steps.append(step)
    for node, step, extra, here in steps:
        if extra is not None:
            _check_extra(extra, step, here, _root(v_op))
            # Read aligned on the right, the tensor meets the same scores in (B, H, Lq, Lk) as in
            # this step's shape, except on flat (B*H, Lq, Lk) scores with B > 1: its own B*H dim
            # is then split into (B, H) for the operator (a view).
            window_step = len(here) == 5  # its tensor is read with the windows merged into the batch dim
            aligned = not window_step and same(tuple(here), op_shape[4 - len(here):])
            flat = not aligned and not window_step and len(shape(extra)) == 3 and not same(shape(extra)[0], 1)
            mask = constant_value(extra, gm) if step.op == "fill" and not window_step else None
            window = causal_window(~mask if step.invert else mask, lq, lk) if mask is not None else None
            derived, split = None, None
            if window is None and step.op in ("fill", "add") and aligned:
                unproved: list = []
                derived = _index_form(extra, step, here, gm, mask, unproved)
                split = split_bias(extra, here, gm) if derived is None and step.op == "add" else None
                notes += unproved if split is None else []
            elif step.op in ("fill", "add") and window_step:
                derived = _window_index_form(extra, step, here, op_shape, node, gm, notes)
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
            elif split is not None:  # s + (tensor + expression): the tensor read as a bias, the rest computed
                tensor, derived = split
                index = len(extras)
                extras.append(tensor)
                kinds.append("bias")
                expr = index_expr.relabel_loads(derived.expr, {k: len(extras) + k for k in range(len(derived.heads))})
                extras += derived.heads
                kinds += ["head"] * len(derived.heads)
                step = dataclasses.replace(step, input=index, expr=expr)
            else:
                # At symbolic sizes: a mask only the sizes decide is checked against the causal
                # rule once per shape when the site runs (Hugging Face's mask builders).
                if step.op == "fill" and aligned and size_mask < 0 and \
                        (key := size_mask_key(extra, gm, lq, lk, step.invert)) is not None:
                    size_mask, size_key = len(extras), key
                step = dataclasses.replace(step, input=len(extras))
                if flat:
                    split_lead.add(len(extras))
                if window_step:
                    merge_lead[len(extras)] = tuple(here)
                extras.append(extra)
                kinds.append({"fill": "mask", "add": "bias"}.get(step.op, "factor"))
        spec_steps.append(step)
    if upcast is not None:  # _safe_softmax(s, dtype=...) is the softmax of s.to(dtype)
        spec_steps.append(ScoreStep("cast", dtype_name(upcast)))
    sinks = -1
    if sink is not None:  # read per query row, aligned on the right of (B, H, Lq, 1) as the scores are
        if not same(tuple(score_shape), op_shape[4 - len(score_shape):]):
            raise Declined(f"the sink column is joined to scores of shape {list(score_shape)}, another (batch, head) "
                           f"split than the site's {list(op_shape)}; fused attention sinks read (B, H, Lq, 1)",
                           shapes=True)
        if depends_on(sink.column, _root(v_op)):
            raise Declined("the sink logits are computed from the values; attention's sinks are learned logits")
        sinks = len(extras)
        extras.append(sink.column)
        kinds.append("sink")
    q_op, k_op = qk.args[-2:]
    sources = {"q": source_operand(q_op, lead, False, False), "k": source_operand(k_op, lead, True, True),
               "v": source_operand(v_op, lead, False, True)} if len(product_shape) == 3 else \
        {"q": None, "k": None, "v": None}
    k_groups = sources["k"][2] if sources["k"] else 1
    v_groups = sources["v"][2] if sources["v"] else 1
    if k_groups != v_groups:  # the operator maps one kv head to a group of query heads for both
        sources["k"] = sources["v"] = None
    spec = AttentionSpec(
        score_dtype=score_dtype, steps=tuple(spec_steps), prob_dtype=dtype_name(dtype(p_node)),
        inputs=tuple(kinds), kv_groups=k_groups if k_groups == v_groups else 1,
        dropout=probs.dropout.rate if probs.dropout else 0.0, safe_softmax=safe, sinks=sinks,
        normalizer="sigmoid" if sigmoid else "softmax", size_mask=size_mask, size_key=size_key,
    )
    dropped = probs.dropout.nodes if probs.dropout else []
    interior = {qk, *score_chain, *(s[0] for s in steps), *views, softmax, *casts, *dropped, *p_chain, pv,
                *([*sink.nodes, sink.slice] if sink else [])}
    site = _Site(softmax, qk, pv, lead, extras, spec, interior, sources, probs.dropout,
                 {product_bias: beta} if product_bias is not None else {}, tuple(notes), frozenset(split_lead),
                 merge_lead)
    reroute_size_reads(gm, interior - {pv}, interior)
    _check_no_escape(site, {softmax, *casts, *p_chain, *([probs.dropout.out] if probs.dropout else []),
                            *([sink.slice] if sink else [])})
    return site


def _safe_softmax_dtype(softmax: Node, scores: Node) -> torch.dtype | None:
    """The dtype ``_safe_softmax(s, dim, dtype)`` casts the scores to first, or None when it casts
    nothing. Only a cast from 16 bits to float32 is taken (a "cast" step before the softmax): a narrowing one could
    turn a finite score into -inf after ``_safe_softmax`` has checked the uncast scores for -inf, so
    a row it leaves NaN would be one the fused softmax zeroes."""
    want = softmax.args[2] if len(softmax.args) > 2 else softmax.kwargs.get("dtype")
    have = dtype(scores)
    if want is None or want == have:
        return None
    if want == torch.float32 and have in _LOW_PRECISION:
        return want
    raise Declined(f"the safe softmax casts the {dtype_name(have)} scores to {want} first; fused attention takes "
                   "only a cast from 16 bits to float32 there")


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


def _window_index_form(extra: Node, step: ScoreStep, here, op_shape, before: Node, gm, notes: list) -> Derived | None:
    """The proved index expression of a mask or bias added on the (B, nW, H, Lq, Lk) view of the
    scores (Swinv2 adds its shift mask, built from ``arange`` in forward, there), read on the
    (B*nW, H, Lq, Lk) scores the operator sees: derived from the broadcast-and-merge the operator's
    input would be (``_windows_merged``, inserted for the derivation and removed again), so the
    window of batch entry b is ``b % nW``. None: the tensor is merged as before."""
    merged = _windows_merged(gm, extra, here, before)
    try:
        return _index_form(merged, step, op_shape, gm, None, notes)
    finally:
        node = merged
        while node is not extra:  # the inserted chain, unused whatever the outcome
            arg = node.args[0]
            gm.graph.erase_node(node)
            node = arg


def split_bias(extra: Node, score_shape, gm, allow_heads: bool = True) -> tuple[Node, Derived] | None:
    """(tensor, proved expression) when a bias that is not an index expression is the sum of a
    tensor and one (transformers' Swin adds its relative-position bias, gathered from a learned
    table, to its shift mask, built from ``arange``, before the scores): the kernel then reads the
    tensor, computes the rest, and adds the two as the user did (one rounding, in their common
    dtype; a float sum is the same either way round). None otherwise (the bias stays one tensor)."""
    if not is_op(extra, aten.add.Tensor) or extra.kwargs.get("alpha", 1) != 1 or len(extra.args) != 2 or \
            not all(isinstance(a, Node) for a in extra.args):
        return None
    a, b = extra.args
    if not dtype(extra).is_floating_point or dtype(a) != dtype(extra) or dtype(b) != dtype(extra):
        return None  # a promoting sum rounds one operand first; not split
    for tensor, other in ((a, b), (b, a)):
        try:
            derived = derive(other, score_shape, gm, allow_heads=allow_heads)
        except NotIndex:
            continue
        if derived.expr[1] == dtype_name(dtype(extra)):
            return tensor, derived
    return None


def _check_no_escape(site: _Site, probabilities: set[Node]) -> None:
    for node in site.interior - {site.pv}:
        outside = [u for u in node.users if u not in site.interior]
        if outside:
            what = "probabilities" if node in probabilities else \
                "dropout mask" if site.dropout and node in site.dropout.nodes else "scores"
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
        operand = insert_call(gm, aten.transpose.int, (operand, -2, -1), site.pv)
    # Splitting the batch dim (or adding unit dims to a 2-D operand) is a view at any strides.
    return insert_call(gm, aten.view.default, (operand, size_args(gm, [b, h, *shape(operand)[-2:]], site.pv)), site.pv)


def _product_bias(gm, site: _Site, index: int) -> Node:
    """A baddbmm's bias as the operator reads it: ``beta * bias`` (in float32 for a 16-bit site,
    whose steps run in float32), its batch dim split into (B, H) to align with the scores."""
    bias, beta = site.extras[index], site.product_bias[index]
    acc = to_dtype(site.spec.score_dtype)  # the dtype of the product's steps (see _added_product)
    if beta != 1:
        if dtype(bias) != acc:
            bias = insert_call(gm, aten._to_copy.default, (bias,), site.pv, {"dtype": acc})
        bias = insert_call(gm, aten.mul.Tensor, (bias, beta), site.pv)
    s = shape(bias)
    b, h = site.lead
    if len(s) == 3 and not same(s[0], 1) and not same(b, 1):  # (B*H, x, y) -> (B, H, x, y): aligned on the right
        bias = insert_call(gm, aten.view.default, (bias, size_args(gm, [b, h, *s[1:]], site.pv)), site.pv)
    return bias


def _windows_merged(gm, extra: Node, windows: tuple, before: Node) -> Node:
    """A tensor added on (B, nW, H, Lq, Lk) scores, as the operator reads it on (B*nW, H, Lq, Lk):
    broadcast along (B, nW) where it varies along either (a copy of B*nW of its (H|1, Lq|1, Lk|1)
    slices; Swin's mask is (1, nW, 1, N, N)), then the two merged; a plain view when it varies
    along neither."""
    s = (1,) * (5 - len(shape(extra))) + tuple(shape(extra))
    e = extra if len(shape(extra)) == 5 else insert_call(gm, aten.view.default, (extra, list(s)), before)
    if s[0] == 1 and s[1] == 1:
        return insert_call(gm, aten.view.default, (e, [1, *s[2:]]), before)
    e = insert_call(gm, aten.expand.default, (e, [windows[0], windows[1], *s[2:]]), before)
    return insert_call(gm, aten.reshape.default, (e, [windows[0] * windows[1], *s[2:]]), before)


def _replace(gm: torch.fx.GraphModule, site: _Site) -> Node:
    q_op, k_op = site.qk.args[-2:]
    v_op = site.pv.args[1]
    q = _operand_4d(gm, q_op, site, "q")
    k = _operand_4d(gm, k_op, site, "k")
    v = _operand_4d(gm, v_op, site, "v")
    # A per-head input of an index expression is read as its (1|B, 1|H, 1, 1) view; a baddbmm's
    # bias is scaled by its beta.
    extras = [insert_call(gm, aten.reshape.default, (e[0], size_args(gm, e[1], site.pv)), site.pv)
              if isinstance(e, tuple) else
              _product_bias(gm, site, i) if i in site.product_bias else
              _windows_merged(gm, e, site.merge_lead[i], site.pv) if i in site.merge_lead else
              insert_call(gm, aten.view.default, (e, size_args(gm, [*site.lead, *shape(e)[1:]], site.pv)), site.pv)
              if i in site.split_lead
              else e for i, e in enumerate(site.extras)]
    # When the output only reaches the rest of the graph through a head merge (transpose(1, 2)
    # then reshape to (B, Lq, H * Dv)), the operator writes it in that order and the merge is a view.
    merge = head_merge_chain(site.pv, site.lead)
    seed = None
    if site.dropout:  # a fresh seed each call; autograd saves it, so the backward redraws the same mask
        seed = insert_seed(gm, site.pv, site.pv)
    args = (q, k, v, extras, site.spec.to_json())
    if seed is not None or merge is not None:
        args += (seed,) + ((True,) if merge is not None else ())
    fused = insert_call(gm, torch.ops.fxfuse.attention.default, args, site.pv)
    if site.softmax.meta.get("stack_trace"):
        fused.meta["stack_trace"] = site.softmax.meta["stack_trace"]
    replaced = set(site.interior)
    if merge is None:
        out = insert_call(gm, aten.view.default, (fused, size_args(gm, shape(site.pv), site.pv)), site.pv)
        site.pv.replace_all_uses_with(out)
    else:
        heads_last = insert_call(gm, aten.permute.default, (fused, [0, 2, 1, 3]), site.pv)  # contiguous
        out = insert_call(gm, aten.view.default, (heads_last, size_args(gm, shape(merge), site.pv)), site.pv)
        merge.replace_all_uses_with(out)
        node = merge
        while node is not site.pv:  # the merge chain, now unused
            replaced.add(node)
            node = node.args[0]
    if site.dropout:
        # Random draws are never dead code to the graph (they advance the generator): the
        # replaced site's are removed here, last user first.
        order = {n: i for i, n in enumerate(gm.graph.nodes)}
        for node in sorted(replaced, key=order.__getitem__, reverse=True):
            if not node.users:
                gm.graph.erase_node(node)
    return fused


def site_shape(fused: Node) -> str:
    """The sizes a fused attention call reads, in words: ``B 2, H 8, GQA 8→2, Lq 128, Lk 128, D 64``."""
    q, k, v = (val(a) for a in fused.args[:3])
    b, h, lq, d = q.shape
    hkv, lk, dv = k.shape[1], k.shape[2], v.shape[3]
    heads = f"H {h}" + (f", GQA {h}→{hkv}" if hkv != h else "")
    lengths = f"L {lq}" if lq == lk else f"Lq {lq}, Lk {lk}"
    dims = f"D {d}" if d == dv else f"D {d}, Dv {dv}"
    return f"B {b}, {heads}, {lengths}, {dims}"


@dataclasses.dataclass(frozen=True)
class FuseAttention:
    name: str = "fuse-attention"

    def __call__(self, gm: torch.fx.GraphModule) -> PassResult:
        import fxfuse.ops  # noqa: F401  (the rewritten graph calls torch.ops.fxfuse.attention)

        result = PassResult(self.name)
        for node in list(gm.graph.nodes):
            if not is_op(node, aten._softmax.default, aten._safe_softmax.default, aten.sigmoid.default) or \
                    node.graph is not gm.graph:
                continue
            if is_op(node, aten.sigmoid.default) and not sigmoid_candidate(node):
                continue  # a gate or an activation, not attention's normaliser (attention_variants.py)
            source, code = source_of(node)
            try:
                site = _recognise(node, gm)
            except _NotAttention:
                continue
            except Declined as why:
                result.misses.append(Miss("attention", source, str(why), code, shapes=why.shapes))
                continue
            fused = _replace(gm, site)
            result.matches.append(Match("attention", source, site.spec, fused.name, code, site.notes, site_shape(fused)))
            result.changed += 1
        return result
