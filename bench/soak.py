"""Soak: a served process under a bounded mixed load, with the worker's memory sampled, to see
whether anything grows without bound. Prints the RSS slope (MiB/min) over the run after the
warm-up, and over its second half, then the error count; exits 1 on any unexpected answer.

The load, from 2 clients in a loop: synchronous txt2img (n=2), img2img, OpenAI-style url answers
(and the link fetched), A1111 txt2img, jobs that are polled to the end, jobs cancelled while
running, requests refused at validation, unknown kept-image links.

    python bench/soak.py [--minutes 10] [--clients 2] [--size 64] [--kinds txt2img,url,...]

A private BentoML home with tiny-sdxl imported; traffic only to 127.0.0.1.
"""

from __future__ import annotations

import argparse
import base64
import io
import itertools
import os
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ["BENTOML_HOME"] = tempfile.mkdtemp(prefix="sdxl-soak-")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx
import psutil
from PIL import Image

from models.store import import_tiny
from tests.served import Server

KINDS = ["txt2img", "img2img", "url", "a1111", "job", "cancel", "refused", "unknown-link"]


def png(size: int) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), (random.randrange(256), 80, 160)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def worker_rss(server: Server) -> int:
    processes = psutil.Process(server.process.pid).children(recursive=True)
    return sum(p.memory_info().rss for p in processes if "_bentoml_impl.worker" in " ".join(p.cmdline()))


def slope_mib_per_min(samples: list[tuple[float, int]]) -> float:
    if len(samples) < 3:
        return float("nan")
    times = [t / 60 for t, _ in samples]
    values = [rss / 2**20 for _, rss in samples]
    return statistics.linear_regression(times, values).slope


def main() -> int:  # noqa: C901 (a script's steps, in the order they run)
    parser = argparse.ArgumentParser()
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument(
        "--kinds",
        type=lambda text: text.split(","),
        default=KINDS,
        help=f"a comma-separated subset of {','.join(KINDS)}, to find which one grows",
    )
    args = parser.parse_args()

    import_tiny()
    server = Server({"SDXL_MODELS": "tiny-sdxl"}, Path(tempfile.mkdtemp()) / "server.log")
    small = {"width": args.size, "height": args.size, "steps": 4}
    counts: dict[str, int] = {}
    failures: list[str] = []
    lock = threading.Lock()

    def note(kind: str, ok: bool, detail: str = "") -> None:
        with lock:
            counts[kind] = counts.get(kind, 0) + 1
            if not ok:
                failures.append(f"{kind}: {detail[:200]}")

    def one(client: httpx.Client, kind: str) -> None:
        if kind == "txt2img":
            r = client.post("/v1/txt2img", json={"prompt": "soak", "n": 2, **small})
            note(kind, r.status_code == 200, r.text)
        elif kind == "img2img":
            r = client.post("/v1/img2img", json={"prompt": "soak", "image": png(args.size), "steps": 4})
            note(kind, r.status_code == 200, r.text)
        elif kind == "url":
            r = client.post("/v1/images/generations", json={"prompt": "soak", "response_format": "url", **small})
            ok = r.status_code == 200 and client.get(r.json()["data"][0]["url"]).status_code == 200
            note(kind, ok, r.text)
        elif kind == "a1111":
            r = client.post("/sdapi/v1/txt2img", json={"prompt": "soak", **small})
            note(kind, r.status_code == 200, r.text)
        elif kind in ("job", "cancel"):
            body = (
                {"prompt": "soak", **small}
                if kind == "job"
                else {"prompt": "soak", "width": 512, "height": 512, "steps": 30}
            )
            job = client.post("/v1/jobs", json={**body, "preview_every": 2}).json()
            if kind == "cancel":
                time.sleep(0.2)
                client.delete(f"/v1/jobs/{job['id']}")
            while (state := client.get(f"/v1/jobs/{job['id']}").json())["status"] in ("queued", "running"):
                time.sleep(0.05)
            note(kind, state["status"] == ("succeeded" if kind == "job" else "cancelled"), str(state)[:200])
        elif kind == "refused":
            r = client.post("/v1/jobs", json={"prompt": "soak", "width": 63})
            note(kind, r.status_code == 400, r.text)
        else:
            r = client.get(f"/v1/images/files/{random.getrandbits(64):x}.png")
            note(kind, r.status_code == 404, r.text)

    kinds = args.kinds
    try:
        server.wait_ready()
        started = time.monotonic()
        stop_at = started + args.minutes * 60
        samples: list[tuple[float, int]] = []

        def client_loop(offset: int) -> None:
            with httpx.Client(base_url=server.url, timeout=300) as client:
                for kind in itertools.islice(itertools.cycle(kinds), offset, None):
                    if time.monotonic() >= stop_at:
                        return
                    one(client, kind)

        threads = [threading.Thread(target=client_loop, args=(i * 3,)) for i in range(args.clients)]
        for thread in threads:
            thread.start()
        while any(thread.is_alive() for thread in threads):
            samples.append((time.monotonic() - started, worker_rss(server)))
            time.sleep(5)
        for thread in threads:
            thread.join()
    finally:
        server.stop()

    after_warmup = [s for s in samples if s[0] >= min(60.0, args.minutes * 60 / 5)]
    second_half = [s for s in samples if s[0] >= args.minutes * 30]
    print(
        f"soak: {args.minutes:g} min, {args.clients} clients, {sum(counts.values())} requests "
        f"({', '.join(f'{k} {v}' for k, v in sorted(counts.items()))})"
    )
    print(
        f"worker RSS: {samples[0][1] / 2**20:.0f} -> {samples[-1][1] / 2**20:.0f} MiB; "
        f"slope after warm-up {slope_mib_per_min(after_warmup):+.2f} MiB/min, "
        f"second half {slope_mib_per_min(second_half):+.2f} MiB/min"
    )
    print(f"unexpected answers: {len(failures)}")
    for failure in failures[:10]:
        print("  " + failure)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
