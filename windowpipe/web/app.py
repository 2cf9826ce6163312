"""The web view's pages and its one action, as a Starlette app.

Pages (GET, reading the state store and Redis only):

- `/`: one row per pipeline (`layout.pipeline_rows`), sortable with `?sort=KEY&order=desc`;
- `/pipelines/NAME`: the window grid, `?from=YYYY-MM-DD&to=YYYY-MM-DD` (UTC days, inclusive);
- `/pipelines/NAME/windows/START`: one window's record;
- `/healthz` (the process answers) and `/readyz` (the state store answers): no credentials.

The action: `POST /pipelines/NAME/rerun` with `start`, `end` and the CSRF token re-runs the
windows of `[start, end)` through `windowpipe.enqueue.enqueue_range` with `force`: exactly
what `windowpipe enqueue NAME --start .. --end .. --force` does, behind the same range checks
and cap. In read-only mode the route does not exist.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from importlib import resources
from typing import Any
from urllib.parse import quote

import jinja2
import redis
import sqlalchemy as sa
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.middleware.authentication import AuthenticationMiddleware
from starlette.middleware.gzip import GZipMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, PlainTextResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from core.config import Config
from core.control_runs import LastRun, format_age, read_last_runs
from core.errors import BadInputError, WindowpipeError, first_line
from core.instants import format_duration, format_instant, parse_instant, utc_now
from core.records import WindowRecord
from core.store import StateStore
from core.store.overview import grid_cells, newest_window_start, pipeline_tallies
from windowpipe.enqueue import enqueue_range
from windowpipe.web import layout
from windowpipe.web.security import (
    Access,
    BasicAuthBackend,
    CsrfTokens,
    refuse_unauthenticated,
)

FIRST_DAY, LAST_DAY = date(1970, 1, 1), date(9998, 12, 31)
"""The days the grid's range may name."""

DEFAULT_GRID_DAYS = 7
"""Days the grid shows when no range is asked for: the week up to the newest window."""

SECURITY_HEADERS = {
    # No framing (a framed page could be clicked into a re-run), nothing but this site's own
    # stylesheet, and forms that post only here; there is no script on any page.
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "
        "frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}
"""Sent with every page."""

REDIS_TIMEOUT_SECONDS = 2.0
"""How long a page waits for Redis (the control tasks' last runs) before showing "unknown"."""


@dataclass
class WebContext:
    """What the app reads and acts with; built once by `windowpipe web` (or a test)."""

    config: Config
    store: StateStore
    redis_client: redis.Redis
    access: Access
    flower_url: str | None = None
    clock: Callable[[], datetime] = utc_now
    chain_sender: Callable[[], Any] | None = None
    """Gives the function that sends a window's chain; None: a Celery app built from `config`
    on the first re-run (and kept: one broker pool per process)."""
    csrf: CsrfTokens = field(default_factory=CsrfTokens)
    _sender: Any = None
    _sender_lock: threading.Lock = field(default_factory=threading.Lock)

    def send_chain(self) -> Any:
        with self._sender_lock:
            if self._sender is None:
                if self.chain_sender is not None:
                    self._sender = self.chain_sender()
                else:
                    from windowpipe.cli.systems import chain_sender

                    self._sender = chain_sender(self.config)
            return self._sender


def _templates() -> Jinja2Templates:
    folder = resources.files("windowpipe.web") / "templates"
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(folder)),
        # Every value is escaped: error texts come from sources and may hold markup.
        autoescape=True,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["instant"] = lambda value: format_instant(value) if value else ""
    env.filters["duration"] = lambda value: format_duration(value) if value is not None else ""
    env.filters["age"] = lambda value: format_age(value.total_seconds())
    env.filters["path"] = lambda value: quote(str(value), safe="")
    env.globals["cells_html"] = layout.cells_html
    return Jinja2Templates(env=env)


TEMPLATES = _templates()


def _page(request: Request, template: str, status_code: int = 200, **values: Any) -> HTMLResponse:
    context: WebContext = request.app.state.context
    values.setdefault("title", "windowpipe")
    response: HTMLResponse = TEMPLATES.TemplateResponse(
        request,
        template,
        {
            "can_act": "act" in request.auth.scopes,
            "read_only": context.access.read_only,
            "user": request.user.display_name,
            "status_order": layout.STATUS_ORDER,
            "status_class": layout.STATUS_CLASS,
            **values,
        },
        status_code=status_code,
    )
    response.headers.update(SECURITY_HEADERS)
    return response


