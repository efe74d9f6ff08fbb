"""Traces (OpenTelemetry), off unless an OTLP endpoint is set the standard way:
`OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`), OTLP over HTTP, with
`OTEL_TRACES_SAMPLER_ARG` the share of requests traced (default: all) and the other `OTEL_*`
variables (headers, timeout, resource) read by the exporter itself.

BentoML's tracing support does the exporting and the span of each HTTP request; the service
adds, in that request's trace: `validate` (the request checked and prepared), and, when its job
ends on whichever replica ran it (the trace context travels with the job, in Redis too), `job`
with `queue wait`, `model load`, `denoise` (decoding included) and `encode` inside, laid out
from the job's times. Spans name the replica and device, never a prompt, key or id.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from typing import Any

from opentelemetry import propagate, trace

from backends.sdxl_backend.jobs import Job

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
            for name, seconds in (
                ("model load", timings.load_s + timings.lora_load_s),
                ("denoise", timings.inference_s),
                ("encode", timings.encode_s),
            ):
                parts.append((name, at, seconds))
                at += seconds
        for name, start, seconds in parts:
            if seconds > 0:
                part = self.tracer.start_span(name, context=inside, start_time=nanoseconds(start))
                part.end(end_time=nanoseconds(start + seconds))
        span.end(end_time=nanoseconds(job.finished or time.time()))
