"""Handing the rewritten graph to Inductor (the backend's default ``inner="inductor"``).

Inductor compiles everything no pass claimed (pointwise chains, reductions, matmul epilogues) and
keeps each fused operator as a call: custom operators are opaque to it, their autograd formulas are
traced by AOTAutograd into a call of the backward operator, and their fake implementations give it
the outputs' shapes and strides.

On CPU a fused operator would otherwise run its torch path op by op, between kernels that Inductor
fused; so before Inductor sees the graph, each CPU site (unless the Triton kernels are to be
interpreted) is replaced by the fastest exact form Inductor can compile, and autograd differentiates
that form instead of calling the backward operator:

- attention that ATen's fused CPU attention computes exactly (``ops.attention._sdpa_form``), in
  training only where its backward gives the user's gradient (no mask, or causal with Lq == Lk):
  ``F.scaled_dot_product_attention`` -- its flash CPU kernel forward and backward;
- a mask that only the sizes decide (``size_mask``, at symbolic sizes) keeps an operator, which
  compares it with the causal rule once per shape and then runs ATen's ``is_causal`` kernels; in
  training ``fxfuse::attention_saved`` (ops.attention_saved), which saves the flash forward's row
  statistics for its backward instead of recomputing the forward there;
- other attention without dropout: the spec's torch reference, which Inductor fuses as it would
  have fused the user's code, and whose gradient autograd takes as it took the user's (dropout keeps
  the operator: its mask is drawn from a seeded generator, which tracing cannot carry). At symbolic
  sizes the reference takes all query rows at once, as the user's code did (its row chunks are
  chosen from concrete sizes);
- norms: ``torch.layer_norm`` where it computes the spec (``ops.norm._aten_layer_norm_args``),
  which Inductor decomposes as it does the user's own ``F.layer_norm``, else the spec's torch
  reference; Inductor turns either into one loop per row, forward and backward.

Each form computes the spec in the user's dtypes, as the operator's own CPU path does; tests compare
both to the float64 reference.
"""
from __future__ import annotations

import contextlib
import operator

import torch
from torch._guards import detect_fake_mode
from torch.fx.experimental.proxy_tensor import make_fx

import fxfuse.ops  # noqa: F401
from fxfuse import config
from fxfuse.capture import saved_tensors_hooks_deferred
from fxfuse.ops import attention as attention_op
from fxfuse.ops import attention_rope as rope_op
from fxfuse.ops import attention_saved  # noqa: F401  (defines fxfuse::attention_saved)
from fxfuse.ops import norm as norm_op

_fx = torch.ops.fxfuse

def inductor_config(mode: str | None, options: dict | None) -> dict:
    """Inductor's config patches for a mode (config.MODES) and the user's own Inductor options
    (these win)."""
    from torch._inductor import list_mode_options

    return {**(list_mode_options(mode) if mode not in (None, "default") else {}), **(options or {})}


def _static(*tensors) -> bool:
    return all(isinstance(n, int) for t in tensors for n in t.shape)


def _laid_out(out, merge_heads: bool):
    """The operator's promised layout, which the graph's views after it rely on: (B, Lq, H, Dv)
    memory order with ``merge_heads`` (SDPA's CPU kernel gives it already), else contiguous."""
    return out.transpose(1, 2).contiguous().transpose(1, 2) if merge_heads else out.contiguous()


