"""Traces carry no ids: the HTTP spans are named by route template, their URL attributes too,
and the query is dropped (tracing.py's RouteTemplates). Here on an SDK tracer of our own with
BentoML's ASGI instrumentation in front of the real routes; the served check is in
test_scale_out.py (a job's trace across replicas)."""

from __future__ import annotations

import asyncio

import httpx
from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from backends.api.operations.tracing import RouteTemplates

JOB_ID = "5f3c9a1e2b7d4c6e8f0a1b2c3d4e5f60"


async def answer(request):
    return PlainTextResponse("ok")


ROUTES = [Route("/v1/jobs/{job_id}", answer), Route("/view", answer), Route("/v1/images/files/{image_id}", answer)]


def spans_of(*paths: str) -> list:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    provider.add_span_processor(RouteTemplates(route.path for route in ROUTES))
    app = OpenTelemetryMiddleware(Starlette(routes=ROUTES), tracer_provider=provider)

    async def call() -> None:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1") as client:
            for path in paths:
                assert (await client.get(path)).status_code == 200

    asyncio.run(call())
    return exporter.get_finished_spans()


def test_http_spans_name_the_route_template_and_keep_no_id_or_query():
    spans = spans_of(f"/v1/jobs/{JOB_ID}", f"/view?filename={JOB_ID}.png&type=output", f"/v1/images/files/{JOB_ID}")
    names = {span.name for span in spans}
    assert {"GET /v1/jobs/{job_id}", "GET /view", "GET /v1/images/files/{image_id}"} <= names
    assert "GET /v1/jobs/{job_id} http send" in names  # (the request's parts too)
    assert JOB_ID not in str([(span.name, dict(span.attributes or {})) for span in spans])
    request = next(span for span in spans if span.name == "GET /v1/jobs/{job_id}")
    assert any(value == "/v1/jobs/{job_id}" for value in (request.attributes or {}).values())