def _message(request: Request, status_code: int, heading: str, text: str) -> HTMLResponse:
    return _page(request, "message.html", status_code, heading=heading, text=text)


def _context(request: Request) -> WebContext:
    context: WebContext = request.app.state.context
    return context


# --- pages ------------------------------------------------------------------------------------


def pipelines_page(request: Request) -> HTMLResponse:
    context = _context(request)
    now = context.clock()
    tallies = pipeline_tallies(context.store)
    names = sorted(set(context.config.pipelines) | set(tallies))
    control_problem = None
    generation: dict[str, LastRun | None] = {}
    cleanup = None
    try:
        activity = read_last_runs(context.redis_client, names)
        generation, cleanup = dict(activity.generation), activity.cleanup
    except redis.RedisError as error:
        control_problem = f"Redis: {type(error).__name__}: {first_line(error)}"
    rows = layout.pipeline_rows(context.config.pipelines, tallies, generation, cleanup, now)
    sort = request.query_params.get("sort", "name")
    descending = request.query_params.get("order") == "desc"
    rows = layout.sort_rows(rows, sort, descending)
    return _page(
        request,
        "pipelines.html",
        title="windowpipe: pipelines",
        rows=rows,
        sort=sort,
        descending=descending,
        now=now,
        cleanup=cleanup,
        control_problem=control_problem,
    )


def _day(text: str | None, what: str) -> date | None:
    if not text:
        return None
    try:
        day = date.fromisoformat(text)
    except ValueError:
        raise BadInputError(f"{what}: expected a day like 2026-11-01, got {text!r}") from None
    # Far from date.min and date.max: a row boundary is computed a week either side.
    if not FIRST_DAY <= day <= LAST_DAY:
        raise BadInputError(f"{what}: {day} is outside {FIRST_DAY} to {LAST_DAY}")
    return day


def grid_page(request: Request) -> HTMLResponse:
    context = _context(request)
    name = request.path_params["name"]
    settings = context.config.pipelines.get(name)
    if settings is None:
        return _message(request, 404, "Unknown pipeline", f"no pipeline {name!r} is configured")
    try:
        first = _day(request.query_params.get("from"), "from")
        last = _day(request.query_params.get("to"), "to")
    except BadInputError as error:
        return _message(request, 400, "Bad range", str(error))
    if last is None:
        newest = newest_window_start(context.store, name)
        last = (newest or context.clock()).astimezone(UTC).date()
    if first is None:
        first = last - timedelta(days=DEFAULT_GRID_DAYS - 1)
    if last < first:
        return _message(request, 400, "Bad range", f"to {last} is before from {first}")
    start, end = layout.day_range(first, last)
    shape = layout.grid_shape(start, end, settings.window)
    if shape.slots > layout.MAX_GRID_WINDOWS:
        return _message(
            request,
            400,
            "Range too large",
            f"{first} to {last} holds {shape.slots:,} windows of "
            f"{format_duration(settings.window)}; a grid shows at most "
            f"{layout.MAX_GRID_WINDOWS:,}: pick a shorter range",
        )
    cells = grid_cells(context.store, name, shape.first_row, start, end)
    counts = Counter(cell.status for cell in cells)
    return _page(
        request,
        "grid.html",
        title=f"windowpipe: {name}",
        name=name,
        settings=settings,
        first=first,
        last=last,
        rows=layout.grid_rows(shape, settings.window, cells),
        columns=layout.column_labels(shape, settings.window),
        counts=counts,
        drifted=sum(1 for cell in cells if cell.drifted),
        start=start,
        end=min(end, layout.newest_due_end(settings, context.clock()) or end),
        csrf=_csrf(request),
    )


