"""The standalone API: ``rewrite()``, ``explain()`` and the ``Rewrite`` result."""
from __future__ import annotations

import contextlib
import dataclasses
import time
import warnings
from typing import Any, Callable

import torch
import torch.utils._pytree as pytree

import fxfuse.ops  # noqa: F401  (the rewritten graphs call torch.ops.fxfuse.*)
from fxfuse import cache_parts, config
from fxfuse.capture import CaptureError, Captured, capture_module
from fxfuse.cpu_calls import direct_cpu_calls
from fxfuse.codegen.kernel import Kernel
from fxfuse.debug import dump_graph
from fxfuse.passes.pipeline import Match, Miss, parse_pipeline, run_pipeline
from fxfuse.report import Report, snapshot_graph
from fxfuse.runtime import prepare_kernels

_AUTOCAST_DEVICES = ("cpu", "cuda")
RECAPTURE_WARNING = 8  # captures of one module before we suggest torch.compile(dynamic=True), which fuses


def optimize_graph(gm: torch.fx.GraphModule, passes=None, title: str = "fxfuse", debug_index: int | None = None,
                   started: float | None = None) -> Report:
    """Run the pass pipeline on a captured graph in place and prepare a kernel per fused site.

    ``debug_index`` numbers the graph's files in the debug directory (a new number if None);
    ``started`` is when the capture began (``time.perf_counter()``), so the report's time covers it."""
    start = time.perf_counter() if started is None else started
    index = dump_graph(gm, "captured", debug_index)
    before = snapshot_graph(gm)
    results = run_pipeline(gm, passes if passes is not None else config.current.passes)
    dump_graph(gm, "rewritten", index)
    matches = [m for r in results for m in r.matches]
    misses = [m for r in results for m in r.misses]
    kernels = prepare_kernels([m.spec for m in matches])
    return Report(matches, misses, kernels, time.perf_counter() - start, title, before=before, after=gm)


# Positional arguments of these exact types are pytree leaves; a call made only of them (the
# common ``module(x)``) skips pytree flattening, which costs more than the rest of the lookup.
_PLAIN_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)


def _flatten_call(args: tuple, kwargs: dict) -> tuple[list, Any]:
    """The call's leaves and a hashable key of its structure (argument positions, keywords)."""
    if not kwargs and all(type(a) in _PLAIN_TENSOR_TYPES for a in args):
        return list(args), len(args)  # an int: never equal to the str of a pytree spec below
    leaves, in_spec = pytree.tree_flatten(cache_parts.take_apart((tuple(args), dict(kwargs))))
    return leaves, str(in_spec)


def _leaf_key(leaf: Any) -> tuple:
    if isinstance(leaf, torch.Tensor):
        # Strides too: code may branch on is_contiguous(), and a traced view() needs them.
        # (torch.Size is a tuple: equal and hashing equal to the plain tuple of the sizes.)
        return (leaf.shape, leaf.stride(), leaf.dtype, leaf.device, leaf.requires_grad)
    # Non-tensor arguments are baked into the graph as constants; repr tells values apart (and
    # objects without a value repr apart by identity).
    return ("C", type(leaf).__qualname__, repr(leaf))


@dataclasses.dataclass
class _ModuleState:
    """One walk over a module: its parameters and buffers as capture_module orders them (the order
    of ``named_parameters``/``named_buffers(remove_duplicate=False)``) and every module's mode and
    plain attributes (``_mode``)."""

    params: list[tuple[str, torch.Tensor]]
    buffers: list[tuple[str, torch.Tensor]]
    training: tuple[tuple, ...]

    @property
    def tensors(self) -> list[torch.Tensor]:
        return [t for _, t in self.params] + [t for _, t in self.buffers]


_NO_STATE = _ModuleState([], [], ())
_PLAIN = (bool, int, float, str)


# What every nn.Module keeps in its __dict__ (hook tables, the parameter/buffer/module dicts, its
# mode); of these only ``training`` and ``_is_full_backward_hook`` (None, or a bool once a hook is
# set) are plain values, returned first by ``_mode``.
_MODULE_INTERNALS = frozenset(torch.nn.Module().__dict__)


