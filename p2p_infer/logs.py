"""Structured logging.

Two set-ups: the CLI and peer processes call :func:`configure_logging` (structlog renders
console or JSON lines on stderr); a library user gets :func:`configure_library_logging`,
done on ``import p2p_infer``: every structlog event becomes a standard :mod:`logging`
record on the ``p2p_infer.*`` loggers, which print nothing until the application
configures logging (a NullHandler stops Python's last-resort handler), as libraries should.
"""

from __future__ import annotations

import logging
import sys
from typing import Literal

import structlog

LogFormat = Literal["console", "json"]
LIBRARY_LOGGER = "p2p_infer"
# Loggers kept from Python's last-resort stderr handler in library mode: ours, and py-libp2p's,
# which logs routine events (a departed peer refusing a dial) at WARNING (notes/libp2p.md, bug 17).
# An application that configures logging sees ours; py-libp2p's logger does not propagate
# (its own set-up, at import), LIBP2P_DEBUG turns its output on.
SILENT_LOGGERS = (LIBRARY_LOGGER, "libp2p")


def configure_logging(fmt: LogFormat = "console", level: str = "info", **context: str) -> None:
    """Configure structlog; ``context`` (e.g. ``peer=...``) is bound to every line."""
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer() if fmt == "json" else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info if fmt == "json" else structlog.processors.StackInfoRenderer(),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[level.upper()]),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    structlog.contextvars.clear_contextvars()
    if context:
        structlog.contextvars.bind_contextvars(**context)


def configure_library_logging(*, force: bool = False) -> None:
    """Route structlog through the standard ``logging`` module (library mode), silent by default.

    An application that configured structlog itself keeps its set-up unless ``force``. With
    ``logging.basicConfig(level=logging.INFO)`` the events show as ``event key=value`` lines
    on the ``p2p_infer.client`` (and other ``p2p_infer.*``) loggers."""
    silence_last_resort()
    if structlog.is_configured() and not force:
        return
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.stdlib.filter_by_level,  # cheap: nothing is formatted for a disabled level
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            structlog.processors.KeyValueRenderer(key_order=["event"], drop_missing=True),
        ],
        wrapper_class=structlog.stdlib.BoundLogger,
        logger_factory=structlog.stdlib.LoggerFactory(),
        cache_logger_on_first_use=False,
    )


def silence_last_resort() -> None:
    """A NullHandler on our loggers and py-libp2p's, so nothing reaches Python's last-resort
    stderr handler. Again after ``import libp2p``, which clears its logger's handlers (and
    stops it propagating) at import: node/client.py calls this once libp2p is imported."""
    for name in SILENT_LOGGERS:
        logger = logging.getLogger(name)
        if _NULL not in logger.handlers:
            logger.addHandler(_NULL)


_NULL = logging.NullHandler()
