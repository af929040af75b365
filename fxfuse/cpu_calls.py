"""The graph a rewritten module runs: its CPU sites call their implementations directly.

Outside torch.compile a fused operator costs the dispatcher's Python (custom_op's autograd
wrapper, its kernel lookup, the spec's parse): tens of microseconds a call, as much as the small
site it replaced took. So the graph ``fxfuse.rewrite``'s module executes (a copy; the graph it
reports and exports keeps the operators) calls, for each site on a CPU device, the function the
operator's CPU implementation is (``ops.attention.cpu_forward``, ``ops.norm.cpu_norm``, ...) with the
spec already parsed. With autograd on, autograd differentiates the ATen ops that function runs:
ATen's fused CPU attention forward and backward where it computes the spec, else the spec's
reference, whose gradient autograd takes as it did the user's code (and saves what the user's
code saved: the operator's recomputing backward is slower on CPU). Interpretation of the Triton
kernels, asked for when the call runs, still goes through the operators.
"""
from __future__ import annotations

import functools

import torch

import fxfuse.ops  # noqa: F401
from fxfuse import config
from fxfuse.ops import attention as attention_op
from fxfuse.ops import norm as norm_op

_fx = torch.ops.fxfuse


def _attention_call(spec_text: str, autograd: bool = True):
    spec = attention_op._spec(spec_text)
    op = _fx.attention.default

    def attention(q, k, v, extras, spec_arg=spec_text, seed=None, merge_heads=False):
        # A safe softmax's fully hidden rows: autograd of the reference gives NaN gradients there
        # (softmax of -inf), the operator's backward gives the zeros eager's _safe_softmax gives.
        if q.device.type != "cpu" or config.interpret_on_cpu() or (
                autograd and spec.safe_softmax and torch.is_grad_enabled()
                and (q.requires_grad or k.requires_grad or v.requires_grad or any(e.requires_grad for e in extras))):
            return op(q, k, v, extras, spec_arg, seed, merge_heads)
        attention_op._check_heads(spec, q, k, v)
        return attention_op.cpu_forward(spec, q, k, v, extras, seed, merge_heads, autograd=autograd)

    return attention


def _attention_rope_call(spec_text: str, autograd: bool = True):
    """RoPE sites: the rotation as the user's code wrote it (autograd differentiates it as it did
    the user's ops), then the attention site's own direct call. The operator's backward recomputes
    the rotation and the attention forward, which on CPU is slower than what it replaced."""
    from fxfuse.ops import attention_rope as rope_op

    spec = rope_op._spec(spec_text)
    plain = _attention_call(rope_op.without_rope(spec).to_json(), autograd)
    op = _fx.attention_rope.default

    def attention_rope(q, k, v, extras, tables, spec_arg=spec_text, seed=None, merge_heads=False):
        if q.device.type != "cpu" or config.interpret_on_cpu():
            return op(q, k, v, extras, tables, spec_arg, seed, merge_heads)
        attention_op._check_heads(spec, q, k, v)
        qr, kr = rope_op.rotated_operands(spec, q, k, tables)
        return plain(qr, kr, v, extras, seed=seed, merge_heads=merge_heads)

    return attention_rope


def _differential_call(spec_text: str):
    """Differential sites: each half by the attention's CPU path (autograd differentiates the ATen
    ops it runs), combined with the user's two ops."""
    from fxfuse.ops import attention_differential as diff_op

    spec, half, _ = diff_op._specs(spec_text)
    op = _fx.attention_differential.default

    def attention_differential(q1, k1, q2, k2, v, lam, extras, spec_arg=spec_text, merge_heads=False):
        grads = torch.is_grad_enabled() and any(t.requires_grad for t in (q1, k1, q2, k2, v, lam, *extras))
        if q1.device.type != "cpu" or config.interpret_on_cpu() or (half.safe_softmax and grads):
            return op(q1, k1, q2, k2, v, lam, extras, spec_arg, merge_heads)
        diff_op._check(half, q1, k1, q2, k2, v, lam)
        # Only the output is read (the graph takes item 0): autograd differentiates the ATen ops.
        return diff_op.cpu_forward(spec, q1, k1, q2, k2, v, lam, extras, merge_heads, autograd=True), None, None

    return attention_differential


