"""The torch.compile backend: ``torch.compile(model, backend="fxfuse", options={...})``.

Dynamo graph → capture (ATen, functional) → passes → Inductor (``torch._inductor.compile_fx``),
which differentiates the rewritten graph with AOTAutograd and generates code for everything no pass
claimed; the fused operators stay calls of fxfuse's kernels (on CPU, the exact fast forms of
fxfuse.inductor). ``options={"inner": "eager"}`` runs AOTAutograd's forward and backward graphs op
by op instead (for debugging: the graphs are what the passes produced, but in training on CPU each
site is the form Inductor would get, unless ``keep_operators=True``).

Inductor's mode and options: ``torch.compile(model, backend="fxfuse", mode="max-autotune")`` (Dynamo
passes ``mode`` to the backend when ``options`` is not given), or within the options,
``options={"mode": "max-autotune", "inductor": {"coordinate_descent_tuning": False}}``.
"""
from __future__ import annotations

import functools
import time
import warnings
from pathlib import Path

import torch
import torch._functorch.config
from torch._dynamo.backends.common import aot_autograd
from torch._functorch.aot_autograd import make_boxed_func

import fxfuse.ops  # noqa: F401
from fxfuse import config
from fxfuse.api import optimize_graph
from fxfuse.capture import CaptureError, capture_graph
from fxfuse.cpu_calls import direct_cpu_calls
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
        return Backend._run_with(fn, self.options)

    @staticmethod
    def _run_with(fn, options: dict):
        @functools.wraps(fn)
        def run(*args):
            with config.patch(**options):
                return fn(*args)

        run._boxed_call = getattr(fn, "_boxed_call", False)
        return run

    def _runtime_options(self) -> dict:
        return {k: v for k, v in self.options.items() if k not in config.COMPILE_ONLY}

    def _compiler(self, stage: str, index: int | None):
        def compile_graph(gm: torch.fx.GraphModule, example_inputs):
            with config.patch(**self.options):
                dump_graph(gm, stage, index)  # what actually runs, after AOTAutograd
                direct = stage == "aot_forward" and not config.current.keep_operators
            # AOTAutograd runs its forward with grad off (the backward is a graph of its own):
            # the forward's CPU sites call their operators' implementations directly, without
            # the dispatcher's Python (about 35 us a call: a CPU layer norm is 55 us), unless
            # keep_operators=True (to debug the operators); both graphs' ATen calls skip
            # OpOverload.__call__ (cpu_calls.direct_cpu_calls).
            return _boxed(direct_cpu_calls(gm, autograd=False, sites=direct), self.options)

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
                # Composed with Inductor, Inductor still compiles it, as the default backend
                # would: a graph fxfuse cannot read must not lose Inductor's speed (BLOOM's
                # custom autograd.Function in training ran op by op before).
                reason = str(err).splitlines()[0]
                composed = config.current.inner == "inductor"
                how = "runs unfused, compiled by Inductor as written" if composed else "runs unfused"
                warnings.warn(f"{title} {how}: {reason}", stacklevel=2)
                self.reports.append(Report([], [Miss("graph", "<dynamo graph>", reason)], [], 0.0, title))
                return self._inductor_as_written(gm, example_inputs) if composed else gm.forward
            report = optimize_graph(aten_gm, title=title, debug_index=index, started=started)
            inner = config.current.inner
            _warn_shape_misses(report)
            if inner == "inductor":
                compiled = self._inductor(aten_gm, example_inputs, index)
            elif _trains(aten_gm, example_inputs) and not config.current.keep_operators:
                from fxfuse.inductor import lower_cpu_sites

                # In training the operators' CPU backward formulas (recomputing the forward, one
                # more reduction per norm) cost more than the forms autograd differentiates, the
                # same the composed backend hands Inductor (SDPA's fused backward, or what the
                # user's code saved); inference keeps the operators (their CPU paths are exact and
                # fast). interpret=True keeps them too (lower_cpu_sites), and so does PolyNorm,
                # whose closed-form CPU backward beats autograd of its reference op by op.
                lower_cpu_sites(aten_gm, example_inputs, for_inductor=False)
        if inner == "eager":
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

    def _inductor_as_written(self, gm: torch.fx.GraphModule, example_inputs):
        """Dynamo's graph compiled by Inductor with nothing fused: what ``backend="inductor"`` runs,
        under the same Inductor options and mode as the composed graphs."""
        from torch._inductor.compile_fx import compile_fx

        from fxfuse.inductor import inductor_config

        return compile_fx(gm, example_inputs, config_patches=inductor_config(config.current.mode, config.current.inductor))

    def _inductor(self, aten_gm: torch.fx.GraphModule, example_inputs, index: int | None):
        """The rewritten graph compiled by Inductor (under the options: they are in force)."""
        from torch._inductor.compile_fx import compile_fx, compile_fx_inner

        from fxfuse.inductor import inductor_config, lower_cpu_sites, views_as_reshapes

        patches = inductor_config(config.current.mode, config.current.inductor)
        lower_cpu_sites(aten_gm, example_inputs)
        views_as_reshapes(aten_gm)  # Inductor's decompositions may lay tensors out otherwise
        options, runtime = self.options, self._runtime_options()

        def inner_compile(gm, inputs, **kwargs):
            backward = kwargs.get("is_backward", False)
            with config.patch(**options):
                dump_graph(gm, "aot_backward" if backward else "aot_forward", index)
            compiled = compile_fx_inner(gm, inputs, **kwargs)
            # The backward runs when autograd calls it, outside the forward's options (below).
            return self._run_with_options(compiled) if backward and runtime else compiled

        # make_fx's symbolic trace leaves its ShapeEnv on the module, which Inductor's cache keys
        # cannot pickle: every dynamic-shape compile warned "Failed to pickle cache key" and
        # bypassed the FX graph cache. The sizes' symbols live on in the nodes' fake tensors (in
        # Dynamo's own ShapeEnv). AOTAutograd's cache stays off for these graphs: a hit there skips
        # inner_compile, which gives the backward fxfuse's runtime options and dumps the graphs;
        # Inductor's FX graph cache, inside inner_compile, still saves each kernel's compile.
        aten_gm.shape_env = None
        with torch._functorch.config.patch(enable_autograd_cache=False):
            compiled = compile_fx(aten_gm, example_inputs, inner_compile=inner_compile, config_patches=patches)
        if not runtime:
            return compiled

        @functools.wraps(compiled)
        def run(*args):
            with config.patch(**runtime):
                return compiled(*args)

        return run