def _mode(m: torch.nn.Module) -> tuple:
    """A module's train/eval mode and its plain Python attributes (eps, scaling, flags): capture
    baked them into the graph as constants, so changing one must capture again. (The set
    difference runs in C: a Python loop over the ~17 internal entries of each module's __dict__
    was most of the rewritten module's per-call check.)"""
    d = m.__dict__
    own = d.keys() - _MODULE_INTERNALS
    plain = tuple((k, d[k]) for k in sorted(own) if type(d[k]) in _PLAIN) if own else ()
    return d.get("training"), d.get("_is_full_backward_hook"), plain


def _walk(m: torch.nn.Module, prefix: str, params: list, buffers: list, training: list) -> None:
    """``named_modules(remove_duplicate=False)``'s order (pre-order, children in registration order)
    with each module's parameters and buffers, in one pass without its generators."""
    training.append(_mode(m))
    dot = prefix + "." if prefix else ""
    for n, p in m._parameters.items():  # (loops, not generators: most modules have none)
        if p is not None:
            params.append((dot + n, p))
    for n, b in m._buffers.items():
        if b is not None:
            buffers.append((dot + n, b))
    for n, sub in m._modules.items():
        if sub is not None:
            _walk(sub, dot + n, params, buffers, training)


def _module_state(model: Callable) -> _ModuleState:
    if not isinstance(model, torch.nn.Module):
        return _NO_STATE
    cls = type(model)
    if cls.named_parameters is torch.nn.Module.named_parameters and cls.named_buffers is torch.nn.Module.named_buffers \
            and cls._named_members is torch.nn.Module._named_members and cls.named_modules is torch.nn.Module.named_modules:
        # What those two methods do, in one walk instead of three (they and modules() each walk).
        params, buffers, training = [], [], []
        _walk(model, "", params, buffers, training)
        return _ModuleState(params, buffers, tuple(training))
    return _ModuleState(list(model.named_parameters(remove_duplicate=False)),
                        list(model.named_buffers(remove_duplicate=False)),
                        tuple(_mode(m) for m in model.modules()))


def _autocast_state() -> tuple:
    return tuple((torch.is_autocast_enabled(d), torch.get_autocast_dtype(d)) for d in _AUTOCAST_DEVICES)


def _signature(structure: Any, leaves: list, state: _ModuleState, autocast: tuple) -> tuple:
    """Everything a captured graph was specialised on, so that a call differing in any of it is
    captured again: the inputs' structure, tensor metadata and constant values; the module's
    parameters and buffers (names, metadata); every submodule's train/eval mode; autocast."""
    return (structure, tuple(_leaf_key(leaf) for leaf in leaves),
            tuple((n, type(t), *_leaf_key(t)) for n, t in state.params),  # type: a DTensor shard (FSDP2) has the full shape
            tuple((n, *_leaf_key(t)) for n, t in state.buffers),
            state.training, autocast)


@contextlib.contextmanager
def _autocast_off():
    """A graph captured under autocast already holds its casts; running it under autocast again
    would cast a second time, so it runs with autocast off."""
    with contextlib.ExitStack() as stack:
        for device in _AUTOCAST_DEVICES:
            if torch.is_autocast_enabled(device):
                stack.enter_context(torch.autocast(device, enabled=False))
        yield


@dataclasses.dataclass
class _Graph:
    """A captured graph with what each call needs precomputed once."""

    captured: Captured
    report: Report
    state_order: list[int] | None  # graph state input i is state.tensors[state_order[i]]; None: same order
    plain_outputs: bool  # every output leaf is a graph output: no constants, no input passed through
    run: Callable  # the graph's forward as executed: CPU sites call their implementations (cpu_calls)


