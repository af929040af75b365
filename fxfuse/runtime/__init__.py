"""Runtime: what runs generated kernels. The operators (``fxfuse.ops``) call it; it asks codegen for
source text, stores it (``cache``), executes it once per process, picks launch configurations
(``configs``) and launches (``attention``, ``norm``). Nothing here renders source."""
from __future__ import annotations

from fxfuse.codegen import generate_kernel
from fxfuse.codegen.kernel import Kernel
from fxfuse.runtime.cache import load, memoized, store


def kernel(spec) -> Kernel:
    """The kernel of a spec, generated and stored in the kernel cache (its ``path`` set)."""
    return store(generate_kernel(spec))


def functions(spec, prefix: str = "") -> dict:
    """The kernel module's Triton functions for a spec, by suffix (``forward``, ``backward_dq``,
    ...): generated, stored and executed once per process (a dict lookup afterwards)."""

    def make():
        k = kernel(spec)
        module = load(k)
        head = k.name + "_"
        return {n[len(head):]: getattr(module, n) for n in vars(module) if n.startswith(head)} | \
            {n: getattr(module, n) for n in ("dropout_mask",) if hasattr(module, n)}

    return memoized(("functions", spec), make)


def prepare_kernels(specs) -> list[Kernel]:
    """The kernels of a graph's fused sites, one per distinct spec, in the sites' order: rendered,
    stored and loaded (their module executed, so a broken kernel fails here, while compiling the
    graph, rather than at its first call). A progress bar is shown when there are many.

    On a GPU, Triton still compiles each kernel at its first launch (for the launch's arguments):
    compiling ahead with Triton's ``warmup`` would need each kernel's launch arguments here."""
    from fxfuse.progress import bar

    # A spec with ``kernel = False`` (the chunked linear cross-entropy, the gated activation) runs
    # as ATen ops: it has no source.
    distinct = list({_key(spec): spec for spec in specs if getattr(spec, "kernel", True)}.values())
    kernels: dict[str, Kernel] = {}
    for spec in bar(distinct, len(distinct), "fxfuse: generating kernels"):
        k = kernel(spec)
        load(k)
        kernels.setdefault(k.name, k)
    return list(kernels.values())


def _key(spec) -> str:
    return spec.to_json() if hasattr(spec, "to_json") else repr(spec)
