"""Traces (OpenTelemetry), off unless an OTLP endpoint is set the standard way:
`OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`), OTLP over HTTP, with
`OTEL_TRACES_SAMPLER_ARG` the share of requests traced (default: all) and the other `OTEL_*`
variables (headers, timeout, resource) read by the exporter itself.

BentoML's tracing support does the exporting and the span of each HTTP request; the service
adds, in that request's trace: `validate` (the request checked and prepared), and, when its job
ends on whichever replica ran it (the trace context travels with the job, in Redis too), `job`
with `queue wait`, `model load`, `denoise` (decoding included) and `encode` inside, laid out
from the job's times. Spans name the replica and device, never a prompt, key or id: the HTTP
spans are named by route template (`GET /v1/jobs/{job_id}`), their URL attributes too, without
the query (`RouteTemplates`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Mapping
from typing import Any

from opentelemetry import propagate, trace
from opentelemetry.sdk.trace import Span, SpanProcessor
from starlette.routing import compile_path

from backends.sdxl_backend.jobs import Job
from backends.sdxl_backend.upscale_protocol import UpscaleTimings

SAMPLE_SHARE = "OTEL_TRACES_SAMPLER_ARG"


def tracing_config(environ: Mapping[str, str] = os.environ) -> dict[str, Any]:
    """BentoML's `tracing` configuration from the OTEL_* variables; {} (off) without an endpoint."""
    if not (environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")):
        return {}
    try:
        share = float(environ.get(SAMPLE_SHARE, "1"))
        if not 0 <= share <= 1:
            raise ValueError
    except ValueError:
        raise RuntimeError(f"{SAMPLE_SHARE}={environ[SAMPLE_SHARE]!r}: the share of requests traced, 0 to 1") from None
    # (no endpoint here: the exporter reads the OTEL_EXPORTER_OTLP_* variables itself)
    return {"exporter_type": "otlp", "sample_rate": share, "otlp": {"protocol": "http", "http": {}}}


def service_tracer(enabled: bool) -> trace.Tracer:
    """The tracer of BentoML's provider (the one its request spans use), in the worker; a tracer
    that records nothing when tracing is off."""
    if not enabled:
        return trace.NoOpTracer()
    from bentoml._internal.configuration.containers import BentoMLContainer

    return BentoMLContainer.tracer_provider.get().get_tracer("sdxl")


URL_ATTRIBUTES = ("http.target", "http.url", "url.full", "url.path")
HTTP_METHODS = {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"}


class RouteTemplates(SpanProcessor):
    """Names the HTTP spans BentoML's ASGI instrumentation starts (the request's, and its
    `http send` and `http receive` parts) by the route's template instead of the raw path, which
    carries job and image ids; their URL attributes likewise, without the query (ComfyUI's
    `/view?filename=` names an image). A path no route with parameters matches stays."""

    def __init__(self, templates: Iterable[str]):
        self.patterns = [(compile_path(template)[0], template) for template in templates if "{" in template]

    def on_start(self, span: Span, parent_context: Any = None) -> None:
        method, _, rest = span.name.partition(" ")
        if method not in HTTP_METHODS or not rest.startswith("/"):
            return
        path = rest.split(" ")[0]
        template = next((template for regex, template in self.patterns if regex.match(path)), path)
        span.update_name(f"{method} {template}{rest[len(path) :]}")
        set_attribute = span.set_attribute

        def templated(key: str, value: Any) -> None:
            if key == "url.query":
                value = ""
            elif key in URL_ATTRIBUTES and isinstance(value, str):
                value = value.split("?")[0].replace(path, template)
            set_attribute(key, value)

        for key, value in dict(span.attributes or {}).items():
            templated(key, value)
        # (the instrumentation sets the request's attributes again once the span has started)
        span.set_attribute = templated  # type: ignore[method-assign]


def route_templates(app: Any) -> list[str]:
    """Every route's template in a FastAPI app, prefixes of included routers applied."""
    from fastapi.routing import iter_route_contexts

    return [context.path for context in iter_route_contexts(app.routes) if context.path]


def name_spans_by_route(app: Any) -> None:
    """Installs `RouteTemplates` for the app's routes on BentoML's tracer provider, in the
    worker (tracing on only)."""
    if tracing_config():
        from bentoml._internal.configuration.containers import BentoMLContainer

        BentoMLContainer.tracer_provider.get().add_span_processor(RouteTemplates(route_templates(app)))


def nanoseconds(seconds: float) -> int:
    return int(seconds * 1e9)


class JobSpans:
    """A finished job's spans, made on the replica that ran it, in the trace it was submitted in."""

    def __init__(self, tracer: trace.Tracer, replica: str):
        self.tracer = tracer
        self.replica = replica

    def finished(self, job: Job) -> None:
        if not job.trace or job.started is None:  # (not traced, or never ran)
            return
        attributes = {"sdxl.replica": self.replica, "sdxl.device": job.device or "", "sdxl.status": job.status.value}
        span = self.tracer.start_span(
            "job", context=propagate.extract(job.trace), start_time=nanoseconds(job.created), attributes=attributes
        )
        inside = trace.set_span_in_context(span)
        parts = [("queue wait", job.created, job.started - job.created)]
        result = job.result  # (read once: a waiting client's handler may drop it meanwhile)
        if result is not None:
            timings, at = result.timings, job.started
            steps = (
                (("model load", timings.load_s), ("upscale", timings.upscale_s), ("encode", timings.encode_s))
                if isinstance(timings, UpscaleTimings)
                else (
                    ("model load", timings.load_s + timings.lora_load_s),
                    ("denoise", timings.inference_s),
                    ("encode", timings.encode_s),
                )
            )
            for name, seconds in steps:
                parts.append((name, at, seconds))
                at += seconds
        for name, start, seconds in parts:
            if seconds > 0:
                part = self.tracer.start_span(name, context=inside, start_time=nanoseconds(start))
                part.end(end_time=nanoseconds(start + seconds))
        span.end(end_time=nanoseconds(job.finished or time.time()))
