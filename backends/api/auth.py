"""Optional API keys: `Authorization: Bearer <key>` or `X-API-Key: <key>`."""

from __future__ import annotations

import hmac

from starlette.datastructures import Headers


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
