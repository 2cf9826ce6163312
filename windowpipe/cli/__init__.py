"""The `windowpipe` command line (typer): the app, its error guard and `main`; the commands
live in one module per group: `windows` (plan, enqueue, status, reconcile, validate),
`operate` (check, locks, metrics, migrate), `web` and `demo`.

Errors are one line on stderr, `windowpipe: error: ...`; exit status 2 for bad input (a bad
config, argument, option or range, a state store without the schema), 1 for a failed run (a
system unreachable, a window dead). Every command runs through one guard, `_GuardedGroup.main`:
click's usage errors, windowpipe's errors and anything unexpected all end as that one line,
never a traceback (`WINDOWPIPE_LOG_LEVEL=DEBUG` adds the traceback of an unexpected error).

Nothing is written before the input is known to be good: the config (every URL included) is
validated first, then the arguments and the range, then the systems are reached, and only then
does a write command write. Read commands (`plan`, `status`, `validate`, `locks`, `check`)
never change the state store's schema; `migrate` does, and so does `enqueue`, which writes.
The config is loaded once per command (`options.read_config`) and handed on from there.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable
from typing import Any

import typer
from typer.core import TyperGroup

from core.errors import BadInputError, WindowpipeError, first_line
from windowpipe.cli import demo, operate, web, windows
from windowpipe.cli.options import error_line

_click_errors: Any = sys.modules[typer.BadParameter.__module__]
"""The exceptions of the click typer parses with: typer >= 0.2x vendors its own copy of click
(`typer._click`), older typer uses click itself; `typer.BadParameter` lives in either one."""


class _NeverRaised(Exception):
    """Stands in for NoArgsIsHelpError with a click that does not have it (before 8.2)."""


_NoArgsIsHelp: type[Exception] = getattr(_click_errors, "NoArgsIsHelpError", _NeverRaised)
_UsageError: type[Exception] = _click_errors.UsageError
_ClickException: type[Exception] = _click_errors.ClickException
_Abort = (typer.Abort, getattr(_click_errors, "Abort", typer.Abort))


def _usage_message(error: Any) -> str:
    message = error.format_message().strip().rstrip(".")
    if message[:1].isupper() and message[1:2].islower():
        message = message[0].lower() + message[1:]
    if error.ctx is None:
        return message
    path = error.ctx.command_path
    command = path.split(" ", 1)[1] if " " in path else None
    where = f"{command}: " if command else ""
    return f"{where}{message} (see `{path} --help`)"


def _exit_status(run: Callable[[], Any]) -> int:
    """Run the command line; every error becomes one line on stderr and an exit status."""
    try:
        result = run()
    except _NoArgsIsHelp as error:
        # `windowpipe` alone asks for the help, like `windowpipe --help`.
        print(error.format_message())  # type: ignore[attr-defined]
        return 0
    except _UsageError as error:
        error_line(_usage_message(error))
        return 2
    except _Abort:
        error_line("aborted")
        return 1
    except _ClickException as error:
        error_line(error.format_message())  # type: ignore[attr-defined]
        return int(error.exit_code)  # type: ignore[attr-defined]
    except BadInputError as error:
        error_line(str(error))
        return 2
    except WindowpipeError as error:
        error_line(str(error))
        return 1
    except Exception as error:
        # A system failed in a way no command anticipated (a connection dropped mid-command):
        # a failed run, in one line. The traceback is there for whoever asks for it.
        if os.environ.get("WINDOWPIPE_LOG_LEVEL", "").upper() == "DEBUG":
            traceback.print_exc()
        error_line(f"{type(error).__name__}: {first_line(error)}")
        return 1
    return result if isinstance(result, int) else 0


class _GuardedGroup(TyperGroup):
    """The `windowpipe` group: click runs in non-standalone mode, so its usage errors reach
    `_exit_status` instead of being drawn as a framed box, and so do every command's errors."""

    def main(  # type: ignore[override]
        self,
        args: Any = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        status = _exit_status(
            lambda: super(_GuardedGroup, self).main(
                args, prog_name or "windowpipe", complete_var, standalone_mode=False, **extra
            )
        )
        if standalone_mode:
            sys.exit(status)
        return status


app = typer.Typer(
    name="windowpipe",
    help="Time-windowed pipelines from a search engine to a warehouse, on Celery workers.",
    cls=_GuardedGroup,
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)

# The commands, in the order `windowpipe --help` lists them.
app.command()(operate.check)
app.command()(windows.plan)
app.command()(windows.enqueue)
app.command()(windows.status)
app.command()(windows.reconcile)
app.command()(windows.validate)
app.command()(operate.locks)
app.command()(operate.metrics)
app.command()(operate.migrate)
app.command()(web.web)
app.command()(demo.demo)


def main() -> None:
    """Console script entry point (also `python -m windowpipe`)."""
    from core.logs import configure_logging

    configure_logging(os.environ.get("WINDOWPIPE_LOG_LEVEL", "WARNING"))
    typer.main.get_command(app).main(prog_name="windowpipe")
