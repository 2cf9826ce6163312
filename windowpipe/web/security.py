"""Who may see the web view and who may act in it.

Two modes, chosen at start and never guessed: basic auth from `WINDOWPIPE_WEB_USER` and
`WINDOWPIPE_WEB_PASSWORD` (every page and the re-run need them), or `--read-only` without them
(the pages, and no action at all: the re-run route does not exist). Neither is a bad start,
one line and exit 2. Credentials and `--read-only` together: authenticated and read-only.

The re-run is a POST that must carry a CSRF token: a browser sends basic-auth credentials with
any request to the site, a forged cross-site form included, so the credentials alone do not
show the operator meant it. The token is the user name signed (itsdangerous) with a key this
process draws at start; it expires after CSRF_MAX_AGE_SECONDS and with the process.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import secrets
from collections.abc import Mapping
from dataclasses import dataclass

from itsdangerous import BadSignature, URLSafeTimedSerializer
from starlette.authentication import (
    AuthCredentials,
    AuthenticationBackend,
    AuthenticationError,
    BaseUser,
    SimpleUser,
)
from starlette.requests import HTTPConnection
from starlette.responses import PlainTextResponse, Response

from core.errors import BadInputError

USER_ENV = "WINDOWPIPE_WEB_USER"
PASSWORD_ENV = "WINDOWPIPE_WEB_PASSWORD"

CSRF_MAX_AGE_SECONDS = 12 * 3600
"""How long a page's CSRF token stays good: a page left open over a shift still works."""

OPEN_PATHS = frozenset({"/healthz", "/readyz"})
"""Probes: answer without credentials (they tell nothing about the windows)."""

REALM = "windowpipe"


@dataclass(frozen=True)
class Access:
    """The mode the server runs in."""

    user: str | None
    password: str | None
    read_only: bool

    @property
    def authenticated(self) -> bool:
        return self.user is not None


def access_from_env(env: Mapping[str, str], *, read_only: bool) -> Access:
    """The access mode from the environment and `--read-only`; BadInputError (one line) when
    neither credentials nor read-only were given, or only half of the credentials."""
    user, password = env.get(USER_ENV) or None, env.get(PASSWORD_ENV) or None
    if user is None and password is None:
        if not read_only:
            raise BadInputError(
                f"web: set {USER_ENV} and {PASSWORD_ENV} (basic auth), or pass --read-only "
                "to serve the pages without any action"
            )
        return Access(None, None, read_only=True)
    if user is None or password is None:
        given, missing = (USER_ENV, PASSWORD_ENV) if user else (PASSWORD_ENV, USER_ENV)
        raise BadInputError(f"web: {given} is set but {missing} is empty or unset")
    if ":" in user:
        raise BadInputError(f"web: {USER_ENV} must not contain ':' (basic auth splits on it)")
    return Access(user, password, read_only=read_only)


def _same(given: str, expected: str) -> bool:
    return secrets.compare_digest(given.encode(), expected.encode())


class BasicAuthBackend(AuthenticationBackend):
    """Starlette's authentication hook: basic auth against the configured credentials, compared
    in constant time; in the open read-only mode everyone is `anonymous` with read access."""

    def __init__(self, access: Access) -> None:
        self.access = access

    async def authenticate(self, conn: HTTPConnection) -> tuple[AuthCredentials, BaseUser] | None:
        access = self.access
        if access.user is None or access.password is None:
            return AuthCredentials(["read"]), SimpleUser("anonymous")
        if conn.url.path in OPEN_PATHS:
            return None
        scheme, _, encoded = conn.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "basic":
            raise AuthenticationError("credentials required")
        try:
            user, _, password = base64.b64decode(encoded, validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            raise AuthenticationError("malformed credentials") from None
        # Both compared, always: the time taken tells nothing about which one was wrong.
        same_user, same_password = _same(user, access.user), _same(password, access.password)
        if not (same_user and same_password):
            raise AuthenticationError("wrong credentials")
        scopes = ["read"] if access.read_only else ["read", "act"]
        return AuthCredentials(scopes), SimpleUser(user)


def refuse_unauthenticated(conn: HTTPConnection, error: Exception) -> Response:
    """401 with the basic-auth challenge, so a browser asks for the credentials."""
    return PlainTextResponse(
        f"401 unauthorized: {error}",
        status_code=401,
        headers={"WWW-Authenticate": f'Basic realm="{REALM}", charset="UTF-8"'},
    )


class CsrfTokens:
    """Signed tokens tying a form to the user it was served to."""

    def __init__(self, key: bytes | None = None) -> None:
        self._serializer = URLSafeTimedSerializer(
            key or secrets.token_bytes(32), salt="windowpipe-web-action"
        )

    @classmethod
    def for_access(cls, access: Access) -> CsrfTokens:
        """Tokens signed with a key derived from the credentials (HMAC of the user name under
        the password), so every replica and every restart serving the same credentials accepts
        a page's token, and changing the password voids them all. Without credentials (no
        action to protect) a key drawn at random."""
        if access.user is None or access.password is None:
            return cls()
        key = hmac.new(
            access.password.encode(), b"windowpipe-web-csrf\0" + access.user.encode(), "sha256"
        ).digest()
        return cls(key)

    def issue(self, user: str) -> str:
        """A token for a form served to `user`."""
        return str(self._serializer.dumps(user))

    def valid(self, token: str | None, user: str) -> bool:
        """True when `token` was issued by this process to `user` and has not expired."""
        if not token:
            return False
        try:
            signed_for = self._serializer.loads(token, max_age=CSRF_MAX_AGE_SECONDS)
        except BadSignature:
            return False
        return isinstance(signed_for, str) and _same(signed_for, user)
