"""The Snowflake connection for a target config, and its errors as windowpipe's.

`snowflake.connector` is imported here, on first connect, so processes that never load into
Snowflake never import it.

What snowflake-connector-python (4.x) retries on its own, and how windowpipe bounds it (it has
no switch to turn its retries off, unlike the other SDKs; core/retry.py's budget counts the
rest):
- a failing query or result request (HTTP 5xx, 429, a dropped connection) is retried with
  backoff until `network_timeout` has passed since the request began: infinite by default,
  set here from the config (default: the load stage's soft time limit). The same value
  is the connector's statement timeout: it cancels a statement running longer;
- a login is tried at most twice (`MAX_CON_RETRY_ATTEMPTS`, default 1 retry) within
  `login_timeout`;
- requests' HTTP adapter retries a failed connect once (`max_retries=1`, not configurable).
"""

from __future__ import annotations

from typing import Any

from connectors.snowflake.sql import LOCK_TIMEOUT_SECONDS
from core.config import SnowflakeTargetConfig, resolve_secret
from core.errors import TerminalError, TransientError, WindowpipeError
from core.retry import as_time_limit

_TRANSIENT_ERRNOS = frozenset({250001, 250002, 250003, 251011, 251012, 252007, 604, 630})
"""Connector and server error numbers worth retrying: cannot connect (250001), connection
closed (250002), request failed (250003), timeout (251011), retryable HTTP code (251012),
session renewal failed (252007), statement cancelled (604) or timed out (630)."""

_TERMINAL_ERRNOS = frozenset({390100, 390101, 390102, 390144, 390201, 390189, 251001, 251006})
"""Ones that are not, even when raised as OperationalError: bad user or password (390100),
locked or disabled user (390101, 390102), bad key pair (390144), no such database or
warehouse at login (390201, 390189), no account (251001), no password (251006)."""

_TRANSIENT_HTTP = (
    "ServiceUnavailableError",
    "GatewayTimeoutError",
    "BadGatewayError",
    "RequestTimeoutError",
    "TooManyRequests",
    "InternalServerError",
    "OtherHTTPRetryableError",
    "RequestExceedMaxRetryError",
)
"""Connector exception classes for HTTP 5xx, 408 and 429 answers."""


def connect(config: SnowflakeTargetConfig) -> Any:
    """A new session with the config's database and schema current (COPY needs them), and the
    qmark paramstyle (server-side binding)."""
    import snowflake.connector

    kwargs: dict[str, Any] = {
        "account": config.account,
        "user": config.user,
        "database": config.database,
        "schema": config.schema_,
        "login_timeout": config.login_timeout,
        "network_timeout": config.network_timeout,
        "paramstyle": "qmark",
        "application": "windowpipe",
        # Out-of-band telemetry posts to Snowflake's own endpoint, outside the session.
        "session_parameters": {
            "CLIENT_OUT_OF_BAND_TELEMETRY_ENABLED": False,
            # A load waits this long on a table lock, not 12 hours (the target's takeover).
            "LOCK_TIMEOUT": LOCK_TIMEOUT_SECONDS,
        },
    }
    secret = resolve_secret(config.password_env)
    if config.private_key_path:
        kwargs["private_key_file"] = config.private_key_path
        if secret is not None:
            kwargs["private_key_file_pwd"] = secret  # the key's passphrase
    elif secret is not None:
        kwargs["password"] = secret
    for key in ("role", "warehouse", "host", "port", "protocol"):
        value = getattr(config, key)
        if value is not None:
            kwargs[key] = value
    try:
        return snowflake.connector.connect(**kwargs)
    except Exception as error:
        raise translate(error, "connect", secret) from None


def translate(error: Exception, action: str, secret: str | None = None) -> WindowpipeError:
    """TransientError for lost connections, timeouts and throttling; TerminalError for
    authentication, missing objects, SQL and data errors. One line, no secrets.

    A soft time limit (which the connector lets through as it is) is `StageTimeLimitError`:
    transient, never terminal.
    """
    from snowflake.connector import errors

    limit = as_time_limit(error, f"snowflake target: {action}")
    if limit is not None:
        return limit
    errno = getattr(error, "errno", None)
    detail = getattr(error, "raw_msg", None) or str(error)
    text = f"snowflake target: {action} failed: {type(error).__name__}: {detail}"
    message = " ".join(text.split())
    if secret:
        message = message.replace(secret, "***")
    if len(message) > 300:
        message = message[:299] + "…"
    if errno in _TERMINAL_ERRNOS:
        return TerminalError(message)
    if errno in _TRANSIENT_ERRNOS or type(error).__name__ in _TRANSIENT_HTTP:
        return TransientError(message)
    if isinstance(error, errors.OperationalError | errors.InterfaceError | OSError | TimeoutError):
        return TransientError(message)
    return TerminalError(message)
