"""Proofs for the attention pass that rest on evaluating the graph, not on reading its ops.

Two kinds of fact are proved here, both exactly at the graph's static shapes:

* Layout: a chain of element-renaming ops (views, permutes, expands, copies) is replayed on an
  ``arange`` index tensor, so the result says where every element comes from. That proves a
  chain is a plain row-major reshape (the softmax still runs over the key axis, the value product
  still contracts it), and finds the tensor a product's operand is a permutation or head-repeat
  of, so the fused operator can read q, k and v in place (grouped-query kv heads unrepeated).
* Constant masks: a boolean mask built by a small deterministic subgraph that reads no graph
  input is evaluated, and replaced by the causal (or sliding-window) rule only when its values
  are exactly that rule.

They live apart from recognition (``fxfuse/passes/attention.py``) because they are the pass's
soundness argument: each answers "is this rewrite exact?" and returns None/False when unsure.
"""
from __future__ import annotations

import hashlib
import itertools
import math

import sympy
import torch
from torch.fx import Node

from fxfuse.passes import layout_symbolic
from fxfuse.passes.graph import is_op, shape
from fxfuse.passes.symbolic import divides, hint, is_static, same

aten = torch.ops.aten

# Ops that only rename elements (no arithmetic): a chain of them between a product and the
# softmax is allowed when replaying it on an index tensor shows it is a plain reshape.
LAYOUT = (aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.expand.default,
          aten.permute.default, aten.transpose.int, aten.unsqueeze.default, aten.squeeze.dim,
          aten.clone.default, aten.alias.default, aten.t.default)

_MAX_CONSTANT_NODES = 40  # constant mask subgraphs evaluated to prove causality stay this small
_MAX_SIZE_MASK_NODES = 200  # transformers' mask builders take about 45 ATen ops (arange, index, cumsum)
_MAX_CONSTANT_NUMEL = 1 << 22
# Boolean masks may be larger: a 16k x 16k causal mask is 256 MiB once, at capture, and proving it
# causal is what lets the kernel skip hidden tiles and keep memory linear in the length.
_MAX_MASK_NUMEL = 1 << 28


def _concrete(args) -> bool:
    flat = []
    for a in args:
        flat.extend(a if isinstance(a, (list, tuple)) else [a])
    return all(not isinstance(a, (Node, torch.SymInt)) for a in flat)


def _replay(chain: list[Node], src_shape: tuple) -> torch.Tensor | None:
    """Where each element of ``chain``'s result comes from: the layout ops (first applied first)
    replayed on ``arange`` over a ``src_shape`` tensor (exact, at these shapes); None if unknown."""
    numel = math.prod(src_shape)
    if numel > _MAX_CONSTANT_NUMEL:
        return None
    idx = torch.arange(numel).reshape(src_shape)
    for node in chain:
        if not _concrete(node.args[1:]):
            return None
        if node.target in (aten.view.default, aten._unsafe_view.default, aten.reshape.default):
            idx = idx.reshape(node.args[1])  # same values as the view; the strides may differ
        else:
            idx = node.target(idx, *node.args[1:], **{k: v for k, v in node.kwargs.items() if k != "memory_format"})
    return idx


_RESHAPES = (aten.view.default, aten._unsafe_view.default, aten.reshape.default)
_COPIES = (aten.clone.default, aten.alias.default)


def _keeps_row_major_order(chain: list[Node]) -> bool:
    """Every op of ``chain`` keeps the elements in row-major order: reshapes (views are defined on
    row-major order whatever the strides), copies, and expands to the input's own shape. Such a
    chain is a plain reshape at any size, so it needs no replay."""
    for node in chain:
        if node.target in _RESHAPES or node.target in _COPIES:
            continue
        if node.target == aten.expand.default and same(shape(node), shape(node.args[0])):
            continue
        return False
    return True


def is_plain_reshape(chain: list[Node], src_shape: tuple, dst_shape: tuple) -> bool:
    """Whether ``chain`` maps a ``src_shape`` tensor to its row-major reshape to ``dst_shape``
    (for every value of the size symbols, when there are some)."""
    if not same(math.prod(src_shape), math.prod(dst_shape)):
        return False
    if _keeps_row_major_order(chain):
        return same(tuple(shape(chain[-1]) if chain else src_shape), tuple(dst_shape))
    if not (is_static(src_shape) and is_static(dst_shape)):
        return same(tuple(shape(chain[-1])), tuple(dst_shape)) and \
            layout_symbolic.is_row_major(layout_symbolic.replay(chain, src_shape))
    idx = _replay(chain, src_shape)
    return idx is not None and tuple(idx.shape) == tuple(dst_shape) and \
        torch.equal(idx, torch.arange(idx.numel()).reshape(dst_shape))


