"""Optional API keys: `Authorization: Bearer <key>` or `X-API-Key: <key>`."""

from __future__ import annotations

import hmac
import json

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send


def presented_key(headers: Headers) -> str | None:
    authorization = headers.get("authorization", "")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return headers.get("x-api-key")


def key_is_valid(presented: str | None, keys: list[str]) -> bool:
    """Constant-time against every key, so timing tells nothing about which prefix matched."""
    if presented is None:
        return False
    matches = [hmac.compare_digest(presented.encode(), key.encode()) for key in keys]
    return any(matches)


class ApiKeyMiddleware:
    """Refuses requests without a valid key (401), except on the open paths.

    A plain ASGI middleware, not Starlette's BaseHTTPMiddleware: that one wraps `receive` so
    that routes can no longer see their client disconnect, which cancelling abandoned
    generations depends on."""

    def __init__(self, app: ASGIApp, keys: list[str], open_paths: tuple[str, ...], open_prefixes: tuple[str, ...],
                 unauthorized_body: dict):
        self.app = app
        self.keys = keys
        self.open_paths = open_paths
        self.open_prefixes = open_prefixes
        self.unauthorized = json.dumps(unauthorized_body).encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if (scope["type"] != "http" or not self.keys or path in self.open_paths
                or path.startswith(self.open_prefixes)
                or key_is_valid(presented_key(Headers(scope=scope)), self.keys)):
            await self.app(scope, receive, send)
            return
        await send({"type": "http.response.start", "status": 401, "headers": [
            (b"content-type", b"application/json"), (b"www-authenticate", b"Bearer"),
            (b"content-length", str(len(self.unauthorized)).encode())]})
        await send({"type": "http.response.body", "body": self.unauthorized})
