"""Codegen: specs → Triton source text, cached on disk, loaded and launched by the operators."""
from __future__ import annotations

from fxfuse.codegen.cache import Kernel, load


def generate_kernel(spec) -> Kernel:
    """The kernel module for a spec (any kind), rendered and stored; needs no GPU."""
    from fxfuse.spec import NormSpec

    if isinstance(spec, NormSpec):
        from fxfuse.codegen.norm import generate

        return generate(spec)
    if type(spec).__name__ == "AttentionSpec":  # imported lazily, like the norm template
        return __import__("fxfuse.codegen.attention", fromlist=["generate"]).generate(spec)
    raise TypeError(f"no kernel template for spec {type(spec).__name__}")


def prepare_kernels(specs) -> list[Kernel]:
    """The kernels of a graph's fused sites, one per distinct spec, in the sites' order: rendered,
    stored and loaded (their module executed, so a broken kernel fails here, while compiling the
    graph, rather than at its first call). A progress bar is shown when there are many.

    On a GPU, Triton still compiles each kernel at its first launch (for the launch's arguments):
    compiling ahead with Triton's ``warmup`` would need each kernel's launch arguments here."""
    from fxfuse.progress import bar

    # A spec with ``kernel = False`` (the chunked linear cross-entropy) runs as torch ops: no source.
    distinct = list({_key(spec): spec for spec in specs if getattr(spec, "kernel", True)}.values())
    kernels: dict[str, Kernel] = {}
    for spec in bar(distinct, len(distinct), "fxfuse: generating kernels"):
        kernel = generate_kernel(spec)
        load(kernel)
        kernels.setdefault(kernel.name, kernel)
    return list(kernels.values())


def _key(spec) -> str:
    return spec.to_json() if hasattr(spec, "to_json") else repr(spec)
