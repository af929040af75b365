"""QK-norm fusion: a norm over the head dim of q and/or k folded into the fused attention.

Runs after fuse-norm (and fuse-rope): for each ``fxfuse.attention`` or ``fxfuse.attention_rope``
call whose q (or k) operand is, through layout ops only, the output of an ``fxfuse.norm`` that
normalises each head's row of D values and is read by nothing else, the call becomes
``fxfuse.attention_rope`` on the unnormalised tensor with the norm's spec in ``norm_q``/``norm_k``
(its parameters after the cos/sin tables): the kernels normalise the rows as they load them, then
rotate them where RoPE was fused too (fxfuse.ops.attention_qk_norm). Qwen3 (RMSNorm on q and k per
head, before RoPE) and Gemma3 (the same with ``1 + w``) are such sites.

What is proved: between the norm and the operand there are layout ops only (transpose, permute,
repeat_kv's head copy, views), and replayed on index tensors they map each row (b, h, l, :) of the
operand onto one row of the norm, element d to element d (one permute or transpose that keeps the
last dim is proved at any size, any other chain at the static shapes it has). A norm over the whole
hidden before the heads are split (OLMo2's q_norm and k_norm over H*D) fails this: a row of the
operand is then a D-slice of a norm row, whose statistics span every head; it is left as written
(its own fxfuse.norm site) with a miss. Also proved: the norm's input and output dtypes are the
operand's (the kernels round the normalised row to it), each parameter has the D elements of a
row, and the normalised tensor has no other user (a normalised k stored in a KV cache stays as
written: a miss says so). A norm applied after RoPE is a norm of the rotated tensor: fuse-rope did
not take that rotation (its output is not the product's operand), and this pass folds only the
norm, which then stays after the rotation, as written.
"""
from __future__ import annotations

import dataclasses

import torch
from torch.fx import Node

from fxfuse.passes.attention_layout import _replay, layout_chain_back
from fxfuse.passes.attention_rope import replace_with_rope_call
from fxfuse.passes.graph import dtype, insert_call, is_op, shape, source_of
from fxfuse.passes.pipeline import Match, Miss, PassResult
from fxfuse.passes.symbolic import is_static, same
from fxfuse.spec import NormSpec, to_dtype
from fxfuse.spec_attention import AttentionSpec

aten = torch.ops.aten


class Declined(Exception):
    """A norm before the product that cannot be folded: the reason."""


def _row_preserving(chain: list[Node], src) -> bool:
    """Whether layout ``chain`` maps (..., D) ``src`` to a (B, H, L, D) operand so that each operand
    row is one row of ``src``, element d from element d (a row-wise op then commutes with it)."""
    if not chain:
        return len(src) == 4
    out = shape(chain[-1])
    if len(chain) == 1 and is_op(chain[0], aten.permute.default, aten.transpose.int) and len(src) == 4:
        node = chain[0]
        if node.target == aten.permute.default:
            return [d % 4 for d in node.args[1]][3] == 3
        a, b = (d % 4 for d in node.args[1:3])
        return 3 not in (a, b) or a == b
    if not (is_static(src) and is_static(out)) or len(out) != 4:
        return False
    idx = _replay(chain, tuple(src))
    if idx is None or tuple(idx.shape) != tuple(out):
        return False
    coords = torch.unravel_index(idx, tuple(src))
    d = torch.arange(out[3])
    return torch.equal(coords[-1], d.expand(tuple(out))) and all(bool((c == c[..., :1]).all()) for c in coords[:-1])


def _check(norm: Node, ns: NormSpec, operand: Node, d) -> None:
    x, params = norm.args[0], norm.args[1]
    want = dtype(operand)
    if dtype(x) != want or dtype(norm) != want or to_dtype(ns.out_dtype) != want:
        raise Declined(f"the norm turns {dtype(x)} into {dtype(norm)} for a {want} operand; the fused kernel "
                       "normalises rows in the operand's own dtype (norm input, output and q/k in one dtype)")
    for p in params:
        ps = shape(p)
        if ps is None or not same(ps[-1] if ps else 1, d) or not all(same(n, 1) for n in ps[:-1]):
            raise Declined(f"a norm parameter ({p.name}, shape {list(ps or [])}) is not one value per element of "
                           f"the head dim ({d}); the kernel reads one (D,) vector for every head")


