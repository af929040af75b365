"""Capture: a model or callable plus example inputs → one ATen-level functional FX graph.

Both entry points (``fxfuse.rewrite`` and the torch.compile backend) converge here. The graph is
traced with ``make_fx`` over fake tensors under functionalization, so every node carries
``meta["val"]`` (a fake tensor: shape, dtype, device, symbolic sizes) and ``meta["stack_trace"]``
(the user's source line).

Two things the plain ATen trace loses are put back here:

- in-place updates of inputs (buffers such as running statistics or step counters): functional
  code computes the new value; ``capture_module`` returns it as an extra output (the caller writes
  it back), ``capture_graph`` ends the graph with ``copy_`` into the input, as AOTAutograd expects;
- ``torch.no_grad()`` regions: make_fx records below autograd, so without help the gradient would
  flow through code the user excluded from it. Ops run while grad mode is off are tagged during the
  trace and their inputs from outside the region are cut with ``detach``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import sys
import traceback
import warnings
from typing import Any, Callable

import torch
import torch.utils._pytree as pytree
from torch._functorch._aot_autograd.functional_utils import from_fun, to_fun
from torch._subclasses.fake_tensor import DataDependentOutputException, DynamicOutputShapeException
from torch._subclasses.functional_tensor import FunctionalTensor, FunctionalTensorMode
from torch.fx import traceback as fx_traceback
from torch.fx.experimental.proxy_tensor import make_fx
from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode, guard_scalar
from torch.overrides import TorchFunctionMode

from fxfuse import cache_parts
from fxfuse.frames import LIBRARY_DIRS, FunctionFinder, is_library_frame
from fxfuse.output_dataclasses import open_dataclasses

aten = torch.ops.aten
_NO_GRAD = "fxfuse_grad_disabled"  # key in node.meta["custom"] of ops traced with grad mode off


class CaptureError(RuntimeError):
    """The model could not be traced into a graph; the message says why and what to do."""


@dataclasses.dataclass
class Captured:
    """A module captured as ``gm(*params, *buffers, *tensor_inputs) -> [*outputs, *updated]``.

    ``updated`` holds the new values of the inputs the model changes in place, in the order of
    ``mutated`` (positions among the graph inputs); the caller writes them back.
    """

    gm: torch.fx.GraphModule
    param_names: list[str]
    buffer_names: list[str]
    in_spec: pytree.TreeSpec
    in_leaves: list[Any]  # the example's leaves: tensors, or the constants the graph specialised on
    out_spec: pytree.TreeSpec
    out_constants: dict[int, Any]  # output leaves that are not tensors, by leaf position
    training: bool
    mutated: list[int] = dataclasses.field(default_factory=list)
    mutated_without_grad: list[int] = dataclasses.field(default_factory=list)  # all its updates ran under no_grad
    # Output leaves that ARE an input tensor (``return x``, or a buffer updated in place and
    # returned): output leaf position -> graph input position, so the caller returns that tensor.
    output_is_input: dict[int, int] = dataclasses.field(default_factory=dict)
    # Custom torch.autograd.Functions the forward calls ("Name at file:line"): the graph holds their
    # forward only, so it must not be differentiated (see fxfuse.api).
    custom_functions: list[str] = dataclasses.field(default_factory=list)
    # Returned cache objects that are a cache passed in (returned ordinal -> passed ordinal, in
    # pytree order): the caller updates the passed object in place and returns it.
    cache_is_input: dict[int, int] = dataclasses.field(default_factory=dict)


# ---- errors ----------------------------------------------------------------------------------------

_DATA_DEPENDENT = (GuardOnDataDependentSymNode, DataDependentOutputException, DynamicOutputShapeException)


def _user_frame(err: BaseException) -> str:
    """The innermost frame of the user's code in ``err``'s traceback, as ``file:line: code``."""
    frames = [f for f in traceback.extract_tb(err.__traceback__) if not is_library_frame(f.filename)]
    if not frames:
        return ""
    f = frames[-1]
    return f"{f.filename}:{f.lineno}: {(f.line or '').strip()}"


def _capture_error(err: Exception) -> CaptureError:
    first = str(err).strip().splitlines()[0] if str(err).strip() else ""
    where = _user_frame(err)
    at = f" at {where}" if where else ""
    if isinstance(err, _DATA_DEPENDENT):
        return CaptureError(
            f"fxfuse cannot capture the model whole: its control flow depends on tensor values{at} "
            f"({type(err).__name__}: {first}).\n"
            "A Python `if`/`int()`/`.item()` on a tensor's value is decided once at capture time, so "
            "the graph would be wrong for other inputs. Either use torch.compile(model, "
            "backend='fxfuse'), which splits the model into graphs around such code, or rewrite "
            "the part of the model without it (e.g. fxfuse.rewrite(model.block, ...)), or express "
            "the branch with tensor ops (torch.where)."
        )
    return CaptureError(
        f"fxfuse could not trace the model on fake tensors shaped like the example inputs: "
        f"{type(err).__name__}{at}: {first}\n"
        "Check that model(*example_inputs, **example_kwargs) runs eagerly with these inputs; the "
        "original exception is chained below."
    )


def _tensor_inside(obj: Any, depth: int = 3) -> bool:
    """Whether a non-tensor object (a cache, a config) holds tensors a few attributes deep."""
    if isinstance(obj, torch.Tensor):
        return True
    if depth == 0 or isinstance(obj, (type(None), bool, int, float, complex, str, bytes, type, torch.dtype, torch.device)):
        return False
    if isinstance(obj, (list, tuple, set, frozenset)):
        children = list(obj)[:64]
    elif isinstance(obj, dict):
        children = list(obj.values())[:64]
    elif isinstance(obj, torch.nn.Module):
        return True
    elif hasattr(obj, "__dict__") and not callable(obj):
        children = list(vars(obj).values())[:64]
    else:
        return False
    return any(_tensor_inside(c, depth - 1) for c in children)


def _leaf_name(tree: Any, index: int) -> str:
    """``['cache']`` or ``[1]``: where leaf ``index`` sits in ``tree``, for messages."""
    try:
        return pytree.keystr(pytree.tree_flatten_with_path(tree)[0][index][0])
    except Exception:  # a pytree node type registered without key paths
        return f"leaf {index}"


def _opaque_error(what: str, obj: Any) -> CaptureError:
    """``what``: "input ['cache']", "output" (the whole output) or "output [1]"."""
    kind = type(obj)
    hugging_face = (kind.__module__ or "").split(".")[0] == "transformers"
    return CaptureError(
        f"the model's {what} is a {kind.__qualname__} ({kind.__module__}) holding tensors, which fxfuse cannot take "
        f"apart: it would {'return tensors from the capture instead of this call' if what.startswith('output') else 'bake them into the graph as constants'}. "
        "Register the type as a pytree node (torch.utils._pytree.register_pytree_node, or "
        "register_dataclass), or leave it out"
        + (" (use_cache=False / past_key_values=None for a cache)." if hugging_face else ".")
    )


# ---- tracing ---------------------------------------------------------------------------------------

_DETACH = (torch.Tensor.detach, torch.detach)


class _TagNoGrad(TorchFunctionMode):
    """Tags the nodes of every torch call made while grad mode is off, and of every ``detach``
    (see ``_cut_no_grad``), and
    records the custom autograd Functions whose forward runs: make_fx records below autograd, so
    their own backward is not in the graph (the rewritten module refuses to differentiate them)."""

    def __init__(self, custom_functions: list[str]):
        super().__init__()
        self.custom_functions = custom_functions
        self._functions = FunctionFinder()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if torch.is_grad_enabled():
            if func not in _DETACH:
                return func(*args, **kwargs)
            # A detach is a one-op no-grad region: since torch 2.14 functionalization records
            # it as aten.alias, which gradients flow through; the cut puts the detach back.
        else:
            call = self._functions.call()
            if call is not None and call not in self.custom_functions:
                self.custom_functions.append(call)
        meta = fx_traceback.get_current_meta()
        saved = meta.get("custom")
        meta["custom"] = {**(saved or {}), _NO_GRAD: True}
        try:
            return func(*args, **kwargs)
        finally:
            if saved is None:
                meta.pop("custom", None)
            else:
                meta["custom"] = saved


def _functionalized(fn: Callable, info: dict, write_back: bool, originals: list | None = None) -> Callable:
    """``fn`` with in-place updates removed; what it mutated is recorded in ``info``.

    With ``write_back`` the traced graph ends with ``input.copy_(new_value)`` for each mutated input
    (AOTAutograd's convention); otherwise the new values are appended to the flat outputs.
    """

    def run(*flat):
        for arg, original in zip(flat, originals or ()):
            # Dynamo turns a float attribute into a 0-d tensor input under dynamic=True and
            # remembers its value as a symbol (item_memo) that make_fx's copy of the input lacks.
            if getattr(original, "item_memo", None) is not None and getattr(arg, "item_memo", 0) is None:
                arg.item_memo = original.item_memo
        # Functionalization in Python (FunctionalTensorMode, as AOTAutograd does): the C++
        # torch.func.functionalize specialises Dynamo's symbolic sizes to their example values.
        no_outer = torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(torch._C.DispatchKey.Functionalize))
        with no_outer, FunctionalTensorMode():
            f_flat = [to_fun(a) for a in flat]
            with fx_traceback.preserve_node_meta(), _TagNoGrad(info.setdefault("custom_functions", [])):
                outs = fn(*f_flat)
            out_leaves, out_spec = pytree.tree_flatten(outs)
            info["output_is_input"] = {k: i for k, o in enumerate(out_leaves) for i, fa in enumerate(f_flat)
                                       if isinstance(o, torch.Tensor) and o is fa}
            mutated, new_values, without_grad = [], [], []
            for i, fa in enumerate(f_flat):
                if not isinstance(fa, FunctionalTensor):
                    continue
                torch._sync(fa)
                if torch._functionalize_has_metadata_mutation(fa.elem) or torch._functionalize_was_storage_changed(fa.elem):
                    raise CaptureError(
                        f"the model changes the shape, strides or storage of input {i} in place "
                        "(e.g. x.unsqueeze_(0), x.resize_(...), x.set_(...)); fxfuse only replays changes "
                        "of values. Use the out-of-place form (x = x.unsqueeze(0))."
                    )
                if torch._functionalize_has_data_mutation(fa.elem):
                    mutated.append(i)
                    new_values.append(from_fun(fa))
                    if torch._functionalize_are_all_mutations_under_no_grad_or_inference_mode(fa.elem):
                        without_grad.append(i)
            out_leaves = [from_fun(o) for o in out_leaves]
        info["mutated"], info["mutated_without_grad"] = mutated, without_grad
        if write_back:
            for i, value in zip(mutated, new_values):
                flat[i].copy_(value)
            return pytree.tree_unflatten(out_leaves, out_spec)
        return [*out_leaves, *new_values]

    return run


def _cut_no_grad(gm: torch.fx.GraphModule) -> None:
    """Detach the values flowing into ops that ran under ``torch.no_grad()``.

    make_fx records below autograd, so the graph alone would let gradients flow through a no-grad
    region (a scale computed under no_grad, running statistics) and give gradients eager does not.
    """
    def tagged(n) -> bool:
        return bool(n.meta.get("custom", {}).get(_NO_GRAD))

    detached: dict[torch.fx.Node, torch.fx.Node] = {}
    last_placeholder = next((n for n in reversed(gm.graph.nodes) if n.op == "placeholder"), None)
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or not tagged(node):
            continue
        for inp in node.all_input_nodes:
            val = inp.meta.get("val")
            if tagged(inp) or not isinstance(val, torch.Tensor) or not (val.is_floating_point() or val.is_complex()):
                continue
            if inp not in detached:
                # Right where the value is made (after the inputs, for an input), so that a pass
                # moving its user earlier still finds it defined.
                with gm.graph.inserting_after(last_placeholder if inp.op == "placeholder" else inp):
                    cut = gm.graph.call_function(aten.detach.default, (inp,))
                cut.meta.update(val=val, stack_trace=node.meta.get("stack_trace"), custom={_NO_GRAD: True})
                detached[inp] = cut
            node.replace_input_with(inp, detached[inp])
    for node in gm.graph.nodes:  # the tag has done its job; keep other tools' "custom" meta intact
        custom = node.meta.get("custom")
        if custom and _NO_GRAD in custom:
            custom = {k: v for k, v in custom.items() if k != _NO_GRAD}
            if custom:
                node.meta["custom"] = custom
            else:
                del node.meta["custom"]
    if detached:
        gm.graph.lint()
        gm.recompile()


def _differentiable_copies(gm: torch.fx.GraphModule) -> None:
    """Replace functionalization's ``aten.copy(dst, src)`` with ops autograd can differentiate.

    ``buf = x.new_empty(...); buf[..., :d].copy_(a)`` (DeepSeek-V2/V3 attention builds its keys so)
    functionalizes into ``slice_scatter(buf, copy(buf[..., :d], a), ...)``, and ``aten.copy`` has
    no derivative: the rewritten module could not be trained. Its value is ``src`` cast to dst's
    dtype and broadcast to dst's shape, which ``_to_copy`` and ``expand`` compute with gradients
    (none to ``dst``, whose values it overwrites; ``src``'s summed over the broadcast).
    """
    changed = False
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not aten.copy.default:
            continue
        dst, src = node.args[:2]
        dst_val, src_val = dst.meta.get("val"), src.meta.get("val") if isinstance(src, torch.fx.Node) else None
        if not isinstance(dst_val, torch.Tensor) or not isinstance(src_val, torch.Tensor):
            continue
        with gm.graph.inserting_before(node):
            value = gm.graph.call_function(aten._to_copy.default, (src,),
                                           {"dtype": dst_val.dtype, "device": dst_val.device})
            with dst_val.fake_mode:
                value.meta["val"] = aten._to_copy.default(src_val, dtype=dst_val.dtype, device=dst_val.device)
            if tuple(src_val.shape) != tuple(dst_val.shape):
                value = gm.graph.call_function(aten.expand.default, (value, list(dst_val.shape)))
                with dst_val.fake_mode:
                    value.meta["val"] = aten.expand.default(value.args[0].meta["val"], list(dst_val.shape))
        for key in ("stack_trace", "custom"):
            if key in node.meta:
                value.meta[key] = node.meta[key]
        node.replace_all_uses_with(value)
        gm.graph.erase_node(node)
        changed = True
    if changed:
        gm.graph.lint()
        gm.recompile()


def _compiling():
    session = getattr(torch.compiler, "_compile_session_context", None)
    return session() if session is not None else contextlib.nullcontext()


class _DropRecords(logging.Filter):
    def filter(self, record) -> bool:
        return False


@contextlib.contextmanager
def _quiet_fake_tensor_log():
    """Fake tensors log every failing op's traceback at ERROR before raising it (34 lines for a
    wrong input shape); the error reaches the user once, in fxfuse's message with its cause."""
    logger, drop = logging.getLogger("torch._subclasses.fake_tensor"), _DropRecords()
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


def _trace(fn: Callable, flat_args: list, tracing_mode: str) -> torch.fx.GraphModule:
    try:
        # Traced with grad on, so that only the model's own no_grad regions count as such; and
        # with torch.compiler.is_compiling() true, as under torch.compile and torch.export, so that
        # libraries take their traceable paths (Hugging Face skips data-dependent checks then).
        with torch.enable_grad(), _compiling(), _quiet_fake_tensor_log():
            # Tensors the model reaches other than through its inputs, parameters and buffers (a
            # plain tensor attribute, a global) are kept by reference: in-place changes to them are
            # seen by later calls; assigning a new tensor to the attribute is not.
            gm = make_fx(fn, tracing_mode=tracing_mode, record_stack_traces=True, _allow_non_fake_inputs=True)(*flat_args)
    except CaptureError:
        raise
    except Exception as err:  # the tracer's errors are long; say what failed, keep the cause
        raise _capture_error(err) from err
    _cut_no_grad(gm)
    _differentiable_copies(gm)
    return gm


# ---- entry points ----------------------------------------------------------------------------------

def _warn_about_hooks(module: torch.nn.Module) -> None:
    """Hooks run once, at capture: what they compute is in the graph, what they do is not."""
    hooked = [repr(name or type(module).__name__) for name, m in module.named_modules()
              if m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks]
    if hooked:
        warnings.warn(
            f"fxfuse traces the hooks of {', '.join(hooked[:5])}{' ...' if len(hooked) > 5 else ''} into the "
            "graph: their effect on tensors is kept, but they run only once, at capture, not on each "
            "call (no logging or collecting of activations), and backward hooks do not run at all.",
            stacklevel=4)


def _refuse_sharded(module: torch.nn.Module) -> None:
    """FSDP2 keeps each parameter sharded between calls and gathers it in forward hooks with
    collectives; a trace on fake tensors can run neither, and the graph's parameters would be the
    shards. The rewritten module can be sharded instead: it reads the parameters FSDP gathers."""
    if not torch.distributed.is_available():
        return
    from torch.distributed.fsdp import FSDPModule

    sharded = [name or "the model" for name, m in module.named_modules() if isinstance(m, FSDPModule)]
    if sharded:
        raise CaptureError(
            f"{sharded[0]!r} is sharded with FSDP2 (fully_shard): its parameters are gathered by forward hooks "
            "that run collectives, which fxfuse cannot trace on fake tensors. Rewrite the unsharded model and "
            "shard the result: `res = fxfuse.rewrite(model, inputs); fully_shard(res.module)` (the rewritten "
            "module's graph reads the parameters FSDP gathers; shard each rewritten block the same way to keep "
            "per-block sharding), or use torch.compile(model, backend=\"fxfuse\") on the sharded model.")


class _ModuleAttributes:
    """The tensors each submodule holds (parameters, buffers, tensor attributes), kept before a
    trace so that what the forward assigns during it can be undone.

    A forward may assign a new tensor to itself (x-transformers' ALiBi caches its bias with
    ``register_buffer`` on first use): during the trace that tensor is a FunctionalTensor over fake
    values, and left in the module it breaks every later call. The graph holds the computation
    that made it, so the module gets back what it held before; a user is told which attributes."""

    def __init__(self, module: torch.nn.Module):
        self.saved = [(m, dict(m._parameters), dict(m._buffers), set(m._non_persistent_buffers_set),
                       dict(vars(m)))
                      for m in module.modules()]
        self.names = {m: name for name, m in module.named_modules(remove_duplicate=False)}

    def restore(self) -> list[str]:
        """Undo assignments made since; returns the qualified names of the attributes undone."""
        undone = []
        for m, params, buffers, non_persistent, attributes in self.saved:
            prefix = self.names.get(m, "")
            for store, before in ((m._parameters, params), (m._buffers, buffers)):
                for key in [k for k in store if k not in before or store[k] is not before[k]]:
                    undone.append(f"{prefix}.{key}" if prefix else key)
                    if key in before:
                        store[key] = before[key]
                    else:
                        del store[key]
            m._non_persistent_buffers_set = non_persistent
            attrs = vars(m)
            for key in [k for k, v in attrs.items() if isinstance(v, torch.Tensor) and attributes.get(k) is not v]:
                undone.append(f"{prefix}.{key}" if prefix else key)
                if key in attributes:
                    attrs[key] = attributes[key]
                else:
                    del attrs[key]
        return undone


def _warn_about_assignments(undone: list[str]) -> None:
    warnings.warn(
        f"the model's forward assigned new tensors to {', '.join(repr(n) for n in undone[:5])}"
        f"{' ...' if len(undone) > 5 else ''} while fxfuse captured it (a cache filled on first use?): the "
        "graph computes those values on each call, and the module keeps what it held before the capture. "
        "State that must carry over between calls should be updated in place (buffer.copy_(new)), which "
        "fxfuse replays.", stacklevel=_user_stacklevel())


def _user_stacklevel() -> int:
    """The ``stacklevel`` that points a warning issued by the caller at the user's line."""
    frame, level = sys._getframe(2), 2
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(LIBRARY_DIRS):
        frame, level = frame.f_back, level + 1
    return level


def capture_module(model: Callable, args: tuple, kwargs: dict | None = None, symbolic: bool = False) -> Captured:
    """Capture ``model(*args, **kwargs)``; parameters and buffers become the first graph inputs."""
    kwargs = kwargs or {}
    module = model if isinstance(model, torch.nn.Module) else None
    if module is not None:
        _refuse_sharded(module)
        _warn_about_hooks(module)
    params = dict(module.named_parameters(remove_duplicate=False)) if module is not None else {}
    buffers = dict(module.named_buffers(remove_duplicate=False)) if module is not None else {}
    # A Hugging Face cache (DynamicCache, StaticCache) passed in is read through its tensors.
    leaves, in_spec = pytree.tree_flatten(cache_parts.take_apart((tuple(args), dict(kwargs))))
    for leaf in leaves:
        if not isinstance(leaf, torch.Tensor) and _tensor_inside(leaf):
            raise _opaque_error("input", leaf)
    tensor_positions = [i for i, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor)]
    n_state = len(params) + len(buffers)
    out_holder: dict[str, Any] = {}

    def flat_fn(*flat):
        state = dict(zip([*params, *buffers], flat[:n_state]))
        call_leaves = list(leaves)
        for pos, tensor in zip(tensor_positions, flat[n_state:]):
            call_leaves[pos] = tensor
        call_args, call_kwargs = cache_parts.rebuild(pytree.tree_unflatten(call_leaves, in_spec))
        if module is not None:
            out = torch.func.functional_call(module, state, call_args, call_kwargs, tie_weights=False)
        else:
            out = model(*call_args, **call_kwargs)
        # A returned cache that is the one passed in (updated in place): the caller's object is
        # updated and returned, as eager does (see fxfuse.api).
        passed_ids = [id(c) for c in cache_parts.caches_in((call_args, call_kwargs))]
        out_holder["cache_is_input"] = {n: passed_ids.index(id(c)) for n, c in enumerate(cache_parts.caches_in(out))
                                        if id(c) in passed_ids}
        out = cache_parts.take_apart(open_dataclasses(out))  # a returned cache: its tensors
        out_leaves, out_spec = pytree.tree_flatten(out)
        out_holder["spec"] = out_spec
        out_holder["constants"] = {i: v for i, v in enumerate(out_leaves) if not isinstance(v, torch.Tensor)}
        out_holder["tensor_positions"] = [i for i, v in enumerate(out_leaves) if isinstance(v, torch.Tensor)]
        for i, v in out_holder["constants"].items():
            if _tensor_inside(v):
                raise _opaque_error(f"output {_leaf_name(out, i)}" if not out_spec.is_leaf() else "output", v)
        return [v for v in out_leaves if isinstance(v, torch.Tensor)]

    info: dict[str, Any] = {}
    flat_inputs = [*params.values(), *buffers.values(), *(leaves[i] for i in tensor_positions)]
    attributes = _ModuleAttributes(module) if module is not None else None
    try:
        gm = _trace(_functionalized(flat_fn, info, write_back=False), flat_inputs, "symbolic" if symbolic else "fake")
    finally:
        undone = attributes.restore() if attributes is not None else []
    if undone:
        _warn_about_assignments(undone)
    positions = out_holder["tensor_positions"]
    return Captured(
        gm=gm,
        param_names=list(params),
        buffer_names=list(buffers),
        in_spec=in_spec,
        in_leaves=leaves,
        out_spec=out_holder["spec"],
        out_constants=out_holder["constants"],
        training=bool(getattr(module, "training", False)),
        mutated=info["mutated"],
        mutated_without_grad=info["mutated_without_grad"],
        output_is_input={positions[k]: i for k, i in info["output_is_input"].items()},
        custom_functions=info.get("custom_functions", []),
        cache_is_input=out_holder["cache_is_input"],
    )


