"""The torch.compile backend: ``torch.compile(model, backend="fxfuse", options={...})``.

Dynamo graph → capture (ATen, functional) → passes → AOTAutograd, whose forward and backward
graphs then contain the fused operators and their backward operators. What no pass claimed runs
as ATen ops.
"""
from __future__ import annotations

import functools
import time
import warnings
from pathlib import Path

import torch
from torch._dynamo.backends.common import aot_autograd
from torch._functorch.aot_autograd import make_boxed_func

import fxfuse.ops  # noqa: F401
from fxfuse import config
from fxfuse.api import optimize_graph
from fxfuse.capture import CaptureError, capture_graph
from fxfuse.debug import dump_graph, next_index
from fxfuse.passes.pipeline import Match, Miss, parse_pipeline
from fxfuse.report import Report


class Backend:
    """A torch.compile backend that keeps what it did: ``be.reports`` has one report per graph,
    ``be.report()`` prints them and ``be.html("report.html")`` draws them all on one page.

    ``Backend(passes="canonicalize,fuse-norm", interpret=True)`` — any fxfuse option
    (``fxfuse.config.Options``) is accepted as a keyword.
    """

    def __init__(self, passes=None, **options):
        if passes is not None:
            options["passes"] = passes
        # Validate names now: inside torch.compile the error would surface at the first call,
        # wrapped in Dynamo's BackendCompilerFailed.
        parse_pipeline(config.current.replace(**options).passes)
        self.options = options
        self.reports: list[Report] = []

    @property
    def matches(self) -> list[Match]:
        return [m for r in self.reports for m in r.matches]

    @property
    def misses(self) -> list[Miss]:
        return [m for r in self.reports for m in r.misses]

    def report(self) -> str:
        """The reports of every graph compiled so far, one after the other."""
        return "\n\n".join(r.text() for r in self.reports) or "fxfuse: no graph compiled yet"

    def html(self, path: str | Path | None = None, renderer: str = "auto") -> str:
        """One self-contained HTML page for every graph compiled so far (a graph break gives
        several): for each, the sections of a single report and its graph before and after the
        passes. Written to ``path`` when given; returned either way."""
        from fxfuse.report_html import render_many

        n = len(self.reports)
        page = render_many(self.reports, f"fxfuse: {n} graph{'' if n == 1 else 's'} compiled by torch.compile", renderer)
        if path is not None:
            Path(path).write_text(page, encoding="utf-8")
        return page

    def _run_with_options(self, fn):
        options = self.options

        @functools.wraps(fn)
        def run(*args):
            with config.patch(**options):
                return fn(*args)

        run._boxed_call = getattr(fn, "_boxed_call", False)
        return run

    def _compiler(self, stage: str, index: int | None):
        def compile_graph(gm: torch.fx.GraphModule, example_inputs):
            with config.patch(**self.options):
                dump_graph(gm, stage, index)  # what actually runs, after AOTAutograd
            return make_boxed_func(self._run_with_options(gm.forward))

        return compile_graph

    def __call__(self, gm: torch.fx.GraphModule, example_inputs):
        title = f"fxfuse graph {len(self.reports)}"
        with config.patch(**self.options):
            index = next_index()
            started = time.perf_counter()
            try:
                aten_gm = capture_graph(gm, example_inputs)
            except CaptureError as err:
                # Dynamo's graph is itself correct: run it as it is, fusing nothing, and say why.
                reason = str(err).splitlines()[0]
                warnings.warn(f"{title} runs unfused: {reason}", stacklevel=2)
                self.reports.append(Report([], [Miss("graph", "<dynamo graph>", reason)], [], 0.0, title))
                return gm.forward
            report = optimize_graph(aten_gm, title=title, debug_index=index, started=started)
        _warn_shape_misses(report)
        compiler = aot_autograd(
            fw_compiler=self._compiler("aot_forward", index),
            bw_compiler=self._compiler("aot_backward", index),
            keep_inference_input_mutations=True,
        )
        compiled = compiler(aten_gm, example_inputs)
        # Only now: Dynamo may abandon this attempt (it restarts analysis when a float it passed
        # as a tensor had to be specialised), and then this graph is never run.
        self.reports.append(report)
        return compiled


_WARNED: set = set()  # (site, reason) already warned about: Dynamo recompiles the same site often


def _warn_shape_misses(report: Report) -> None:
    """A site left unfused because of its sizes is a warning, once per site and reason: at debug
    log level only, a user would not learn that dynamic shapes cost them the fused kernel."""
    for miss in report.misses:
        key = (miss.kind, miss.source, miss.reason)
        if miss.shapes and key not in _WARNED:
            _WARNED.add(key)
            warnings.warn(f"fxfuse: {miss.kind} at {miss.source} left unfused because of its shapes: {miss.reason}",
                          stacklevel=3)


def fxfuse_backend(gm: torch.fx.GraphModule, example_inputs, options: dict | None = None):
    """Entry point of ``backend="fxfuse"``; ``options`` comes from ``torch.compile(options=...)``."""
    return Backend(**(options or {}))(gm, example_inputs)
