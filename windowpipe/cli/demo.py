"""`windowpipe demo`: the command's options; the demo itself is `windowpipe.demo`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def demo(
    events: Annotated[int, typer.Option(help="Synthetic events to seed.")] = 100_000,
    hours: Annotated[int, typer.Option(help="Hours of data: one 1h window each (2-336).")] = 24,
    workdir: Annotated[
        Path, typer.Option(help="Work dir (config, databases, stage, logs); wiped at start.")
    ] = Path(".demo"),
    flower_port: Annotated[
        int | None, typer.Option(help="Flower's port (default: a free one).", show_default=False)
    ] = None,
    keep: Annotated[
        bool, typer.Option("--keep", help="Keep everything running until Ctrl-C.")
    ] = False,
    target: Annotated[
        str,
        typer.Option(help="auto (Snowflake on fakesnow if it works, else sql), snowflake, sql."),
    ] = "auto",
    timeout: Annotated[float, typer.Option(help="Give up on the pipeline after seconds.")] = 600,
) -> None:
    """The whole system end to end on this machine, with no outside service."""
    from windowpipe.demo.run import DemoOptions, run_demo

    options = DemoOptions(events, hours, workdir, flower_port, keep, target, timeout)
    raise typer.Exit(run_demo(options))