def _attention_form(q, k, v, extras, spec, seed=None, merge_heads=False, *, grads=(), qkv_grad=False):
    s = attention_op._spec(spec)
    if s.size_mask >= 0:  # an operator checks the mask once per shape, then runs is_causal (ops.size_masks)
        if qkv_grad and s.inputs == ("mask",) and not s.dropout and attention_op._sdpa_form(s) is not None:
            # training: the operator that saves the flash forward's statistics for its backward
            return lambda q, k, v, mask: _laid_out(_fx.attention_saved(q, k, v, [mask], spec)[0], merge_heads)
        return None
    form = attention_op._sdpa_form(s)
    # SDPA's CPU kernel gives no gradient for its mask: a bias that needs one (T5's learned
    # position bias) takes the reference, which autograd differentiates; and with a mask its
    # backward differs from the user's gradient in rows that see no key (_every_row_sees_a_key).
    if form is not None and qkv_grad and not attention_op._every_row_sees_a_key(form, q, k):
        form = None
    if form is not None and not any(step.op == "add" and step.input >= 0 and grads[step.input] for step in s.steps):
        return lambda q, k, v, *extras: _laid_out(attention_op._sdpa(s, form, q, k, v, list(extras)), merge_heads)
    if s.dropout:
        return None
    # At symbolic sizes all rows at once (the row chunks are chosen from concrete sizes): the
    # scores the user's code materialised too, so no more memory than without fxfuse.
    chunked = _static(q, k, v, *extras)
    return lambda q, k, v, *extras: _laid_out(attention_op.reference(s, q, k, v, list(extras), chunked=chunked),
                                              merge_heads)


def _normalized(s, x, params):
    """A norm site as Inductor should see it: ``aten.native_layer_norm`` where that computes it
    (Inductor then decomposes it, forward and backward, exactly as it does the user's F.layer_norm:
    its backward formula takes fewer reductions than autograd's of the reference), else the reference."""
    affine = norm_op._aten_layer_norm_args(s, x, params)
    if affine is None:
        return norm_op.reference(s, x, params)
    return torch.layer_norm(x, (x.shape[-1],), *affine, s.eps)


def _attention_rope_form(q, k, v, extras, tables, spec, seed=None, merge_heads=False, *, grads=(), qkv_grad=False):
    """RoPE, then the attention form: Inductor fuses the rotation into one pointwise loop per operand."""
    s = attention_op._spec(spec)
    inner = _attention_form(q, k, v, extras, rope_op.without_rope(s).to_json(), seed, merge_heads, grads=grads,
                            qkv_grad=qkv_grad)
    if inner is None:
        return None
    n = len(extras)

    def form(q, k, v, *rest):
        qr, kr = rope_op.rotated_operands(s, q, k, list(rest[n:]))
        return inner(qr, kr, v, *rest[:n])

    return form


def _differential_form(q1, k1, q2, k2, v, lam, extras, spec, merge_heads=False, *, grads=(), qkv_grad=False):
    """Differential attention: each half's attention form, combined as the user's code does."""
    from fxfuse.ops import attention_differential as diff_op

    _, _, half_json = diff_op._specs(spec)
    inner = _attention_form(q1, k1, v, extras, half_json, grads=grads, qkv_grad=qkv_grad)
    if inner is None:
        return None
    s = diff_op._specs(spec)[0]

    def form(q1, k1, q2, k2, v, lam, *extras):
        # (out, stats, halves) as the operator returns them; only the output has users (autograd
        # differentiates this form, not the operator's backward), so the other two are dead code.
        o1, o2 = inner(q1, k1, v, *extras), inner(q2, k2, v, *extras)
        return _laid_out(diff_op.combine(o1, o2, lam), merge_heads), *diff_op._not_saved(s, q1, o1, o2)

    return form


def _norm_form(x, params, spec):
    s = norm_op._spec(spec)
    return lambda x, *params: _normalized(s, x, list(params))


def _add_norm_form(x, residual, params, spec):
    s = norm_op._spec(spec)

    def form(x, residual, *params):
        total = (x + residual).to(norm_op.to_dtype(s.sum_dtype))
        return _normalized(s, total, list(params)), total

    return form


def _sum_norm_form(terms, params, spec):
    s = norm_op._spec(spec)
    n = len(terms)

    def form(*args):
        total = norm_op.scaled_sum(s, list(args[:n]))
        return _normalized(s, total, list(args[n:])), total

    return form


