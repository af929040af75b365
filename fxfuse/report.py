"""Readable reports of what the passes matched, declined and generated."""
from __future__ import annotations

import dataclasses
from collections import Counter

from fxfuse.codegen.cache import Kernel
from fxfuse.passes.pipeline import Match, Miss


@dataclasses.dataclass
class Report:
    """What one capture + pipeline did: one per ``rewrite`` call or per compiled graph."""

    matches: list[Match]
    misses: list[Miss]
    kernels: list[Kernel]
    seconds: float = 0.0
    title: str = "fxfuse"

    def text(self) -> str:
        kinds = Counter(m.kind for m in self.matches)
        lines = [
            f"{self.title}: {len(self.matches) + len(self.misses)} candidate site(s), "
            f"{len(self.matches)} fused ({', '.join(f'{n} {k}' for k, n in sorted(kinds.items())) or 'none'}), "
            f"{len(self.misses)} declined, {len(self.kernels)} kernel(s), {self.seconds:.2f}s",
        ]
        if self.matches:
            lines.append("fused:")
            for m in self.matches:
                kernel = next((k.name for k in self.kernels if k.spec == m.describe()), "")
                arrow = f" -> kernel {kernel}" if kernel else ""
                lines.append(f"  {m.kind} at {m.source} -- {m.describe()}{arrow}")
                if m.code:
                    lines.append(f"      {m.code}")
        if self.misses:
            lines.append("declined:")
            for m in self.misses:
                lines.append(f"  {m.kind} at {m.source}: {m.reason}")
                if m.code:
                    lines.append(f"      {m.code}")
        return "\n".join(lines)

    __str__ = text
