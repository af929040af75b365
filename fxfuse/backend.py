"""The torch.compile backend: ``torch.compile(model, backend="fxfuse", options={...})``.

Dynamo graph → capture (ATen, functional) → passes → AOTAutograd, whose forward and backward
graphs then contain the fused operators and their backward operators. What no pass claimed runs
as ATen ops.
"""
from __future__ import annotations

import functools

import torch
from torch._dynamo.backends.common import aot_autograd
from torch._functorch.aot_autograd import make_boxed_func

import fxfuse.ops  # noqa: F401
from fxfuse import config
from fxfuse.api import optimize_graph
from fxfuse.capture import capture_graph
from fxfuse.report import Report


class Backend:
    """A torch.compile backend that keeps what it did: ``be.reports`` has one report per graph.

    ``Backend(passes="canonicalize,fuse-norm", interpret=True)`` — any fxfuse option
    (``fxfuse.config.Options``) is accepted as a keyword.
    """

    def __init__(self, passes=None, **options):
        if passes is not None:
            options["passes"] = passes
        config.current.replace(**options)  # validates names now, not at the first compile
        self.options = options
        self.reports: list[Report] = []

    def _run_with_options(self, fn):
        options = self.options

        @functools.wraps(fn)
        def run(*args):
            with config.patch(**options):
                return fn(*args)

        run._boxed_call = getattr(fn, "_boxed_call", False)
        return run

    def _compile_graph(self, gm: torch.fx.GraphModule, example_inputs):
        return make_boxed_func(self._run_with_options(gm.forward))

    def __call__(self, gm: torch.fx.GraphModule, example_inputs):
        with config.patch(**self.options):
            aten_gm = capture_graph(gm, example_inputs)
            report = optimize_graph(aten_gm, title=f"fxfuse graph {len(self.reports)}")
        self.reports.append(report)
        compiler = aot_autograd(
            fw_compiler=self._compile_graph,
            bw_compiler=self._compile_graph,
            keep_inference_input_mutations=True,
        )
        return compiler(aten_gm, example_inputs)


def fxfuse_backend(gm: torch.fx.GraphModule, example_inputs, options: dict | None = None):
    """Entry point of ``backend="fxfuse"``; ``options`` comes from ``torch.compile(options=...)``."""
    return Backend(**(options or {}))(gm, example_inputs)
