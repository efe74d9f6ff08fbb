"""Prometheus metrics that leak nothing and stay bounded: requests are labelled by their route
template (`/v1/jobs/{job_id}`), never by a raw path (which would carry job and image ids, and
grow one series per id); generation metrics by model, outcome and device. The dashboard in
deploy/grafana/sdxl.json reads them.

BentoML's own HTTP metrics label by raw path, so they are off (service.py) and these replace
them, through prometheus_client as BentoML documents for user metrics. They are created in the
worker, after BentoML has pointed prometheus_client at its multiprocess directory.
"""

from __future__ import annotations

import os

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.multiprocess import MultiProcessCollector

from backends.sdxl_backend.jobs import Job, JobStatus
from backends.sdxl_backend.protocol import GenerationResult
from backends.sdxl_backend.upscale_protocol import UpscaleResult


class Metrics:
    def __init__(self, models: list[str]) -> None:
        self.requests = Counter("sdxl_http_requests_total", "HTTP requests answered", ["route", "method", "status"])
        self.request_seconds = Histogram(
            "sdxl_http_request_seconds",
            "Time to answer an HTTP request",
            ["route", "method"],
            buckets=(0.01, 0.05, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600),
        )
        # With a shared queue (SDXL_REDIS_URL), the fleet's counts: the same on every replica.
        self.queued = Gauge("sdxl_queued_jobs", "Jobs waiting for a device", multiprocess_mode="livesum")
        self.running = Gauge("sdxl_running_jobs", "Jobs running on a device", multiprocess_mode="livesum")
        self.generations = Counter(
            "sdxl_generations_total", "Finished jobs", ["model", "outcome", "device"]
        )  # device: the one that ran it ("none": cancelled while queued)
        self.recoveries = Counter(
            "sdxl_out_of_memory_recoveries_total", "Out-of-memory errors recovered in a lower mode", ["model"]
        )
        self.load_seconds = Counter("sdxl_model_load_seconds_total", "Seconds spent loading models", ["model"])
        self.images = Counter("sdxl_images_total", "Images generated", ["model", "device"])
        self.queue_wait = Histogram(
            "sdxl_queue_wait_seconds",
            "From a job's submission to its start on a device",
            ["priority"],
            buckets=(0.05, 0.25, 1, 2.5, 5, 10, 30, 60, 120, 300, 600),
        )
        self.step_seconds = Histogram(
            "sdxl_step_seconds",
            "Seconds a denoising step took (each job's mean, decoding included)",
            ["model", "device"],
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        )
        # The most recent reading of this worker's devices (on the CPU: the host's memory).
        self.device_memory = Gauge(
            "sdxl_device_memory_bytes", "Device memory", ["device", "kind"], multiprocess_mode="mostrecent"
        )
        # Only with a shared queue (SDXL_REDIS_URL): whether its Redis answered at the last scrape.
        self.redis_up = Gauge("sdxl_redis_up", "1 when Redis answered", multiprocess_mode="mostrecent")
        for model in models:  # (at 0 from the start, so that a rate or increase sees the first one)
            self.recoveries.labels(model)
            self.load_seconds.labels(model)

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        self.requests.labels(route, method, str(status)).inc()
        self.request_seconds.labels(route, method).observe(seconds)

    def observe_queue(self, queued: int, running: int) -> None:
        self.queued.set(queued)
        self.running.set(running)

    def observe_devices(self, memory: dict[str, tuple[int, int]]) -> None:
        for device, (used, total) in memory.items():
            self.device_memory.labels(device, "used").set(used)
            self.device_memory.labels(device, "total").set(total)

    def observe_redis(self, answered: bool) -> None:
        self.redis_up.set(1 if answered else 0)

    def observe_finished(self, job: Job) -> None:
        model = job.model or "unknown"  # (an upscale's: its upscaler)
        device = job.device or "none"
        result = job.result  # (read once: a waiting client's handler may drop it meanwhile)
        self.generations.labels(model, job.status.value, device).inc()
        if job.started is not None:
            self.queue_wait.labels(job.priority).observe(max(0.0, job.started - job.created))
        if job.status == JobStatus.SUCCEEDED and isinstance(result, UpscaleResult) and result.timings.load_s:
            self.load_seconds.labels(model).inc(result.timings.load_s)
        if job.status == JobStatus.SUCCEEDED and isinstance(result, GenerationResult):
            self.images.labels(model, device).inc(len(result.images))
            if job.step:
                self.step_seconds.labels(model, device).observe(result.timings.inference_s / job.step)
            if result.out_of_memory_in:
                self.recoveries.labels(model).inc(len(result.out_of_memory_in))
            if result.timings.load_s:
                self.load_seconds.labels(model).inc(result.timings.load_s)


def exposition() -> tuple[bytes, str]:
    """Every metric of the service's processes, in Prometheus' text format."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