class _DynamoGraphInterpreter(torch.fx.Interpreter):
    """Runs a Dynamo graph op by op, reading floats as constants.

    Under ``dynamic=True`` Dynamo passes a float attribute (an eps, a scale) as a 0-d tensor read
    with ``.item()``; a fused site needs it as a constant, as it is without ``dynamic=True``. Its
    value is used with a guard on it, so Dynamo compiles again if the float ever changes.
    """

    def run_node(self, n: torch.fx.Node):
        source = n.args[0] if n.op == "call_method" and n.target == "item" and n.args else None
        if isinstance(source, torch.fx.Node) and source.op == "placeholder":
            memo = getattr(source.meta.get("example_value"), "item_memo", None)
            if isinstance(memo, torch.SymFloat):
                return guard_scalar(memo)
        return super().run_node(n)


def capture_graph(gm: torch.fx.GraphModule, example_inputs: list) -> torch.fx.GraphModule:
    """Capture a Dynamo graph (torch-level ops) as an ATen-level functional graph, same signature.

    Dynamo hands real example tensors to a backend, but records in each placeholder the fake tensor
    (with symbolic sizes under ``dynamic=True``) it traced with; tracing those symbolically, in
    Dynamo's own fake mode, keeps the sizes symbolic and the graph valid for every shape Dynamo's
    guards admit. Inputs the graph mutates are written back with ``copy_`` at its end.
    """
    functions = [n for n in gm.graph.nodes if n.op == "call_function" and
                 getattr(n.target, "__name__", "") == "autograd_function_apply"]
    if functions and torch.is_grad_enabled() and any(
            isinstance(x, torch.Tensor) and x.requires_grad for x in example_inputs):
        # Retracing below autograd would keep the Function's forward and lose its backward.
        where = functions[0].meta.get("stack_trace", "").strip().splitlines()
        raise CaptureError(
            "the graph calls a custom torch.autograd.Function (" + (where[-2].strip() if len(where) > 1 else
                                                                    functions[0].name) +
            "), whose own backward fxfuse's capture cannot keep; the graph runs as Dynamo traced it")

    def run(*args):
        # Interpreting node by node under preserve_node_meta carries each Dynamo node's
        # stack_trace (the user's source line) onto the ATen nodes it decomposes into.
        with fx_traceback.preserve_node_meta():
            return _DynamoGraphInterpreter(gm).run(*args)

    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    fakes = [n.meta.get("example_value") for n in placeholders]
    if len(fakes) == len(example_inputs) and all(f is not None for f in fakes) and any(isinstance(f, torch.Tensor) for f in fakes):
        traced = _functionalized(run, {}, write_back=True, originals=fakes)
        aten_gm = _trace(traced, fakes, "symbolic")
    else:
        aten_gm = _trace(_functionalized(run, {}, write_back=True), list(example_inputs), "fake")
    if torch.is_grad_enabled():
        _read_mutated_inputs_from_copies(aten_gm)
    return aten_gm


def _read_mutated_inputs_from_copies(gm: torch.fx.GraphModule) -> None:
    """Make the ops of a graph read a copy of each input that the graph's end writes to.

    AOTAutograd differentiates the graph as given: an op that saves an input for backward
    (batch norm saves its running statistics) would find it changed by the final ``copy_`` and
    autograd would refuse. Only done when gradients are on; inference graphs keep reading in place.
    """
    writes = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is aten.copy_.default
              and isinstance(n.args[0], torch.fx.Node) and n.args[0].op == "placeholder"]
    if not writes:
        return
    last_placeholder = [n for n in gm.graph.nodes if n.op == "placeholder"][-1]
    for write in writes:
        target = write.args[0]
        with gm.graph.inserting_after(last_placeholder):
            copy = gm.graph.call_function(aten.clone.default, (target,))
        copy.meta.update(val=target.meta.get("val"))
        target.replace_all_uses_with(copy, delete_user_cb=lambda user: user is not write and user is not copy)
    gm.graph.lint()
    gm.recompile()
