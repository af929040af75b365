"""Linear attention already written in its linear order, ``phi(q) @ (phi(k)^T @ v)``: Shen et al.'s
efficient attention as its paper's code writes it (``context = k_s @ v^T; out = context^T @ q_s``,
channels first) or as ``q_s @ (k_s.transpose(-2, -1) @ v)``. There is no (L, L) product to remove;
what the operator adds is the feature maps inside it (the softmaxes are then neither written nor
kept for the backward) and one fused call for the two products. Found from the outer product:

- ``a @ ctx`` where ``ctx`` is the product ``bt @ v`` regrouped (a row-major view keeping its
  last two dims): the operator's own order;
- ``ctx^T @ y`` (the product transposed, its batch dims regrouped): the transpose of ``y^T @ ctx``,
  computed as ``op(y^T, bt, v)^T`` (proved at static sizes by replaying the layout ops on indices).

The context must have no other use (it would still be computed) and everything stays in one dtype
(a cast between the products stops the walk). The state is kept in float32 by the kernels rather
than rounded to a 16-bit context as the model's two products round it: the reassociation's
rounding, as for the quadratic form (opt-in pass).
"""
from __future__ import annotations

import dataclasses

import torch
from torch.fx import Node

from fxfuse.passes.attention_layout import _replay, is_plain_reshape, layout_chain_back
from fxfuse.passes.graph import dtype, insert_call, is_op, match_layout, shape, val
from fxfuse.passes.linear_attention_features import absorb_feature_map, nonnegative_feature_map
from fxfuse.passes.symbolic import is_static, same
from fxfuse.spec_linear_attention import LinearAttentionSpec

aten = torch.ops.aten
_PRODUCTS = (aten.bmm.default, aten.mm.default)


@dataclasses.dataclass
class LinearFormSite:
    outer: Node  # the product that gives the attention's output (or its transpose)
    a: Node | None  # the queries' features (N, L, D) as an operand, when the outer product reads them so
    y: Node | None  # else the (N, D, L) operand whose transpose they are
    bt: Node  # the inner product's operands: (N, D, S) and (N, S, E)
    v: Node
    transposed: bool  # the outer product is (N, E, L): the operator's result transposed


def _single_use_chain(root: Node, chain: list[Node]) -> bool:
    nodes = [root, *chain]
    return all(len(n.users) == 1 for n in nodes)


def _inner(node: Node) -> tuple[Node, list[Node]] | None:
    """(the inner product, the layout ops from it to ``node``) when ``node`` is one, used only there."""
    root, chain = layout_chain_back(node)
    if not is_op(root, *_PRODUCTS) or not _single_use_chain(root, chain):
        return None
    if dtype(root) != dtype(node) or shape(root) is None or len(shape(root)) != len(shape(node)):
        return None
    return root, chain


def _is_transposed_regroup(chain: list[Node], src: tuple, dst: tuple) -> bool:
    """Whether ``chain`` maps a ``src`` (N, D, E) tensor to its transpose (N, E, D) = ``dst`` (static sizes)."""
    if not (is_static(src) and is_static(dst)) or not chain or tuple(dst) != (*src[:-2], src[-1], src[-2]):
        return False
    idx = _replay(chain, src)
    if idx is None or tuple(idx.shape) != tuple(dst):
        return False
    want = torch.arange(idx.numel()).reshape(src).transpose(-2, -1)
    return torch.equal(idx, want.reshape(dst))


def find(outer: Node) -> LinearFormSite | None:
    """The linear-order site whose outer product is ``outer``, or None (not one)."""
    if not is_op(outer, *_PRODUCTS):
        return None
    x, y = outer.args[:2]
    if not isinstance(x, Node) or not isinstance(y, Node):
        return None
    found = _inner(y)
    if found is not None:  # a @ ctx
        inner, chain = found
        keeps = all(same(p, q) for p, q in zip(shape(inner)[-2:], shape(y)[-2:]))  # (D, E) stays (D, E)
        if keeps and is_plain_reshape(chain, shape(inner), shape(y)):
            return LinearFormSite(outer, x, None, inner.args[0], inner.args[1], transposed=False)
    found = _inner(x)
    if found is not None:  # ctx^T @ y = (y^T @ ctx)^T
        inner, chain = found
        if _is_transposed_regroup(chain, tuple(shape(inner)), tuple(shape(x))):
            return LinearFormSite(outer, None, y, inner.args[0], inner.args[1], transposed=True)
    return None


def rewrite(gm, site: LinearFormSite) -> tuple[Node, LinearAttentionSpec, tuple[str, ...], str] | None:
    """Replace the site's outer product by the operator (the feature maps it can apply taken in):
    (its node, spec, notes, sizes in words);
    None, the graph unchanged, unless both operands are known non-negative feature maps (else it
    is just two products, which this pass leaves to whoever computes them)."""
    existing = set(gm.graph.nodes)
    outer = site.outer
    a = site.a if site.a is not None else insert_call(gm, aten.transpose.int, (site.y, -2, -1), outer)
    phi = [nonnegative_feature_map(a), nonnegative_feature_map(site.bt)]
    if None in phi:
        for n in reversed([n for n in gm.graph.nodes if n not in existing]):
            gm.graph.erase_node(n)
        return None
    kept = []
    absorbed = [absorb_feature_map(gm, x, outer, side, False, kept) for x, side in ((a, "a"), (site.bt, "bt"))]
    operands = [found[1] if found else x for found, x in zip(absorbed, (a, site.bt))]
    kinds = tuple(found[0] if found else "" for found in absorbed)
    spec = LinearAttentionSpec(False, True, " / ".join(dict.fromkeys(phi)), phi_a=kinds[0], phi_b=kinds[1])
    out = insert_call(gm, torch.ops.fxfuse.linear_attention.default, (*operands, site.v, spec.to_json()), outer)
    if site.transposed:
        out = insert_call(gm, aten.transpose.int, (out, -2, -1), outer)
    out = match_layout(gm, out, val(outer), outer)
    outer.replace_all_uses_with(out)
    notes = ("written in the linear order (no (L, L) product): the two products as one operator",)
    if any(kinds):
        notes += (f"feature map applied in the operator ({', '.join(k for k in kinds if k)}): phi(q), phi(k) not written",)
    sizes = f"N {shape(a)[0] if len(shape(a)) == 3 else 1}, L {shape(a)[-2]}, S {shape(site.bt)[-1]}, D {shape(a)[-1]}"
    return out, spec, notes + tuple(kept), sizes
