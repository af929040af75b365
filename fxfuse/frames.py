"""Which Python frames are the user's, and whether a torch call runs inside a custom
``torch.autograd.Function``'s forward (for capture's messages and its no-grad tagging)."""
from __future__ import annotations

import os
import sys

import torch

# Frames in these directories are the tracer's, not the user's (by path prefix, not by name: a
# checkout in a directory called "fxfuse" holds user code too).
LIBRARY_DIRS = tuple(os.path.dirname(os.path.abspath(p)) + os.sep for p in (torch.__file__, __file__))


def is_library_frame(filename: str) -> bool:
    """Whether a traceback frame's file is torch's or fxfuse's (or generated code), not the user's."""
    return os.path.abspath(filename).startswith(LIBRARY_DIRS) or filename.startswith("<")


def _function_forwards() -> dict:
    """The code object of every custom ``torch.autograd.Function``'s ``forward`` -> its class."""
    found, todo = {}, [torch.autograd.Function]
    while todo:
        cls = todo.pop()
        todo.extend(cls.__subclasses__())
        code = getattr(cls.__dict__.get("forward"), "__code__", None)
        if code is None and isinstance(cls.__dict__.get("forward"), staticmethod):
            code = getattr(cls.__dict__["forward"].__func__, "__code__", None)
        if code is not None:
            found[code] = cls
    return found


class FunctionFinder:
    """Tells whether the current torch call runs inside a custom ``torch.autograd.Function``'s
    forward, by finding that ``forward`` among the calling frames.

    Autograd calls ``forward`` itself (from C++ since torch 2.14, from ``Function.apply`` before)
    with grad mode off, and no hook or mode sees ``Function.apply``; the forward's code object
    identifies it in every version: it is the ``forward`` of a subclass of
    ``torch.autograd.Function``. Lookups are cached for the one trace this object serves.
    """

    def __init__(self):
        self._classes: dict = {}  # code object -> Function class, or None for any other "forward"

    def _class_of(self, code) -> type | None:
        if code not in self._classes:
            forwards = _function_forwards()
            self._classes.update(forwards)
            self._classes.setdefault(code, forwards.get(code))
        return self._classes[code]

    def call(self) -> str | None:
        """``Name at file:line`` (where the user called ``Name.apply``), or None."""
        frame = sys._getframe(2)
        while frame is not None:
            cls = self._class_of(frame.f_code) if frame.f_code.co_name == "forward" else None
            if cls is not None:
                caller = frame.f_back  # above autograd's own frames (Function.apply before 2.14)
                while caller is not None and os.path.abspath(caller.f_code.co_filename).startswith(LIBRARY_DIRS):
                    caller = caller.f_back
                where = f" at {caller.f_code.co_filename}:{caller.f_lineno}" if caller is not None else ""
                return f"{cls.__qualname__}{where}"
            frame = frame.f_back
        return None
