"""RoPE fusion: rotary position embeddings applied to q and k right before a fused attention.

Runs after the attention passes: for each ``fxfuse.attention`` call whose q (or k) operand is
``x * cos + rotate(x) * sin`` and is read by nothing else, the call becomes
``fxfuse.attention_rope`` on the unrotated x, and the kernels rotate as they load (see
fxfuse.ops.attention_rope), so the rotated copy is never written. The rotations recognised:

* "half" (transformers' Llama, GPT-NeoX, Qwen, Mistral: ``rotate_half``): ``cat(-x2, x1)`` of the
  head dim's halves, taken by slicing at D/2 or by ``chunk(2, -1)``;
* "interleaved" (GPT-J's ``rotate_every_two``): ``stack(-x[..., 1::2], x[..., ::2], -1)``
  flattened, the same rotation on pairs (2j, 2j+1); Meta's complex form (``view_as_complex``) is
  in ``attention_rope_complex``.

What is proved: the rotation spans the whole head dim (halves split at exactly D/2, or every
pair); x, cos, sin and every op's result share x's dtype (the operator rounds as they do); cos
and sin broadcast to x's (B, H, L, D) with size 1 on the head dim, their last dim D and their
length dim L or 1; between the rotation and the operand there is at most a permutation (permutes,
transposes, and an unsqueeze of a batch-less (L, H, D) tensor, as vision towers write it) or a head
copy (repeat_kv's expand and reshape, proved by replaying it on index tensors to keep (b, l, d) and
take one head per (b, h', l) row: a rotation commutes with it); the rotated tensor has no other user (a rotated k stored in a KV cache stays
as written: a miss says so). Partial rotary (GPT-NeoX's ``rotary_pct``, Phi: only the first
rotary_dim < D dims rotated, then a cat) is not recognised: it is left as written (the product's
operand is then a cat, not a rotation).
"""
from __future__ import annotations

import dataclasses
import operator

import torch
from torch.fx import Node

from fxfuse.ops.attention_rope import IN_FLOAT32  # the style suffix of a rotation in float32
from fxfuse.passes import attention_rope_complex as complex_rope
from fxfuse.passes.attention_layout import _replay, layout_chain_back
from fxfuse.passes.graph import dtype, insert_call, is_op, shape, source_of, val
from fxfuse.passes.pipeline import Match, Miss, PassResult
from fxfuse.passes.symbolic import is_static, same, size_args
from fxfuse.spec_attention import AttentionSpec

aten = torch.ops.aten
_END = 2**62  # a slice's end at or past this is "to the end" (Python's sys.maxsize)


class NotRope(Exception):
    """The operand is not a rotation (nothing to report)."""


class Declined(Exception):
    """A rotation that cannot be fused: the reason."""


@dataclasses.dataclass
class Rope:
    x: Node  # the unrotated operand
    cos: Node | None
    sin: Node | None
    style: str  # "half" or "interleaved", "/float32" appended for a rotation in float32 (Meta's, 16-bit)
    freqs: Node | None = None  # Meta's complex form: freqs_cis, whose parts the tables are (cos, sin None)


def _dim(d: int, rank: int) -> int:
    return d + rank if d < 0 else d


def _slice(node, x_rank: int) -> tuple[Node, int, int, int] | None:
    """(source, start, end, step) of a slice along the last dim, else None."""
    if not is_op(node, aten.slice.Tensor):
        return None
    src, dim, start, end, step = (list(node.args) + [0, None, None, 1][len(node.args) - 1:])[:5]
    if not isinstance(src, Node) or _dim(dim, x_rank) != x_rank - 1:
        return None
    return src, start or 0, _END if end is None else end, step


