"""Security: upscales are bounded. Each waiting call holds its decoded image, so past
SDXL_MAX_UPSCALES (4 here, the default) calls at once a fifth is a 429 with Retry-After at
once, never a growing pile; the waiting ones finish once the device is free."""

from __future__ import annotations

import base64
import concurrent.futures

import httpx

from tests.conftest import png_bytes
from tests.polling import poll
from tests.test_jobs import LONG, submit, wait

UPSCALE = {"image": base64.b64encode(png_bytes(64, 64)).decode(), "upscaler": "lanczos", "scale": 2}


def upscales(server) -> int:
    return httpx.get(f"{server.url}/v1/system/status", timeout=300).json()["upscales"]


def test_past_the_cap_an_upscale_is_a_429_and_the_waiting_ones_finish(server):
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        with server.parked():  # the device held by a job, so that the upscales wait their turn
            blocker = submit(server, {**LONG, "prompt": "a parked one, held"})
            wait(server, blocker["id"], until=lambda job: job["step"] == 1)
            waiting = [pool.submit(httpx.post, f"{server.url}/v1/upscale", json=UPSCALE, timeout=300) for _ in range(4)]
            poll(lambda: upscales(server), until=lambda count: count == 4, what="four upscales waiting")
            refused = httpx.post(f"{server.url}/v1/upscale", json=UPSCALE, timeout=300)
            assert refused.status_code == 429 and "SDXL_MAX_UPSCALES" in refused.json()["error"]["message"]
            assert int(refused.headers["retry-after"]) > 0
            extras = httpx.post(
                f"{server.url}/sdapi/v1/extra-single-image",
                json={"image": UPSCALE["image"], "upscaler_1": "Lanczos"},
                timeout=300,
            )
            assert extras.status_code == 429  # (A1111's extras count too)
        assert [future.result().status_code for future in waiting] == [200] * 4
    assert upscales(server) == 0
