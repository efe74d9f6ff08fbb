"""All of a device's torch work on its one thread: the thread itself, and the served process's
own record of which thread did each kind of torch work (a structure check, never a timing)."""

from __future__ import annotations

import base64
import threading

import httpx
import pytest

from backends.sdxl_backend.device_thread import DeviceThread
from backends.sdxl_backend.errors import DeviceUnavailable
from tests.conftest import nothing_loaded, png_bytes
from tests.test_jobs import wait


def test_work_handed_over_runs_on_the_device_thread_before_its_loop_and_at_its_exit():
    device, ran, stop = DeviceThread(torch_threads=1, name="device-under-test"), [], threading.Event()

    def loop():
        ran.append(("loop", threading.current_thread().name))
        while not stop.wait(0.01):
            device.run_calls()

    handed_before_start = device.call(lambda: ran.append(("early", threading.current_thread().name)))
    device.run_at_exit(lambda: ran.append(("exit", threading.current_thread().name)))
    device.start(loop, wake=lambda: None)
    handed_before_start.result(timeout=60)
    assert device.run(lambda: threading.current_thread().name) == "device-under-test"
    failing = device.call(lambda: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        failing.result(timeout=60)
    assert device.run(lambda: device.torch_threads) == 1  # the failure did not end the thread
    stop.set()
    device.join(timeout=60)
    assert ran == [("early", "device-under-test"), ("loop", "device-under-test"), ("exit", "device-under-test")]
    with pytest.raises(DeviceUnavailable):
        device.call(lambda: None).result(timeout=60)


@pytest.mark.served
def test_every_kind_of_torch_work_ran_on_the_device_thread_with_the_set_thread_count(side_models_server):
    """On the server that serves every kind of model, after whatever other tests ran on it."""
    server = side_models_server
    nothing_loaded(server)
    control = base64.b64encode(png_bytes(64, 64)).decode()
    small = {"prompt": "a lighthouse", "width": 64, "height": 64, "steps": 2, "seed": 1}
    requests = [
        small,
        {**small, "loras": [{"id": "tiny-sdxl-lora", "weight": 0.8}]},
        {**small, "controlnets": [{"id": "tiny-sdxl-controlnet", "image": control}]},
    ]
    for body in requests:
        response = httpx.post(f"{server.url}/v1/txt2img", json=body, timeout=300)
        assert response.status_code == 200, response.text
    job = httpx.post(f"{server.url}/v1/jobs", json={**small, "preview_every": 1}, timeout=300).json()
    assert wait(server, job["id"])[0]["status"] == "succeeded"
    upscale = {"image": control, "upscaler": "tiny-upscaler", "scale": 2}
    assert httpx.post(f"{server.url}/v1/upscale", json=upscale, timeout=300).status_code == 200
    unloaded = httpx.post(f"{server.url}/v1/system/unload", timeout=300).json()["unloaded"]
    assert unloaded == ["tiny-sdxl", "tiny-sdxl-controlnet", "tiny-upscaler"]  # (what this test loaded)
    assert httpx.post(f"{server.url}/v1/txt2img", json=small, timeout=300).status_code == 200  # loaded again

    device = httpx.get(f"{server.url}/v1/system/status", timeout=300).json()["device_thread"]
    assert device["torch_threads"] == 1  # SDXL_TORCH_THREADS, as torch reports it on that thread
    assert device["torch_work"] == {
        kind: [device["name"]]
        for kind in ("encode prompts", "generate", "load", "preview", "unload", "upscale", "warm-up")
    }
