"""Errors as HTTP: one status per backend error class, one body shape for every route.

The body is OpenAI's, `{"error": {"message", "type", "param", "code"}}`, which OpenAI clients
parse and which moondream-style clients, reading `error` as text, still show.
"""

from __future__ import annotations

from typing import Any, Sequence

from backends.sdxl_backend.errors import (
    BackendError,
    Cancelled,
    InvalidImage,
    InvalidRequest,
    JobExpired,
    OutOfMemory,
    PayloadTooLarge,
    QueueFull,
    UnknownJob,
    UnknownModel,
)

STATUS: dict[type[BackendError], tuple[int, str]] = {
    InvalidRequest: (400, "invalid_request_error"),
    UnknownModel: (404, "model_not_found"),
    UnknownJob: (404, "job_not_found"),
    JobExpired: (410, "job_expired"),
    PayloadTooLarge: (413, "payload_too_large"),
    Cancelled: (409, "cancelled"),
    InvalidImage: (422, "invalid_image"),
    QueueFull: (429, "queue_full"),
    BackendError: (500, "internal_error"),
    OutOfMemory: (507, "out_of_memory"),
}


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def backend_error(exc: BackendError) -> tuple[int, dict[str, Any]]:
    status, type_ = STATUS[type(exc)]
    return status, error_body(exc.message, type_, exc.param, type_)


def validation_error(errors: Sequence[dict[str, Any]]) -> tuple[int, dict[str, Any]]:
    """Request-body validation (FastAPI/pydantic) errors: 400, naming the first bad field."""
    messages, param = [], None
    for error in errors:
        if error["type"] == "json_invalid":
            messages.append(f"body: not valid JSON ({error['ctx']['error']} at position {error['loc'][-1]})")
            continue
        location = [str(part) for part in error["loc"] if part != "body"]
        field = ".".join(location)
        param = param or field or None
        message = error["msg"].removeprefix("Value error, ")
        messages.append(f"{field}: {message}" if field else message)
    return 400, error_body("; ".join(messages), "invalid_request_error", param, "invalid_value")
