"""What every command shares: the `--config` and `--json` options, the config loaded once, the
instants it parses, and its one-line errors.

A command loads the config once (`load`) and hands that object to whatever it calls, the
Celery app included (`workers.celery_app.create_app`): nothing reads the file a second time.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, NoReturn, TypeVar

import orjson
import typer
from rich.console import Console

from core.config import Config, load_config
from core.errors import BadInputError, WindowpipeError
from core.instants import parse_instant

T = TypeVar("T")

ConfigOption = Annotated[
    Path | None,
    typer.Option(
        "--config",
        "-c",
        help="Config file (default: $WINDOWPIPE_CONFIG, else ./windowpipe.toml).",
        show_default=False,
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print a JSON list of objects.")]

# Piped (not a terminal), tables get room for every column instead of rich's default 80.
out = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 240)


def error_line(message: str) -> None:
    """Print `windowpipe: error: MESSAGE` as exactly one line on stderr."""
    text = " ".join(line.strip() for line in str(message).splitlines() if line.strip())
    print(f"windowpipe: error: {text}", file=sys.stderr)


def fail(message: str, status: int = 2) -> NoReturn:
    """Print one line on stderr and exit (2: bad input, 1: a failed run)."""
    error_line(message)
    raise typer.Exit(status)


def guarded(function: Callable[[], T]) -> T:
    """Run a command body, turning windowpipe errors into one line and the right status."""
    try:
        return function()
    except BadInputError as error:
        fail(str(error), 2)
    except WindowpipeError as error:
        fail(str(error), 1)


def read_config(path: Path | None, *, require_secrets: bool = True) -> Config:
    """The command's config, loaded once; a bad one is one line and exit 2."""
    return guarded(lambda: load_config(path, require_secrets=require_secrets))


def instant(text: str, option: str) -> datetime:
    """An option's ISO 8601 instant; a bad one is one line naming the option, exit 2."""
    try:
        return parse_instant(text)
    except ValueError as error:
        fail(f"{option}: {error}")


def print_json(rows: list[dict[str, Any]]) -> None:
    """`--json` output: a JSON list of objects on stdout."""
    sys.stdout.write(orjson.dumps(rows, option=orjson.OPT_INDENT_2).decode() + "\n")