def _folds(fused: Node, misses: list) -> dict:
    """{"q"|"k": (norm node, NormSpec, layout chain)} for the operands that are foldable norms."""
    found = {}
    for name, arg in (("q", fused.args[0]), ("k", fused.args[1])):
        root, chain = layout_chain_back(arg)
        d = shape(arg)[-1]
        if not is_op(root, torch.ops.fxfuse.norm.default):
            continue
        ns = NormSpec.from_json(root.args[2])
        try:
            if not _row_preserving(chain, shape(root)):
                n = shape(root)[-1]
                if is_static([n, d]) and n > d and n % d == 0:
                    raise Declined(f"the norm normalises the whole hidden ({n} = {n // d} heads x {d}) before the "
                                   "heads are split (OLMo2's form), not each head's row: its statistics span all "
                                   "heads, so it stays its own fxfuse.norm site")
                raise Declined("the norm's rows are not the operand's head rows (it normalises another dim than the "
                               "head dim, or the layout between them mixes rows)")
            _check(root, ns, arg, d)
        except Declined as why:
            misses.append(f"QK-norm on {name}: {why}")
            continue
        others = [u for n in [root, *chain] for u in n.users if u is not fused and u not in chain]
        if others:
            misses.append(f"QK-norm on {name} stays as written: the normalised {name} ({root.name}) is also used by "
                          f"{others[0].name} (a KV cache, or returned); fusing would drop that use")
            continue
        found[name] = (root, ns, chain)
    return found


def _replace(gm, fused: Node, found: dict) -> Node:
    rope = fused.target == torch.ops.fxfuse.attention_rope.default
    spec_at = 5 if rope else 4
    spec = AttentionSpec.from_json(fused.args[spec_at])
    spec = dataclasses.replace(spec, **{f"norm_{n}": ns.to_json() for n, (_, ns, _) in found.items()})
    q, k = fused.args[:2]
    tables = list(fused.args[4]) if rope else []
    for name in ("q", "k"):
        if name not in found:
            continue
        norm, _, chain = found[name]
        x = norm.args[0]
        for node in chain:  # the same layout, of the unnormalised tensor
            x = insert_call(gm, node.target, (x, *node.args[1:]), fused, dict(node.kwargs))
        q, k = (x, k) if name == "q" else (q, x)
        tables += list(norm.args[1])
    args = (q, k, fused.args[2], fused.args[3], tables, spec.to_json(), *fused.args[spec_at + 1:])
    return replace_with_rope_call(gm, fused, args, dict(fused.kwargs))


@dataclasses.dataclass(frozen=True)
class FuseQkNorm:
    name: str = "fuse-qk-norm"

    def __call__(self, gm: torch.fx.GraphModule) -> PassResult:
        import fxfuse.ops  # noqa: F401  (the rewritten graph calls torch.ops.fxfuse.attention_rope)

        result = PassResult(self.name)
        gm.graph.eliminate_dead_code()
        targets = (torch.ops.fxfuse.attention.default, torch.ops.fxfuse.attention_rope.default)
        for node in list(gm.graph.nodes):
            if not is_op(node, *targets):
                continue
            source, code = source_of(node)
            reasons: list[str] = []
            found = _folds(node, reasons)
            for reason in reasons:
                result.misses.append(Miss("qk-norm", source, reason, code))
            if not found:
                continue
            new = _replace(gm, node, found)
            result.matches.append(Match("qk-norm", source, AttentionSpec.from_json(new.args[5]), new.name, code))
            result.changed += 1
        return result