def _polynorm_form(x, weights, bias, spec):
    from fxfuse.ops import polynorm as polynorm_op

    s = polynorm_op._spec(spec)
    n = len(weights)
    # Out of place whatever the fake tensors' requires_grad says: AOTAutograd may differentiate it.
    return lambda x, *rest: polynorm_op.differentiable_reference(s, x, list(rest[:n]), rest[n])


# operator -> (the form for these arguments or None, the tensor arguments it takes, in order)
_FORMS = {
    _fx.attention.default: (_attention_form, lambda q, k, v, extras, *rest, **kw: [q, k, v, *extras]),
    _fx.attention_rope.default: (_attention_rope_form,
                                 lambda q, k, v, extras, tables, *rest, **kw: [q, k, v, *extras, *tables]),
    _fx.attention_differential.default: (_differential_form, lambda q1, k1, q2, k2, v, lam, extras, *rest, **kw:
                                         [q1, k1, q2, k2, v, lam, *extras]),
    _fx.norm.default: (_norm_form, lambda x, params, spec: [x, *params]),
    _fx.add_norm.default: (_add_norm_form, lambda x, residual, params, spec: [x, residual, *params]),
    _fx.sum_norm.default: (_sum_norm_form, lambda terms, params, spec: [*terms, *params]),
    _fx.polynorm.default: (_polynorm_form, lambda x, weights, bias, spec: [x, *weights, bias]),
}


# attention operators -> the position of their extras (the operands come before them)
_ATTENTION_EXTRAS = {_fx.attention.default: 3, _fx.attention_rope.default: 3, _fx.attention_differential.default: 6}


def _fake(a):
    return a.meta["val"] if isinstance(a, torch.fx.Node) else [_fake(x) for x in a] if isinstance(a, (list, tuple)) else a


def _needing_grad(gm: torch.fx.GraphModule, example_inputs) -> set:
    """The nodes whose value may need a gradient: those computed from an input that requires grad
    (parameters included) while grad mode is on, except through a detach (over-approximated)."""
    if not torch.is_grad_enabled():
        return set()
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    found = {p for p, x in zip(placeholders, example_inputs) if isinstance(x, torch.Tensor) and x.requires_grad}
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target is not torch.ops.aten.detach.default \
                and any(a in found for a in n.all_input_nodes):
            found.add(n)
    return found


# Operators whose own CPU forward and backward beat their form run op by op (inner="eager"):
# PolyNorm's closed-form backward (ops.polynorm_cpu) against autograd's of the reference.
_KEPT_OP_BY_OP = {_fx.polynorm.default}


def lower_cpu_sites(gm: torch.fx.GraphModule, example_inputs=(), for_inductor: bool = True) -> int:
    """Replace the graph's CPU fused sites by the forms above, in place; returns how many.
    ``for_inductor=False``: the forms are to run op by op (the backend's inner="eager" in
    training), and the operators in ``_KEPT_OP_BY_OP`` stay."""
    if config.interpret_on_cpu():
        return 0  # the Triton kernels were asked for: they run through the operators
    needing_grad = _needing_grad(gm, example_inputs)
    lowered = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in _FORMS \
                or (not for_inductor and node.target in _KEPT_OP_BY_OP):
            continue
        choose, tensor_args = _FORMS[node.target]
        fakes = _fake(node.args)
        inputs = tensor_args(*fakes, **_fake(node.kwargs))
        if inputs[0].device.type != "cpu":
            continue
        if node.target in _ATTENTION_EXTRAS:
            at = _ATTENTION_EXTRAS[node.target]  # the operands before the extras, then the extras
            grads = [a in needing_grad for a in node.args[at]]
            qkv_grad = any(a in needing_grad for a in node.args[:at])
            form = choose(*fakes, **_fake(node.kwargs), grads=grads, qkv_grad=qkv_grad)
        else:
            form = choose(*fakes, **_fake(node.kwargs))
        if form is None:
            continue
        # Traced on Dynamo's fake tensors, in their mode: sizes stay symbolic, and tensors the form
        # makes (a causal mask) are ops of the graph, not constants; the user's saved-tensor hooks
        # run at run time, not here.
        with detect_fake_mode(inputs) or contextlib.nullcontext(), saved_tensors_hooks_deferred():
            sub = make_fx(form)(*inputs)
        _inline(gm, node, sub, tensor_args(*node.args, **node.kwargs))
        lowered += 1
    if lowered:
        gm.graph.eliminate_dead_code()
        gm.graph.lint()
        gm.recompile()
    return lowered


