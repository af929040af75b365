"""Swin's shifted windows addressed by index: ``address-windows`` (issue 12, item 6, step 3).

Runs after the attention passes, on each ``fxfuse.attention`` call. Swin computes window
attention as: image ``x`` (B, Hp, Wp, C) -> ``roll(x, (-s, -s), (1, 2))`` -> window partition
(view, permute, copy, view: (B * nW, ws * ws, C)) -> the q, k, v linears -> split heads ->
attention -> merge heads -> the output linear -> window reverse -> ``roll`` by +s. A linear acts on
the last dim only, each row on its own, so it commutes with any renaming of the rows:
``linear(partition(roll(x))) == partition(roll(linear(x)))`` (the same rows multiplied by the same
weight, at the same GEMM shape). Moving the q, k, v linears before the partition and the output
linear after the reverse leaves between the image-layout tensors and the attention only element
renamings, which ``fxfuse.window_attention`` reads as image tensors (spec field ``windows``).

The proof is by replay on index tensors at the graph's static sizes (``_replay`` on ``arange``,
``roll`` included): the linear's input is a renaming of the image's rows (each row whole, its
channels in order); the operand is, element for element, the windows of the linear's output on
the image's rows (``partition`` of fxfuse.ops.attention_windows, for one (ws, shift)); the output
linear reads the attention's output rows in window order, and the chain after it writes row r of
its result from exactly the image position whose window row that is (``reverse``). Anything else
(a shift not rolled back, a permute mixing window and channel dims, strip windows, a window that
does not divide the image, symbolic sizes, a linear whose bias varies by row, a window-layout
tensor something else reads) leaves the site as fuse-attention wrote it, with the reason as a miss
where the site looked like windows (a roll or a rank-6 permute feeds it).
"""
from __future__ import annotations

import dataclasses
import math
import operator

import torch
from torch.fx import Node

from fxfuse.runtime.attention_windows import partition, reverse
from fxfuse.passes.attention_layout import LAYOUT, _replay
from fxfuse.passes.graph import insert_call, is_op, match_layout, shape, source_of, val
from fxfuse.passes.pipeline import Match, Miss, PassResult
from fxfuse.passes.symbolic import is_static
from fxfuse.spec_attention import AttentionSpec

aten = torch.ops.aten
_LINEARS = (aten.addmm.default, aten.mm.default)
_MAX_NUMEL = 1 << 22  # index tensors replayed at capture stay this small


class _Unproved(Exception):
    """Why a site's windows are not addressed (``shapes``: the sizes are why, warned under torch.compile)."""

    def __init__(self, reason: str, shapes: bool = False):
        super().__init__(reason)
        self.shapes = shapes


def _zero_pad(node: Node) -> bool:
    """``F.pad`` by zero on every side (transformers' ``maybe_pad`` when the windows divide the
    image): a copy. A real pad stops the walk (its padded rows are then part of the image)."""
    return is_op(node, aten.constant_pad_nd.default) and not any(node.args[1])


def _movers(node: Node) -> bool:
    """Ops that only move (or pick: ``select``, a fused qkv's ``unbind``) elements, replayed as they are."""
    return is_op(node, *LAYOUT, aten.roll.default, aten.select.int) or _zero_pad(node)


def _unbound(node: Node) -> bool:
    """``unbind(x, dim)[i]`` (a fused qkv split into q, k, v): ``select(x, dim, i)``."""
    return isinstance(node, Node) and node.op == "call_function" and node.target is operator.getitem and \
        is_op(node.args[0], aten.unbind.int) and isinstance(node.args[1], int)


def _chain_back(node: Node) -> tuple[Node, list[Node]]:
    chain = []
    while isinstance(node, Node) and (_movers(node) or _unbound(node)) and isinstance(node.args[0], Node):
        chain.append(node)
        node = node.args[0].args[0] if _unbound(node) else node.args[0]
    return node, chain[::-1]