def _norm_call(spec_text: str):
    spec = norm_op._spec(spec_text)
    op = _fx.norm.default

    def norm(x, params, spec_arg=spec_text):
        if x.device.type != "cpu" or config.interpret_on_cpu():
            return op(x, params, spec_arg)
        return norm_op.cpu_norm(spec, x, params)

    return norm


def _norm_then_contiguous_call(spec_text: str):
    """A norm site whose only use is ``clone(memory_format=contiguous)``: the pass keeps the layout
    the user's code had (``F.layer_norm`` gives a contiguous output for a transposed input, Swin's
    patch embedding), so the operator's output in the input's strides was copied back. This call
    computes both: the output contiguous, made once (ATen's layer_norm gives it so)."""
    spec = norm_op._spec(spec_text)
    op = _fx.norm.default

    def norm_contiguous(x, params, spec_arg=spec_text):
        if x.device.type != "cpu" or config.interpret_on_cpu():
            return op(x, params, spec_arg).clone(memory_format=torch.contiguous_format)
        return norm_op.cpu_norm(spec, x, params, contiguous=True)

    return norm_contiguous


def _then_contiguous(node: torch.fx.Node) -> torch.fx.Node | None:
    """The node's only user when that is ``clone(node, memory_format=torch.contiguous_format)``."""
    users = list(node.users)
    if len(users) != 1:
        return None
    (user,) = users
    if user.op == "call_function" and user.target is torch.ops.aten.clone.default and user.args == (node,) \
            and user.kwargs == {"memory_format": torch.contiguous_format}:
        return user
    return None


def _add_norm_call(spec_text: str):
    spec = norm_op._spec(spec_text)
    op = _fx.add_norm.default

    def add_norm(x, residual, params, spec_arg=spec_text):
        if x.device.type != "cpu" or config.interpret_on_cpu():
            return op(x, residual, params, spec_arg)
        return norm_op.cpu_add_norm(spec, x, residual, params)

    return add_norm


def _sum_norm_call(spec_text: str):
    spec = norm_op._spec(spec_text)
    op = _fx.sum_norm.default

    def sum_norm(terms, params, spec_arg=spec_text):
        if terms[0].device.type != "cpu" or config.interpret_on_cpu():
            return op(terms, params, spec_arg)
        return norm_op.cpu_sum_norm(spec, terms, params)

    return sum_norm


def _polynorm_call(spec_text: str, autograd: bool = True):
    from fxfuse.ops import polynorm as polynorm_op
    from fxfuse.ops import polynorm_cpu

    spec = polynorm_op._spec(spec_text)
    op = _fx.polynorm.default

    def polynorm(x, weights, bias, spec_arg=spec_text):
        if x.device.type != "cpu" or config.interpret_on_cpu():
            return op(x, weights, bias, spec_arg)
        if not autograd:  # the operator's CPU implementation, as it is
            polynorm_op._check(spec, x, weights, bias)
            if polynorm_cpu.applies(x, weights, bias):
                return polynorm_cpu.forward(spec, x.contiguous(), weights, bias)
            return polynorm_op.reference(spec, x, weights, bias).contiguous()
        if polynorm_cpu.applies(x, weights, bias):
            return polynorm_cpu.call(spec, x.contiguous(), weights, bias)
        return polynorm_op.reference(spec, x, weights, bias)

    return polynorm


