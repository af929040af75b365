"""Capture: a model or callable plus example inputs → one ATen-level functional FX graph.

Both entry points (``fxfuse.rewrite`` and the torch.compile backend) converge here. The graph is
traced with ``make_fx`` over fake tensors after functionalization, so every node carries
``meta["val"]`` (a fake tensor: shape, dtype, device, symbolic sizes) and ``meta["stack_trace"]``
(the user's source line), and the only mutations left are the write-backs to inputs at its end.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch
import torch.utils._pytree as pytree
from torch._guards import detect_fake_mode
from torch.fx import traceback as fx_traceback
from torch.fx.experimental.proxy_tensor import make_fx


class CaptureError(RuntimeError):
    """The model could not be traced into a graph; the message says why and what to do."""


@dataclasses.dataclass
class Captured:
    """A module captured as ``gm(*params, *buffers, *tensor_inputs) -> flat tensor outputs``."""

    gm: torch.fx.GraphModule
    param_names: list[str]
    buffer_names: list[str]
    in_spec: pytree.TreeSpec
    in_leaves: list[Any]  # the example's leaves: tensors, or the constants the graph specialised on
    out_spec: pytree.TreeSpec
    out_constants: dict[int, Any]  # output leaves that are not tensors, by leaf position
    training: bool


def _trace(fn: Callable, flat_args: list, fake_mode=None, symbolic: bool = False) -> torch.fx.GraphModule:
    functional = torch.func.functionalize(fn, remove="mutations")
    try:
        if fake_mode is not None:
            # The inputs are already fake (torch.compile hands us Dynamo's); trace in their mode so
            # their symbolic sizes become the graph's.
            # Stack traces come from the Dynamo graph's nodes (see capture_graph), not this frame.
            with fake_mode:
                return make_fx(functional, tracing_mode="real")(*flat_args)
        mode = "symbolic" if symbolic else "fake"
        return make_fx(functional, tracing_mode=mode, record_stack_traces=True)(*flat_args)
    except Exception as err:  # the tracer's errors are long; say what failed, keep the cause
        raise CaptureError(
            f"fxfuse could not trace the model into a graph: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}\n"
            "Models with data-dependent control flow (a Python `if` on tensor values) cannot be "
            "captured whole; use torch.compile(model, backend='fxfuse'), which splits the model "
            "into graphs around such code."
        ) from err


def capture_module(model: Callable, args: tuple, kwargs: dict | None = None, symbolic: bool = False) -> Captured:
    """Capture ``model(*args, **kwargs)``; parameters and buffers become the first graph inputs."""
    kwargs = kwargs or {}
    module = model if isinstance(model, torch.nn.Module) else None
    params = dict(module.named_parameters(remove_duplicate=False)) if module is not None else {}
    buffers = dict(module.named_buffers(remove_duplicate=False)) if module is not None else {}
    leaves, in_spec = pytree.tree_flatten((tuple(args), dict(kwargs)))
    tensor_positions = [i for i, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor)]
    n_state = len(params) + len(buffers)
    out_holder: dict[str, Any] = {}

    def flat_fn(*flat):
        state = dict(zip([*params, *buffers], flat[:n_state]))
        call_leaves = list(leaves)
        for pos, tensor in zip(tensor_positions, flat[n_state:]):
            call_leaves[pos] = tensor
        call_args, call_kwargs = pytree.tree_unflatten(call_leaves, in_spec)
        if module is not None:
            out = torch.func.functional_call(module, state, call_args, call_kwargs, tie_weights=False)
        else:
            out = model(*call_args, **call_kwargs)
        out_leaves, out_spec = pytree.tree_flatten(out)
        out_holder["spec"] = out_spec
        out_holder["constants"] = {i: v for i, v in enumerate(out_leaves) if not isinstance(v, torch.Tensor)}
        return [v for v in out_leaves if isinstance(v, torch.Tensor)]

    flat_inputs = [*params.values(), *buffers.values(), *(leaves[i] for i in tensor_positions)]
    gm = _trace(flat_fn, flat_inputs, symbolic=symbolic)
    return Captured(
        gm=gm,
        param_names=list(params),
        buffer_names=list(buffers),
        in_spec=in_spec,
        in_leaves=leaves,
        out_spec=out_holder["spec"],
        out_constants=out_holder["constants"],
        training=bool(getattr(module, "training", False)),
    )


def capture_graph(gm: torch.fx.GraphModule, example_inputs: list) -> torch.fx.GraphModule:
    """Capture a Dynamo graph (torch-level ops) as an ATen-level functional graph, same inputs.

    Dynamo hands real example tensors to a backend, but records in each placeholder the fake tensor
    (with symbolic sizes under ``dynamic=True``) it traced with; tracing with those keeps the
    sizes symbolic and the graph valid for every shape Dynamo's guards admit.
    """
    def run(*args):
        # Interpreting node by node under preserve_node_meta carries each Dynamo node's
        # stack_trace (the user's source line) onto the ATen nodes it decomposes into.
        with fx_traceback.preserve_node_meta():
            return torch.fx.Interpreter(gm).run(*args)

    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    fakes = [n.meta.get("example_value") for n in placeholders]
    tensor_fakes = [f for f in fakes if isinstance(f, torch.Tensor)]
    if len(fakes) == len(example_inputs) and all(f is not None for f in fakes) and tensor_fakes:
        fake_mode = getattr(tensor_fakes[0], "fake_mode", None)
        if fake_mode is not None:
            return _trace(run, fakes, fake_mode=fake_mode)
    fake_mode = detect_fake_mode(example_inputs)
    if fake_mode is not None:
        return _trace(run, list(example_inputs), fake_mode=fake_mode)
    return _trace(run, list(example_inputs))
