"""How webhook events reach their receivers (webhooks.py decides which events and what they
say): where they may go, and the delivery itself.

- **Where:** `Destinations`, the allow-list `SDXL_WEBHOOK_ALLOWED_HOSTS`. A URL is checked when
  the job is submitted (a 400 naming `webhook.url`, no connection made) and the host again as
  each connection opens, after DNS: the connection goes to the address just checked, for http
  and https alike, so a name cannot be rebound between the check and the connection.
- **Bounded:** one attempt has `SDXL_WEBHOOK_TIMEOUT_SECONDS` in all, to connect, send and read
  the receiver's status line and headers. Every read and write gets what is left of it, so a
  receiver that trickles a byte a second is cut at the deadline. The answer's body is never
  read, nor decompressed; its headers are capped by the HTTP parser (100 kB).
- **Apart:** each owner (API key) and receiver (host and port) has a lane of its own, a thread that
  delivers its events in order and ends when idle. A slow receiver holds up its own lane, and
  no other key's webhooks.
- **Direct:** httpcore, not httpx's client, so no `HTTP(S)_PROXY` from the environment, no
  redirect followed, no content decoding.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import math
import queue
import socket
import threading
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import httpcore

from backends.api.composition.settings import Settings
from backends.sdxl_backend.errors import InvalidRequest

logger = logging.getLogger(__name__)
LANE_IDLE_S = 30.0  # a lane's thread ends after this long without events
MAX_LANES = 64  # lanes at once; past this, new (owner, receiver) pairs share one overflow lane
DELIVERY_ERRORS = (httpcore.TimeoutException, httpcore.NetworkError, httpcore.ProtocolError, OSError)
Resolver = Callable[[str, int], list[str]]
Body = Callable[[], dict[str, Any]]


def resolve(host: str, port: int) -> list[str]:
    return sorted({str(info[4][0]) for info in socket.getaddrinfo(host, port, proto=socket.IPPROTO_TCP)})


def _is_network(entry: str) -> bool:
    try:
        ipaddress.ip_network(entry, strict=False)
        return True
    except ValueError:
        return False


class Destinations:
    """`SDXL_WEBHOOK_ALLOWED_HOSTS`: where webhooks may go."""

    def __init__(self, allowed: list[str], resolver: Resolver = resolve):
        self.names = {entry.lower() for entry in allowed if not _is_network(entry)}
        self.networks = [ipaddress.ip_network(entry, strict=False) for entry in allowed if _is_network(entry)]
        self.resolver = resolver

    def check(self, url: str) -> str:
        """The address to connect to; `InvalidRequest` naming `webhook.url` when the URL may not be called."""
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise InvalidRequest(f"webhook.url: '{url}' is not an http(s) URL", "webhook.url")
        if parts.username is not None or parts.password is not None:  # (they would travel in the Host header)
            raise InvalidRequest(
                "webhook.url: credentials in the URL (user:pass@) are not sent; the signature authenticates",
                "webhook.url",
            )
        try:
            port = parts.port
        except ValueError:  # (out of range, or not a number)
            port = 0
        if port == 0:
            raise InvalidRequest(f"webhook.url: '{parts.netloc}' has no valid port (1..65535)", "webhook.url")
        return self.address_of(parts.hostname, port or (443 if parts.scheme == "https" else 80))

    def address_of(self, host: str, port: int) -> str:
        """An allowed address of `host` (a name, resolved now, or an address)."""
        if not self.names and not self.networks:
            raise InvalidRequest(
                "webhook: webhooks are off on this server (SDXL_WEBHOOK_ALLOWED_HOSTS lists where they may go)",
                "webhook",
            )
        host = host.lower().strip("[]")
        try:
            addresses = [ipaddress.ip_address(host)]
        except ValueError:
            if host not in self.names:
                raise InvalidRequest(
                    f"webhook.url: {host} is not in SDXL_WEBHOOK_ALLOWED_HOSTS", "webhook.url"
                ) from None
            try:
                addresses = [ipaddress.ip_address(a) for a in self.resolver(host, port)]
            except OSError as exc:
                raise InvalidRequest(f"webhook.url: {host} does not resolve ({exc})", "webhook.url") from None
        for address in addresses:
            listed = any(address in network for network in self.networks)
            if not listed and (host not in self.names or not address.is_global):
                raise InvalidRequest(
                    f"webhook.url: {host} is at {address}, which SDXL_WEBHOOK_ALLOWED_HOSTS does not allow",
                    "webhook.url",
                )
        return str(addresses[0])


class _Deadline(threading.local):
    at = math.inf  # (time.monotonic) when the current thread's delivery attempt must be over


class CheckedNetwork(httpcore.NetworkBackend):
    """httpcore's connections for deliveries: to an address the destinations allow (checked as
    the connection opens), every connect, read and write within the attempt's deadline."""

    def __init__(self, destinations: Destinations):
        self.destinations = destinations
        self.deadline = _Deadline()
        self._sockets = httpcore.SyncBackend()

    def left(self, timeout: float | None) -> float:
        left = self.deadline.at - time.monotonic()
        if left <= 0:
            raise httpcore.ReadTimeout("the delivery's deadline passed")
        return left if timeout is None else min(timeout, left)

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        address = self.destinations.address_of(host, port)
        stream = self._sockets.connect_tcp(address, port, self.left(timeout), local_address, socket_options)
        return _DeadlineStream(stream, self)

    def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[Any] | None = None
    ) -> httpcore.NetworkStream:
        raise httpcore.ConnectError("webhooks go over TCP")