# operator -> (the call for a spec, the position of the spec among its arguments)
_CALLS = {
    _fx.attention.default: (_attention_call, 4),
    _fx.attention_rope.default: (_attention_rope_call, 5),
    _fx.attention_differential.default: (_differential_call, 7),
    _fx.norm.default: (_norm_call, 2),
    _fx.add_norm.default: (_add_norm_call, 3),
    _fx.sum_norm.default: (_sum_norm_call, 2),
    _fx.polynorm.default: (_polynorm_call, 3),
}


def _on_cpu(node: torch.fx.Node) -> bool:
    first = node.args[0]
    if isinstance(first, (list, tuple)) and first:  # sum_norm: its terms
        first = first[0]
    val = first.meta.get("val") if isinstance(first, torch.fx.Node) else None
    return isinstance(val, torch.Tensor) and val.device.type == "cpu"


# The calls that are the operator's own CPU implementation when nothing is differentiated
# through them (``direct_cpu_calls(gm, autograd=False)``): the same function, the same strides.
_OPERATOR_EQUAL = (_fx.attention.default, _fx.attention_rope.default, _fx.norm.default, _fx.add_norm.default,
                   _fx.sum_norm.default, _fx.polynorm.default)
_WITH_AUTOGRAD_FLAG = (_fx.attention.default, _fx.attention_rope.default, _fx.polynorm.default)


def direct_cpu_calls(gm: torch.fx.GraphModule, autograd: bool = True, sites: bool = True) -> torch.fx.GraphModule:
    """A copy of ``gm`` (``gm`` itself is unchanged) whose CPU fused sites call their
    implementations directly (``sites``) and whose ATen calls skip ``OpOverload.__call__``.
    ``autograd=False``: for a graph autograd never differentiates (AOTAutograd's compiled forward,
    which runs with grad off, its backward given as a graph of its own: the backend's
    ``inner="eager"``), whose sites must compute exactly what their operators' CPU implementations
    do (the values and strides AOTAutograd planned for); only those sites whose direct call is that
    implementation are replaced."""
    graph = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    output = graph.graph_copy(gm.graph, env)
    graph.output(output)
    folded = []
    for old, node in env.items():
        if old.op != "call_function" or node in folded:
            continue
        if sites and old.target is _fx.norm.default and _on_cpu(old) and (clone := _then_contiguous(old)) is not None:
            node.target = _norm_then_contiguous_call(old.args[2] if len(old.args) > 2 else old.kwargs["spec"])
            env[clone].replace_all_uses_with(node)
            folded.append(env[clone])
        elif sites and old.target in _CALLS and _on_cpu(old) and (autograd or old.target in _OPERATOR_EQUAL):
            make, spec_at = _CALLS[old.target]
            spec_text = node.args[spec_at] if len(node.args) > spec_at else node.kwargs["spec"]
            node.target = make(spec_text, autograd) if old.target in _WITH_AUTOGRAD_FLAG else make(spec_text)
        elif isinstance(old.target, torch._ops.OpOverload):
            node.target = _unwrapped(old.target)
    for clone in folded:
        graph.erase_node(clone)
    return torch.fx.GraphModule(gm, graph)


@functools.lru_cache(maxsize=None)
def _unwrapped(op: torch._ops.OpOverload) -> functools.partial:
    """What ``OpOverload.__call__`` calls (``self._op(*args, **kwargs)``), without its Python
    frame: 1-2 us of a 4-8 us view or add, on every node of a graph of mostly small ops. A
    partial (called in C) with a name of its own, so that the graph's generated code holds it as a
    global (``_op`` itself, nameless, cannot be written there).

    The C++ dispatcher's handle: torch 2.14 may swap ``_op`` for a Python fast path that
    ``__call__`` bypasses in some states; the handle it falls back to is always the full dispatch."""
    call = functools.partial(getattr(op, "_cpp_dispatch_handle", op._op))
    call.__name__ = "aten_" + str(op).replace("aten.", "", 1).replace(".", "_") if str(op).startswith("aten.") \
        else str(op).replace(".", "_")
    call.__module__ = __name__
    return call
