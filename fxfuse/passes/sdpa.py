"""Claim ``F.scaled_dot_product_attention`` calls already in the graph as ``fxfuse.attention``.

SDPA reaches the captured ATen graph as one of its backend operators, chosen at trace time from the
device and arguments: ``_scaled_dot_product_flash_attention_for_cpu`` on CPU,
``_scaled_dot_product_flash_attention`` / ``_efficient_attention`` / ``_cudnn_attention`` on CUDA
(or the composite ``scaled_dot_product_attention`` where no decomposition ran). A boolean
``attn_mask`` arrives already converted by SDPA into ``where(mask, 0, -inf)``; it is read back as
the boolean mask (a fill of -inf where it is False), a constant one proved causal becomes the causal
rule. Where SDPA falls back to its math decomposition (dropout on CPU, a mask that requires grad,
inputs that are not 4-d), the graph holds plain products and a ``_safe_softmax`` instead, with no
SDPA call left to claim: fuse-attention reads that as the attention it is written as (a spec with
``safe_softmax``, which gives 0 for a row with every key masked, as SDPA does). Dropout in the
operators themselves (``dropout_p``, as CUDA's flash and efficient kernels take it) is the spec's
dropout: the fused call draws its own seed (the mask has SDPA's distribution, not its stream).

What the spec must reproduce, and how:

- the scale (default ``1/sqrt(E)``, E = q's last dim) multiplies the scores;
- ``is_causal`` hides key j from query i when j > i (top-left aligned). The spec's causal rule is
  aligned bottom-right (j > i + Lk - Lq): equal only when Lq == Lk; for other lengths the spec
  hides ``j > i`` as an index expression (every row keeps key 0, so it needs no guard); a constant
  ``attn_mask`` computed from positions becomes an index expression too, when no row needs a
  guard (``attention_index.py`` derives and proves it);
- SDPA returns 0 (and zero gradients) for a query row whose every key is masked, where the fused
  operator follows a user-written softmax and gives NaN. Unless the mask is a constant proved to
  leave every row a key, the pass guards it: such rows see every key inside the operator (so
  nothing is NaN, in the forward or the backward) and their output is then set to 0;
- in half precision every SDPA backend the graph can hold (CPU flash, CUDA flash, efficient,
  cuDNN) accumulates q @ k^T in float32 and applies the scale, the mask and the softmax to that
  float32 product without rounding it to 16 bits first: the spec's score dtype is float32 (the
  product of the 16-bit q and k accumulated in float32, as a 16-bit ``baddbmm``'s), every step
  runs in float32, and the probabilities are rounded to the inputs' dtype for the value product.
"""
from __future__ import annotations

import dataclasses
import math
import operator

import torch
from torch.fx import Node

from fxfuse import index_expr
from fxfuse.passes.attention import site_shape, split_bias
from fxfuse.passes.attention_index import NotIndex, derive
from fxfuse.passes.attention_layout import (causal_window, constant_value, head_merge_chain, repeated_heads,
                                           size_mask_key)
from fxfuse.passes.graph import (broadcasts_to, dtype, insert_call, insert_seed, is_op, is_python_scalar,
                                  match_layout, same_layout, shape, source_of, val)
from fxfuse.passes.pipeline import Match, Miss, PassResult
from fxfuse.passes.symbolic import equal_or_guarded, is_static, same, size_args, specialised
from fxfuse.spec import dtype_name
from fxfuse.spec_attention import AttentionSpec, ScoreStep

aten = torch.ops.aten
_NEG_INF = float("-inf")


def _sdpa_ops() -> dict:
    """Operator -> how to read (dropout_p, is_causal, attn_mask) from its args and kwargs."""
    ops = {}

    def add(name, mask_pos, dropout_pos, causal_pos):
        op = getattr(aten, name, None)
        if op is not None:
            ops[op.default] = (mask_pos, dropout_pos, causal_pos)

    add("scaled_dot_product_attention", 3, 4, 5)
    add("_scaled_dot_product_flash_attention_for_cpu", "attn_mask", 3, 4)
    add("_scaled_dot_product_flash_attention", None, 3, 4)
    add("_scaled_dot_product_efficient_attention", 3, 5, 6)
    add("_scaled_dot_product_cudnn_attention", 3, 5, 6)
    return ops


