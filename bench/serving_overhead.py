"""Serving overhead of the HTTP stack against the engine, on tiny-sdxl (CPU or GPU).

Measured in one run, so machine noise cancels out of the ratios:
- cold start: seconds from `bentoml serve` starting to /readyz answering (warm-up included),
  beside the bare imports (torch, diffusers' SDXL pipeline, CLIP) in a fresh interpreter: the
  floor no server on these packages can beat;
- latency: median of N requests over HTTP against N generations in-process arranged the way
  the service runs them (its `Runtime`: the device thread, its torch thread count, its warm-up,
  the job queue), and the bare `Engine.generate` on a fresh thread of a fresh process; same
  model, size, steps and seed. Each in-process part runs in a process of its own;
- the peer: one client's latency against a FastAPI + diffusers server of a dozen lines
  (bench/peer_fastapi.py) on the same weights, alternating with the above, and what the peer
  answers at the most clients;
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
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("BENTOML_HOME", tempfile.mkdtemp(prefix="sdxl-bench-"))
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import psutil  # noqa: E402

from models.catalog import defaults_for  # noqa: E402
from models.store import import_tiny  # noqa: E402
from tests.served import Server, free_port  # noqa: E402

BARE_IMPORTS = "import torch; from diffusers import StableDiffusionXLPipeline; from transformers import CLIPTextModel"


def tree_rss(pid: int) -> int:
    process = psutil.Process(pid)
    return sum(p.memory_info().rss for p in [process, *process.children(recursive=True)])


def in_process(part: str, body: dict) -> None:
    """One in-process part, in a process of its own (`InProcess`): generations of `body`, one
    for each line read, each answered with its seconds. "service": through the service's own
    `Runtime` (device thread, thread count, warm-up, job queue); "bare-engine":
    `Engine.generate` on a fresh thread, warmed up there."""
    from backends.api.composition.runtime import Runtime
    from backends.api.composition.served import ServedModel
    from backends.api.composition.settings import load_settings
    from backends.sdxl_backend.device import select_placement
    from backends.sdxl_backend.generation.engine import Engine
    from backends.sdxl_backend.models.manager import ModelManager
    from backends.sdxl_backend.models.records import ModelSource
    from backends.sdxl_backend.protocol import GenerationRequest

    path, defaults = Path(tiny_model().path), defaults_for("tiny-sdxl")

    def answer_each_line(generate) -> None:
        print("ready", flush=True)
        for _ in sys.stdin:
            started = time.perf_counter()
            generate()
            print(f"seconds {time.perf_counter() - started}", flush=True)

    if part == "service":
        runtime = Runtime(load_settings(), [ServedModel("tiny-sdxl", path, "bench", "", defaults)], "tiny-sdxl")
        runtime.start(warm_up=True)
        answer_each_line(lambda: runtime.jobs.submit(runtime.engine.prepare(GenerationRequest(**body))).done.result())
        runtime.close()
        return

    def bare() -> None:
        engine = Engine(ModelManager([ModelSource("tiny-sdxl", path, defaults)], select_placement()), "tiny-sdxl")
        engine.generate(engine.prepare(GenerationRequest(**body)))  # warm-up
        answer_each_line(lambda: engine.generate(engine.prepare(GenerationRequest(**body))))

    thread = threading.Thread(target=bare)
    thread.start()
    thread.join()


class InProcess:
    """`in_process(part)` in a fresh interpreter (no part inherits another's threads), asked
    for one generation at a time, so that its runs can alternate with the served ones: each
    then meets the same machine, and the same pause between two generations."""

    def __init__(self, part: str, body: dict):
        self.process = subprocess.Popen(
            [sys.executable, __file__, "--part", part, "--body", json.dumps(body)],
            cwd=ROOT,
            text=True,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        self._answer("ready")

    def _answer(self, prefix: str) -> str:
        for line in self.process.stdout:  # (library warnings may come first)
            if line.startswith(prefix):
                return line.removeprefix(prefix).strip()
        raise RuntimeError(f"the in-process part exited with {self.process.wait()}")

    def generate(self) -> float:
        self.process.stdin.write("go\n")
        self.process.stdin.flush()
        return float(self._answer("seconds "))

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=60)


def tiny_model():
    from models.store import stored_model

    return stored_model("tiny-sdxl") or import_tiny()


def bare_imports_s() -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", BARE_IMPORTS], check=True)
    return time.perf_counter() - started


def throughput(client: httpx.Client, route: str, body: dict, runs: int, clients: int) -> tuple[float, int]:
    """Images/s and errors of `runs` requests from `clients` concurrent clients."""

    def request(index: int) -> bool:
        try:
            return client.post(route, json={**body, "seed": index}).status_code == 200
        except httpx.HTTPError:
            return False

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        answered = list(pool.map(request, range(runs)))
    return runs / (time.perf_counter() - started), answered.count(False)


class Peer:
    """The peer (bench/peer_fastapi.py) under uvicorn, on tiny-sdxl's weights."""

    def __init__(self, body: dict, log: Path, connections: int):
        port = free_port()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "bench.peer_fastapi:app", "--host", "127.0.0.1", "--port", str(port)],
            cwd=ROOT,
            env={**os.environ, "SDXL_PEER_MODEL": tiny_model().path},
            stdout=log.open("w"),
            stderr=subprocess.STDOUT,
        )
        self.body = {**body, "guidance_scale": defaults_for("tiny-sdxl").guidance_scale}
        self.client = httpx.Client(
            base_url=f"http://127.0.0.1:{port}", timeout=300, limits=httpx.Limits(max_connections=connections)
        )
        deadline = time.monotonic() + 180
        while True:
            try:
                self.generate()  # (its warm-up)
                return
            except httpx.HTTPError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    raise RuntimeError(f"the peer did not start:\n{log.read_text()}") from None
                time.sleep(0.5)

    def generate(self) -> float:
        started = time.perf_counter()
        self.client.post("/generate", json=self.body).raise_for_status()
        return time.perf_counter() - started

    def close(self) -> None:
        self.client.close()
        self.process.terminate()
        self.process.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=24)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--clients", type=lambda text: [int(c) for c in text.split(",")], default=[1, 4, 8])
    parser.add_argument(
        "--max-batch",
        type=lambda text: [int(b) for b in text.split(",")],
        default=[1, 4, 8],
        help="SDXL_MAX_BATCH values, one served process each",
    )
    parser.add_argument("--part", choices=["service", "bare-engine"], help=argparse.SUPPRESS)
    parser.add_argument("--body", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.part:  # one in-process part, in a process of its own (see `InProcess`)
        in_process(args.part, json.loads(args.body))
        return
    body = {"prompt": "a lighthouse at dusk", "width": args.size, "height": args.size, "steps": args.steps, "seed": 1}
    tiny_model()
    logs = Path(tempfile.mkdtemp(prefix="sdxl-bench-logs-"))

    figures: dict = {"request": body}
    imports = [bare_imports_s() for _ in range(2)]
    few, many = min(args.clients), max(args.clients)
    rates: dict[tuple[int, int], float] = {}
    cold_starts = []
    for max_batch in args.max_batch:
        server = Server(
            {"SDXL_MODELS": "tiny-sdxl", "SDXL_MAX_BATCH": str(max_batch)}, logs / f"server-{max_batch}.log"
        )
        try:
            cold_starts.append(server.wait_ready())
            with httpx.Client(
                base_url=server.url, timeout=300, limits=httpx.Limits(max_connections=max(args.clients))
            ) as client:
                client.post("/v1/txt2img", json=body).raise_for_status()
                if max_batch == args.max_batch[0]:
                    service, bare = InProcess("service", body), InProcess("bare-engine", body)
                    peer = Peer(body, logs / "peer.log", many)
                    served, in_service, in_bare, by_peer = [], [], [], []
                    for _ in range(args.runs):  # (alternating: the four meet the same machine)
                        started = time.perf_counter()
                        client.post("/v1/txt2img", json=body).raise_for_status()
                        served.append(time.perf_counter() - started)
                        in_service.append(service.generate())
                        in_bare.append(bare.generate())
                        by_peer.append(peer.generate())
                    service.close()
                    bare.close()
                    peer_rate, peer_errors = throughput(peer.client, "/generate", peer.body, args.runs, many)
                    peer.close()
                    served_p50, service_p50, bare_p50, peer_p50 = map(
                        statistics.median, (served, in_service, in_bare, by_peer)
                    )
                    figures.update(
                        {
                            "served_p50_s": round(served_p50, 4),
                            "in_process_p50_s": round(service_p50, 4),
                            "bare_engine_p50_s": round(bare_p50, 4),
                            "serving_overhead_ratio": round(served_p50 / service_p50, 3),
                            "serving_overhead_ms": round((served_p50 - service_p50) * 1000, 1),
                            "service_thread_vs_bare_engine_ratio": round(service_p50 / bare_p50, 3),
                            "peer_p50_s": round(peer_p50, 4),
                            "one_client_speed_vs_peer": round(peer_p50 / served_p50, 3),  # (above 1: faster)
                            f"peer_images_per_s_{many}_clients": round(peer_rate, 2),
                            f"peer_errors_{many}_clients": peer_errors,
                        }
                    )
                for clients in args.clients:
                    rate, errors = throughput(client, "/v1/txt2img", body, args.runs, clients)
                    rates[max_batch, clients] = rate
                    figures[f"images_per_s_max_batch_{max_batch}_{clients}_clients"] = round(rate, 2)
                    figures[f"errors_max_batch_{max_batch}_{clients}_clients"] = errors
            figures[f"server_rss_mib_max_batch_{max_batch}"] = round(tree_rss(server.process.pid) / 2**20)
        finally:
            server.stop()
    figures.update(
        {
            "bare_imports_s": round(min(imports), 2),
            "cold_start_s": round(min(cold_starts), 2),
            "cold_start_over_bare_imports_s": round(min(cold_starts) - min(imports), 2),
        }
    )
    for max_batch in args.max_batch:
        figures[f"clients_{many}_vs_{few}_max_batch_{max_batch}"] = round(
            rates[max_batch, many] / rates[max_batch, few], 3
        )

    width = max(map(len, figures))
    for name, value in figures.items():
        print(f"{name.ljust(width)}  {value}")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
