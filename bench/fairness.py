"""A key's wait behind another key's flood, with fair shares against first-in-first-out, on
tiny-sdxl (CPU or GPU), in one run.

Arranged the way the service runs: the service's `Runtime` (its device thread, thread count,
warm-up and job queue) in this process. Each round, key A queues `--flood` jobs, then key B
queues one; the rounds alternate between SDXL_QUEUE_ORDER=fair and fifo (the same queue and
device, its order switched between rounds), so both meet the same machine. It prints B's wait
(from its submit to its start) and how many of A's jobs started before it, per order, and the
ratio of B's median waits.

    python bench/fairness.py [--rounds 5] [--flood 10] [--size 64] [--steps 4]

It uses a private BentoML home with tiny-sdxl imported, so it needs no set-up.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("BENTOML_HOME", tempfile.mkdtemp(prefix="sdxl-bench-"))
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from backends.api.composition.runtime import Runtime  # noqa: E402
from backends.api.composition.served import ServedModel  # noqa: E402
from backends.api.composition.settings import load_settings  # noqa: E402
from backends.sdxl_backend.protocol import GenerationRequest  # noqa: E402
from models.catalog import defaults_for  # noqa: E402
from models.store import import_tiny, stored_model  # noqa: E402


def one_round(runtime: Runtime, order: str, flood: int, body: dict) -> tuple[float, int]:
    """B's wait in seconds, and how many of A's jobs started before B's."""
    runtime.jobs.bounds = dataclasses.replace(runtime.jobs.bounds, order=order)
    prepared = runtime.engine.prepare(GenerationRequest(**body))
    a_jobs = [runtime.jobs.submit(prepared, "key-a") for _ in range(flood)]
    b_job = runtime.jobs.submit(prepared, "key-b")
    for job in [*a_jobs, b_job]:
        job.done.result()
    return b_job.started - b_job.created, sum(1 for job in a_jobs if job.started < b_job.started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--flood", type=int, default=10)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    os.environ["SDXL_MAX_BATCH"] = "1"  # one job per call: the order alone decides the wait
    model = stored_model("tiny-sdxl") or import_tiny("tiny-sdxl")
    served = ServedModel("tiny-sdxl", Path(model.path), "bench", "", defaults_for("tiny-sdxl"))
    runtime = Runtime(load_settings(), [served], "tiny-sdxl")
    runtime.start(warm_up=True)
    body = {"prompt": "a flood", "width": args.size, "height": args.size, "steps": args.steps, "seed": 1}
    waits: dict[str, list[float]] = {"fair": [], "fifo": []}
    before: dict[str, list[int]] = {"fair": [], "fifo": []}
    try:
        for _ in range(args.rounds):
            for order in ("fair", "fifo"):
                wait, passed_by = one_round(runtime, order, args.flood, body)
                waits[order].append(wait)
                before[order].append(passed_by)
    finally:
        runtime.close()
    print(f"key A floods {args.flood} jobs, then key B submits 1 ({args.size}x{args.size}, {args.steps} steps)")
    for order in ("fair", "fifo"):
        print(
            f"  {order}: B waits p50 {statistics.median(waits[order]) * 1000:.0f} ms; "
            f"A's jobs started before B's: {sorted(set(before[order]))}"
        )
    ratio = statistics.median(waits["fifo"]) / statistics.median(waits["fair"])
    print(f"fairness_wait_ratio (fifo / fair, B's median wait): {ratio:.1f}x")


if __name__ == "__main__":
    main()
