"""Structured logging: one JSON object a line, through structlog, configured once per process.

Bind `pipeline` and `window` (and `stage`) to a logger and every line carries them, so a
window's whole story can be read with `grep '"window": "2026-11-01T00:15:00Z"'`.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog

_configured = False


def configure_logging(level: str = "INFO", *, json: bool = True) -> None:
    """Route structlog and the standard library (Celery's loggers too) to stderr, once.

    windowpipe's own lines are rendered by structlog and written to stderr directly, filtered
    by level before any work: no stdlib `LogRecord`, handler and formatter per line, which cost
    more than the rest of a tiny window's stage logging. Other libraries' lines go through the
    stdlib root handler, rendered by the same processors into the same JSON."""
    global _configured
    if _configured:
        return
    _configured = True
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: Any = (
        structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=False)
    )
    threshold = logging.getLevelNamesMapping()[level.upper()]
    structlog.configure(
        processors=[*shared, structlog.processors.format_exc_info, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(threshold),
        logger_factory=structlog.WriteLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            renderer,
        ],
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(threshold)
    # Client libraries are chatty at INFO (every HTTP request); keep their warnings only.
    for noisy in ("elastic_transport", "urllib3", "botocore", "boto3", "snowflake", "opensearch"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def get_logger(name: str = "windowpipe", **context: Any) -> Any:
    """A structlog logger with `context` bound (e.g. pipeline=..., window=...); its lines say
    `name` as their `logger`, as the standard library's lines do."""
    return structlog.get_logger().bind(logger=name, **context)
