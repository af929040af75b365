"""The kernel cache: generated sources (``fxfuse.codegen``) copied to disk, run from memory.

A kernel's name hashes the codegen version and its spec (``codegen.kernel``), and its source is a
pure function of the spec, so a name stands for one text. ``<cache>/<name>.py`` is a copy of that text for people and
tools to read; it is never what runs. ``load`` compiles the text we generated (with the file's path
as its filename, so tracebacks and Triton's ``inspect`` calls show the right file) and seeds
``linecache`` with it, so a half-written, truncated, edited or concurrently replaced file can never
be executed, and no stale ``__pycache__`` bytecode can stand in for it.

Writes are atomic (a temporary file in the same directory, renamed into place), so processes that
compile the same kernel at once each write the same bytes and a reader sees the old file or the new
one, never a mix. A file whose bytes differ from the text (corrupted, truncated, edited) is written
again. A cache directory that cannot be written is not an error: the kernel does not need the file
to run, so fxfuse warns once per directory, says how to fix it, and goes on (``Kernel.path`` is then
``""``). A debug directory that cannot be written is an error: the user asked for those files.
"""
from __future__ import annotations

import dataclasses
import hashlib
import linecache
import os
import sys
import tempfile
import threading
import warnings
from pathlib import Path
from types import ModuleType

from fxfuse import config
from fxfuse.codegen.kernel import CODEGEN_VERSION, Kernel, kernel_name  # noqa: F401 (re-exported)

# What this process has already done, so the hot path (a launch per call) touches no disk:
_verified: set[tuple[str, str]] = set()  # (file path, source digest) known to hold that source
_modules: dict[tuple[str, str], ModuleType] = {}  # (name, source digest) -> executed module
_warned_dirs: set[str] = set()
_lock = threading.Lock()  # autograd runs backward kernels on its own thread


class CacheError(OSError):
    """A file fxfuse was asked to write (a debug dump) could not be written."""


def _digest(source: str) -> str:
    return hashlib.sha256(source.encode()).hexdigest()


def _holds(path: Path, source: str) -> bool:
    """Whether ``path`` holds exactly ``source`` (missing, unreadable or undecodable: no)."""
    try:
        return path.read_bytes() == source.encode()
    except OSError:
        return False


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(text.encode())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; the copy is meant to be read
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _ensure_copy(path: Path, source: str) -> bool:
    """Make ``path`` hold ``source`` (checked once per process); False if it cannot be written."""
    key = (str(path), _digest(source))
    if key in _verified:
        return True
    if not _holds(path, source):
        try:
            _write_atomic(path, source)
        except OSError as e:
            directory = str(path.parent)
            if directory not in _warned_dirs:
                _warned_dirs.add(directory)
                warnings.warn(
                    f"fxfuse cannot write generated kernels to the cache directory {directory!r} "
                    f"({type(e).__name__}: {e}). Kernels still run (from memory) but are not saved "
                    "for reading; set FXFUSE_CACHE_DIR or the cache_dir option to a writable directory.",
                    RuntimeWarning,
                    stacklevel=3,
                )
            return False
    _verified.add(key)
    return True


def store(kernel: Kernel) -> Kernel:
    """Make sure ``<cache>/<name>.py`` holds exactly the kernel's source; mirror it to the debug
    dir. Returns the kernel with its ``path`` (``""`` when the cache cannot be written)."""
    name, source = kernel.name, kernel.source
    path = Path(config.current.cache_dir) / f"{name}.py"
    with _lock:
        saved = _ensure_copy(path, source)
    if config.current.debug_dir:
        dump = Path(config.current.debug_dir) / "kernels" / f"{name}.py"
        try:
            _write_atomic(dump, source)
        except OSError as e:
            raise CacheError(
                f"fxfuse could not write kernel {name} to the debug directory {str(dump.parent)!r} "
                f"({type(e).__name__}: {e}); set FXFUSE_DEBUG_DIR / debug_dir to a writable directory or unset it."
            ) from e
    return dataclasses.replace(kernel, path=str(path) if saved else "")


def load(kernel: Kernel) -> ModuleType:
    """The module of a kernel, executed once per process from ``kernel.source`` (never from disk).

    The on-disk copy is checked and rewritten if it is not intact, for the people who read it.
    """
    key = (kernel.name, _digest(kernel.source))
    with _lock:
        if key in _modules:
            return _modules[key]
        path = Path(config.current.cache_dir) / f"{kernel.name}.py"
        _ensure_copy(path, kernel.source)
        filename = str(path)
        # Triton reads a @jit function's source through inspect -> linecache; an entry whose mtime
        # is None is never revalidated against the disk, so it sees exactly the text we run.
        linecache.cache[filename] = (len(kernel.source), None, kernel.source.splitlines(True), filename)
        code = compile(kernel.source, filename, "exec", dont_inherit=True)
        module_name = f"fxfuse_kernels.{kernel.name}"
        module = ModuleType(module_name, f"fxfuse kernel: {kernel.spec}")
        module.__file__ = filename
        sys.modules[module_name] = module  # functions find their module (pickling, inspect)
        try:
            exec(code, module.__dict__)
        except BaseException:
            sys.modules.pop(module_name, None)
            raise
        _modules[key] = module
        return module


_memo: dict = {}


def memoized(key, make):
    """A per-process memo for what is derived from loaded kernels (their launch functions), so a
    launch costs a dict lookup rather than rendering, hashing and checking; ``forget`` clears it."""
    value = _memo.get(key)
    if value is None:
        value = _memo[key] = make()
    return value


def forget() -> None:
    """Forget which files this process has checked and which kernels it has executed.

    For tests, and for long-running processes whose cache directory was cleaned: the next
    ``store``/``load`` checks the files again (modules already handed out stay valid).
    """
    with _lock:
        _verified.clear()
        _modules.clear()
        _memo.clear()
        _warned_dirs.clear()