def _looks_windowed(chain: list[Node]) -> bool:
    return any(is_op(n, aten.roll.default) or
               (is_op(n, aten.permute.default, aten.transpose.int) and len(shape(n)) >= 6) for n in chain)


def _linear_parts(lin: Node) -> tuple[Node, int]:
    """(the linear's input, its position in args), once its bias is proved the same for every row."""
    if lin.kwargs:
        raise _Unproved(f"{lin.name} scales its product or bias (beta/alpha)")
    if is_op(lin, aten.mm.default):
        return lin.args[0], 0
    bias = shape(lin.args[0])
    if bias is None or not (len(bias) == 1 or (len(bias) == 2 and bias[0] == 1)):
        raise _Unproved(f"the bias of {lin.name} is not one row (shape {bias}): it may vary by row")
    return lin.args[1], 1


def _replay_from(chain: list[Node], start: torch.Tensor) -> torch.Tensor:
    idx = start
    for node in chain:
        if _unbound(node):
            unbind = node.args[0]
            dim = unbind.args[1] if len(unbind.args) > 1 else unbind.kwargs.get("dim", 0)
            idx = idx.select(dim, node.args[1])
            continue
        idx = _replay([node], tuple(idx.shape), idx)
        if idx is None:
            raise _Unproved("a layout op's arguments are not constants")
    return idx


def _row_renaming(idx: torch.Tensor, cols: int) -> torch.Tensor | None:
    """For an index tensor over a (M, cols) source, with last dim ``cols``: the source row of each
    of its rows when every row is a whole source row with its columns in order, else None."""
    if idx.dim() < 1 or idx.shape[-1] != cols:
        return None
    rows = idx.reshape(-1, cols)
    src = rows[:, 0] // cols
    return src if torch.equal(rows, src[:, None] * cols + torch.arange(cols)) else None


@dataclasses.dataclass
class _Operand:
    linear: Node
    root: Node  # the image-layout tensor the linear is moved onto (its rows: image positions)
    image: tuple  # (B, Hp, Wp)
    windows: tuple  # (ws, shift, Hp, Wp)
    split: tuple  # (Hx, Dx), or (G, g, Hx, Dx): the operand is group g of the linear's columns


