"""Errors as HTTP: one status per backend error class, one body shape for every route.

The body is OpenAI's, `{"error": {"message", "type", "param", "code"}}`, which OpenAI clients
parse and which moondream-style clients, reading `error` as text, still show. Every error the
service sends has it: backend errors, request validation, unknown routes, BentoML's own
answers (rewritten at the edge), unexpected exceptions.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import BaseModel

from backends.sdxl_backend.errors import (
    BackendError,
    Cancelled,
    DeviceUnavailable,
    InvalidImage,
    InvalidRequest,
    JobExpired,
    NotPermitted,
    OutOfMemory,
    PayloadTooLarge,
    QueueFull,
    StoreUnavailable,
    TimedOut,
    UnknownJob,
    UnknownModel,
)

STATUS: dict[type[BackendError], tuple[int, str]] = {
    InvalidRequest: (400, "invalid_request_error"),
    NotPermitted: (403, "permission_error"),
    UnknownModel: (404, "model_not_found"),
    UnknownJob: (404, "job_not_found"),
    JobExpired: (410, "job_expired"),
    PayloadTooLarge: (413, "payload_too_large"),
    Cancelled: (409, "cancelled"),
    InvalidImage: (422, "invalid_image"),
    QueueFull: (429, "queue_full"),
    BackendError: (500, "internal_error"),
    DeviceUnavailable: (503, "unavailable"),
    StoreUnavailable: (503, "unavailable"),
    TimedOut: (504, "timeout"),
    OutOfMemory: (507, "out_of_memory"),
}
DESCRIPTIONS = {
    400: "Bad request: the message names the field and the reason",
    401: "Missing or invalid API key",
    403: "The API key may not ask for this (a 'high' priority not listed in SDXL_PRIORITY_KEYS)",
    404: "No such model, job, image or route",
    405: "Method not allowed",
    409: "The job was cancelled",
    410: "The job or image has expired",
    413: "A body or input image over the limits",
    415: "The body is not JSON",
    422: "The input image does not decode",
    429: "The queue is full; Retry-After says when to try again",
    500: "Internal error",
    503: "The device, or the shared store (Redis), is unavailable",
    504: "The request ran past the timeout and was cancelled",
    507: "Out of memory, also after a retry in a lower memory mode",
}


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(BaseModel):
    error: ErrorDetail


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def backend_error(exc: BackendError) -> tuple[int, dict[str, Any]]:
    status, type_ = next(STATUS[cls] for cls in type(exc).__mro__ if cls in STATUS)
    return status, error_body(exc.message, type_, exc.param, type_)


def error_headers(exc: BackendError) -> dict[str, str] | None:
    return {"Retry-After": str(exc.retry_after_s)} if isinstance(exc, QueueFull) else None


def validation_error(errors: Sequence[Mapping[str, Any]]) -> tuple[int, dict[str, Any]]:
    """Request validation (pydantic) errors, from FastAPI or BentoML: 400, naming the first bad field."""
    messages, param = [], None
    for error in errors:
        if error["type"] == "json_invalid":
            messages.append(f"body: not valid JSON ({error['msg'].removeprefix('Invalid JSON: ')})")
            continue
        location = [str(part) for part in error["loc"] if part != "body"]
        field = ".".join(location)
        param = param or field or None
        message = error["msg"].removeprefix("Value error, ")
        messages.append(f"{field}: {message}" if field else message)
    return 400, error_body("; ".join(messages), "invalid_request_error", param, "invalid_value")


def status_error(status: int, message: str) -> dict[str, Any]:
    """An error that has no backend class (unknown route, bad method, body too large...)."""
    type_ = {
        401: "authentication_error",
        403: "permission_error",
        404: "not_found",
        405: "method_not_allowed",
        413: "payload_too_large",
        415: "unsupported_media_type",
        421: "misdirected_request",
        429: "rate_limited",
        503: "unavailable",
        504: "timeout",
    }.get(status, "invalid_request_error" if status < 500 else "internal_error")
    return error_body(message, type_, None, type_)


def responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` for the errors a route sends, each with the error shape."""
    return {status: {"model": ErrorBody, "description": DESCRIPTIONS[status]} for status in statuses}
