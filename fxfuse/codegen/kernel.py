"""What codegen produces: a kernel's name and its Triton source text, nothing more.

A kernel's name hashes the codegen version and its spec, and its source is a pure function of the
spec, so a name stands for one text. Storing the text (the on-disk copy people read), executing it
and launching it are the runtime's (``fxfuse.runtime``).
"""
from __future__ import annotations

import dataclasses
import hashlib

CODEGEN_VERSION = "2"  # bump when templates change in a way that must not reuse old files


@dataclasses.dataclass(frozen=True)
class Kernel:
    """A generated kernel: its name, its Triton source text and the file holding a copy of it
    (``""`` until the runtime stores it, or when the cache directory could not be written)."""

    name: str
    source: str
    path: str = ""
    spec: str = ""  # the spec in words, for listings


def kernel_name(prefix: str, key: str) -> str:
    """``fxfuse_<prefix>_<12 hex digits>``: a hash of the codegen version and ``key`` (the spec)."""
    digest = hashlib.sha256(f"{CODEGEN_VERSION}\n{key}".encode()).hexdigest()[:12]
    return f"fxfuse_{prefix}_{digest}"