_OPS = _sdpa_ops()


class Declined(Exception):
    """Raised with the reason an SDPA call is left as written."""

    def __init__(self, reason: str, shapes: bool = False):
        super().__init__(reason)
        self.shapes = shapes  # the sizes are why (a warning under torch.compile)


def _arg(node: Node, where, default, names=()):
    """Positional ``where`` (or keyword ``where`` when it is a string), else a keyword of ``names``."""
    if isinstance(where, str):
        return node.kwargs.get(where, default)
    if where is None:
        return default
    if len(node.args) > where:
        return node.args[where]
    for name in names:
        if name in node.kwargs:
            return node.kwargs[name]
    return default


def _scalar(node) -> float | None:
    if is_python_scalar(node):
        return float(node)
    if is_op(node, aten.scalar_tensor.default, aten.full.default):
        value = node.args[0] if node.target == aten.scalar_tensor.default else node.args[1]
        if node.target == aten.full.default and list(node.args[0]):
            return None
        return float(value) if is_python_scalar(value) else None
    return None


def _boolean_source(mask: Node) -> Node | None:
    """``m`` when the float mask is SDPA's conversion ``where(m, 0, -inf)`` of a boolean mask."""
    if is_op(mask, aten.where.self) and dtype(mask.args[0]) == torch.bool and _scalar(mask.args[1]) == 0.0 \
            and _scalar(mask.args[2]) == _NEG_INF:
        return mask.args[0]
    return None



@dataclasses.dataclass
class _Claim:
    spec: AttentionSpec
    mask: Node | None  # the extra tensor (boolean: True takes part; or additive), None when absent or causal
    boolean: bool
    guard: bool  # rows may have every key masked: SDPA gives 0 there
    k: Node | None = None  # the keys and values the fused call reads: SDPA's, or what they repeat
    v: Node | None = None