def window_page(request: Request) -> HTMLResponse:
    context = _context(request)
    name = request.path_params["name"]
    settings = context.config.pipelines.get(name)
    try:
        window_start = parse_instant(request.path_params["start"])
    except ValueError as error:
        return _message(request, 400, "Bad window", str(error))
    record = context.store.get(name, window_start)
    if record is None:
        return _message(
            request,
            404,
            "No such window",
            f"{name} has no window starting at {format_instant(window_start)}",
        )
    fields = record.to_json()
    checksums = {key: value for key, value in fields.items() if "checksum" in key}
    return _page(
        request,
        "window.html",
        title=f"windowpipe: {name} {format_instant(record.window_start)}",
        name=name,
        record=record,
        max_attempts=settings.max_attempts if settings is not None else None,
        checksums=checksums,
        chain_time=_chain_time(record),
        flower_url=context.flower_url.rstrip("/") if context.flower_url else None,
        flower_search=f"args:{format_instant(record.window_start)}",
        csrf=_csrf(request),
    )


def _chain_time(record: WindowRecord) -> timedelta | None:
    if record.started_at is None or record.finished_at is None:
        return None
    return record.finished_at - record.started_at


def _csrf(request: Request) -> str | None:
    if "act" not in request.auth.scopes:
        return None
    return _context(request).csrf.issue(request.user.display_name)


# --- the action -------------------------------------------------------------------------------


async def rerun(request: Request) -> HTMLResponse:
    """Re-run `[start, end)` of a pipeline: `windowpipe enqueue --force`'s own code path."""
    context = _context(request)
    if "act" not in request.auth.scopes:
        return _message(request, 403, "Refused", "this server is read-only")
    form = await request.form()
    token = form.get("csrf_token")
    if not context.csrf.valid(token if isinstance(token, str) else None, request.user.display_name):
        return _message(
            request,
            403,
            "Refused",
            "missing or expired CSRF token: reload the page and try again; nothing was changed",
        )
    name = request.path_params["name"]
    settings = context.config.pipelines.get(name)
    if settings is None:
        return _message(request, 404, "Unknown pipeline", f"no pipeline {name!r} is configured")
    try:
        first = parse_instant(str(form.get("start", "")))
        last = parse_instant(str(form.get("end", "")))
    except ValueError as error:
        return _message(request, 400, "Bad range", f"{error}; nothing was changed")
    try:
        done = await run_in_threadpool(
            enqueue_range,
            context.config,
            settings,
            first,
            last,
            force=True,
            now=context.clock(),
            open_store=lambda: context.store,
            chain_sender=context.send_chain,
        )
    except BadInputError as error:
        return _message(request, 400, "Refused", f"{error}; nothing was changed")
    except WindowpipeError as error:
        return _message(request, 503, "Not done", str(error))
    return _page(
        request,
        "rerun.html",
        title=f"windowpipe: {name} re-run",
        name=name,
        summary=done.summary(name),
        first=done.windows[0].start,
        last=done.windows[-1].end,
    )


# --- probes -----------------------------------------------------------------------------------


def healthz(request: Request) -> Response:
    return PlainTextResponse("ok")


def readyz(request: Request) -> Response:
    """Ready when the state store answers a query."""
    try:
        with _context(request).store.engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
    except sa.exc.SQLAlchemyError as error:
        return PlainTextResponse(f"state store: {first_line(error)}", status_code=503)
    return PlainTextResponse("ok")


def create_web_app(context: WebContext) -> Starlette:
    """The web view over `context`: pages for anyone authenticated (or everyone, open
    read-only), the re-run route only when the server may act."""
    routes = [
        Route("/", pipelines_page),
        Route("/healthz", healthz),
        Route("/readyz", readyz),
        Route("/pipelines/{name}", grid_page),
        Route("/pipelines/{name}/windows/{start}", window_page),
        Mount(
            "/static",
            app=StaticFiles(directory=str(resources.files("windowpipe.web") / "static")),
            name="static",
        ),
    ]
    if not context.access.read_only:
        routes.append(Route("/pipelines/{name}/rerun", rerun, methods=["POST"]))
    app = Starlette(
        routes=routes,
        middleware=[
            Middleware(
                AuthenticationMiddleware,
                backend=BasicAuthBackend(context.access),
                on_error=refuse_unauthenticated,
            ),
            Middleware(GZipMiddleware, minimum_size=1000),
        ],
    )
    app.state.context = context
    return app
