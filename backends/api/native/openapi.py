"""`/docs.json`: BentoML's OpenAPI document, made to say what the server sends.

BentoML writes its own methods' errors as its generic 400/404/500 bodies and labels the
document 3.0.2, while the schemas it merges in (pydantic's, FastAPI's) use OpenAPI 3.1's JSON
Schema (numeric `exclusiveMinimum`, `type: "null"`). Here the document says 3.1.0, every
operation declares the errors it really sends in the one error shape (and not FastAPI's 422,
which this server answers as 400), and the native methods declare their raw-image answer.
Its description, which BentoML's UI at `/` shows first, links the playground.
"""

from __future__ import annotations

from typing import Any

from backends.api.edge import errors
from backends.api.native import generation as native

ERROR_REF = {"$ref": "#/components/schemas/ErrorBody"}


def _error_responses(statuses: tuple[int, ...]) -> dict[str, Any]:
    return {
        str(status): {
            "description": errors.DESCRIPTIONS[status],
            "content": {"application/json": {"schema": ERROR_REF}},
        }
        for status in statuses
    }


def truthful(spec: dict[str, Any]) -> dict[str, Any]:
    spec["openapi"] = "3.1.0"
    info = spec.setdefault("info", {})
    info["description"] = "**[Open the playground](/ui)**: generate, watch and compare in the browser.\n\n" + info.get(
        "description", ""
    )
    schemas = spec.setdefault("components", {}).setdefault("schemas", {})
    schemas["ErrorBody"] = errors.ErrorBody.model_json_schema(ref_template="#/components/schemas/{model}")
    schemas.update(schemas["ErrorBody"].pop("$defs"))
    for path, item in spec["paths"].items():
        for operation in item.values():
            if not isinstance(operation, dict) or "responses" not in operation:
                continue
            responses = operation["responses"]
            if "x-bentoml-name" in operation:  # a native API method
                responses = {"200": responses["200"], **_error_responses(native.ERROR_STATUSES)}
                binary = {"schema": {"type": "string", "format": "binary"}}
                responses["200"]["content"].update(dict.fromkeys(native.IMAGE_TYPES, binary))
                responses["200"]["description"] = (
                    "JSON with the images (base64), seeds and timings; with Accept: image/* and n=1, the image itself"
                )
            elif path in ("/livez", "/readyz", "/healthz"):
                responses["503"] = {"description": "The service is not alive or not ready"}
            else:
                validation = responses.get("422", {}).get("content", {}).get("application/json", {}).get("schema", {})
                if validation.get("$ref", "").endswith("/HTTPValidationError"):
                    del responses["422"]
                    responses.update(_error_responses((400,)))
                if path == "/metrics" or (
                    path not in ("/health", "/ui", "/ui/fleet") and not path.startswith("/v1/images/files")
                ):
                    responses.update(_error_responses((401,)))
            operation["responses"] = responses
    return spec
