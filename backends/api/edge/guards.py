"""What keeps web pages from driving a server on the user's own machine (the edge applies it
before any route runs):

- DNS rebinding: a page on evil.example whose name is made to point at 127.0.0.1 reaches the
  server with `Host: evil.example`. Only the allowed hosts are served (`SDXL_ALLOWED_HOSTS`):
  by default `localhost` and IP literals (a rebinding page cannot send an IP literal as its
  Host: the browser sends the page's own name), plus the names listed; `*` serves every Host
  (behind a proxy that checks it). Others get 421.
- Cross-site requests: a page may POST to any address without a preflight (a "simple"
  request: no body, text/plain, a form), and the browser sends it with the page's `Origin`. A
  request that changes state or starts work (any method but GET, HEAD and OPTIONS) whose
  Origin is neither the server's own nor one of `SDXL_CORS_ORIGINS` is refused (403), key or
  not. Clients that are not browsers send no Origin and are unaffected.
- CORS itself (which origins may read answers): `SDXL_CORS_ORIGINS`, by default the local
  origins (`http://localhost:*`, `http://127.0.0.1:*`, `http://[::1]:*`, any port), so a gallery
  served from the same machine keeps working; `*` opens reading to every page.
- Private Network Access: a public page's preflight asking to reach this (private) server
  (`Access-Control-Request-Private-Network: true`) is answered yes only for allowed origins.

And what keeps a server without keys off a network: a worker that finds itself listening on an
address other than loopback (`--host 0.0.0.0`, an image's default) with no `SDXL_API_KEYS`
refuses to start, unless `SDXL_ALLOW_OPEN=1` says in as many words that it should serve a
network open (behind a gateway that authenticates, say).
"""

from __future__ import annotations

import ipaddress
import re
import socket
from urllib.parse import urlsplit

LOCAL_ORIGINS = ["http://localhost:*", "http://127.0.0.1:*", "http://[::1]:*"]
LOCAL_HOSTS = ["localhost"]
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")


class Origins:
    """`SDXL_CORS_ORIGINS`: exact origins, `*`, or patterns whose port is `*` (any port)."""

    def __init__(self, patterns: list[str]):
        self.any = "*" in patterns
        self.exact = [pattern for pattern in patterns if "*" not in pattern]
        wildcards = [pattern for pattern in patterns if "*" in pattern and pattern != "*"]
        # (as a regex too: BentoML's CORS middleware answers the preflights)
        self.regex = (
            "|".join(re.escape(pattern).replace(r":\*", r"(?::\d+)?") for pattern in wildcards) if wildcards else None
        )
        self._wildcards = re.compile(f"^(?:{self.regex})$") if self.regex else None

    def allows(self, origin: str) -> bool:
        return self.any or origin in self.exact or bool(self._wildcards and self._wildcards.match(origin))


def host_name(host_header: str) -> str:
    """The name of a Host header, without its port ("[::1]:3000" -> "::1")."""
    if host_header.startswith("["):
        return host_header[1 : host_header.find("]")]
    return host_header.rsplit(":", 1)[0] if host_header.count(":") == 1 else host_header


def host_allowed(host_header: str | None, allowed: list[str]) -> bool:
    if "*" in allowed or host_header is None:  # (browsers always send one)
        return True
    name = host_name(host_header or "").lower()
    if name in LOCAL_HOSTS or name in (host.lower() for host in allowed):
        return True
    try:
        ipaddress.ip_address(name)
        return True  # an IP literal: never a rebound name
    except ValueError:
        return False


def same_origin(origin: str, host_header: str | None) -> bool:
    """The page came from this server (the playground at /ui)."""
    return urlsplit(origin).netloc.lower() == (host_header or "").lower()


def cross_site_refusal(method: str, origin: str | None, host_header: str | None, origins: Origins) -> str | None:
    """Why a request that would change state must be refused, or None."""
    if method in SAFE_METHODS or origin is None or same_origin(origin, host_header) or origins.allows(origin):
        return None
    return f"a {method} from the web page at {origin} is refused: that origin is not in SDXL_CORS_ORIGINS"


def listening_addresses() -> list[str]:
    """The addresses this server listens on. A worker inherits its server's socket and finds it
    among its own; `bentoml serve`'s own process imports the service before it opens the
    socket, so there it is the command's `--host` (a name resolved)."""
    import click
    import psutil

    context = click.get_current_context(silent=True)
    if context is not None and "host" in context.params:
        from bentoml._internal.configuration.containers import BentoMLContainer

        host = str(context.params["host"] or BentoMLContainer.http.host.get())  # (unset: BentoML's default)
        try:
            return [str(ipaddress.ip_address(host))]
        except ValueError:
            return sorted({str(info[4][0]) for info in socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)})
    connections = psutil.Process().net_connections(kind="inet")
    return [c.laddr.ip for c in connections if c.status == psutil.CONN_LISTEN]


def refuse_open_network(addresses: list[str], keys: list[str], allow_open: bool) -> None:
    """Stops the start of a server that would serve a network with no key asked."""
    exposed = [address for address in addresses if not ipaddress.ip_address(address.split("%")[0]).is_loopback]
    if exposed and not keys and not allow_open:
        raise RuntimeError(
            f"this server listens on {', '.join(sorted(set(exposed)))}, a network address, and SDXL_API_KEYS "
            "is unset: anyone who reaches it could use it. Set SDXL_API_KEYS, listen on 127.0.0.1 "
            "(--host 127.0.0.1), or set SDXL_ALLOW_OPEN=1 to serve the network without keys"
        )