def _halves(first: Node, second: Node, d: int):
    """x when ``first`` and ``second`` are x's head-dim halves [0, D/2) and [D/2, D), else None."""
    rank = len(shape(first) or ())
    if is_op(first, operator.getitem) and is_op(second, operator.getitem) and first.args[0] is second.args[0]:
        # chunk(2, -1) / split(D/2, -1): items 0 and 1 of one split
        split = first.args[0]
        if not is_op(split, aten.split.Tensor, aten.split_with_sizes.default):
            return None
        sizes = split.args[1]
        dim = split.args[2] if len(split.args) > 2 else split.kwargs.get("dim", 0)
        halves = sizes == d // 2 if isinstance(sizes, int) else list(sizes) == [d // 2, d // 2]
        if halves and _dim(dim, rank) == rank - 1 and (first.args[1], second.args[1]) == (0, 1):
            return split.args[0]
        return None
    a, b = _slice(first, rank), _slice(second, rank)
    if a is None or b is None or a[0] is not b[0] or a[3] != 1 or b[3] != 1:
        return None
    if (a[1], min(a[2], d), b[1], min(b[2], d)) != (0, d // 2, d // 2, d):
        return None
    return a[0]


def _pairs(even: Node, odd: Node, d: int):
    """x when ``even`` is x[..., ::2] and ``odd`` x[..., 1::2], else None."""
    rank = len(shape(even) or ())
    a, b = _slice(even, rank), _slice(odd, rank)
    if a is None or b is None or a[0] is not b[0] or (a[1], a[3], b[1], b[3]) != (0, 2, 1, 2):
        return None
    return a[0] if a[2] >= d and b[2] >= d else None


def rotation_of(r: Node, d: int) -> tuple[Node, str] | None:
    """(x, style) when ``r`` is rotate_half(x) or rotate_every_two(x), else None."""
    if is_op(r, aten.cat.default) and len(r.args[0]) == 2 and \
            _dim(r.args[1] if len(r.args) > 1 else 0, len(shape(r))) == len(shape(r)) - 1:
        neg, first = r.args[0]
        if is_op(neg, aten.neg.default):
            x = _halves(first, neg.args[0], d)
            if x is not None:
                return x, "half"
    # rotate_every_two: stack((-x2, x1), -1) is unsqueeze + cat on a new last dim, then flatten
    # (a view/reshape back to (..., D)).
    if is_op(r, aten.view.default, aten.reshape.default, aten._unsafe_view.default):
        stacked = r.args[0]
        if is_op(stacked, aten.stack.default) and len(stacked.args[0]) == 2 and len(shape(stacked)) == len(shape(r)) + 1 \
                and _dim(stacked.args[1] if len(stacked.args) > 1 else 0, len(shape(stacked))) == len(shape(r)) \
                and same(tuple(shape(stacked)[-2:]), (d // 2, 2)):
            neg, first = stacked.args[0]
            if is_op(neg, aten.neg.default):
                x = _pairs(first, neg.args[0], d)
                if x is not None:
                    return x, "interleaved"
    return None


def _muls(node) -> list[tuple[Node, Node]]:
    """(a, b) and (b, a) of a tensor product ``a * b``."""
    if not is_op(node, aten.mul.Tensor) or not all(isinstance(a, Node) for a in node.args[:2]):
        return []
    a, b = node.args[:2]
    return [(a, b), (b, a)]


def match_rope(node: Node, perm: list[int], lifted: bool = False) -> Rope:
    """The rotation ``node`` computes, or NotRope / Declined (see the module docstring); ``perm``
    permutes ``node`` (with a size-1 dim put first when ``lifted``: an (L, H, D) tensor without
    batch dim) to the operator's (B, H, L, D)."""
    try:
        if not lifted:  # the complex form is matched on (B, L, H, D) or (B, H, L, D) only
            x, freqs, in_float32 = complex_rope.match_complex(node, perm, Declined)
            return Rope(x, None, None, "interleaved/float32" if in_float32 else "interleaved", freqs)
    except complex_rope.NotComplexRope:
        pass
    cast = None
    if is_op(node, aten._to_copy.default) and is_op(node.args[0], aten.add.Tensor):
        cast, node = node, node.args[0]  # a rotation in float32 rounded back (Qwen2-VL's vision RoPE)
    if not is_op(node, aten.add.Tensor) or node.kwargs.get("alpha", 1) != 1 or len(node.args) != 2 or \
            not all(isinstance(a, Node) for a in node.args):
        raise NotRope()
    s = shape(node)
    if s is None or len(s) != (3 if lifted else 4) or not is_static(s[-1:]):
        raise NotRope()
    d = s[-1]
    for plain, rotated in (node.args, node.args[::-1]):
        for x, cos in _muls(plain):
            for r, sin in _muls(rotated):
                found = rotation_of(r, d) if d % 2 == 0 else None
                if found is not None and found[0] is x:
                    rope = Rope(x, cos, sin, found[1])
                    _check(node, rope, (plain, rotated, r), perm, lifted)
                    return rope if cast is None else _in_float32(rope, cast)
    raise NotRope()


def _in_float32(rope: Rope, cast: Node) -> Rope:
    """The rotation of ``x.float()`` rounded back to x's 16-bit dtype by ``cast``: the style's float32
    form, read from the 16-bit x (its tables are float32)."""
    source = complex_rope.upcast_source(rope.x, cast)
    if source is None:
        raise Declined(f"the rotation runs in {dtype(rope.x)} and is cast to {dtype(cast)}; fused RoPE rotates in "
                       "q's dtype, or in float32 on a 16-bit q that is cast back to its dtype once")
    return dataclasses.replace(rope, x=source, style=rope.style + IN_FLOAT32)


def _check(node: Node, rope: Rope, parts, perm: list[int], lifted: bool = False) -> None:
    want = dtype(rope.x)
    for n in (node, rope.cos, rope.sin, *parts):
        if dtype(n) != want:
            raise Declined(f"the rotation mixes dtypes ({n.name} is {dtype(n)}, q/k {want}); fused RoPE computes "
                           "x * cos + rotate(x) * sin in x's dtype: cast cos and sin to q's dtype first "
                           "(as transformers' rotary embeddings do)")
    if not same(shape(rope.x), shape(node)):
        raise Declined("the rotation broadcasts q/k to another shape")
    operand = [((1,) * lifted + tuple(shape(node)))[p] for p in perm]  # (B, H, L, D) as the operator reads it
    for name, t in (("cos", rope.cos), ("sin", rope.sin)):
        ts = shape(t)
        if ts is None or len(ts) > 4:
            raise Declined(f"{name} has no known shape of rank <= 4")
        ts = [((1,) * (4 - len(ts)) + tuple(ts))[p] for p in perm]
        if not (same(ts[-1], operand[-1]) and same(ts[1], 1) and (same(ts[2], 1) or same(ts[2], operand[2]))
                and (same(ts[0], 1) or same(ts[0], operand[0]))):
            raise Declined(f"{name} (read as {list(ts)}) does not broadcast over the heads of q/k ({list(operand)}) "
                           "as a (1|B, 1, 1|L, D) table; fused RoPE reads one row of D per position")


def _table(gm, t: Node, perm: list[int], before: Node) -> Node:
    """The cos or sin tensor as the operator reads it, (1|B, 1|L, D) in the operator's (B, H, L, D)
    order (``perm`` is the permutation from the rotated tensor to the operand)."""
    ts = (1,) * (4 - len(shape(t))) + tuple(shape(t))
    t4 = t if len(shape(t)) == 4 else insert_call(gm, aten.view.default, (t, size_args(gm, list(ts), before)), before)
    if perm != [0, 1, 2, 3]:
        t4 = insert_call(gm, aten.permute.default, (t4, perm), before)
    return insert_call(gm, aten.select.int, (t4, 1, 0), before)


def _head_copy(chain: list[Node], src: tuple) -> bool:
    """Whether layout ``chain`` (repeat_kv's unsqueeze, expand, clone, reshape) maps (B, H, L, D)
    ``src`` to (B, H', L, D) so that element (b, h', l, d) comes from (b, h, l, d) with h the same
    for every d: the rotation (along d, with tables indexed by b, l, d) then commutes with it.
    Replayed on index tensors, exact at these static shapes."""
    out = shape(chain[-1])
    if not (is_static(src) and is_static(out)) or len(out) != 4 or src[0] != out[0] or tuple(src[2:]) != tuple(out[2:]):
        return False
    idx = _replay(chain, tuple(src))
    if idx is None or tuple(idx.shape) != tuple(out):
        return False
    b, h, l, d = torch.unravel_index(idx, tuple(src))
    grid = torch.meshgrid(*(torch.arange(n) for n in out), indexing="ij")
    return torch.equal(b, grid[0]) and torch.equal(l, grid[2]) and torch.equal(d, grid[3]) and \
        bool((h == h[..., :1]).all())


_MOVES = (aten.permute.default, aten.transpose.int, aten.unsqueeze.default)


def _moved_dims(arg: Node) -> tuple[Node, list, list[Node]] | None:
    """When ``arg`` is a tensor moved by permute/transpose/unsqueeze only (a vision tower's
    ``x.transpose(0, 1).unsqueeze(0)`` on (L, H, D)): (the tensor, for each of arg's dims the dim of
    it that it is or None for a new size-1 dim, the moves in program order); else None."""
    moves, node = [], arg
    while is_op(node, *_MOVES) and isinstance(node.args[0], Node):
        moves.append(node)
        node = node.args[0]
    if not moves or shape(node) is None:
        return None
    dims: list = list(range(len(shape(node))))
    for m in reversed(moves):
        rank = len(dims)
        if m.target is aten.permute.default:
            dims = [dims[_dim(p, rank)] for p in m.args[1]]
        elif m.target is aten.transpose.int:
            a, b = _dim(m.args[1], rank), _dim(m.args[2], rank)
            dims[a], dims[b] = dims[b], dims[a]
        else:
            dims.insert(_dim(m.args[1], rank + 1), None)
    return node, dims, moves[::-1]


def _operand(arg: Node) -> tuple[Node, list[int], list[Node], bool]:
    """The tensor an operand of the fused call reads: (it, the permutation to the operand, the head
    copy between them (see _head_copy), [] when none, whether it is (L, H, D) without a batch dim:
    the permutation is then of it with a size-1 dim put first)."""
    moved = _moved_dims(arg)
    if moved is not None and len(moved[1]) == 4:
        root, dims, _ = moved
        new = [i for i, d in enumerate(dims) if d is None]
        if not new:
            return root, dims, [], False
        if len(new) == 1 and len(shape(root)) == 3 and same(shape(arg)[new[0]], 1):
            return root, [0 if d is None else d + 1 for d in dims], [], True
    root, chain = layout_chain_back(arg)
    if chain and _head_copy(chain, shape(root)):
        return root, [0, 1, 2, 3], chain, False
    return arg, [0, 1, 2, 3], [], False


def _rotations(fused: Node, misses: list) -> dict:
    """{"q"|"k": (Rope, perm, head copy, lifted)} for the operands that are fusable rotations (see _operand)."""
    found = {}
    for name, arg in (("q", fused.args[0]), ("k", fused.args[1])):
        root, perm, chain, lifted = _operand(arg)
        if perm[3] != 3:
            continue
        try:
            rope = match_rope(root, perm, lifted)
        except NotRope:
            continue
        except Declined as why:
            misses.append(f"RoPE on {name}: {why}")
            continue
        between = chain or (_moved_dims(arg) or (None, None, [arg] if arg is not root else []))[2]
        others = [u for n in [root, *between] for u in n.users if u is not fused and u not in between]
        if others:
            misses.append(f"RoPE on {name} stays as written: the rotated {name} ({root.name}) is also used by "
                          f"{others[0].name} (a KV cache, or returned); fusing would drop that use")
            continue
        found[name] = (rope, perm, chain, lifted)
    return found


def _replace(gm, fused: Node, found: dict) -> Node:
    spec = AttentionSpec.from_json(fused.args[4])
    spec = dataclasses.replace(spec, **{f"rope_{n}": rope.style for n, (rope, *_) in found.items()})
    q, k = fused.args[:2]
    tables = []
    for name, (rope, perm, chain, lifted) in found.items():
        x = insert_call(gm, aten.unsqueeze.default, (rope.x, 0), fused) if lifted else rope.x
        x = x if perm == [0, 1, 2, 3] else insert_call(gm, aten.permute.default, (x, perm), fused)
        for node in chain:  # the same head copy, of the unrotated tensor
            x = insert_call(gm, node.target, (x, *node.args[1:]), fused, dict(node.kwargs))
        q, k = (x, k) if name == "q" else (q, x)
        cos, sin = (rope.cos, rope.sin) if rope.freqs is None else complex_rope.tables(gm, rope.freqs, fused)
        tables += [_table(gm, cos, perm, fused), _table(gm, sin, perm, fused)]
    args = (q, k, fused.args[2], fused.args[3], tables, spec.to_json(), *fused.args[5:])
    return replace_with_rope_call(gm, fused, args)


def replace_with_rope_call(gm: torch.fx.GraphModule, fused: Node, args: tuple, kwargs: dict | None = None) -> Node:
    """Put ``fxfuse.attention_rope(*args)`` in place of the fused attention call ``fused`` (the
    user's source line kept), which it must match in shape; returns the new call."""
    new = insert_call(gm, torch.ops.fxfuse.attention_rope.default, args, fused, kwargs)
    new.meta["stack_trace"] = fused.meta.get("stack_trace")
    assert same(tuple(val(new).shape), tuple(val(fused).shape))
    fused.replace_all_uses_with(new)
    gm.graph.erase_node(fused)
    return new


@dataclasses.dataclass(frozen=True)
class FuseRope:
    name: str = "fuse-rope"

    def __call__(self, gm: torch.fx.GraphModule) -> PassResult:
        import fxfuse.ops  # noqa: F401  (the rewritten graph calls torch.ops.fxfuse.attention_rope)

        result = PassResult(self.name)
        gm.graph.eliminate_dead_code()  # the attention passes leave the products' operand chains dead
        for node in list(gm.graph.nodes):
            if not is_op(node, torch.ops.fxfuse.attention.default):
                continue
            source, code = source_of(node)
            reasons: list[str] = []
            found = _rotations(node, reasons)
            for reason in reasons:
                result.misses.append(Miss("rope", source, reason, code))
            if not found:
                continue
            new = _replace(gm, node, found)
            spec = AttentionSpec.from_json(new.args[5])
            result.matches.append(Match("rope", source, spec, new.name, code))
            result.changed += 1
        return result