def _recognise(node: Node, gm: torch.fx.GraphModule) -> _Claim:
    mask_pos, dropout_pos, causal_pos = _OPS[node.target]
    q, k, v = node.args[:3]
    dropout = _arg(node, dropout_pos, 0.0, ("dropout_p",))
    if not is_python_scalar(dropout) or not 0.0 <= dropout < 1.0:
        raise Declined(f"scaled_dot_product_attention with dropout_p={dropout}; fused attention takes a constant "
                       "dropout rate in [0, 1)")
    causal = _arg(node, causal_pos, False, ("is_causal",))
    mask = _arg(node, mask_pos, None, ("attn_mask", "attn_bias"))
    scale = node.kwargs.get("scale")
    shapes = [shape(t) for t in (q, k, v)]
    if any(s is None or len(s) != 4 for s in shapes):
        raise Declined("scaled_dot_product_attention on inputs that are not (B, H, L, D) tensors; fused "
                       "attention reads 4-d q, k, v", shapes=True)
    (b, h, lq, e), (bk, hk, lk, _), (bv, hv, lv, _) = shapes
    # Head counts and head dims that are symbols (dynamic=True on q, k, v passed in) are taken at
    # their values with a guard: the kernels specialise on them, and a model's head sizes do not vary.
    h, hk, hv, e = (specialised(n) for n in (h, hk, hv, e))
    specialised(shapes[2][3])
    if hk == hv == h:
        # Keys and values repeated per query head (transformers' repeat_kv before SDPA): read the
        # kv heads in place (grouped-query attention), so the repeated copies are never made.
        repeats = repeated_heads(k, h), repeated_heads(v, h)
        if repeats[0] and repeats[1] and repeats[0][1] == repeats[1][1]:
            (k, groups), (v, _) = repeats
            hk = hv = h // groups
    if any(0 in s for s in shapes):
        raise Declined(f"scaled_dot_product_attention on empty inputs (q {list(shapes[0])}, k {list(shapes[1])}, "
                       f"v {list(shapes[2])}): a size is 0, so there is nothing to compute; it is left as written")
    # Batch and lengths may be symbols (dynamic shapes): each equality is proved for all their values,
    # or guarded where SDPA itself requires it (a cache's key and value lengths may be two symbols).
    if not equal_or_guarded(bk, b) or not equal_or_guarded(bv, b) or hk != hv or not equal_or_guarded(lv, lk) or \
            h % hk:
        raise Declined(f"q {list(shapes[0])}, k {list(shapes[1])} and v {list(shapes[2])} are broadcast or "
                       "grouped in a way fused attention does not read (B equal, kv heads dividing query heads)", shapes=True)
    if not (dtype(q) == dtype(k) == dtype(v)) or not dtype(q).is_floating_point:
        raise Declined(f"q, k, v of dtypes {dtype(q)}, {dtype(k)}, {dtype(v)}; fused attention reads one float dtype")
    if any(u.target is not operator.getitem or u.args[1] != 0 for u in node.users) and \
            node.target != aten.scaled_dot_product_attention.default:
        raise Declined("an SDPA result other than the output (its logsumexp or seeds) is used; the fused "
                       "operator returns only the output")
    if scale is None:
        scale = 1.0 / math.sqrt(e)
    if not is_python_scalar(scale):
        raise Declined("scaled_dot_product_attention with a scale that is not a constant")
    in_dtype = dtype_name(dtype(q))
    wide = "float64" if in_dtype == "float64" else "float32"
    # The product itself is accumulated in float32 and never rounded to 16 bits (see above).
    steps = [ScoreStep("mul", wide, value=float(scale))]
    score_shape = (b, h, lq, lk)
    inputs, claimed_mask, boolean, guard, size_mask, size_key = (), None, False, False, -1, ""
    if causal:
        if mask is not None:
            raise Declined("scaled_dot_product_attention with both attn_mask and is_causal")
        if same(lq, lk):
            steps.append(ScoreStep("fill", wide, value=_NEG_INF, input=-1))
        else:  # top-left, unlike the spec's rule: key j is hidden after query i, as an index expression
            steps.append(ScoreStep("fill", wide, value=_NEG_INF, expr=("gt", "bool", index_expr.var("j"),
                                                                         index_expr.var("i"))))
    elif mask is not None:
        # A boolean mask: as SDPA converted it (where(m, 0, -inf)), or as given to the composite op.
        source = mask if isinstance(mask, Node) and dtype(mask) == torch.bool else _boolean_source(mask)
        boolean = source is not None
        claimed_mask = source if boolean else mask
        if not isinstance(claimed_mask, Node) or not broadcasts_to(shape(claimed_mask), score_shape):
            got = list(shape(claimed_mask)) if isinstance(claimed_mask, Node) and shape(claimed_mask) else "?"
            raise Declined(f"an attn_mask of shape {got} does not broadcast to the scores' shape "
                           f"{list(score_shape)} aligned on the right; fused attention cannot read it", shapes=True)
        if not boolean and not dtype(mask).is_floating_point:
            raise Declined(f"an attn_mask of dtype {dtype(mask)}; fused attention adds float masks")
        constant = constant_value(claimed_mask, gm)
        if constant is not None:
            visible = constant if boolean else constant != _NEG_INF
            guard = not bool(visible.any(-1).all())
        else:
            guard = True
        # The causal rule only where every row keeps a key (bottom-right with Lq > Lk hides whole
        # rows, which SDPA returns as 0 and the rule alone would leave NaN).
        window = causal_window(~constant, lq, lk) if boolean and constant is not None and not guard else None
        if window is not None:  # the mask's values are the causal (or sliding-window) rule
            steps.append(ScoreStep("fill", wide, value=_NEG_INF, input=-1, window=window))
            claimed_mask = None
        elif (derived := _index_form(claimed_mask, boolean, score_shape, gm, constant, guard)) is not None:
            # Computed from positions: the kernel computes it (a mask's expression loads nothing).
            expr = index_expr.negate(derived.expr) if boolean else derived.expr
            steps.append(ScoreStep("fill" if boolean else "add", wide, value=_NEG_INF if boolean else 0.0, expr=expr))
            claimed_mask = None
        elif not boolean and (split := _split_mask(claimed_mask, score_shape, gm, guard)) is not None:
            # A tensor plus an expression (Swin's relative-position bias plus its shift mask): the
            # tensor is read (and guarded), the rest computed, summed as the user's code summed them.
            claimed_mask, derived = split
            steps.append(ScoreStep("add", wide, input=0, expr=derived.expr))
            inputs = ("bias",)
        else:
            steps.append(ScoreStep("fill", wide, value=_NEG_INF, input=0, invert=True) if boolean
                         else ScoreStep("add", wide, input=0))
            inputs = ("mask" if boolean else "bias",)
            # At symbolic sizes: a mask only the sizes decide is checked against the causal rule
            # once per shape when the site runs (Hugging Face's mask builders).
            if boolean and (key := size_mask_key(claimed_mask, gm, lq, lk, invert=True)) is not None:
                size_mask, size_key = 0, key
    spec = AttentionSpec(score_dtype=wide, steps=tuple(steps), prob_dtype=in_dtype, inputs=inputs,
                         kv_groups=h // hk, dropout=float(dropout), size_mask=size_mask,
                         size_key=size_key)
    return _Claim(spec, claimed_mask, boolean, guard, k, v)