class _DeadlineStream(httpcore.NetworkStream):
    def __init__(self, stream: httpcore.NetworkStream, network: CheckedNetwork):
        self.stream, self.network = stream, network

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self.stream.read(max_bytes, self.network.left(timeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self.stream.write(buffer, self.network.left(timeout))

    def close(self) -> None:
        self.stream.close()

    def start_tls(self, ssl_context: Any, server_hostname: str | None = None, timeout: float | None = None) -> Any:
        tls = self.stream.start_tls(ssl_context, server_hostname, self.network.left(timeout))
        return _DeadlineStream(tls, self.network)

    def get_extra_info(self, info: str) -> Any:
        return self.stream.get_extra_info(info)


class WebhookSender:
    """Delivers webhook events, with retries, each (owner, receiver) in its lane;
    `record(job_id, event, outcome)` keeps each event's outcome on its job."""

    def __init__(
        self,
        secret: str | None,
        destinations: Destinations,
        attempts: int,
        retry_s: float,
        timeout_s: float,
        record: Callable[[str, str, dict[str, Any]], None],
    ):
        from standardwebhooks import Webhook

        self.signer = Webhook(secret) if secret else None
        self.destinations = destinations
        self.attempts, self.retry_s, self.timeout_s = attempts, retry_s, timeout_s
        self.record = record
        self._network = CheckedNetwork(destinations)
        self._connections = httpcore.ConnectionPool(network_backend=self._network, max_connections=MAX_LANES)
        self._lanes: dict[tuple[str | None, str], queue.Queue] = {}
        self._lock = threading.Lock()
        self._closing = False

    @classmethod
    def configured(
        cls, settings: Settings, destinations: Destinations, record: Callable[[str, str, dict[str, Any]], None]
    ) -> WebhookSender:
        return cls(
            settings.webhook_secret,
            destinations,
            settings.webhook_attempts,
            settings.webhook_retry_seconds,
            settings.webhook_timeout_seconds,
            record,
        )

    def send(
        self,
        owner: str | None,
        job_id: str,
        event: str,
        message_id: str,
        url: str,
        body: Body,
        before: Callable[[], None] | None = None,
    ) -> None:
        """Queues one event for delivery (from any thread; never waits on the receiver or a
        store). `before` (holding the event in the job queue) and `body` run on the lane's
        thread (the body may keep images: the device does not wait for that)."""
        lane = (owner, urlsplit(url).netloc.lower())
        with self._lock:
            if self._closing:
                return
            if lane not in self._lanes and len(self._lanes) >= MAX_LANES:
                lane = (None, "")  # (the overflow lane)
            events = self._lanes.get(lane)
            if events is None:
                events = self._lanes[lane] = queue.Queue()
                threading.Thread(
                    target=self._deliver_all, args=(lane, events), name="sdxl-webhooks", daemon=True
                ).start()
            events.put((job_id, event, message_id, url, body, before))

    def close(self) -> None:
        with self._lock:
            self._closing = True
            for events in self._lanes.values():
                events.put(None)
        self._connections.close()

    def _deliver_all(self, lane: tuple[str | None, str], events: queue.Queue) -> None:
        while True:
            try:
                item = events.get(timeout=LANE_IDLE_S)
            except queue.Empty:
                with self._lock:  # (an event put meanwhile is taken before the lane ends)
                    if events.empty():
                        del self._lanes[lane]
                        return
                continue
            if item is None:
                return
            job_id, event, message_id, url, body, before = item
            if before is not None:
                before()
            try:
                attempts = 1 if event == "progress" else self.attempts
                outcome = self._deliver(url, message_id, json.dumps({"event": event, **body()}), attempts)
            except Exception as exc:  # a bug here must not end the lane
                logger.exception("a webhook delivery failed unexpectedly")
                outcome = {"status": "failed", "attempts": 0, "error": type(exc).__name__}
            try:
                self.record(job_id, event, outcome)
            except Exception:  # (the job's store may be away: the receiver got it or not regardless)
                logger.warning("a webhook's outcome could not be kept on its job")

    def _deliver(self, url: str, message_id: str, payload: str, attempts: int) -> dict[str, Any]:
        """Posts `payload` until a 2xx, `attempts` times at most; `message_id` is the same for
        every retry of one event (and for a delivery taken over from a replica that stopped)."""
        error = ""
        for attempt in range(1, attempts + 1):
            if attempt > 1:
                time.sleep(self.retry_s * 2 ** (attempt - 2))
            try:
                status = self._post(url, message_id, payload)
                if 200 <= status < 300:
                    return {"status": "delivered", "attempts": attempt}
                error = f"answered {status}"
            except InvalidRequest as exc:  # the destination is no longer allowed: no retry
                return {"status": "failed", "attempts": attempt, "error": exc.message}
            except DELIVERY_ERRORS as exc:
                error = type(exc).__name__
        logger.warning("a webhook was not delivered after %d attempt(s) (%s)", attempts, error)
        return {"status": "failed", "attempts": attempts, "error": error}

    def _post(self, url: str, message_id: str, payload: str) -> int:
        """One attempt: the receiver's status code (its body is not read)."""
        self.destinations.check(url)
        headers = {"content-type": "application/json", "webhook-id": message_id}
        now = datetime.now(tz=UTC)
        headers["webhook-timestamp"] = str(int(now.timestamp()))
        if self.signer is not None:
            headers["webhook-signature"] = self.signer.sign(message_id, now, payload)
        self._network.deadline.at = time.monotonic() + self.timeout_s
        try:
            with self._connections.stream("POST", url, headers=list(headers.items()), content=payload.encode()) as sent:
                return sent.status
        finally:
            self._network.deadline.at = math.inf
