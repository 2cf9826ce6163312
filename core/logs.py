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
    """Route structlog and the standard library (Celery's loggers too) to stderr, once."""
    global _configured
    if _configured:
        return
    _configured = True
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: Any = (
        structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            *shared,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
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
    root.setLevel(level.upper())
    # Client libraries are chatty at INFO (every HTTP request); keep their warnings only.
    for noisy in ("elastic_transport", "urllib3", "botocore", "boto3", "snowflake", "opensearch"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def get_logger(name: str = "windowpipe", **context: Any) -> Any:
    """A structlog logger with `context` bound (e.g. pipeline=..., window=...)."""
    return structlog.get_logger(name).bind(**context)