def _index_form(mask: Node, boolean: bool, score_shape, gm, constant, guard: bool):
    """The proved index expression of a constant attn_mask, or None. Not with a guard (rows with
    no visible key need the mask itself) nor with per-head inputs (kept simple: one tensor or none)."""
    if constant is None or guard:
        return None
    try:
        return derive(mask, score_shape, gm, allow_heads=False, value=constant)
    except NotIndex:
        return None


def _split_mask(mask: Node, score_shape, gm, guard: bool):
    """(tensor, expression) of a float attn_mask that is their sum (see attention.split_bias), or
    None. With a guard (a mask that is not a constant proved to leave every row a key), the
    guard reads the tensor alone: a row of ``tensor + e`` is all -inf exactly where the tensor's
    is, when ``e`` is finite and below 2^100 in magnitude and the sum is float32 or bfloat16 (a
    finite value plus such an ``e`` cannot overflow: their largest finite values are 2^104 and
    2^120 apart from the next; float16's are 32 apart, so not float16)."""
    if not is_static(score_shape):
        return None
    split = split_bias(mask, score_shape, gm, allow_heads=False)
    if split is None or not guard:
        return split
    if dtype(mask) not in (torch.float32, torch.bfloat16):
        return None
    values = index_expr.evaluate(split[1].expr, index_expr.grids((1,) * (4 - len(score_shape)) + tuple(score_shape)), [])
    if not bool(values.isfinite().all()) or float(values.abs().max()) >= 2.0 ** 100:
        return None
    return split


def _merge_layout(t: torch.Tensor) -> bool:
    """Whether a (B, H, L, D) output is laid out in (B, L, H, D) memory order, as SDPA's CPU
    flash kernel (and CUDA's flash and efficient kernels) return it, and not also contiguous."""
    from torch._prims_common import make_contiguous_strides_for

    b, h, lq, dv = t.shape
    sb, sl, sh, sd = make_contiguous_strides_for((b, lq, h, dv))
    merged = torch.empty_strided(t.shape, (sb, sh, sl, sd), device="meta")
    contiguous = torch.empty(t.shape, device="meta")
    return same_layout(t, merged) and not same_layout(t, contiguous)


