"""Bearer-token authentication of every request but the public ones.

Runs before routing and before any body is read, so an unauthenticated upload is refused
without being buffered. The client id it finds is put in the request scope for endpoints.
A WebSocket without an Authorization header is let through: its endpoint authenticates the
token in the client's first frame.
"""

from __future__ import annotations

from starlette.requests import HTTPConnection
from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.errors import NotAuthenticatedError, error_response
from gateway.services import services

PUBLIC_PATHS = frozenset({"/healthz"})
SCOPE_KEY = "trainyard.client_id"


def client_id(conn: HTTPConnection) -> str:
    """The authenticated client of a request (set by BearerAuth)."""
    value = conn.scope[SCOPE_KEY]
    assert isinstance(value, str)
    return value


class BearerAuth:
    """ASGI middleware: `Authorization: Bearer <token>` or 401 with `WWW-Authenticate`."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or scope["path"] in PUBLIC_PATHS:
            await self.app(scope, receive, send)
            return
        conn = HTTPConnection(scope)
        if scope["type"] == "websocket" and "authorization" not in conn.headers:
            # The endpoint takes the token from the client's first frame instead.
            await self.app(scope, receive, send)
            return
        try:
            scope[SCOPE_KEY] = await self._authenticate(conn)
        except NotAuthenticatedError as error:
            if scope["type"] == "websocket":
                # Accepted, then closed: a refused handshake would carry no reason.
                await receive()  # websocket.connect
                await send({"type": "websocket.accept"})
                await send({"type": "websocket.close", "code": 1008, "reason": error.detail})
                return
            response = error_response(error.status, error.detail, headers=error.headers)
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)

    @staticmethod
    async def _authenticate(conn: HTTPConnection) -> str:
        header = conn.headers.get("authorization")
        if header is None:
            raise NotAuthenticatedError(
                "an Authorization: Bearer <token> header is required", invalid_token=False
            )
        scheme, _, token = header.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise NotAuthenticatedError(
                "the Authorization header must be 'Bearer <token>'", invalid_token=False
            )
        svc = services(conn)
        found = await svc.run(svc.tokens.authenticate, token)
        if found is None:
            raise NotAuthenticatedError(
                "the token is malformed, unknown or revoked", invalid_token=True
            )
        return found
