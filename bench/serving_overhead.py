"""Serving overhead of the HTTP stack against the bare engine, on tiny-sdxl (CPU or GPU).

Measured in one run, so machine noise cancels out of the ratios:
- cold start: seconds from `bentoml serve` starting to /readyz answering (warm-up included);
- latency: median of N requests over HTTP vs. N calls of Engine.generate() in-process,
  same model, size, steps and seed;
- throughput: images/s with 1, 4 and 8 concurrent clients, for each SDXL_MAX_BATCH (1: no
  batching), each on its own served process, one after the other;
- peak RSS of the server process tree.

    python bench/serving_overhead.py [--runs 24] [--size 64] [--steps 4] [--clients 1,4,8] [--max-batch 1,4,8]

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
    parser.add_argument("--runs", type=int, default=24)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--clients", type=lambda text: [int(c) for c in text.split(",")], default=[1, 4, 8])
    parser.add_argument("--max-batch", type=lambda text: [int(b) for b in text.split(",")], default=[1, 4, 8],
                        help="SDXL_MAX_BATCH values, one served process each")
    args = parser.parse_args()
    body = {"prompt": "a lighthouse at dusk", "width": args.size, "height": args.size, "steps": args.steps, "seed": 1}

    model = import_tiny()
    # In-process, through the same job queue (and so the same device thread) as the service.
    engine = Engine(
        ModelManager([ModelSource("tiny-sdxl", Path(model.path), defaults_for("tiny-sdxl"))], select_placement()),
        "tiny-sdxl",
    )
    jobs = JobQueue(engine)
    jobs.start()
    jobs.submit(engine.prepare(GenerationRequest(**body))).done.result()  # warm-up, as the service does at start
    in_process = []
    for _ in range(args.runs):
        started = time.perf_counter()
        jobs.submit(engine.prepare(GenerationRequest(**body))).done.result()
        in_process.append(time.perf_counter() - started)
    jobs.close()

    def throughput(client: httpx.Client, clients: int) -> tuple[float, int]:
        """Images/s and errors of `args.runs` requests from `clients` concurrent clients."""
        def request(index: int) -> bool:
            return client.post("/v1/txt2img", json={**body, "seed": index}).status_code == 200

        started = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            answered = list(pool.map(request, range(args.runs)))
        return args.runs / (time.perf_counter() - started), answered.count(False)

    figures: dict = {"request": body}
    rates: dict[tuple[int, int], float] = {}
    for max_batch in args.max_batch:
        server = Server({"SDXL_MODELS": "tiny-sdxl", "SDXL_MAX_BATCH": str(max_batch)},
                        Path(tempfile.mkdtemp()) / "server.log")
        try:
            cold_start = server.wait_ready()
            with httpx.Client(base_url=server.url, timeout=300,
                              limits=httpx.Limits(max_connections=max(args.clients))) as client:
                client.post("/v1/txt2img", json=body).raise_for_status()
                if max_batch == args.max_batch[0]:
                    served = []
                    for _ in range(args.runs):
                        started = time.perf_counter()
                        client.post("/v1/txt2img", json=body).raise_for_status()
                        served.append(time.perf_counter() - started)
                    served_p50, in_process_p50 = statistics.median(served), statistics.median(in_process)
                    figures.update({
                        "cold_start_s": round(cold_start, 2),
                        "served_p50_s": round(served_p50, 4),
                        "in_process_p50_s": round(in_process_p50, 4),
                        "serving_overhead_ratio": round(served_p50 / in_process_p50, 3),
                        "serving_overhead_ms": round((served_p50 - in_process_p50) * 1000, 1),
                    })
                for clients in args.clients:
                    rate, errors = throughput(client, clients)
                    rates[max_batch, clients] = rate
                    figures[f"images_per_s_max_batch_{max_batch}_{clients}_clients"] = round(rate, 2)
                    figures[f"errors_max_batch_{max_batch}_{clients}_clients"] = errors
            figures[f"server_rss_mib_max_batch_{max_batch}"] = round(tree_rss(server.process.pid) / 2**20)
        finally:
            server.stop()
    few, many = min(args.clients), max(args.clients)
    for max_batch in args.max_batch:
        figures[f"clients_{many}_vs_{few}_max_batch_{max_batch}"] = round(rates[max_batch, many] / rates[max_batch, few], 3)

    width = max(map(len, figures))
    for name, value in figures.items():
        print(f"{name.ljust(width)}  {value}")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
