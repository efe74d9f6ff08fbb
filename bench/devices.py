"""Images/s with one device and with two over one queue (SDXL_DEVICES), on tiny-sdxl, in one run.

Arranged the way the service runs: the service's `Runtime` (device threads, their share of the
cores, warm-up, job queue), each arrangement in a process of its own (no process inherits
another's torch threads), run one after the other and alternated `--rounds` times so that both
meet the same machine. Each round queues `--jobs` jobs at once and times them all. On the CPU
the two devices are two shares of it (`cpu,cpu`, each held to half of SDXL_TORCH_THREADS);
with two GPUs pass `--devices cuda:0 cuda:0,cuda:1`.

    python bench/devices.py [--rounds 3] [--jobs 16] [--size 256] [--steps 8] [--devices cpu cpu,cpu]

It uses a private BentoML home with tiny-sdxl imported, so it needs no set-up.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("BENTOML_HOME", tempfile.mkdtemp(prefix="sdxl-bench-"))
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def images_per_second(jobs: int, body: dict) -> float:
    """In this process, with SDXL_DEVICES as set: `jobs` jobs queued at once, timed to the last."""
    from backends.api.composition.runtime import Runtime
    from backends.api.composition.served import ServedModel
    from backends.api.composition.settings import load_settings
    from backends.sdxl_backend.protocol import GenerationRequest
    from models.catalog import defaults_for
    from models.store import import_tiny, stored_model

    model = stored_model("tiny-sdxl") or import_tiny("tiny-sdxl")
    served = ServedModel("tiny-sdxl", Path(model.path), "bench", "", defaults_for("tiny-sdxl"))
    runtime = Runtime(load_settings(), [served], "tiny-sdxl")
    runtime.start(warm_up=True)
    try:
        prepared = runtime.engine.prepare(GenerationRequest(**body))
        started = time.perf_counter()
        queued = [runtime.jobs.submit(prepared) for _ in range(jobs)]
        for job in queued:
            job.done.result()
        return jobs / (time.perf_counter() - started)
    finally:
        runtime.close()


def measure(devices: str, jobs: int, body: dict) -> float:
    environment = {**os.environ, "SDXL_DEVICES": devices, "SDXL_MAX_BATCH": "1", "SDXL_MAX_QUEUE": str(jobs)}
    done = subprocess.run(
        [sys.executable, __file__, "--part", str(jobs), "--body", json.dumps(body)],
        cwd=ROOT,
        env=environment,
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        raise RuntimeError(f"SDXL_DEVICES={devices} failed:\n{done.stderr[-3000:]}")
    return float(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=16)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--devices", nargs=2, default=["cpu", "cpu,cpu"], metavar=("ONE", "TWO"))
    parser.add_argument("--part", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--body", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.part:
        print(images_per_second(args.part, json.loads(args.body)))
        return
    body = {"prompt": "a pair", "width": args.size, "height": args.size, "steps": args.steps, "seed": 1}
    rates: dict[str, list[float]] = {devices: [] for devices in args.devices}
    for _ in range(args.rounds):
        for devices in args.devices:
            rates[devices].append(measure(devices, args.jobs, body))
    print(f"{args.jobs} jobs queued at once ({args.size}x{args.size}, {args.steps} steps), {args.rounds} rounds")
    for devices, values in rates.items():
        rounds = ", ".join(f"{value:.1f}" for value in values)
        print(f"  SDXL_DEVICES={devices}: {statistics.median(values):.1f} images/s (rounds: {rounds})")
    one, two = (statistics.median(rates[devices]) for devices in args.devices)
    print(f"two_devices_ratio (images/s, two / one): {two / one:.2f}x")


if __name__ == "__main__":
    main()
