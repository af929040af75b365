"""Every option and environment variable fxfuse reads, in one place.

Options can be set three ways, later ones winning: environment variables (read once, at import),
``fxfuse.config.patch(...)`` as a context manager, and the ``options={...}`` of
``torch.compile(model, backend="fxfuse", options=...)`` / ``fxfuse.rewrite(..., options=...)``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import tempfile
from pathlib import Path


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def _env_off(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"0", "false", "no", "off"}


# Triton decides at import whether its own library functions (tl.sum, tl.max, ...) are compiled or
# interpreted, so interpretation is a property of the process: it must be on before triton loads.
if _env_flag("FXFUSE_INTERPRET") and "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def interpreter_available() -> bool:
    """Whether this process's Triton runs kernels through its CPU interpreter."""
    try:
        import triton.language as tl
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:
        return False
    return isinstance(tl.sum, InterpretedFunction)


@dataclasses.dataclass
class Options:
    # Run the generated Triton kernels on CPU tensors through Triton's interpreter instead of the
    # exact torch reference. Slow; meant for tests and for reading what a kernel does.
    interpret: bool = dataclasses.field(default_factory=lambda: _env_flag("FXFUSE_INTERPRET"))
    # Where every captured graph (before/after the passes) and every kernel is written; None: off.
    debug_dir: str | None = dataclasses.field(default_factory=lambda: os.environ.get("FXFUSE_DEBUG_DIR") or None)
    # Where generated kernel sources are cached, by content hash.
    cache_dir: str = dataclasses.field(
        default_factory=lambda: os.environ.get("FXFUSE_CACHE_DIR")
        or str(Path(tempfile.gettempdir()) / f"fxfuse-cache-{os.getuid() if hasattr(os, 'getuid') else 'user'}")
    )
    # The pass pipeline: None for the default, or a comma-separated string / list of pass names.
    passes: str | list | None = None
    # A progress bar on stderr while a graph's kernels are generated and loaded, when there are many
    # (fxfuse/progress.py) and stderr is a terminal; FXFUSE_PROGRESS=0 turns it off.
    progress: bool = dataclasses.field(default_factory=lambda: not _env_off("FXFUSE_PROGRESS"))
    # torch.compile backend only. What compiles the rewritten graph: "inductor" (the default:
    # Inductor generates code for everything no pass fused and calls the fused operators) or "eager"
    # (AOTAutograd's graphs run op by op; for debugging). FXFUSE_INNER sets the default.
    inner: str = dataclasses.field(default_factory=lambda: os.environ.get("FXFUSE_INNER") or "inductor")
    # inner="eager" only. In a graph that trains, each CPU site becomes the form the composed backend
    # hands Inductor (fxfuse/inductor.py: SDPA, or the reference autograd differentiates), as fast as
    # the user's code; True keeps the fused operators and their backward operators there instead
    # (whose CPU backward recomputes the forward: slower than eager), to debug them.
    keep_operators: bool = False
    # Inductor's mode ("max-autotune", "reduce-overhead", ...), as torch.compile(mode=...) names it,
    # and Inductor config options of its own (``{"max_autotune_gemm_backends": "ATEN"}``), under inner="inductor".
    mode: str | None = None
    inductor: dict | None = None

    def replace(self, **changes) -> "Options":
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            known = ", ".join(f.name for f in dataclasses.fields(self))
            raise ValueError(f"unknown fxfuse option(s) {sorted(unknown)}; the options are: {known}")
        for name, value in changes.items():
            types, what = _OPTION_TYPES[name]
            if not isinstance(value, types):
                raise TypeError(f"fxfuse option {name!r} must be {what}, got {value!r}")
            if name == "inner" and value not in INNERS:
                raise ValueError(f"fxfuse option 'inner' must be one of {', '.join(map(repr, INNERS))}, got {value!r}")
            if name == "mode" and value is not None and value not in MODES:
                raise ValueError(f"unknown Inductor mode {value!r} (fxfuse option 'mode'); the modes are: {', '.join(MODES)}")
            if isinstance(value, os.PathLike):
                changes[name] = os.fspath(value)
        return dataclasses.replace(self, **changes)


# What each option accepts; a wrong type fails when the option is given, not deep in a compile.
_OPTION_TYPES = {
    "interpret": (bool, "True or False"),
    "debug_dir": ((str, os.PathLike, type(None)), "a directory path or None"),
    "cache_dir": ((str, os.PathLike), "a directory path"),
    "progress": (bool, "True or False"),
    "passes": ((str, list, tuple, type(None)), 'a pipeline such as "canonicalize,fuse-norm", a list of pass names, or None'),
    "inner": (str, '"inductor" or "eager"'),
    "keep_operators": (bool, "True or False"),
    "mode": ((str, type(None)), 'an Inductor mode such as "max-autotune", or None'),
    "inductor": ((dict, type(None)), "a dict of Inductor config options, or None"),
}
INNERS = ("inductor", "eager")
# Inductor's modes, as torch.compile(mode=...) names them (torch._inductor.list_mode_options).
MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
# Options that only choose how a graph is compiled: the compiled code does not need them at run time.
COMPILE_ONLY = frozenset({"passes", "inner", "mode", "inductor", "keep_operators"})


# The options in force. A module-level object rather than a thread-local: autograd runs backward
# functions on its own thread, and the backward kernels must see the options the forward saw.
current = Options()


@contextlib.contextmanager
def patch(**changes):
    """Temporarily change options: ``with fxfuse.config.patch(interpret=True): ...``."""
    global current
    saved = current
    current = current.replace(**changes)
    try:
        yield current
    finally:
        current = saved


def interpret_on_cpu() -> bool:
    """Whether fused ops on CPU tensors should run their Triton kernels (through the interpreter)."""
    if not current.interpret:
        return False
    if not interpreter_available():
        raise RuntimeError(
            "fxfuse was asked to run Triton kernels on the CPU (interpret=True), but Triton was imported "
            "without its interpreter. Set FXFUSE_INTERPRET=1 (or TRITON_INTERPRET=1) in the environment "
            "before Python starts, or leave interpret off to use the exact torch reference on CPU."
        )
    return True
