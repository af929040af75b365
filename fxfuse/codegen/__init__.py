"""Codegen: specs → Triton source text, cached on disk, loaded and launched by the operators."""
from __future__ import annotations

from fxfuse.codegen.cache import Kernel


def generate_kernel(spec) -> Kernel:
    """The kernel module for a spec (any kind), rendered and stored; needs no GPU."""
    from fxfuse.spec import NormSpec

    if isinstance(spec, NormSpec):
        from fxfuse.codegen.norm import generate

        return generate(spec)
    if type(spec).__name__ == "AttentionSpec":  # imported lazily, like the norm template
        return __import__("fxfuse.codegen.attention", fromlist=["generate"]).generate(spec)
    raise TypeError(f"no kernel template for spec {type(spec).__name__}")
