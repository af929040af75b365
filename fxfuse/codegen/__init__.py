"""Codegen: specs → Triton source text, cached on disk, loaded and launched by the operators."""
from __future__ import annotations

from fxfuse.codegen.cache import Kernel


def generate_kernel(spec) -> Kernel:
    """The kernel module for a spec (any kind), rendered and stored; needs no GPU."""
    from fxfuse.spec import NormSpec

    if isinstance(spec, NormSpec):
        from fxfuse.codegen.norm import generate

        return generate(spec)
    raise TypeError(f"no kernel template for spec {type(spec).__name__}")
