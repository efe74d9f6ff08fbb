"""Replicas sharing one Redis queue (SDXL_REDIS_URL), on tiny-sdxl: does a second replica add
a second device's worth of throughput, and how soon does a killed replica's job resume?

Measured in one run, with a real `redis-server` and real `bentoml serve` processes:
- throughput: images/s of N small synchronous requests from 8 concurrent clients, sent to
  every replica in turn, with one replica and then with two sharing the queue; the ratio;
- resume: seconds from kill -9 of the replica running a job to that job running again on the
  other one (the heartbeat has to lapse first: about 10 s), and to its result.

On a CPU machine the replicas share the cores: each is held to `--threads` torch threads
(one each by default), standing for a GPU of its own, and batching is off (SDXL_MAX_BATCH=1)
so that the ratio measures replicas, not batching.

    python bench/scale_out.py [--runs 32] [--size 256] [--steps 16] [--threads 1]

The default job (256x256, 16 steps: under a second) keeps the device the bottleneck, as it is on
a GPU; at 64x64 the serving work of both replicas, on the same two cores, weighs on the ratio.

It uses a private BentoML home with tiny-sdxl imported, so it needs no set-up and touches
no user store.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ["BENTOML_HOME"] = tempfile.mkdtemp(prefix="sdxl-bench-")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx

from models.store import import_tiny
from tests.served import RedisServer, Server

CLIENTS = 8


def serve(name: str, env: dict[str, str], folder: Path) -> Server:
    (folder / name).mkdir()
    server = Server(env, folder / name / "server.log")
    server.wait_ready()
    return server


def throughput(replicas: list[Server], body: dict, runs: int) -> float:
    """Images per second of `runs` requests from CLIENTS clients, spread over the replicas."""

    def one(index: int) -> None:
        answer = httpx.post(
            f"{replicas[index % len(replicas)].url}/v1/txt2img", json={**body, "seed": index}, timeout=600
        )
        answer.raise_for_status()

    with ThreadPoolExecutor(CLIENTS) as pool:
        list(pool.map(one, range(CLIENTS)))  # every replica loaded and warm
        started = time.perf_counter()
        list(pool.map(one, range(runs)))
        return runs / (time.perf_counter() - started)


def resume_after_kill(replicas: list[Server]) -> tuple[float, float]:
    """Seconds from kill -9 of the replica running a job to the job running again elsewhere,
    and to its result."""
    body = {"prompt": "a long one", "width": 512, "height": 512, "steps": 40, "seed": 1}
    job_id = httpx.post(f"{replicas[0].url}/v1/jobs", json=body, timeout=600).json()["id"]
    while True:
        state = httpx.get(f"{replicas[0].url}/v1/jobs/{job_id}", timeout=600).json()
        if state["status"] == "running" and state["step"] >= 1:
            break
        time.sleep(0.05)
    runner = next(r for r in replicas if httpx.get(f"{r.url}/v1/system/status", timeout=600).json()["jobs_on_device"])
    other = next(r for r in replicas if r is not runner)
    runner.kill()
    killed = time.perf_counter()
    resumed = None
    while True:
        state = httpx.get(f"{other.url}/v1/jobs/{job_id}", timeout=600).json()
        if resumed is None and state["status"] == "running" and state["step"] >= 1 and on_device(other):
            resumed = time.perf_counter() - killed
        if state["status"] in ("succeeded", "failed", "cancelled"):
            assert state["status"] == "succeeded", state
            return resumed or 0.0, time.perf_counter() - killed
        time.sleep(0.05)


def on_device(replica: Server) -> int:
    return httpx.get(f"{replica.url}/v1/system/status", timeout=600).json()["jobs_on_device"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=32)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per replica (CPU)")
    args = parser.parse_args()
    body = {"prompt": "a lighthouse at dusk", "width": args.size, "height": args.size, "steps": args.steps}
    import_tiny()
    folder = Path(tempfile.mkdtemp(prefix="sdxl-scale-out-"))
    (folder / "redis").mkdir()
    redis_server = RedisServer(folder / "redis").start()
    env = {
        "SDXL_MODELS": "tiny-sdxl",
        "SDXL_MAX_BATCH": "1",
        "SDXL_MAX_QUEUE": "256",
        "OMP_NUM_THREADS": str(args.threads),
    }
    replicas: list[Server] = []
    try:
        for database, count in ((0, 1), (1, 2)):
            fleet_env = {**env, "SDXL_REDIS_URL": f"{redis_server.url[:-2]}/{database}"}
            replicas = [serve(f"fleet{database}-{index}", fleet_env, folder) for index in range(count)]
            rate = throughput(replicas, body, args.runs)
            print(
                f"{count} replica(s): {rate:.2f} images/s ({args.runs} requests, {CLIENTS} clients, "
                f"{args.size}x{args.size}, {args.steps} steps)"
            )
            if count == 1:
                single = rate
            else:
                print(f"2 replicas vs 1: {rate / single:.2f}x")
                to_running, to_result = resume_after_kill(replicas)
                print(
                    f"kill -9 of the replica running a job: running again on the other after {to_running:.1f} s, "
                    f"its result after {to_result:.1f} s"
                )
            for replica in replicas:
                replica.stop()
    finally:
        for replica in replicas:
            replica.stop()
        redis_server.stop()


if __name__ == "__main__":
    main()
