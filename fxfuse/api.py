"""The standalone API: ``rewrite()``, ``explain()`` and the ``Rewrite`` result."""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable

import torch
import torch.utils._pytree as pytree

import fxfuse.ops  # noqa: F401  (the rewritten graphs call torch.ops.fxfuse.*)
from fxfuse import config
from fxfuse.capture import Captured, capture_module
from fxfuse.codegen import generate_kernel
from fxfuse.codegen.cache import Kernel
from fxfuse.debug import dump_graph
from fxfuse.passes.pipeline import Match, Miss, run_pipeline
from fxfuse.report import Report


def optimize_graph(gm: torch.fx.GraphModule, passes=None, title: str = "fxfuse") -> Report:
    """Run the pass pipeline on a captured graph in place and generate a kernel per fused site."""
    start = time.perf_counter()
    index = dump_graph(gm, "captured")
    results = run_pipeline(gm, passes if passes is not None else config.current.passes)
    dump_graph(gm, "rewritten", index)
    matches = [m for r in results for m in r.matches]
    misses = [m for r in results for m in r.misses]
    kernels: dict[str, Kernel] = {}
    for m in matches:
        kernel = generate_kernel(m.spec)
        kernels.setdefault(kernel.name, kernel)
    return Report(matches, misses, list(kernels.values()), time.perf_counter() - start, title)


def _signature(leaves: list, training: bool) -> tuple:
    """What a captured graph was specialised on: tensor metadata and non-tensor values."""
    sig = []
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            sig.append(("T", tuple(leaf.shape), leaf.dtype, leaf.device.type, leaf.requires_grad))
        else:
            sig.append(("C", repr(leaf)))
    return tuple(sig) + (training,)


class RewrittenModule(torch.nn.Module):
    """Calls the rewritten graph with the original model's parameters and buffers.

    The original model is a submodule, so ``parameters()``, ``state_dict()``, optimizers and
    ``.to()`` act on the user's own tensors, and gradients flow to them. A call whose inputs differ
    from the captured ones in shape, dtype, device or constant arguments (or after ``train()``/
    ``eval()``) is captured and rewritten again for those inputs.
    """

    def __init__(self, model: Callable, passes, options: dict):
        super().__init__()
        if isinstance(model, torch.nn.Module):
            self.original = model
        else:
            self._callable = model
        self._passes, self._options = passes, dict(options)
        self._graphs: dict[tuple, tuple[Captured, Report]] = {}

    @property
    def _model(self):
        return self.original if "original" in self._modules else self._callable

    def prepare(self, args: tuple, kwargs: dict) -> tuple[Captured, Report]:
        leaves, _ = pytree.tree_flatten((tuple(args), dict(kwargs)))
        training = bool(getattr(self._model, "training", False))
        key = _signature(leaves, training)
        if key not in self._graphs:
            with config.patch(**self._options):
                captured = capture_module(self._model, args, kwargs)
                report = optimize_graph(captured.gm, self._passes, title=f"fxfuse.rewrite({type(self._model).__name__})")
            self._graphs[key] = (captured, report)
        return self._graphs[key]

    def forward(self, *args, **kwargs):
        captured, _ = self.prepare(args, kwargs)
        leaves, _ = pytree.tree_flatten((tuple(args), dict(kwargs)))
        model = self._model
        state = []
        if isinstance(model, torch.nn.Module):
            named_p = dict(model.named_parameters(remove_duplicate=False))
            named_b = dict(model.named_buffers(remove_duplicate=False))
            state = [named_p[n] for n in captured.param_names] + [named_b[n] for n in captured.buffer_names]
        tensors = [leaf for leaf in leaves if isinstance(leaf, torch.Tensor)]
        with config.patch(**self._options):
            flat_out = captured.gm(*state, *tensors)
        out_leaves, it = [], iter(flat_out)
        for i in range(captured.out_spec.num_leaves):
            out_leaves.append(captured.out_constants[i] if i in captured.out_constants else next(it))
        return pytree.tree_unflatten(out_leaves, captured.out_spec)


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


def rewrite(model: Callable, example_inputs: Any = (), passes=None, options: dict | None = None,
            example_kwargs: dict | None = None) -> Rewrite:
    """Capture ``model`` on ``example_inputs``, run the passes and return a ``Rewrite``.

    ``example_inputs`` is a tuple of positional arguments (a single tensor is accepted too);
    ``example_kwargs`` holds keyword arguments. ``passes`` selects the pipeline (names or a comma
    separated string); ``options`` are fxfuse options (see ``fxfuse.config.Options``).
    """
    if not callable(model):
        raise TypeError(f"fxfuse.rewrite needs a torch.nn.Module or a callable, got {type(model).__name__}")
    if isinstance(example_inputs, torch.Tensor) or not isinstance(example_inputs, (tuple, list)):
        example_inputs = (example_inputs,)
    options = dict(options or {})
    config.current.replace(**options)  # validates option names before any work
    module = RewrittenModule(model, passes, options)
    captured, report = module.prepare(tuple(example_inputs), dict(example_kwargs or {}))
    return Rewrite(module=module, report_data=report, graph=captured.gm)


def explain(model: Callable, *args, **kwargs) -> Rewrite:
    """Print what fxfuse would do to ``model(*args, **kwargs)``; returns the ``Rewrite``."""
    res = rewrite(model, args, example_kwargs=kwargs)
    print(res.report())
    return res
