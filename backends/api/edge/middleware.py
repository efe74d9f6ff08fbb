"""The HTTP edge, an ASGI middleware around the whole BentoML app (its own routes included):

- a Host not allowed is a 421, and a cross-site request that would change state a 403, before
  anything else (guards.py: DNS rebinding and web pages driving a local server); a Private
  Network Access preflight is answered yes for the allowed origins;
- a request body over `SDXL_MAX_BODY_BYTES` is a 413 before any of it is parsed;
- API keys: with `SDXL_API_KEYS` set, every route needs `Authorization: Bearer <key>`,
  `X-API-Key: <key>` or HTTP Basic with the key as the password (A1111's clients), except
  the probes, `/health`, kept-image links (unguessable, fetched by browsers that cannot send
  a key), CORS preflights, and `/metrics` when `SDXL_OPEN_METRICS=1`; its 401 asks for Bearer
  alone (`WWW-Authenticate: Basic` would make browsers pop up a login over the playground);
- its own refusals (401, 413, 415) carry the CORS headers BentoML's CORS middleware, which
  they never reach, would have added, so that a browser shows the refusal, not a CORS error;
- the one error shape for the errors BentoML itself answers (request validation of the native
  API methods, its timeouts and limits), which are `{"error": "<text>", ...}` there;
- `/docs.json`, BentoML's OpenAPI document made truthful (openapi.py);
- the access log and the request metrics, labelled by route template (`/v1/jobs/{job_id}`),
  so that neither carries a job or image id.

`TimelyTimeout` stands in for BentoML's request timeout, which sits outside the edge.

A plain ASGI middleware, not Starlette's BaseHTTPMiddleware: that one wraps `receive` so that
routes can no longer see their client disconnect, which cancelling abandoned generations needs.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs

from bentoml._internal.server.http.traffic import TimeoutMiddleware
from pydantic import ValidationError
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from backends.api.edge import errors
from backends.api.edge.guards import Origins, cross_site_refusal, host_allowed, same_origin
from backends.api.edge.headers import key_is_valid, presented_key
from backends.api.native import openapi

PROBES = ("/health", "/livez", "/readyz", "/healthz")
PAGES = ("/ui", "/ui/fleet")  # the playground and the fleet page: they hold no secret, and ask for the key
JSON_ONLY = ("/v1/txt2img", "/v1/img2img", "/v1/upscale")  # the native BentoML methods, whose bodies are JSON
OPEN_PREFIXES = ("/v1/images/files/",)
access_log = logging.getLogger(f"{__name__}.access")  # (the access log: a stream of its own)
REFUSED = "sdxl.refused_at_edge"  # a scope key: the edge answered this request itself
PRIVATE_NETWORK_ASKED = b"access-control-request-private-network"


class Edge:
    def __init__(
        self,
        app: ASGIApp,
        keys: list[str],
        open_metrics: bool,
        max_body_bytes: int,
        cors_origins: list[str],
        allowed_hosts: list[str],
        state: Any,
    ):
        self.app = app
        self.keys = keys
        self.origins = Origins(cors_origins)
        self.allowed_hosts = allowed_hosts
        self.open_paths = PROBES + PAGES + (("/metrics",) if open_metrics else ())
        self.max_body_bytes = max_body_bytes
        self.state = state  # the dialect app's state, where the runtime (and its metrics) will be

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket" and self._socket_refused(scope):  # (before it is accepted: a 403)
            await receive()
            await send({"type": "websocket.close", "code": 1008})
            return
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started, status = time.perf_counter(), [500]

        async def recording_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self._answer(scope, receive, recording_send)
        finally:
            self._record(scope, status[0], time.perf_counter() - started)

    async def _answer(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        request_headers = Headers(scope=scope)
        host, origin = request_headers.get("host"), request_headers.get("origin")
        if not host_allowed(host, self.allowed_hosts):
            scope[REFUSED] = True
            body = errors.status_error(
                421, "this server does not answer to that Host name: add it to SDXL_ALLOWED_HOSTS (or use its address)"
            )
            await _send_json(send, 421, body, [])
            return
        refusal = cross_site_refusal(scope["method"], origin, host, self.origins)
        if refusal is not None:
            scope[REFUSED] = True
            await _send_json(send, 403, errors.status_error(403, refusal), [])
            return
        private_network_asked = request_headers.get("access-control-request-private-network") == "true"
        if (
            scope["method"] == "OPTIONS"
            and private_network_asked
            and origin is not None
            and self.origins.allows(origin)
        ):
            # Answered here: BentoML gives Starlette's CORS middleware no switch for it, so
            # that middleware sees a plain preflight, and its answer gets the yes.
            scope["headers"] = [(k, v) for k, v in scope["headers"] if k != PRIVATE_NETWORK_ASKED]
            send = _with_header(send, (b"access-control-allow-private-network", b"true"))
        if self.keys and not self._open(scope, path):
            scope[REFUSED] = True
            body = errors.status_error(
                401,
                "missing or invalid API key: send Authorization: Bearer <key>, X-API-Key: <key>, "
                "or HTTP Basic with the key as the password (any user name)",
            )
            body["error"]["code"] = "invalid_api_key"
            await _send_json(send, 401, body, [(b"www-authenticate", b"Bearer"), *self._cors(scope)])
            return
        bounded = await self._bounded(scope, receive)
        if bounded is None:
            scope[REFUSED] = True
            body = errors.status_error(
                413, f"the request body is over the limit of {self.max_body_bytes} bytes (SDXL_MAX_BODY_BYTES)"
            )
            await _send_json(send, 413, body, [(b"connection", b"close"), *self._cors(scope)])
            return
        if path in JSON_ONLY and scope["method"] == "POST":
            media_type = Headers(scope=scope).get("content-type", "application/json").split(";")[0].strip().lower()
            if media_type != "application/json":
                scope[REFUSED] = True
                body = errors.status_error(
                    415, f"the body must be JSON (Content-Type: application/json), not {media_type}"
                )
                await _send_json(send, 415, body, self._cors(scope))
                return
        if path == "/docs.json":
            await self.app(scope, bounded, _rewriting(send, lambda status, body: (status, openapi.truthful(body))))
            return
        await self.app(scope, bounded, _rewriting(send, _bentoml_error, only_errors=True))

    def _socket_refused(self, scope: Scope) -> bool:
        """A WebSocket (ComfyUI's /ws) is not covered by CORS: any page may open one. Its Host,
        its Origin (this server's pages, or SDXL_CORS_ORIGINS) and its key (a header, or the
        `token` query parameter, which a browser can send) are checked here."""
        request_headers = Headers(scope=scope)
        host, origin = request_headers.get("host"), request_headers.get("origin")
        if not host_allowed(host, self.allowed_hosts):
            return True
        if origin is not None and not same_origin(origin, host) and not self.origins.allows(origin):
            return True
        token = parse_qs(scope.get("query_string", b"").decode(errors="replace")).get("token", [None])[0]
        return bool(self.keys) and not key_is_valid(presented_key(request_headers) or token, self.keys)

    def _cors(self, scope: Scope) -> list[tuple[bytes, bytes]]:
        origin = Headers(scope=scope).get("origin")
        if origin is None or not self.origins.allows(origin):
            return []
        return [
            (b"access-control-allow-origin", b"*" if self.origins.any else origin.encode()),
            (b"vary", b"Origin"),
        ]

    def _open(self, scope: Scope, path: str) -> bool:
        return (
            scope["method"] == "OPTIONS"
            or path in self.open_paths
            or path.startswith(OPEN_PREFIXES)
            or key_is_valid(presented_key(Headers(scope=scope)), self.keys)
        )

    async def _bounded(self, scope: Scope, receive: Receive) -> Receive | None:
        """`receive` for a body within the limit, None for one over it. A declared length is
        checked before reading; a body without one (chunked) is read up to the limit first."""
        length = Headers(scope=scope).get("content-length")
        if length is not None:
            return receive if length.isdigit() and int(length) <= self.max_body_bytes else None
        if scope["method"] in ("GET", "HEAD", "OPTIONS", "DELETE"):
            return receive
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return receive
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_body_bytes:
                return None
            more = message.get("more_body", False)
        replay = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replaying_receive() -> Message:
            return replay.pop() if replay else await receive()

        return replaying_receive

    def _record(self, scope: Scope, status: int, seconds: float) -> None:
        """One access-log line and the request metrics, by the template of the route that
        answered (`/v1/jobs/{job_id}`); "refused" when the edge answered itself (key, body size,
        media type), "unmatched" when no route did (an unknown path)."""
        route = getattr(scope.get("route"), "path", None) or ("refused" if scope.get(REFUSED) else "unmatched")
        runtime = getattr(self.state, "runtime", None)
        if runtime is not None:
            runtime.metrics.observe_request(route, scope["method"], status, seconds)
        if route not in PROBES:
            ms = seconds * 1000
            fields = {"route": route, "method": scope["method"], "status": status, "duration_ms": round(ms, 1)}
            access_log.info("%s %s %d %.1f ms", scope["method"], route, status, ms, extra=fields)


class TimelyTimeout(TimeoutMiddleware):
    """BentoML's request timeout (`traffic.timeout`: 504 when no answer has started in time),
    with its timer cancelled once the request is over. BentoML 1.4's own leaves the timer
    armed until the timeout, and the timer holds a copy of the request's context: a soak at
    about 5 requests a second grew the worker by 5 MiB a minute until timers began to fire.
    service.py puts this class where BentoML looks for its own."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        loop = asyncio.get_running_loop()
        started = loop.create_future()  # resolved by the answer's first message, or by the timer

        async def starting_send(message: Message) -> None:
            if not started.done():
                started.set_result(None)
            await send(message)

        timer = loop.call_later(self.timeout, self._set_timer_out, started)
        answer = asyncio.ensure_future(self.app(scope, receive, starting_send))
        try:
            await started
        except TimeoutError:
            if answer.cancel():
                body = errors.status_error(504, f"no answer within {self.timeout:g} s (the server's request timeout)")
                await _send_json(send, 504, body, [])
            return
        finally:
            timer.cancel()
        await answer


def _bentoml_error(status: int, body: Any) -> tuple[int, Any]:
    """BentoML's and Starlette's error bodies in the one shape; ours pass through unchanged."""
    if isinstance(body, str):  # plain text: Starlette's "Not Found" for a path no route has
        message = {
            404: "no such route: this server generates images (routes: /docs.json)",
            405: "method not allowed on this route",
        }.get(status, body.strip() or "error")
        return status, errors.status_error(status, message)
    if isinstance(body, list) and len(body) == 1:  # BentoML sends some errors as a one-item list
        body = body[0]
    if not isinstance(body, dict) or not isinstance(body.get("error"), str):
        return status, body
    if isinstance(body.get("detail"), list):  # pydantic validation of a native API method's body
        return errors.validation_error(body["detail"])
    return status, errors.status_error(status, body["error"])


def _rewriting(send: Send, rewrite: Callable[[int, Any], tuple[int, Any]], only_errors: bool = False) -> Send:
    """A `send` that buffers a JSON answer (with `only_errors`: an error answer, JSON or plain
    text) and passes it through `rewrite`; any other answer streams through untouched."""
    start: Message | None = None
    chunks: list[bytes] = []

    async def rewriting_send(message: Message) -> None:
        nonlocal start
        if message["type"] == "http.response.start":
            content_type = Headers(raw=message["headers"]).get("content-type", "")
            error = message["status"] >= 400
            if (content_type.startswith("application/json") and (error or not only_errors)) or (
                only_errors and error and content_type.startswith("text/plain")
            ):
                start = message
                return
        elif message["type"] == "http.response.body" and start is not None:
            chunks.append(message.get("body", b""))
            if message.get("more_body"):
                return
            status, body = start["status"], b"".join(chunks)
            try:
                parsed = json.loads(body)
            except ValueError:
                parsed = body.decode(errors="replace")
            status, rewritten = rewrite(status, parsed)
            body = json.dumps(rewritten).encode()
            headers = [(k, v) for k, v in start["headers"] if k.lower() not in (b"content-length", b"content-type")]
            await send(
                {
                    **start,
                    "status": status,
                    "headers": [
                        *headers,
                        (b"content-type", b"application/json"),
                        (b"content-length", str(len(body)).encode()),
                    ],
                }
            )
            await send({"type": "http.response.body", "body": body})
            return
        await send(message)

    return rewriting_send


def _with_header(send: Send, header: tuple[bytes, bytes]) -> Send:
    async def sending_with_header(message: Message) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message["headers"], header]}
        await send(message)

    return sending_with_header


async def _send_json(send: Send, status: int, body: dict, extra_headers: list[tuple[bytes, bytes]]) -> None:
    data = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(data)).encode()),
                *extra_headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": data})


class _NoValidationTracebacks(logging.Filter):
    """BentoML logs a traceback for every body that fails validation, input values (prompts)
    included; the client got a 400 that says what was wrong, so the log keeps one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], ValidationError):
            record.msg, record.args, record.exc_info, record.exc_text = "request body refused (400)", (), None, None
        return True


def quiet_validation_logs() -> None:
    logging.getLogger("bentoml._internal.server.http_app").addFilter(_NoValidationTracebacks())
