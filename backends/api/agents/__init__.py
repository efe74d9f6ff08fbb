"""Agents: an MCP (Model Context Protocol) server inside the service, at `/mcp`, over the
streamable HTTP transport of the official `mcp` SDK.

Stateless: no session lives on a replica (protocol 2026-07-28 has none; older clients get the
SDK's stateless mode), so any replica answers any call. The edge guards `/mcp` as every route:
the API key (`Authorization: Bearer`), the Host and Origin checks a local server needs against
DNS rebinding, the body limit.

- tools.py: the tools as a client reads them (argument and result schemas);
- serving.py: each tool's work on the runtime.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from mcp.server.lowlevel import Server
from mcp.server.streamable_http_manager import StreamableHTTPSessionManager
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from backends.api.agents import serving

PATH = "/mcp"
INSTRUCTIONS = (
    "Generates and edits images with Stable Diffusion XL. generate_image answers links to PNG images "
    "(fetchable without a key while they are kept) and a small preview of each; list_models names the "
    "models. Long jobs: pass wait=false and follow them with get_job."
)


class AgentEndpoint:
    """The MCP server as an ASGI app, the route that serves it, and the lifespan that runs it
    while the dialects' app runs (BentoML enters a mounted app's lifespan)."""

    def __init__(self, version: str = ""):
        server = Server(
            "sdxl",
            version=version,
            title="SDXL image generation",
            instructions=INSTRUCTIONS,
            get_tool_input_schema=serving.input_schema,
            on_list_tools=serving.list_tools,
            on_call_tool=serving.call_tool,
        )
        # (no transport security settings: the edge checks Host and Origin for every route)
        self.manager = StreamableHTTPSessionManager(app=server, stateless=True)
        # (an ASGI app as the endpoint: Starlette hands a plain function a Request instead)
        self.route = Route(PATH, endpoint=self, methods=["GET", "POST", "DELETE"])

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.manager.handle_request(scope, receive, send)

    @contextlib.asynccontextmanager
    async def lifespan(self, _app) -> AsyncIterator[None]:
        async with self.manager.run():
            yield
