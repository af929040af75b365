"""Small questions recognition passes ask of an ATen FX graph, answered from ``node.meta``."""
from __future__ import annotations

import os
import re

import torch
from torch.fx import Node

aten = torch.ops.aten


def val(node) -> torch.Tensor | None:
    """The fake tensor a node produces, or None (scalars, tuples, unknown)."""
    v = node.meta.get("val") if isinstance(node, Node) else None
    return v if isinstance(v, torch.Tensor) else None


def shape(node) -> tuple | None:
    v = val(node)
    return tuple(v.shape) if v is not None else None


def dtype(node) -> torch.dtype | None:
    v = val(node)
    return v.dtype if v is not None else None


def is_op(node, *targets) -> bool:
    return isinstance(node, Node) and node.op == "call_function" and node.target in targets


def is_python_scalar(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def size_scalar(x) -> float | None:
    """The value of a scalar computed from symbolic sizes (``q.size(-1) ** -0.5`` with a symbolic
    head dim), guarded: the graph then runs only where it has this value, and Dynamo compiles
    again for another (the kernels specialise on the head dim anyway). None for anything else,
    and for a scalar read from a tensor's data (no guard can be put on it)."""
    from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode, free_unbacked_symbols, guard_scalar

    v = x.meta.get("val") if isinstance(x, Node) else None
    if not isinstance(v, (torch.SymInt, torch.SymFloat)) or free_unbacked_symbols(v):
        return None
    try:
        return float(guard_scalar(v))
    except GuardOnDataDependentSymNode:
        return None


def scalar_value(x) -> float | None:
    """A Python number's value, or a size scalar's (``size_scalar``, guarded); else None."""
    return float(x) if is_python_scalar(x) else size_scalar(x)


_LIBRARY_DIRS = tuple(
    os.path.dirname(os.path.abspath(p)) + os.sep for p in (torch.__file__, os.path.dirname(os.path.abspath(__file__)))
)
# fxfuse files whose code is a user's model (the demo), so their lines are the user's lines.
_USER_FACING_FILES = (os.sep + "demo.py",)


def source_of(node: Node) -> tuple[str, str]:
    """The user's ``file:line`` and source line for a node, from its recorded stack trace."""
    trace = node.meta.get("stack_trace") or ""
    frames = re.findall(r'File "([^"]+)", line (\d+), in [^\n]*\n\s*([^\n]*)', trace)
    # The last frame outside torch's and fxfuse's own installed files is the user's line (by
    # prefix: a user's checkout may well live in a folder called fxfuse or torch).
    for path, line, code in reversed(frames):
        if os.path.abspath(path).startswith(_LIBRARY_DIRS) and not path.endswith(_USER_FACING_FILES):
            continue
        return f"{path}:{line}", code.strip()
    if frames:
        path, line, code = frames[-1]
        return f"{path}:{line}", code.strip()
    return "<unknown>", ""


def depends_on(node, target: Node) -> bool:
    """Whether ``node`` is computed (transitively) from ``target``."""
    if not isinstance(node, Node):
        return False
    seen, todo = set(), [node]
    while todo:
        n = todo.pop()
        if n is target:
            return True
        if n in seen or n.op == "placeholder":
            continue
        seen.add(n)
        todo.extend(n.all_input_nodes)
    return False


def last_dim_only(dims, rank: int) -> bool:
    """Whether a reduction's ``dim`` argument is exactly the last dimension."""
    if dims is None:
        return rank == 1
    dims = [dims] if isinstance(dims, int) else list(dims)
    return len(dims) == 1 and dims[0] % max(rank, 1) == rank - 1


# ---- casts --------------------------------------------------------------------------------------

def plain_cast(node) -> bool:
    """``x.to(dtype)``: a dtype change only (no device/layout change, no copy semantics)."""
    if not is_op(node, aten._to_copy.default):
        return False
    extra = set(node.kwargs) - {"dtype", "layout", "device", "memory_format"}
    v, src = val(node), val(node.args[0])
    return not extra and v is not None and src is not None and v.device == src.device and v.dtype.is_floating_point


def strip_cast(node: Node) -> Node:
    return node.args[0] if plain_cast(node) else node


# (mantissa bits, exponent bits): a cast is exact when the target has at least as many of both.
FLOAT_FORMATS = {torch.float64: (53, 11), torch.float32: (24, 8), torch.bfloat16: (8, 8), torch.float16: (11, 5)}


def exact_cast(src: torch.dtype | None, dst: torch.dtype | None) -> bool:
    """Whether every value of ``src`` is representable in ``dst`` (bf16 -> f32 yes, f32 -> bf16 no)."""
    if src is None or dst is None:
        return False
    if src == dst:
        return True
    a, b = FLOAT_FORMATS.get(src), FLOAT_FORMATS.get(dst)
    return a is not None and b is not None and b[0] >= a[0] and b[1] >= a[1]


def holds_values_of(node: Node, x: Node) -> bool:
    """``node`` is x, or x cast exactly (an upcast): it holds x's values unchanged."""
    return node is x or (strip_cast(node) is x and exact_cast(dtype(x), dtype(node)))


def keepdim_of(node: Node, position: int) -> bool:
    """A reduction's keepdim flag, given positionally at ``position`` or by keyword."""
    return bool(node.args[position] if len(node.args) > position else node.kwargs.get("keepdim", False))


def broadcasts_to(s, target) -> bool:
    """Whether shape ``s`` broadcasts to ``target`` aligned on the right, as a fused operator reads it."""
    if s is None or len(s) > len(target):
        return False
    from fxfuse.passes.symbolic import same

    # For every value of the size symbols (a guess at the example sizes would add a guard).
    return all(same(a, 1) or same(a, b) for a, b in zip(reversed(s), reversed(target)))


def is_random(node) -> bool:
    """Whether a node draws random numbers (bernoulli, rand, native_dropout, ...)."""
    return isinstance(node, Node) and node.op == "call_function" and \
        torch.Tag.nondeterministic_seeded in getattr(node.target, "tags", ())


def insert_seed(gm: torch.fx.GraphModule, like: Node, before: Node) -> Node:
    """A fresh random int64 seed, a 0-dim tensor on ``like``'s device, drawn each time the graph
    runs (a random op of the graph, so make_fx, AOTAutograd and the rewritten module all keep it)."""
    fake = val(like)
    kwargs = {"dtype": torch.int64, "device": fake.device}
    args = (0, 2**62, [])
    with gm.graph.inserting_before(before):
        node = gm.graph.call_function(aten.randint.low, args, kwargs)
    with fake.fake_mode:
        node.meta["val"] = aten.randint.low(*args, **kwargs)
    return node


def insert_call(gm: torch.fx.GraphModule, target, args, before: Node, kwargs: dict | None = None) -> Node:
    """Insert ``target(*args, **kwargs)`` before ``before``, its meta computed from the arguments' fake values."""
    kwargs = kwargs or {}
    with gm.graph.inserting_before(before):
        node = gm.graph.call_function(target, args, kwargs)
    fake_args = torch.fx.node.map_arg(args, lambda a: a.meta["val"])
    fake = next(a for a in torch.utils._pytree.tree_leaves(fake_args) if isinstance(a, torch.Tensor))
    with fake.fake_mode:
        node.meta["val"] = target(*fake_args, **kwargs)
    return node


# ---- layouts ------------------------------------------------------------------------------------
# A fused operator's output must have the strides the code it replaces produced: the rest of the
# graph (a head merge's ``view``, a ``linear``'s flattening view, AOTAutograd's plan of the
# backward) was traced on them, and a ``view`` that was legal there fails on other strides.

def same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal shapes and equal strides along every dim of size > 1 (a size-1 dim's stride is
    never read), as far as it is known without adding a guard."""
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    if len(a.shape) != len(b.shape):
        return False
    for n, m, s, t in zip(a.shape, b.shape, a.stride(), b.stride()):
        if not statically_known_true(n == m):
            return False
        if not statically_known_true(n <= 1) and not statically_known_true(s == t):
            return False
    return True


def insert_relayout(gm: torch.fx.GraphModule, node: Node, like: torch.Tensor, before: Node) -> Node:
    """``node``'s values copied into ``like``'s dense layout: permuted to ``like``'s memory order,
    made contiguous, permuted back (differentiable and functional: no ``copy`` or ``as_strided``)."""
    from torch._prims_common import compute_elementwise_output_logical_to_physical_perm

    perm, _ = compute_elementwise_output_logical_to_physical_perm(like)
    if list(perm) == list(range(like.dim())):
        return insert_call(gm, aten.clone.default, (node,), before, {"memory_format": torch.contiguous_format})
    inverse = [perm.index(d) for d in range(len(perm))]
    ordered = insert_call(gm, aten.permute.default, (node, list(perm)), before)
    dense = insert_call(gm, aten.clone.default, (ordered,), before, {"memory_format": torch.contiguous_format})
    return insert_call(gm, aten.permute.default, (dense, inverse), before)


def match_layout(gm: torch.fx.GraphModule, node: Node, like: torch.Tensor | None, before: Node) -> Node:
    """``node``, or its values in ``like``'s layout where its own differs (see insert_relayout)."""
    got = val(node)
    if like is None or got is None or same_layout(got, like):
        return node
    return insert_relayout(gm, node, like, before)
