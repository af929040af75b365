"""Generated kernel sources on disk: named by content hash, written atomically, imported once.

Two processes compiling the same kernel write the same bytes to a temporary file each and rename
it into place, so a reader never sees a half-written file. A file whose bytes differ from the
source we expect (truncated, edited, corrupted) is simply written again: the source is always at
hand, so the cache is only ever a copy of it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import os
import sys
import tempfile
from pathlib import Path
from types import ModuleType

from fxfuse import config

CODEGEN_VERSION = "1"  # bump when templates change in a way that must not reuse old files

_modules: dict[str, ModuleType] = {}


@dataclasses.dataclass(frozen=True)
class Kernel:
    """A generated kernel: its name, its Triton source text and the file it lives in."""

    name: str
    source: str
    path: str
    spec: str = ""  # the spec in words, for listings


def kernel_name(prefix: str, key: str) -> str:
    digest = hashlib.sha256(f"{CODEGEN_VERSION}\n{key}".encode()).hexdigest()[:12]
    return f"fxfuse_{prefix}_{digest}"


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def store(name: str, source: str, spec: str = "") -> Kernel:
    """Make sure ``<cache>/<name>.py`` holds exactly ``source``; mirror it to the debug dir."""
    path = Path(config.current.cache_dir) / f"{name}.py"
    try:
        current = path.read_text()
    except (OSError, UnicodeDecodeError):
        current = None
    if current != source:
        _write_atomic(path, source)
    if config.current.debug_dir:
        _write_atomic(Path(config.current.debug_dir) / "kernels" / f"{name}.py", source)
    return Kernel(name=name, source=source, path=str(path), spec=spec)


def load(kernel: Kernel) -> ModuleType:
    """Import a stored kernel module (once per process), re-storing it if the file is not intact."""
    if kernel.name in _modules:
        return _modules[kernel.name]
    path = Path(kernel.path)
    try:
        intact = path.read_text() == kernel.source
    except (OSError, UnicodeDecodeError):
        intact = False
    if not intact:
        store(kernel.name, kernel.source, kernel.spec)
    module_name = f"fxfuse_kernels.{kernel.name}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    _modules[kernel.name] = module
    return module
