"""``FXFUSE_DEBUG_DIR``: every captured graph, before and after the passes (and, under
torch.compile, the forward and backward graphs AOTAutograd derives from it), written as text.

Files are ``<debug_dir>/graphs/NNN_<stage>.txt``, one number per captured graph, so the stages of
one graph sort together: ``captured``, ``rewritten``, ``aot_forward``, ``aot_backward``. The
generated kernels go to ``<debug_dir>/kernels/`` (see ``fxfuse.runtime.cache``).
"""
from __future__ import annotations

import itertools
from pathlib import Path

import torch

from fxfuse import config

_counter = itertools.count()


def next_index() -> int | None:
    """A new graph number, or None when no debug directory is set."""
    return next(_counter) if config.current.debug_dir else None


def dump_graph(gm: torch.fx.GraphModule, stage: str, index: int | None = None) -> int | None:
    """Write ``gm``'s code and graph to ``<debug_dir>/graphs/NNN_<stage>.txt``; returns its index."""
    root = config.current.debug_dir
    if not root:
        return index
    index = next(_counter) if index is None else index
    path = Path(root) / "graphs" / f"{index:03d}_{stage}.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"# {stage}\n{gm.code}\n\n# graph\n{gm.graph}\n")
    return index
