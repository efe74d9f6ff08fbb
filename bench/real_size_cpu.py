"""Real size on a CPU: SDXL base's full architecture with random weights, taken through the
real path (saved as a diffusers directory, `python -m models import ... --from`, the model
store, `bentoml serve` with the service's loader and memory budget) and asked for one small
image. It proves the loader, the memory accounting and the budget at the size real models
have, on a machine without a GPU or the hub; it prints the store size, the start time, the
load time, the worker's RSS and what `/v1/system/status` counts.

    python bench/real_size_cpu.py [--size 256] [--steps 2]

Needs about 7 GiB of disk (float16 weights; the store hard-links them) and about 16 GiB of
memory (the service holds float32 weights on a CPU). A private BentoML home, removed after.
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HOME = Path(tempfile.mkdtemp(prefix="sdxl-real-size-"))
os.environ["BENTOML_HOME"] = str(HOME / "bentoml")
ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

import httpx  # noqa: E402
import psutil  # noqa: E402
import torch  # noqa: E402
from gpu_sdxl import build_full_sdxl  # noqa: E402

from tests.served import Server  # noqa: E402

GiB = 2**30


def worker_rss(server: Server) -> int:
    processes = psutil.Process(server.process.pid).children(recursive=True)
    return sum(p.memory_info().rss for p in processes if "_bentoml_impl.worker" in " ".join(p.cmdline()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args()
    figures: dict[str, str] = {}
    try:
        started = time.perf_counter()
        torch.set_default_dtype(torch.float16)  # built in float16 from the start: half the memory
        pipeline = build_full_sdxl(torch.device("cpu"), torch.float16)
        torch.set_default_dtype(torch.float32)
        directory = HOME / "sdxl-random"
        pipeline.save_pretrained(directory, variant="fp16")
        del pipeline
        gc.collect()
        figures["build and save (float16)"] = f"{time.perf_counter() - started:.0f} s"

        started = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "models", "import", "sdxl-random", "--from", str(directory)],
            cwd=ROOT,
            check=True,
            env={**os.environ},
        )
        figures["python -m models import --from"] = f"{time.perf_counter() - started:.0f} s"
        stored = sum(f.stat().st_size for f in (HOME / "bentoml" / "models").rglob("*") if f.is_file())
        figures["in the store"] = f"{stored / GiB:.2f} GiB"

        server = Server({"SDXL_MODELS": "sdxl-random", "SDXL_WARMUP": "0"}, HOME / "server.log")
        try:
            figures["bentoml serve to ready (no warm-up)"] = f"{server.wait_ready(timeout=1800):.0f} s"
            figures["worker RSS, ready"] = f"{worker_rss(server) / GiB:.2f} GiB"
            answer = httpx.post(
                f"{server.url}/v1/txt2img",
                timeout=3600,
                json={
                    "prompt": "a lighthouse at dusk",
                    "width": args.size,
                    "height": args.size,
                    "steps": args.steps,
                    "seed": 1,
                },
            )
            answer.raise_for_status()
            timings = answer.json()["timings"]
            figures["first request: model load"] = f"{timings['load_s']:.1f} s"
            figures[f"first request: {args.size}x{args.size}, {args.steps} steps, guidance"] = (
                f"{timings['inference_s']:.1f} s"
            )
            figures["worker RSS, after"] = f"{worker_rss(server) / GiB:.2f} GiB"
            status = httpx.get(f"{server.url}/v1/system/status", timeout=300).json()
            memory = status["memory"]
            figures["budget counts (weights in float32)"] = f"{memory['models'] / GiB:.2f} GiB"
            figures["budget"] = f"{memory['budget'] / GiB:.2f} GiB of {memory['total'] / GiB:.2f} GiB"
        finally:
            server.stop()
    finally:
        shutil.rmtree(HOME, ignore_errors=True)
    print(f"\nSDXL base architecture, random weights, on {os.cpu_count()} CPU cores:")
    print("| figure | value |\n| --- | --- |")
    for name, value in figures.items():
        print(f"| {name} | {value} |")


if __name__ == "__main__":
    main()
