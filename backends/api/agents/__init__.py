"""Agents: an MCP (Model Context Protocol) server inside the service, at `/mcp`, over the
streamable HTTP transport of the official `mcp` SDK.

Stateless: no session lives on a replica (protocol 2026-07-28 has none; older clients get the
SDK's stateless mode), so any replica answers any call. The edge guards `/mcp` as every route:
the API key (`Authorization: Bearer`), the Host and Origin checks a local server needs against
DNS rebinding, the body limit.

- tools.py: the tools as a client reads them (argument and result schemas);
- serving.py: each tool's work on the runtime;
- server.py: the SDK's server and its session manager.

The SDK takes over a second to import, so only the worker imports it (BentoML's main process
imports service.py too, to read the service), while its models load (`preload`).
"""

from __future__ import annotations

import contextlib
import importlib
import threading
from collections.abc import AsyncIterator
from typing import Any

from starlette.routing import Route
from starlette.types import Receive, Scope, Send

PATH = "/mcp"
SERVER_MODULE = "backends.api.agents.server"


def preload() -> None:
    """Import the MCP server in the background (the lifespan finds it imported, or waits)."""
    threading.Thread(target=importlib.import_module, args=(SERVER_MODULE,), name="mcp-import", daemon=True).start()


class AgentEndpoint:
    """The route that serves the MCP server, and the lifespan that runs the server while the
    dialects' app runs (BentoML enters a mounted app's lifespan, in the worker)."""

    def __init__(self) -> None:
        # The SDK's session manager, once the lifespan made it (imported in the worker only: its
        # module is the MCP SDK's, read as Any here).
        self.manager: Any = None
        # (an ASGI app as the endpoint: Starlette hands a plain function a Request instead)
        self.route = Route(PATH, endpoint=self, methods=["GET", "POST", "DELETE"])

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.manager.handle_request(scope, receive, send)

    @contextlib.asynccontextmanager
    async def lifespan(self, _app: object) -> AsyncIterator[None]:
        self.manager = importlib.import_module(SERVER_MODULE).session_manager()
        async with self.manager.run():
            yield
