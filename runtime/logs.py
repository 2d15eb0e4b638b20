"""Logging, configured once per process: every line on stderr is one JSON object.

Contract: ``configure(level)`` is called once, by the ``sentiment`` command before any command runs (or by a
test that runs a service in-process). After it, every log record of the process leaves as one JSON line on
stderr with the same keys, whoever wrote it:
  * ``event`` (the message), ``level``, ``logger`` (the module's name), ``timestamp`` (ISO-8601, UTC);
  * the ids a record carries as key-value pairs (structlog calls: ``id=…``, ``version=…``), and
    ``exception`` (the formatted traceback) when there is one.
structlog loggers (the worker, drift monitor) and stdlib loggers (training, faust, aiokafka, mode) go through
the same ``structlog.stdlib.ProcessorFormatter`` on one root handler, so a third-party line cannot come out as
plain text. Message text never goes into logs at INFO; ids and codes do.

Calling it again replaces the handler and the level (tests do), it never stacks a second handler.
"""

from __future__ import annotations

import logging
import sys

import structlog

# Chatty at INFO about every rebalance step and connection; their warnings and errors still come through.
NOISY_LIBRARIES = ("aiokafka", "faust", "mode", "kafka")
_HANDLER_NAME = "sentiment-json"


def _shared_processors() -> list:
    """What every record gets, from structlog or from the standard library alike."""
    return [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True, key="timestamp"),
    ]


def configure(level: str = "INFO") -> None:
    """Routes every logger of the process through one JSON formatter on stderr, at ``level``."""
    numeric = getattr(logging, level.upper())
    formatter = structlog.stdlib.ProcessorFormatter(
        # Records from the standard library: %-style arguments are merged into the message first.
        foreign_pre_chain=[*_shared_processors(), structlog.stdlib.PositionalArgumentsFormatter()],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(ensure_ascii=False, default=str),
        ],
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in list(root.handlers):  # replace, never stack: one line per record
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(numeric)
    for name in NOISY_LIBRARIES:
        library = logging.getLogger(name)
        library.setLevel(max(logging.WARNING, numeric))
        library.handlers.clear()  # a library's own handler would print the record a second time, as text
        library.propagate = True
    logging.captureWarnings(True)  # warnings.warn(...) becomes a record of logger "py.warnings"
    structlog.configure(
        processors=[*_shared_processors(), structlog.processors.StackInfoRenderer(),
                    structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.stdlib.LoggerFactory(),
        cache_logger_on_first_use=False,  # configure() may run again (tests); cached loggers would keep the old
    )
