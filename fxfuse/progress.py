"""The progress bar shown while a graph's kernels are generated and loaded, when there are many.

Only on a terminal: a bar is noise in a log file, a CI job or a pipe (``fxfuse explain ... | less``),
so it is drawn only when stderr is a tty, the ``CI`` variable is unset, the graph has at least
``MIN_KERNELS`` kernels to prepare, and the ``progress`` option (``FXFUSE_PROGRESS=0`` turns it
off) is on. tqdm is imported only when a bar is drawn.
"""
from __future__ import annotations

import os
import sys
from typing import Iterable, Iterator, TypeVar

from fxfuse import config

T = TypeVar("T")

# Fewer kernels than this are prepared in a blink (a few ms each on CPU): no bar.
MIN_KERNELS = 8


def wanted(total: int, stream=None) -> bool:
    """Whether a bar for ``total`` items would be drawn on ``stream`` (stderr by default)."""
    stream = sys.stderr if stream is None else stream
    if not config.current.progress or total < MIN_KERNELS:
        return False
    if os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no"):
        return False  # some CI runners give jobs a pseudo-terminal; their logs still keep every redraw
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except (OSError, ValueError):  # a closed or detached stream
        return False


def bar(items: Iterable[T], total: int, desc: str) -> Iterator[T]:
    """``items``, with a tqdm bar on stderr while they are consumed when ``wanted(total)``."""
    stream = sys.stderr  # looked up now, not at import: tests and applications replace it
    if not wanted(total, stream):
        yield from items
        return
    from tqdm import tqdm

    with tqdm(items, total=total, desc=desc, unit="kernel", file=stream, leave=False, dynamic_ncols=True) as shown:
        yield from shown