def source_operand(operand: Node, lead: tuple[int, int], transposed: bool, grouped: bool):
    """The tensor a product's operand was copied, repeated or transposed from, read in place.

    ``operand`` is (B*H, L, D) (or (B*H, D, L) when ``transposed``: the keys of q @ k^T). Walking
    back through its layout ops, the farthest 4-d tensor R of which it is, element for element, a
    dims permutation to (B, Hkv, L, D) with each kv head repeated H/Hkv times (``grouped``: keys
    and values of grouped-query attention) is returned as (R, permutation, H/Hkv); None when there
    is none (the operand is then used as it is). The replay on index tensors is the proof.
    """
    b, h = lead
    n, rows, cols = shape(operand)
    l, d = (cols, rows) if transposed else (rows, cols)
    node, chain = layout_chain_back(operand, through_full_slices=True)
    candidates = [node] + [c for c in chain[:-1]]  # the farthest first: it saves the most copies
    if not isinstance(h, int):
        return None  # the head count is a symbol: no grouping is proved
    for i, root in enumerate(candidates):
        rs = shape(root)
        if rs is None or len(rs) != 4:
            continue
        if not is_static(rs) or not is_static((b, n, l, d)):
            found = _symbolic_source(chain[i:], rs, (b, h, l, d), transposed, grouped)
            if found is not None:
                return root, *found
            continue
        idx = _replay(chain[i:], rs)
        if idx is None:
            continue
        for perm in itertools.permutations(range(4)):
            hkv = rs[perm[1]]
            if (rs[perm[0]], rs[perm[2]], rs[perm[3]]) != (b, l, d) or h % hkv or (hkv != h and not grouped):
                continue
            base = torch.arange(math.prod(rs)).reshape(rs).permute(perm)
            want = base.unsqueeze(2).expand(b, hkv, h // hkv, l, d).reshape(n, l, d)
            if torch.equal(idx, want.transpose(1, 2) if transposed else want):
                return root, list(perm), h // hkv
    return None


def _full_slice(node: Node) -> bool:
    """``x[:, :]``-style ``aten.slice`` that keeps every element (transformers' repeat_kv indexes
    ``hidden[:, :, None, :, :]``): the identity."""
    if not is_op(node, aten.slice.Tensor) or not isinstance(node.args[0], Node):
        return False
    start = node.args[2] if len(node.args) > 2 else 0
    step = node.args[4] if len(node.args) > 4 else 1
    a, b = shape(node), shape(node.args[0])
    return start in (0, None) and step == 1 and a is not None and b is not None and len(a) == len(b) and \
        all(same(x, y) for x, y in zip(a, b))


def repeated_heads(operand: Node, h: int) -> tuple[Node, int] | None:
    """(R, groups) when the 4-d (B, H, L, D) ``operand`` is R (B, H/groups, L, D) with each head
    repeated ``groups`` times in a row (transformers' ``repeat_kv``: expand + reshape, or
    ``repeat_interleave`` on the heads), read through a chain of layout ops; None otherwise. R is
    the farthest 4-d tensor along the chain that proves it (the keys' RoPE output, the values'
    transposed projection). The replay of the rest of the chain is the proof: on index tensors at
    static sizes, on symbolic layouts otherwise."""
    os_ = shape(operand)
    if os_ is None or len(os_) != 4 or not isinstance(h, int):
        return None
    root, chain = layout_chain_back(operand, through_full_slices=True)
    for i, start in enumerate([root] + chain[:-1]):
        found = _repeats(start, chain[i:], os_, h)
        if found:
            return start, found
    return None


def _repeats(root: Node, chain: list[Node], os_: tuple, h: int) -> int | None:
    rs = shape(root)
    if rs is None or len(rs) != 4 or not isinstance(rs[1], int) or rs[1] == h or h % rs[1] or \
            not all(same(a, b) for a, b in zip((rs[0], rs[2], rs[3]), (os_[0], os_[2], os_[3]))):
        return None
    hkv, groups = rs[1], h // rs[1]
    if is_static(rs) and is_static(os_):
        idx = _replay(chain, rs)
        want = torch.arange(math.prod(rs)).reshape(rs).unsqueeze(2).expand(rs[0], hkv, groups, *rs[2:]).reshape(os_)
        return groups if idx is not None and tuple(idx.shape) == tuple(os_) and torch.equal(idx, want) else None
    got = layout_symbolic.replay(chain, rs)
    b, heads, l, d = layout_symbolic.row_major(rs)
    want = [b, heads + [(sympy.Integer(groups), sympy.Integer(0))], l, d]
    return groups if got is not None and layout_symbolic.same_layout(got, want) else None


def _symbolic_source(chain: list[Node], rs: tuple, sizes: tuple, transposed: bool, grouped: bool):
    """source_operand's proof at symbolic sizes: the chain's layout over ``rs`` equals a dims
    permutation of it with each kv head repeated, for every value of the symbols; (perm, groups)."""
    b, h, l, d = sizes
    got = layout_symbolic.replay(chain, rs)
    if got is None:
        return None
    for perm in itertools.permutations(range(4)):
        hkv = rs[perm[1]]
        if not (same(rs[perm[0]], b) and same(rs[perm[2]], l) and same(rs[perm[3]], d)) or \
                not isinstance(hkv, int) or not divides(hkv, h) or (hkv != h and not grouped):
            continue
        want = layout_symbolic.grouped_heads(rs, list(perm), h // hkv, transposed)
        if layout_symbolic.same_layout(got, want):
            return list(perm), h // hkv
    return None


def layout_chain_back(node: Node, through_full_slices: bool = False) -> tuple[Node, list[Node]]:
    """Walk back from ``node`` through layout ops: (first non-layout node, chain in program order).
    With ``through_full_slices`` the walk also passes slices that keep every element, leaving them
    out of the chain (they are the identity)."""
    chain = []
    while isinstance(node, Node) and node.args and isinstance(node.args[0], Node):
        if is_op(node, *LAYOUT):
            chain.append(node)
        elif not (through_full_slices and _full_slice(node)):
            break
        node = node.args[0]
    return node, chain[::-1]



def _is_size(n: Node) -> bool:
    return isinstance(n.meta.get("val"), torch.SymInt) and n.op in ("placeholder", "call_function")


def _input_free_subgraph(node: Node, max_nodes: int, through_sizes: bool) -> list[Node] | None:
    """The nodes ``node`` is computed from (itself included; with ``through_sizes`` the walk stops at
    symbolic sizes, which are listed), or None when a graph input's values take part, an op gives
    other values each time it runs (random or uninitialised), or there are more than ``max_nodes``."""
    order, todo, seen = [], [node], set()
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        if through_sizes and _is_size(n):
            order.append(n)
            continue
        if n.op not in ("call_function", "get_attr") or len(seen) > max_nodes:
            return None  # a graph input (placeholder) takes part: the value is not known here
        if n.op == "call_function" and not _repeatable(n.target):
            return None  # random or uninitialised values: one evaluation proves nothing about the next
        order.append(n)
        todo.extend(n.all_input_nodes)
    return order


def constant_value(node: Node, gm: torch.fx.GraphModule, limit: int | None = None,
                   at_hints: bool = False, max_nodes: int = _MAX_CONSTANT_NODES) -> torch.Tensor | None:
    """Evaluate a small subgraph that depends on no graph input (a mask built from ones/arange);
    None when it reads one, or its result has more than ``limit`` elements (by default 2^28 for
    boolean masks, 2^22 for other tensors). With ``at_hints`` the subgraph may read symbolic sizes
    (a SymInt input, a tensor's ``sym_size``): it is evaluated at their example values, which
    proves nothing about other sizes (the caller's argument must cover those)."""
    order = _input_free_subgraph(node, max_nodes, at_hints)
    if order is None:
        return None
    env: dict[Node, object] = {}
    for n in sorted(order, key=_position(gm).__getitem__):
        try:
            if n.op == "get_attr":
                env[n] = getattr(gm, n.target)
                continue
            if at_hints and isinstance(n.meta.get("val"), torch.SymInt):
                env[n] = hint(n.meta["val"])
                continue
            args = torch.fx.node.map_arg(n.args, env.__getitem__)
            kwargs = torch.fx.node.map_arg(n.kwargs, env.__getitem__)
            if "device" in kwargs:
                kwargs = {**kwargs, "device": torch.device("cpu")}
            env[n] = n.target(*args, **kwargs)
        except Exception:
            return None
    out = env[node]
    if not isinstance(out, torch.Tensor):
        return None
    limit = limit or (_MAX_MASK_NUMEL if out.dtype == torch.bool else _MAX_CONSTANT_NUMEL)
    return out.cpu() if out.numel() <= limit else None


def size_mask_key(node: Node, gm: torch.fx.GraphModule, lq, lk, invert: bool) -> str | None:
    """For a boolean mask that only sizes decide, each of them a dim of the mask (so its shape
    decides its values, at every size: fxfuse.ops.size_masks checks it once per shape), a key
    naming the function from its shape to its values: a digest of its subgraph, with each size
    written in terms of the mask's dims. Two masks with one key compute the same values at the
    same shape, so they may share a verdict. None when something else enters the values, or when
    the mask does not hide (where True, or False with ``invert``) the causal or sliding-window
    rule's scores at the example sizes (the check would be wasted work)."""
    if shape(node) is None or node.meta["val"].dtype != torch.bool or is_static((lq, lk)):
        return None
    dims = {d.node.expr: sympy.Symbol(f"dim{i}") for i, d in enumerate(shape(node))
            if isinstance(d, torch.SymInt) and d.node.expr.is_Symbol}
    subgraph = _input_free_subgraph(node, _MAX_SIZE_MASK_NODES, through_sizes=True)
    if subgraph is None:
        return None
    sizes = {}
    for n in filter(_is_size, subgraph):
        size = n.meta["val"].node.expr
        if not size.free_symbols <= set(dims):
            return None  # a size the mask's shape does not show (or one read from data)
        sizes[n] = sympy.srepr(size.xreplace(dims))
    example = constant_value(node, gm, at_hints=True, max_nodes=_MAX_SIZE_MASK_NODES)
    from fxfuse.ops.size_masks import causal_window as window_of

    if example is None or hint(lq) > hint(lk) or \
            window_of(~example if invert else example, hint(lq), hint(lk)) is None:
        return None
    return _subgraph_digest(gm, set(subgraph), sizes)


def _subgraph_digest(gm, nodes: set, sizes: dict) -> str:
    """A digest of what the nodes compute: each node's op and arguments in program order, the
    nodes it reads named by their place, sizes by their expressions, constants by their values."""
    names, lines = {}, []
    for n in sorted(nodes, key=_position(gm).__getitem__):
        if n in sizes:
            text = f"size {sizes[n]}"
        elif n.op == "get_attr":
            t = getattr(gm, n.target)
            text = f"constant {t.dtype} {tuple(t.shape)} {hashlib.sha256(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()}"
        else:
            args = torch.fx.node.map_arg((n.args, n.kwargs), names.__getitem__)
            text = f"{n.target} {args!r}"
        names[n] = f"%{len(names)}"
        lines.append(text)
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:20]


def _repeatable(target) -> bool:
    name = getattr(target, "__name__", str(target))
    tags = getattr(target, "tags", ())
    return torch.Tag.nondeterministic_seeded not in tags and "empty" not in name and "rand" not in name


def _position(gm) -> dict[Node, int]:
    return {n: i for i, n in enumerate(gm.graph.nodes)}


def causal_window(mask: torch.Tensor, lq: int, lk: int) -> int | None:
    """For a boolean mask (broadcast to (…, Lq, Lk)) that hides exactly the keys after each query,
    0; that also hides those ``w`` or more keys before it (a sliding window), ``w``; else None."""
    from fxfuse.ops.size_masks import causal_window as window_of

    if not isinstance(lq, int) or not isinstance(lk, int):
        return None  # a symbolic length: one mask's values prove nothing about another length's
    return window_of(mask, lq, lk)


def _swap_perm(node: Node) -> list[int] | None:
    """The dims permutation a permute/transpose node applies (None for other ops)."""
    rank = len(shape(node))
    if node.target == aten.permute.default:
        return [d % rank for d in node.args[1]]
    if node.target == aten.transpose.int:
        a, b = (d % rank for d in node.args[1:3])
        perm = list(range(rank))
        perm[a], perm[b] = perm[b], perm[a]
        return perm
    if node.target == aten.t.default and rank == 2:
        return [1, 0]
    return None


def head_merge_chain(pv: Node, lead: tuple[int, int]) -> Node | None:
    """The last node of the layout chain after the value product that merges the heads, or None.

    The product ``pv`` holds the output ``(B, H, Lq, Dv)`` (lead = (B, H)) in row-major order
    (reshaped to (B*H, Lq, Dv) or (Lq, Dv)). The chain is proved, op by op, to be its row-major
    reshapes and copies, one swap of the head and query dims (``transpose(1, 2)`` of the
    (B, H, Lq, Dv) view, or ``transpose(0, 1)`` of (H, Lq, Dv) when B is 1: fairseq's layout),
    then row-major reshapes and copies again: its result holds the elements in (B, Lq, H, Dv)
    order, which is what the operator writes when asked to (the merge is then a view). Every node
    of the chain must have the next as its only user, so nothing else reads the (B, H, Lq, Dv)
    order. The longest such chain is returned; None when there is no swap.
    """
    b, h = lead
    lq, dv = shape(pv)[-2:]
    node, swapped, end = pv, False, None
    while len(node.users) == 1:
        user = next(iter(node.users))
        if not is_op(user, *LAYOUT) or user.args[0] is not node:
            break
        if _keeps_row_major_order([user]):
            pass
        elif not swapped and _swap_perm(user) is not None and (
                (same(tuple(shape(node)), (b, h, lq, dv)) and _swap_perm(user) == [0, 2, 1, 3]) or
                (same(b, 1) and same(tuple(shape(node)), (h, lq, dv)) and _swap_perm(user) == [1, 0, 2])):
            swapped = True
        else:
            break
        node = user
        if swapped:
            end = node
    return end
