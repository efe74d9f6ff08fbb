"""The fixed-path dialects as one FastAPI app, mounted into the BentoML service: one router per
dialect, the MCP server for agents, and every error (backend errors, validation, unknown
routes, bugs) in the one shape."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from backends.api import a1111, images
from backends.api.agents import AgentEndpoint
from backends.api.comfyui import routes as comfyui
from backends.api.comfyui import socket as comfyui_socket
from backends.api.comfyui.graph import WorkflowRefused
from backends.api.edge import errors
from backends.api.jobs import routes as jobs
from backends.api.native import playground
from backends.api.operations import fleet, system
from backends.sdxl_backend.errors import BackendError

logger = logging.getLogger(__name__)


async def _backend_error(_: Request, exc: BackendError) -> JSONResponse:
    status, body = errors.backend_error(exc)
    return JSONResponse(body, status_code=status, headers=errors.error_headers(exc))


async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    status, body = errors.validation_error(exc.errors())
    return JSONResponse(body, status_code=status)


async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    message = {
        404: f"no route {request.method} {request.url.path}: this server generates images (see /docs.json)",
        405: f"{request.method} is not allowed on {request.url.path}",
    }.get(exc.status_code, str(exc.detail))
    return JSONResponse(errors.status_error(exc.status_code, message), status_code=exc.status_code, headers=exc.headers)


async def _workflow_refused(_: Request, exc: WorkflowRefused) -> JSONResponse:
    return JSONResponse(exc.body, status_code=400)  # (ComfyUI's own shape: its clients read node_errors)


async def _unexpected_error(_: Request, exc: Exception) -> JSONResponse:
    logger.exception("unexpected error while answering a request")
    return JSONResponse(
        errors.status_error(500, f"internal error ({type(exc).__name__}); see the server log"), status_code=500
    )


def create_app() -> FastAPI:
    agents = AgentEndpoint()
    # BentoML's own OpenAPI UI (at /) documents these routes; FastAPI's second copy is off.
    app = FastAPI(title="SDXL", docs_url=None, redoc_url=None, openapi_url=None, lifespan=agents.lifespan)
    for router in (
        *images.routers,
        jobs.router,
        a1111.router,
        a1111.controlnet_router,
        system.router,
        fleet.router,
        playground.router,
    ):
        app.include_router(router)
    # ComfyUI serves each route at the root and under /api (its web editor uses the latter).
    app.include_router(comfyui.router)
    app.include_router(comfyui.router, prefix="/api", include_in_schema=False)
    app.include_router(comfyui_socket.router)
    app.include_router(comfyui_socket.router, prefix="/api")
    app.router.routes.append(agents.route)
    # (each handler takes its own class of error: Starlette's type says any Exception)
    handlers: dict[type[Exception], Callable[[Request, Any], Awaitable[JSONResponse]]] = {
        BackendError: _backend_error,
        RequestValidationError: _validation_error,
        HTTPException: _http_error,
        WorkflowRefused: _workflow_refused,
        Exception: _unexpected_error,
    }
    for error_class, handler in handlers.items():
        app.add_exception_handler(error_class, handler)
    return app
