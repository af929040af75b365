"""Readable reports of what the passes matched, declined and generated.

A ``Report`` holds plain data (matches, misses, kernels) and reads it only through ``Match.kind``,
``Match.source``, ``Match.describe()`` and ``Kernel.spec``, so a new pattern family (attention, ...)
appears in the text and HTML reports without changes here.
"""
from __future__ import annotations

import dataclasses
from collections import Counter
from typing import Optional

import torch

from fxfuse.codegen.kernel import Kernel
from fxfuse.log import get_logger
from fxfuse.passes.pipeline import Match, Miss

log = get_logger(__name__)


@dataclasses.dataclass
class Report:
    """What one capture + pipeline did: one per ``rewrite`` call or per compiled graph."""

    matches: list[Match]
    misses: list[Miss]
    kernels: list[Kernel]
    seconds: float = 0.0
    title: str = "fxfuse"
    # The graph before the passes (a copy) and after them, drawn by ``html()``; None when unknown.
    before: Optional[torch.fx.Graph] = dataclasses.field(default=None, repr=False, compare=False)
    after: Optional[torch.fx.Graph] = dataclasses.field(default=None, repr=False, compare=False)

    def __post_init__(self):
        # Reports are built once per captured graph, so this is the one place every entry point
        # (rewrite, the torch.compile backend, the CLI) passes through: log here, not in each.
        log.info("%s", self.summary())
        for m in self.matches:
            log.debug("fused %s at %s: %s", m.kind, m.source, m.describe())
        for m in self.misses:
            log.debug("declined %s at %s: %s", m.kind, m.source, m.reason)

    def kernel_for(self, match: Match) -> Kernel | None:
        """The generated kernel that computes ``match`` (kernels are shared by identical specs)."""
        described = match.describe()
        return next((k for k in self.kernels if k.spec == described), None)

    def summary(self) -> str:
        kinds = Counter(m.kind for m in self.matches)
        fused = ", ".join(f"{n} {k}" for k, n in sorted(kinds.items())) or "none"
        return (
            f"{self.title}: {len(self.matches) + len(self.misses)} candidate site(s), "
            f"{len(self.matches)} fused ({fused}), {len(self.misses)} declined, "
            f"{len(self.kernels)} kernel(s), compile time {self.seconds:.2f}s"
        )

    def text(self) -> str:
        lines = [self.summary()]
        if self.matches:
            lines.append("fused:")
            for m in self.matches:
                kernel = self.kernel_for(m)
                arrow = f" -> kernel {kernel.name}" if kernel else ""
                shape = f" ({m.shape})" if m.shape else ""
                lines.append(f"  {m.kind} at {m.source} -- {m.describe()}{shape}{arrow}")
                if m.code:
                    lines.append(f"      {m.code}")
                lines += [f"      note: {note}" for note in m.notes]
        if self.misses:
            lines.append("declined:")
            for m in self.misses:
                lines.append(f"  {m.kind} at {m.source}: {m.reason}")
                if m.code:
                    lines.append(f"      {m.code}")
        return "\n".join(lines)

    __str__ = text

    def html(self, before=None, after=None, renderer: str = "auto") -> str:
        """One self-contained HTML page, with the graph before and after the passes drawn.

        The graphs are the report's own (kept by ``fxfuse.rewrite`` and ``fxfuse.Backend``) unless
        ``before`` or ``after`` is given (a ``GraphModule`` or ``Graph``): then only those are drawn.
        ``renderer`` is "auto" (Graphviz ``dot`` when installed, else the built-in layered layout), "dot" or "layered".
        """
        from fxfuse.report_html import render

        if before is None and after is None:
            before, after = self.before, self.after
        return render(self, before=before, after=after, renderer=renderer)


def snapshot_graph(gm: torch.fx.GraphModule) -> torch.fx.Graph:
    """A copy of ``gm``'s graph for the report's pictures, taken before the passes change it in
    place. Node names and ``meta`` (shapes, source lines) are kept; tensors are shared, not copied."""
    graph = torch.fx.Graph()
    value, _ = graph.graph_copy(gm.graph, {}, return_output_node=True)
    graph.output(value)
    return graph