class RewrittenModule(torch.nn.Module):
    """Calls the rewritten graph with the original model's parameters and buffers.

    The original model is a submodule, so ``parameters()``, ``state_dict()``, optimizers and
    ``.to()`` act on the user's own tensors, and gradients flow to them. Buffers the model updates
    in place (running statistics, step counters) are updated in the user's tensors as eager does.
    A call whose inputs differ from the captured ones in structure, shape, strides, dtype, device
    or constant arguments, or after ``train()``/``eval()``, ``.to()`` or under another autocast
    state, is captured and rewritten again for those inputs.

    Each call costs some Python (a lookup of the graph for these inputs, then the graph's own ops);
    on a GPU, for small ops, wrap it in ``torch.compile`` or CUDA graphs.
    """

    def __init__(self, model: Callable, passes, options: dict):
        super().__init__()
        if isinstance(model, torch.nn.Module):
            self.original = model
        else:
            self._callable = model
        self._passes, self._options = passes, dict(options)
        self._graphs: dict[tuple, _Graph] = {}

    @property
    def _model(self):
        return self.original if "original" in self._modules else self._callable

    def prepare(self, args: tuple, kwargs: dict) -> tuple[Captured, Report]:
        """The captured and rewritten graph for this call's inputs (capturing it if new)."""
        leaves, structure = _flatten_call(args, kwargs)
        graph = self._graph(args, kwargs, leaves, structure, _module_state(self._model), _autocast_state())
        return graph.captured, graph.report

    def _graph(self, args, kwargs, leaves, structure, state: _ModuleState, autocast: tuple) -> _Graph:
        key = _signature(structure, leaves, state, autocast)
        graph = self._graphs.get(key)
        if graph is not None:
            return graph
        if len(self._graphs) == RECAPTURE_WARNING:
            warnings.warn(
                f"fxfuse has captured {type(self._model).__name__} {RECAPTURE_WARNING} times, once per "
                "distinct input shape/constant; if shapes keep changing, torch.compile(model, "
                "backend='fxfuse', dynamic=True) compiles one graph for all of them, with attention and "
                "norms fused at symbolic sizes.", stacklevel=4)
        with config.patch(**self._options):
            started = time.perf_counter()
            captured = capture_module(self._model, args, kwargs)
            report = optimize_graph(captured.gm, self._passes, title=f"fxfuse.rewrite({type(self._model).__name__})",
                                    started=started)
        names = [n for n, _ in state.params] + [n for n, _ in state.buffers]
        wanted = captured.param_names + captured.buffer_names
        order = None if names == wanted else [names.index(n) for n in wanted]
        plain = not captured.out_constants and not captured.output_is_input
        graph = self._graphs[key] = _Graph(captured, report, order, plain, direct_cpu_calls(captured.gm).forward)
        return graph

    def forward(self, *args, **kwargs):
        leaves, structure = _flatten_call(args, kwargs)
        state, autocast = _module_state(self._model), _autocast_state()
        graph = self._graph(args, kwargs, leaves, structure, state, autocast)
        captured = graph.captured
        state_tensors = state.tensors
        if graph.state_order is not None:
            state_tensors = [state_tensors[i] for i in graph.state_order]
        inputs = [*state_tensors, *(leaf for leaf in leaves if isinstance(leaf, torch.Tensor))]
        graph_inputs = inputs
        if captured.custom_functions and torch.is_grad_enabled() and any(t.requires_grad for t in inputs):
            raise CaptureError(
                f"the model calls custom torch.autograd.Function {captured.custom_functions[0]}: the captured "
                "graph holds its forward only (make_fx records below autograd), so fxfuse.rewrite cannot give "
                "its gradients. Call the rewritten module under torch.no_grad() for inference; to train, use "
                "torch.compile(model, backend=\"fxfuse\"), which runs a graph holding such a Function as "
                "Dynamo traced it (correct gradients, that graph unfused).")
        if captured.mutated and torch.is_grad_enabled():
            # Autograd may save an input the model then updates (batch norm saves its running
            # stats); the graph gets a copy, so the write-back below does not invalidate it.
            graph_inputs = [t.clone() if i in captured.mutated else t for i, t in enumerate(inputs)]
        # The context managers cost microseconds a call: entered only when they change something.
        # (forward, not gm(): the module call machinery adds its own microseconds.)
        # Traced (torch.compile, export, make_fx: a dispatch mode is active) the graph with its
        # operators is what the tracer must see; run, its direct CPU calls (cpu_calls).
        traced = torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() > 0
        run = captured.gm.forward if traced else graph.run
        if not self._options and not any(enabled for enabled, _ in autocast):
            flat_out = run(*graph_inputs)
        else:
            with contextlib.ExitStack() as stack:
                if self._options:
                    stack.enter_context(config.patch(**self._options))
                stack.enter_context(_autocast_off())
                flat_out = run(*graph_inputs)
        n_out = len(flat_out) - len(captured.mutated)
        if captured.mutated:
            self._write_back(captured, inputs, flat_out[n_out:])
        if graph.plain_outputs:
            out_leaves = flat_out[:n_out] if captured.mutated else flat_out
        else:
            out_leaves, it = [], iter(flat_out[:n_out])
            for i in range(captured.out_spec.num_leaves):
                if i in captured.out_constants:
                    out_leaves.append(captured.out_constants[i])
                else:
                    value = next(it)
                    out_leaves.append(inputs[captured.output_is_input[i]] if i in captured.output_is_input else value)
        if captured.out_spec.is_leaf():
            return out_leaves[0]
        out = cache_parts.rebuild(pytree.tree_unflatten(out_leaves, captured.out_spec))
        if captured.cache_is_input:
            out = cache_parts.returned_in_place(out, cache_parts.caches_in((args, kwargs)), captured.cache_is_input)
        return out

    @staticmethod
    def _write_back(captured: Captured, inputs: list, new_values) -> None:
        """Apply the model's in-place updates to the caller's tensors, as eager would have.

        An update made under ``torch.no_grad()`` (running statistics) is applied without autograd,
        so the buffer does not start carrying this step's graph.
        """
        for i, value in zip(captured.mutated, new_values):
            if i in captured.mutated_without_grad:
                with torch.no_grad():
                    inputs[i].copy_(value)
            else:
                inputs[i].copy_(value)


