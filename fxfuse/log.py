"""The ``fxfuse`` logger. Quiet by default, like any library: ``FXFUSE_LOG=info`` (or ``debug``)
in the environment raises its level and sends its records to stderr.

Modules log under ``fxfuse.<module>`` (``get_logger(__name__)``), so one variable controls them all
and ``logging.getLogger("fxfuse.passes")`` can be tuned on its own.
"""
from __future__ import annotations

import logging
import os
import sys
import warnings

LOGGER_NAME = "fxfuse"
ENV_VAR = "FXFUSE_LOG"
LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}

_handler: logging.Handler | None = None


def get_logger(name: str | None = None) -> logging.Logger:
    """``get_logger(__name__)`` inside the package; names outside ``fxfuse`` are put under it."""
    if not name or name == LOGGER_NAME:
        return logging.getLogger(LOGGER_NAME)
    if not name.startswith(LOGGER_NAME + "."):
        name = f"{LOGGER_NAME}.{name}"
    return logging.getLogger(name)


def set_level(level: str | int) -> logging.Logger:
    """Set the ``fxfuse`` logger's level and make sure its records reach stderr once."""
    global _handler
    logger = logging.getLogger(LOGGER_NAME)
    if isinstance(level, str):
        if level.strip().lower() not in LEVELS:
            raise ValueError(f"unknown fxfuse log level {level!r}; use one of: {', '.join(LEVELS)}")
        level = LEVELS[level.strip().lower()]
    logger.setLevel(level)
    if _handler is None:
        # Our own handler rather than logging.basicConfig: an application's root configuration stays
        # untouched, and propagation is off so a record is not printed twice when the root has one.
        _handler = logging.StreamHandler(sys.stderr)
        _handler.setFormatter(logging.Formatter("[%(name)s] %(levelname)s: %(message)s"))
        logger.addHandler(_handler)
        logger.propagate = False
    return logger


def configure_from_env() -> None:
    """Apply ``FXFUSE_LOG``; an unknown value warns instead of breaking ``import fxfuse``."""
    value = os.environ.get(ENV_VAR, "").strip()
    if not value:
        return
    try:
        set_level(value)
    except ValueError as err:
        warnings.warn(f"{ENV_VAR}: {err}", stacklevel=2)


logging.getLogger(LOGGER_NAME).addHandler(logging.NullHandler())
configure_from_env()
