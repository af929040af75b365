"""Codegen: specs → Triton source text (``Kernel``: a name and a text). Pure: it writes no files,
runs nothing and needs no GPU; storing, loading and launching are ``fxfuse.runtime``'s."""
from __future__ import annotations

from fxfuse.codegen.kernel import Kernel


def generate_kernel(spec) -> Kernel:
    """The kernel (name and source) for a spec of any kind."""
    from fxfuse.spec import NormSpec

    if isinstance(spec, NormSpec):
        from fxfuse.codegen.norm import generate

        return generate(spec)
    if type(spec).__name__ == "PolyNormSpec":
        return __import__("fxfuse.codegen.polynorm", fromlist=["generate"]).generate(spec)
    if type(spec).__name__ == "LinearAttentionSpec":
        return __import__("fxfuse.codegen.linear_attention", fromlist=["generate"]).generate(spec)
    if type(spec).__name__ == "AttentionSpec":  # imported lazily, like the norm template
        return __import__("fxfuse.codegen.attention", fromlist=["generate"]).generate(spec)
    raise TypeError(f"no kernel template for spec {type(spec).__name__}")