def _boxed(gm: torch.fx.GraphModule, options: dict):
    """``gm`` as a boxed function that empties the argument list it is given (as Inductor's code
    and torch's own aot_eager do), under fxfuse's ``options``. AOTAutograd hands the backward the
    forward's saved activations in that list and drops its own references: emptied, each one is
    freed after its last use in the graph (the generated code sets dead values to None), not when
    the whole backward returns. Unboxed (``make_boxed_func(gm.forward)``), every saved activation
    lived to the end of the backward: a higher peak, whose fresh pages the next step paid for in
    page faults (GPT-2 training under inner="eager": 1344 minor faults a step, eager 545)."""
    try:
        from torch.fx.graph import _BoxedCodeGen  # private to torch, used by its aot_eager
    except ImportError:  # a torch without it: the unboxed call, correct, only later frees
        return make_boxed_func(Backend._run_with(gm.forward, options))
    gm.graph.set_codegen(_BoxedCodeGen())
    gm.recompile()
    forward = gm.forward

    def run(args):
        with config.patch(**options):
            return forward(args)

    run._boxed_call = True
    return run


def _trains(gm: torch.fx.GraphModule, example_inputs) -> bool:
    """Whether AOTAutograd will differentiate this graph: grad mode on and an input requires grad."""
    return torch.is_grad_enabled() and any(isinstance(x, torch.Tensor) and x.requires_grad for x in example_inputs)


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


def fxfuse_backend(gm: torch.fx.GraphModule, example_inputs, options: dict | None = None, mode: str | None = None):
    """Entry point of ``backend="fxfuse"``; ``options`` comes from ``torch.compile(options=...)``,
    ``mode`` from ``torch.compile(mode=...)`` (Inductor's mode; torch.compile takes one or the other)."""
    options = dict(options or {})
    if mode is not None:
        options.setdefault("mode", mode)
    return Backend(**options)(gm, example_inputs)
