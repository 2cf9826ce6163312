"""`windowpipe web`: the window grid in a browser (windowpipe/web)."""

from __future__ import annotations

import os
from typing import Annotated

import typer

from windowpipe.cli.options import ConfigOption, guarded, read_config

DEFAULT_PORT = 8077
"""`windowpipe web`'s port unless `--port` says otherwise."""


def web(
    host: Annotated[
        str, typer.Option(help="Address to listen on; anything but loopback exposes the view.")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port to listen on.")] = DEFAULT_PORT,
    read_only: Annotated[
        bool,
        typer.Option(
            "--read-only",
            help="Serve the pages without any action; without WINDOWPIPE_WEB_USER and "
            "WINDOWPIPE_WEB_PASSWORD, without authentication too.",
        ),
    ] = False,
    flower_url: Annotated[
        str | None,
        typer.Option(
            help="Flower's address, for the links to a window's tasks "
            "(default: $WINDOWPIPE_WEB_FLOWER_URL).",
            show_default=False,
        ),
    ] = None,
    config_path: ConfigOption = None,
) -> None:
    """The window grid in a browser: pipelines, windows by status, detail, re-run
    (authenticated: WINDOWPIPE_WEB_USER and WINDOWPIPE_WEB_PASSWORD, or --read-only)."""
    from windowpipe.web.security import CsrfTokens, access_from_env

    access = guarded(lambda: access_from_env(os.environ, read_only=read_only))
    # The web view sends chains but runs none: it needs no connector secret.
    config = read_config(config_path, require_secrets=False)
    import redis
    import uvicorn

    from windowpipe.cli.systems import read_store
    from windowpipe.web.app import REDIS_TIMEOUT_SECONDS, WebContext, create_web_app

    store = read_store(config)
    client = redis.Redis.from_url(
        config.settings.redis_url,
        socket_timeout=REDIS_TIMEOUT_SECONDS,
        socket_connect_timeout=REDIS_TIMEOUT_SECONDS,
    )
    context = WebContext(
        config=config,
        store=store,
        redis_client=client,
        access=access,
        csrf=CsrfTokens.for_access(access),
        flower_url=flower_url or os.environ.get("WINDOWPIPE_WEB_FLOWER_URL") or None,
    )
    mode = "read-only" if access.read_only else "re-run enabled"
    who = f"basic auth as {access.user}" if access.authenticated else "no authentication"
    print(f"windowpipe web: http://{host}:{port}/ ({who}, {mode})", flush=True)
    try:
        uvicorn.run(create_web_app(context), host=host, port=port, log_level="warning")
    finally:
        store.dispose()
        client.close()