def _inline(gm: torch.fx.GraphModule, node: torch.fx.Node, sub: torch.fx.GraphModule, args: list) -> None:
    """Put ``sub``'s nodes in place of ``node`` (the user's source line stays on each)."""
    env: dict[torch.fx.Node, object] = {}
    placeholders = iter(args)
    with gm.graph.inserting_before(node):
        for n in sub.graph.nodes:
            if n.op == "placeholder":
                env[n] = next(placeholders)
            elif n.op == "get_attr":  # a constant the form made (a mask built from sizes)
                name = gm.graph._target_to_str(f"_fxfuse_const_{n.target}")
                value = getattr(sub, n.target)
                if isinstance(value, torch.Tensor):
                    gm.register_buffer(name, value, persistent=False)
                else:
                    setattr(gm, name, value)
                env[n] = gm.graph.get_attr(name)
                env[n].meta.update(n.meta)
            elif n.op == "output":
                result = n.args[0]
            else:
                copy = gm.graph.node_copy(n, lambda a: env[a])
                if "stack_trace" in node.meta:
                    copy.meta["stack_trace"] = node.meta["stack_trace"]
                env[n] = copy
    out = torch.fx.node.map_arg(result, lambda a: env[a])
    if isinstance(out, (list, tuple)):  # add_norm: its users index the pair
        for user in list(node.users):
            assert user.target is operator.getitem, user
            user.replace_all_uses_with(out[user.args[1]])
            gm.graph.erase_node(user)
    else:
        node.replace_all_uses_with(out)
    gm.graph.erase_node(node)


def views_as_reshapes(gm: torch.fx.GraphModule) -> int:
    """Turn the graph's ``aten.view`` nodes into ``aten.reshape``, in place; returns how many.

    The graph was traced once already, by the capture (and by ``lower_cpu_sites``' forms): each
    composite op (``matmul``, ``reshape``, ``flatten``) chose a view there from the strides the
    tensors had in that trace. Inductor traces it again with its own decompositions, which can lay
    a tensor out otherwise: ``cat`` of one non-empty tensor (RoPE's empty pass-through part, Phi-3)
    becomes a ``clone`` that keeps its input's transposed strides where eager's cat is contiguous,
    and the view made for the contiguous tensor then fails ("Cannot view a tensor with shape ...").
    ``reshape`` makes that choice again against the strides of the new trace: the same view where
    one exists, a copy where not, the same values either way. A view that an in-place op writes
    through (directly or through further views) stays: there the aliasing is the semantics."""
    written: set[torch.fx.Node] = set()
    for node in reversed(gm.graph.nodes):
        target = node.target
        if node.op != "call_function" or not isinstance(target, torch._ops.OpOverload):
            continue
        schema = target._schema
        if schema.is_mutable:
            for arg, value in zip(schema.arguments, node.args):
                if arg.alias_info is not None and arg.alias_info.is_write and isinstance(value, torch.fx.Node):
                    written.add(value)
        if node in written and schema.arguments and schema.arguments[0].alias_info is not None \
                and isinstance(node.args[0], torch.fx.Node):
            written.add(node.args[0])  # a view of a written tensor: its base is written through it
    changed = 0
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is torch.ops.aten.view.default and node not in written:
            node.target = torch.ops.aten.reshape.default
            changed += 1
    if changed:
        gm.recompile()
    return changed