def _operand(node: Node) -> _Operand:
    """Prove the attention operand ``node`` (B * nW, Hx, N, Dx) is the windows of a linear applied
    to an image's rows (see the module's docstring)."""
    lin, after = _chain_back(node)
    if not is_op(lin, *_LINEARS) or not _looks_windowed(_chain_back(lin.args[0 if is_op(lin, aten.mm.default) else 1])[1]):
        raise _Unproved("")  # not a windowed site (or not Swin's form of one): nothing to say
    x2d, _ = _linear_parts(lin)
    root, before = _chain_back(x2d)
    n_rows, cols = shape(x2d)
    out_cols = shape(lin)[1]
    bw, hx, n, dx = shape(node)
    if not all(is_static(shape(t)) for t in (node, lin, x2d, *before)) or not is_static(shape(root)):
        raise _Unproved("the sizes are symbolic; windows are proved at static sizes only (the partition "
                        "stays; mark the image sizes static, e.g. torch.compile(dynamic=False))", shapes=True)
    if n_rows * max(cols, out_cols) > _MAX_NUMEL or math.prod(shape(node)) > _MAX_NUMEL:
        raise _Unproved("the image is too large to prove its windows by replay at capture")
    ws = math.isqrt(n)
    if ws * ws != n:
        raise _Unproved(f"{n} tokens per window is not a square window")
    rolls = [r for r in before if is_op(r, aten.roll.default)]
    candidates = [root, *before]  # the farthest first: it moves the linear the farthest
    why = "the linear's input is not a renaming of an image's rows"
    for i, cand in enumerate(candidates):
        cs = shape(cand)
        if cs is None or math.prod(cs) != n_rows * cols or cs[-1] != cols:
            continue
        src = _row_renaming(_replay_from(before[i:], torch.arange(math.prod(cs)).reshape(cs)), cols)
        if src is None:
            continue
        images = {tuple(shape(t)[:3]) for t in (cand, *before[i:]) if len(shape(t)) == 4 and shape(t)[-1] == cols}
        lin_rows = torch.arange(n_rows * out_cols).reshape(n_rows, out_cols)[src]
        got = _replay_from(after, lin_rows)
        for b, hp, wp in sorted(images):
            if b * hp * wp != n_rows or hp % ws or wp % ws or b * (hp // ws) * (wp // ws) != bw:
                why = f"{ws}x{ws} windows do not tile the {hp}x{wp} image"
                continue
            shifts = {0} | {(-r.args[1][0]) % hp for r in rolls if len(r.args[1]) == 2 and r.args[1][0] == r.args[1][1]}
            for shift in sorted(s for s in shifts if s < ws):
                windows = (ws, shift, hp, wp)
                split = _split(got, (b, hp, wp), out_cols, hx, dx, windows)
                if split is not None:
                    return _Operand(lin, cand, (b, hp, wp), windows, split)
            why = f"{node.name} is not the {ws}x{ws} windows of the image rolled back by the shift its roll applies"
    raise _Unproved(why)


def _split(got: torch.Tensor, image: tuple, out_cols: int, hx: int, dx: int, windows: tuple) -> tuple | None:
    """How the operand's (Hx, Dx) sits in the linear's columns, when its elements are exactly the
    windows of the linear's output on the image; None otherwise."""
    b, hp, wp = image
    full = torch.arange(b * hp * wp * out_cols).reshape(b, hp, wp, out_cols)
    if out_cols == hx * dx:
        return (hx, dx) if torch.equal(got, partition(full.reshape(b, hp, wp, hx, dx), windows)) else None
    if out_cols % (hx * dx):
        return None
    groups = out_cols // (hx * dx)
    for g in range(groups):
        if torch.equal(got, partition(full.reshape(b, hp, wp, groups, hx, dx)[:, :, :, g], windows)):
            return (groups, g, hx, dx)
    return None


def _output(fused: Node, windows: tuple, image: tuple) -> tuple[Node, Node]:
    """(the output linear, the last node of the chain after it) once proved: the linear reads the
    attention's output rows in window order and the chain writes each row back to its image
    position, so the chain's result is the linear applied to the un-windowed output's rows."""
    node, chain = fused, []
    while len(node.users) == 1 and is_op(user := next(iter(node.users)), *LAYOUT) and user.args[0] is node:
        chain.append(user)
        node = user
    lin = next(iter(node.users)) if len(node.users) == 1 else None
    if not is_op(lin, *_LINEARS):
        raise _Unproved("the attention's output is not read by one linear through layout ops alone")
    x2d, _ = _linear_parts(lin)
    if x2d is not node:
        raise _Unproved(f"the attention's output is {lin.name}'s weight, not its input")
    b, hp, wp = image
    out = torch.arange(math.prod(shape(fused))).reshape(shape(fused))
    rows_in = _replay_from(chain, out)
    img_rows = reverse(out, windows).reshape(b * hp * wp, -1)
    if rows_in.dim() != 2 or rows_in.shape[1] != img_rows.shape[1]:
        raise _Unproved("the output linear does not read whole (head, channel) rows of the attention's output")
    cols = shape(lin)[1]
    after, node = [], lin
    best = None
    while len(node.users) == 1 and _movers(user := next(iter(node.users))) and user.args[0] is node:
        after.append(user)
        node = user
        if not is_static(shape(node)):
            break
        sel = _row_renaming(_replay_from(after, torch.arange(math.prod(shape(lin))).reshape(shape(lin))), cols)
        if sel is not None and sel.numel() == img_rows.shape[0] and torch.equal(rows_in[sel], img_rows):
            best = node  # the farthest proved end: every copy up to it goes
    if best is None:
        raise _Unproved("the chain after the output linear does not write its rows back to their un-shifted "
                        "image positions (a shift not rolled back, or another window order)")
    return lin, best


def _image_operand(gm, op: _Operand, before: Node) -> Node:
    x2d, pos = _linear_parts(op.linear)
    b, hp, wp = op.image
    rows = insert_call(gm, aten.reshape.default, (op.root, [b * hp * wp, shape(x2d)[1]]), before)
    args = list(op.linear.args)
    args[pos] = rows
    moved = insert_call(gm, op.linear.target, tuple(args), before)
    if len(op.split) == 2:
        return insert_call(gm, aten.view.default, (moved, [b, hp, wp, *op.split]), before)
    groups, g, hx, dx = op.split
    grouped = insert_call(gm, aten.view.default, (moved, [b, hp, wp, groups, hx, dx]), before)
    return insert_call(gm, aten.select.int, (grouped, 3, g), before)


def _address(gm, fused: Node) -> tuple[AttentionSpec, Node]:
    spec = AttentionSpec.from_json(fused.args[4])
    if spec.windows:
        raise _Unproved("")
    ops = [_operand(fused.args[i]) for i in range(3)]
    if len({(o.windows, o.image) for o in ops}) != 1:
        raise _Unproved("q, k and v are windows of different images or window sizes")
    windows, image = ops[0].windows, ops[0].image
    lin, end = _output(fused, windows, image)
    spec = dataclasses.replace(spec, windows=windows)
    q, k, v = (_image_operand(gm, o, fused) for o in ops)
    seed = fused.args[5] if len(fused.args) > 5 else None
    call = insert_call(gm, torch.ops.fxfuse.window_attention.default, (q, k, v, fused.args[3], spec.to_json(), seed),
                       fused)
    call.meta["stack_trace"] = fused.meta.get("stack_trace")
    b, hp, wp = image
    rows = insert_call(gm, aten.view.default, (call, [b * hp * wp, math.prod(shape(call)[3:])]), lin)
    args = list(lin.args)
    args[_linear_parts(lin)[1]] = rows
    moved = insert_call(gm, lin.target, tuple(args), lin)
    out = insert_call(gm, aten.view.default, (moved, list(shape(end))), end)
    end.replace_all_uses_with(match_layout(gm, out, val(end), end))
    return spec, call


def _kernels_run(node: Node) -> bool:
    """Whether the site's kernels will run (CUDA tensors, or interpretation asked for): only then
    does addressing the windows save the copies. On a CPU torch path the operator builds the
    partition itself, and its backward partitions q, k and v again: slower than the user's one
    partition of the image (0.81-0.86x in training, benchmarks/results/swin_windows_cpu.json)."""
    from fxfuse import config

    q = val(node.args[0])
    return q is not None and (q.device.type == "cuda" or config.current.interpret)


@dataclasses.dataclass(frozen=True)
class AddressWindows:
    """``on_cpu``: address the windows of CPU sites too (the torch path; for tests and inspection)."""

    name: str = "address-windows"
    on_cpu: bool = False

    def __call__(self, gm: torch.fx.GraphModule) -> PassResult:
        import fxfuse.ops  # noqa: F401  (the rewritten graph calls torch.ops.fxfuse.window_attention)

        result = PassResult(self.name)
        for node in list(gm.graph.nodes):
            if not is_op(node, torch.ops.fxfuse.attention.default) or not (self.on_cpu or _kernels_run(node)):
                continue
            source, code = source_of(node)
            try:
                spec, call = _address(gm, node)
            except _Unproved as why:
                if str(why):
                    result.misses.append(Miss("attention-windows", source, f"windows not addressed: {why}", code,
                                              shapes=why.shapes))
                continue
            # The windowed spec: its kernels (the ones that run) are rendered and listed in the report.
            result.matches.append(Match("attention-windows", source, spec, call.name, code))
            result.changed += 1
        return result