def _replace(gm, node: Node, claim: _Claim) -> Node:
    q = node.args[0]
    k, v = claim.k, claim.v
    composite = node.target == aten.scaled_dot_product_attention.default
    outputs = [node] if composite else [u for u in node.users if u.args[1] == 0]
    # The strides the replaced call gave its output: the graph after it (a head merge's view) was
    # traced on them, so the fused call writes that layout too.
    produced = val(outputs[0]) if outputs else None
    merge_heads = produced is not None and _merge_layout(produced)
    extras, alive = [], None
    if claim.mask is not None:
        mask = claim.mask
        if claim.guard:
            # alive: whether a query row has any key left. Dead rows see every key in the operator
            # (finite output and gradients) and are zeroed afterwards, as SDPA returns them.
            seen = mask if claim.boolean else insert_call(gm, aten.ne.Scalar, (mask, _NEG_INF), node)
            alive = insert_call(gm, aten.any.dim, (seen, -1, True), node)
            dead = insert_call(gm, aten.logical_not.default, (alive,), node)
            mask = insert_call(gm, aten.logical_or.default, (mask, dead), node) if claim.boolean else \
                insert_call(gm, aten.where.ScalarOther, (alive, mask, 0.0), node)
        extras.append(mask)
    args = (q, k, v, extras, claim.spec.to_json())
    seed = insert_seed(gm, q, node) if claim.spec.dropout else None  # a fresh seed each call, saved for the backward
    if seed is not None or merge_heads:
        args += (seed,)
    if merge_heads:
        args += (True,)
    fused = insert_call(gm, torch.ops.fxfuse.attention.default, args, node)
    if node.meta.get("stack_trace"):
        fused.meta["stack_trace"] = node.meta["stack_trace"]
    out = fused if alive is None else _zero_dead_rows(gm, fused, alive, merge_heads, node)
    if produced is not None:
        out = match_layout(gm, out, produced, node)
    if composite:
        node.replace_all_uses_with(out)
    else:
        for user in list(node.users):
            user.replace_all_uses_with(out)
            gm.graph.erase_node(user)
    gm.graph.erase_node(node)
    merge = head_merge_chain(fused, tuple(shape(fused)[:2])) if out is fused and not merge_heads else None
    if merge is not None:  # only a head merge reads the output: write it in that order (see attention.py)
        merged = insert_call(gm, torch.ops.fxfuse.attention.default, (*fused.args[:5], seed, True), merge)
        merged.meta["stack_trace"] = fused.meta.get("stack_trace")
        heads_last = insert_call(gm, aten.permute.default, (merged, [0, 2, 1, 3]), merge)
        merged_shape = size_args(gm, shape(merge), merge)
        merge.replace_all_uses_with(insert_call(gm, aten.view.default, (heads_last, merged_shape), merge))
        return merged
    return fused


def _zero_dead_rows(gm, fused: Node, alive: Node, merge_heads: bool, before: Node) -> Node:
    """``where(alive, fused, 0)`` in ``fused``'s layout: ``where`` lays its result out after its
    first operand (the (B, H, L, 1) condition, contiguous), so for a (B, L, H, D)-ordered output it
    runs on the heads-last views and the result is permuted back."""
    if not merge_heads:
        return insert_call(gm, aten.where.ScalarOther, (alive, fused, 0.0), before)
    to_heads_last = [0, 2, 1, 3]
    alive_last = insert_call(gm, aten.permute.default, (alive, to_heads_last), before)
    alive_last = insert_call(gm, aten.clone.default, (alive_last,), before, {"memory_format": torch.contiguous_format})
    fused_last = insert_call(gm, aten.permute.default, (fused, to_heads_last), before)
    zeroed = insert_call(gm, aten.where.ScalarOther, (alive_last, fused_last, 0.0), before)
    return insert_call(gm, aten.permute.default, (zeroed, to_heads_last), before)


@dataclasses.dataclass(frozen=True)
class ClaimSDPA:
    name: str = "claim-sdpa"

    def __call__(self, gm: torch.fx.GraphModule) -> PassResult:
        import fxfuse.ops  # noqa: F401  (the rewritten graph calls torch.ops.fxfuse.attention)

        result = PassResult(self.name)
        for node in list(gm.graph.nodes):
            if node.op != "call_function":
                continue
            if node.target not in _OPS:
                continue
            source, code = source_of(node)
            try:
                claim = _recognise(node, gm)
            except Declined as why:
                result.misses.append(Miss("attention", source, str(why), code, shapes=why.shapes))
                continue
            fused = _replace(gm, node, claim)
            result.matches.append(Match("attention", source, claim.spec, fused.name, code, shape=site_shape(fused)))
            result.changed += 1
        return result