@dataclasses.dataclass
class Rewrite:
    """The result of ``fxfuse.rewrite``: the rewritten module and what was done to get it."""

    module: RewrittenModule
    report_data: Report
    graph: torch.fx.GraphModule

    @property
    def matches(self) -> list[Match]:
        return self.report_data.matches

    @property
    def misses(self) -> list[Miss]:
        return self.report_data.misses

    @property
    def kernels(self) -> list[Kernel]:
        return self.report_data.kernels

    def report(self) -> str:
        return self.report_data.text()


def _check_model(model: Any) -> None:
    if callable(model):
        return
    hint = ""
    if isinstance(model, torch.Tensor):
        hint = " (a tensor: the model comes first, then its inputs)"
    raise TypeError(
        f"fxfuse.rewrite needs the model to rewrite: an nn.Module or a function, got a "
        f"{type(model).__name__}{hint}. Call it as fxfuse.rewrite(model, (x,)) or "
        "fxfuse.rewrite(model, (x,), example_kwargs={'mask': m})."
    )


def rewrite(model: Callable, example_inputs: Any = (), passes=None, options: dict | None = None,
            example_kwargs: dict | None = None) -> Rewrite:
    """Capture ``model`` on ``example_inputs``, run the passes and return a ``Rewrite``.

    ``example_inputs`` is a tuple of positional arguments (a single tensor is accepted too);
    ``example_kwargs`` holds keyword arguments. ``passes`` selects the pipeline (names or a comma
    separated string); ``options`` are fxfuse options (see ``fxfuse.config.Options``).
    """
    _check_model(model)
    if isinstance(example_inputs, torch.Tensor) or not isinstance(example_inputs, (tuple, list)):
        example_inputs = (example_inputs,)
    if example_kwargs is not None and not isinstance(example_kwargs, dict):
        raise TypeError(f"example_kwargs must be a dict of keyword arguments, got {type(example_kwargs).__name__}")
    options = dict(options or {})
    validated = config.current.replace(**options)  # validates option names before any work
    parse_pipeline(passes if passes is not None else validated.passes)  # and pass names
    module = RewrittenModule(model, passes, options)
    captured, report = module.prepare(tuple(example_inputs), dict(example_kwargs or {}))
    return Rewrite(module=module, report_data=report, graph=captured.gm)


def explain(model: Callable, *args, **kwargs) -> Rewrite:
    """Print what fxfuse would do to ``model(*args, **kwargs)``; returns the ``Rewrite``."""
    res = rewrite(model, args, example_kwargs=kwargs)
    print(res.report())
    return res
