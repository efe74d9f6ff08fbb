"""Serving overhead of the HTTP stack against the bare engine, on tiny-sdxl (CPU or GPU).

Measured in one run, so machine noise cancels out of the ratios:
- cold start: seconds from `bentoml serve` starting to /readyz answering (warm-up included);
- latency: median of N requests over HTTP vs. N calls of Engine.generate() in-process,
  same model, size, steps and seed;
- throughput: images/s with C concurrent clients vs. one client at a time;
- peak RSS of the server process tree.

    python bench/serving_overhead.py [--runs 20] [--size 64] [--steps 4] [--clients 4]

It uses a private BentoML home with tiny-sdxl imported, so it needs no set-up and touches
no user store.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ["BENTOML_HOME"] = tempfile.mkdtemp(prefix="sdxl-bench-")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx  # noqa: E402
import psutil  # noqa: E402

from backends.sdxl_backend.device import select_placement  # noqa: E402
from backends.sdxl_backend.engine import Engine  # noqa: E402
from backends.sdxl_backend.jobs import JobQueue  # noqa: E402
from backends.sdxl_backend.model_manager import ModelManager, ModelSource  # noqa: E402
from backends.sdxl_backend.protocol import GenerationRequest  # noqa: E402
from models.catalog import defaults_for  # noqa: E402
from models.store import import_tiny  # noqa: E402
from tests.served import Server  # noqa: E402


def tree_rss(pid: int) -> int:
    process = psutil.Process(pid)
    return sum(p.memory_info().rss for p in [process, *process.children(recursive=True)])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--clients", type=int, default=4)
    args = parser.parse_args()
    body = {"prompt": "a lighthouse at dusk", "width": args.size, "height": args.size, "steps": args.steps, "seed": 1}

    model = import_tiny()
    # In-process, through the same job queue (and so the same device thread) as the service.
    engine = Engine(
        ModelManager([ModelSource("tiny-sdxl", Path(model.path), defaults_for("tiny-sdxl"))], select_placement()),
        "tiny-sdxl",
    )
    jobs = JobQueue(engine)
    jobs.submit(engine.prepare(GenerationRequest(**body))).done.result()  # warm-up, as the service does at start
    in_process = []
    for _ in range(args.runs):
        started = time.perf_counter()
        jobs.submit(engine.prepare(GenerationRequest(**body))).done.result()
        in_process.append(time.perf_counter() - started)
    jobs.close()

    server = Server({"SDXL_MODELS": "tiny-sdxl"}, Path(tempfile.mkdtemp()) / "server.log")
    try:
        cold_start = server.wait_ready()
        with httpx.Client(base_url=server.url, timeout=300) as client:
            def request(_: int = 0) -> float:
                started = time.perf_counter()
                client.post("/v1/txt2img", json=body).raise_for_status()
                return time.perf_counter() - started

            request()
            served = [request() for _ in range(args.runs)]
            started = time.perf_counter()
            with ThreadPoolExecutor(args.clients) as pool:
                list(pool.map(request, range(args.runs)))
            concurrent_s = time.perf_counter() - started
        peak_rss = tree_rss(server.process.pid)
    finally:
        server.stop()

    served_p50, in_process_p50 = statistics.median(served), statistics.median(in_process)
    sequential_ips, concurrent_ips = 1 / statistics.mean(served), args.runs / concurrent_s
    figures = {
        "request": body,
        "cold_start_s": round(cold_start, 2),
        "served_p50_s": round(served_p50, 4),
        "in_process_p50_s": round(in_process_p50, 4),
        "serving_overhead_ratio": round(served_p50 / in_process_p50, 3),
        "serving_overhead_ms": round((served_p50 - in_process_p50) * 1000, 1),
        "images_per_s_sequential": round(sequential_ips, 2),
        f"images_per_s_{args.clients}_clients": round(concurrent_ips, 2),
        "concurrency_ratio": round(concurrent_ips / sequential_ips, 3),
        "server_rss_mib": round(peak_rss / 2**20),
    }
    width = max(map(len, figures))
    for name, value in figures.items():
        print(f"{name.ljust(width)}  {value}")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
