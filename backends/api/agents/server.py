"""The MCP server proper: the SDK's low-level server, whose two handlers list the tools and
call one (bad arguments and refusals become tool errors carrying the HTTP API's message, the
field named, never protocol errors), and the stateless session manager that serves it."""

from __future__ import annotations

from typing import Any

import mcp_types as types
from mcp.server.context import ServerRequestContext
from mcp.server.lowlevel import Server
from mcp.server.streamable_http_manager import StreamableHTTPSessionManager
from mcp.shared.exceptions import MCPError
from pydantic import ValidationError

from backends.api.agents.serving import Call
from backends.api.agents.tools import TOOLS
from backends.api.edge import errors
from backends.sdxl_backend.errors import BackendError

INSTRUCTIONS = (
    "Generates and edits images with Stable Diffusion XL. generate_image answers links to PNG images "
    "(fetchable without a key while they are kept) and a small preview of each; list_models names the "
    "models. Long jobs: pass wait=false and follow them with get_job."
)


def session_manager() -> StreamableHTTPSessionManager:
    server = Server(
        "sdxl",
        title="SDXL image generation",
        instructions=INSTRUCTIONS,
        get_tool_input_schema=input_schema,
        on_list_tools=list_tools,
        on_call_tool=call_tool,
    )
    # (no transport security settings: the edge checks Host and Origin for every route)
    return StreamableHTTPSessionManager(app=server, stateless=True)


async def list_tools(_: ServerRequestContext, __: types.PaginatedRequestParams | None) -> types.ListToolsResult:
    return types.ListToolsResult(tools=[listed for listed, _ in TOOLS.values()])


def input_schema(name: str) -> dict[str, Any] | None:
    return TOOLS[name][0].input_schema if name in TOOLS else None


async def call_tool(ctx: ServerRequestContext, params: types.CallToolRequestParams) -> types.CallToolResult:
    if params.name not in TOOLS:
        raise MCPError(types.INVALID_PARAMS, f"no tool named {params.name!r}; tools/list names them")
    _, takes = TOOLS[params.name]
    try:
        arguments = takes.model_validate(params.arguments or {})
        return await getattr(Call(ctx), params.name)(arguments)
    except ValidationError as exc:
        return refusal(errors.validation_error(exc.errors())[1]["error"]["message"])
    except BackendError as exc:
        return refusal(exc.message)


def refusal(message: str) -> types.CallToolResult:
    return types.CallToolResult(content=[types.TextContent(type="text", text=message)], is_error=True)
