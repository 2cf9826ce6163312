"""The commands that operate a deployment: check, locks, metrics, migrate.

Read commands (`check`, `locks` without `--cleanup`, `metrics`) never change the state store's
schema; `migrate` does.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

import typer
from rich.table import Table

from core.config import Config, PipelineConfig
from core.errors import first_line
from core.instants import format_instant, utc_now
from windowpipe.cli.options import ConfigOption, fail, out, read_config
from windowpipe.cli.systems import (
    StoreUnreachableError,
    chain_sender,
    open_store,
    reaching_store,
    read_store,
    redis_client,
    schema_problem,
    shown,
    unreachable,
)

# --- check ------------------------------------------------------------------------------------


def check(config_path: ConfigOption = None) -> None:
    """Validate the config and reach every configured system; one line per problem."""
    config = read_config(config_path)
    problems = _reach_everything(config)
    for line in problems:
        print(line)
    if problems:
        raise typer.Exit(1)
    print(f"ok: {config.path}: {len(config.pipelines)} pipeline(s), every system reachable")


def _reach_everything(config: Config) -> list[str]:
    problems = unreachable(config)
    store = open_store(config)
    try:
        problem = schema_problem(store)
    except StoreUnreachableError as error:
        problem = str(error)
    finally:
        store.dispose()
    if problem:
        problems.append(f"state store: {problem}")
    for name, pipeline in config.pipelines.items():
        problems += _reach_pipeline(name, pipeline)
    return problems


def _reach_pipeline(name: str, pipeline: PipelineConfig) -> list[str]:
    from connectors.registry import Role, build
    from core.windows import Window

    probe = Window(pipeline.start, pipeline.start + pipeline.window)
    calls: dict[Role, Callable[[Any], object]] = {
        "source": lambda c: c.count(probe),
        "staging": lambda c: c.list_files(name, probe),
        "target": lambda c: c.count_window(name, probe),
    }
    problems = []
    for role, call in calls.items():
        try:
            connector = build(role, pipeline)
            try:
                call(connector)
            finally:
                connector.close()
        except Exception as error:
            problems.append(f"{name}.{role}: {error}")
    return problems


# --- locks ------------------------------------------------------------------------------------


def locks(
    cleanup: Annotated[
        bool, typer.Option("--cleanup", help="Release stale locks and requeue their windows.")
    ] = False,
    config_path: ConfigOption = None,
) -> None:
    """List held window locks; with --cleanup, release stale ones and requeue lost windows."""
    from core.locks import held_locks

    # Listing needs no secrets; a cleanup may start chains, which need them.
    config = read_config(config_path, require_secrets=cleanup)
    # Locks belong to the windows of one state store: refuse a store without the schema (the
    # cleanup writes records, never the schema) before touching Redis.
    store = read_store(config)
    client = redis_client(config)
    held = held_locks(client)
    table = Table("pipeline", "window_start", "owner", "ttl_s", "owner_alive")
    for lock in held:
        table.add_row(
            lock.pipeline,
            format_instant(lock.window_start),
            lock.owner,
            f"{lock.ttl_seconds:.1f}",
            "no" if lock.owner_is_dead_here() else "yes/unknown",
        )
    out.print(table if held else "no window locks held")
    if cleanup:
        from core.recovery import cleanup as run_cleanup

        send_chain = chain_sender(config)
        problems = unreachable(config)
        if problems:
            fail(problems[0], 1)
        report = run_cleanup(store, client, config, send_chain, utc_now())
        summary = report.summary()
        for label, key in (
            ("released", "released"),
            ("requeued", "requeued"),
            ("failed (attempts exhausted)", "failed"),
            ("dispatched", "dispatched"),
        ):
            for line in summary[key]:
                print(f"{label}: {line}")
        queued = sum(report.dispatched.values())
        total = len(report.released) + len(report.requeued) + len(report.failed) + queued
        print(f"cleanup: {total} change(s)")


# --- metrics ----------------------------------------------------------------------------------


def metrics(
    port: Annotated[
        int, typer.Option(min=0, max=65535, help="Port to serve /metrics on (0: any free port).")
    ] = 9810,
    address: Annotated[str, typer.Option(help="Address to listen on.")] = "0.0.0.0",
    once: Annotated[
        bool, typer.Option("--once", help="Print one scrape on stdout and exit.")
    ] = False,
    refresh: Annotated[
        float,
        typer.Option(
            min=0,
            help="Read the numbers every SECONDS in the background and answer scrapes from "
            "memory, with their age (0: read them at each scrape).",
        ),
    ] = 15.0,
    config_path: ConfigOption = None,
) -> None:
    """Prometheus exporter: freshness, windows by status, stage durations, rows, queue depth."""
    from windowpipe.exporter import WindowpipeCollector, render, serve

    config = read_config(config_path, require_secrets=False)
    if once:
        # Like every read command: a store without the newest schema is refused, exit 2.
        print(render(WindowpipeCollector(config, read_store(config))), end="")
        return
    # Serving, it reports such a store as down until it is migrated (windowpipe/exporter.py).
    collector = WindowpipeCollector(config, open_store(config))
    serve(collector, address, port, announce=lambda line: print(line, flush=True), refresh=refresh)


# --- migrate ----------------------------------------------------------------------------------


def migrate(config_path: ConfigOption = None) -> None:
    """Create or upgrade the state store's schema (read commands never change it)."""
    config = read_config(config_path, require_secrets=False)
    store = open_store(config)
    where = f"the state store at {shown(store.url)}"
    try:
        before, head = reaching_store(store, store.schema_revision)
        if before == head:
            print(f"{where} is at schema revision {head}, the newest: nothing to do")
            return
        try:
            reaching_store(store, store.migrate)
        except _alembic_errors() as error:
            fail(
                f"cannot migrate {where} from schema revision {before}: {first_line(error)} "
                f"(was it migrated by a newer windowpipe?)",
                1,
            )
        after, _ = reaching_store(store, store.schema_revision)
    finally:
        store.dispose()
    was = "had no windowpipe schema" if before is None else f"was at schema revision {before}"
    print(f"{where} {was}; migrated to revision {after}")


def _alembic_errors() -> tuple[type[Exception], ...]:
    """What alembic raises for a revision it cannot resolve (one unknown to this windowpipe)."""
    from alembic.util.exc import CommandError

    return (CommandError,)
