"""AUTOMATIC1111 clients against a real served process (tiny-sdxl, also aliased sdxl-realism)."""

from __future__ import annotations

import base64
import io
import json
import threading
import time

import httpx
import pytest
from PIL import Image

from tests.conftest import pixels, png_bytes

# What A1111 clients send: every field, most of them at A1111's defaults.
A1111_DEFAULTS = {
    "prompt": "a misty forest", "negative_prompt": "", "styles": [], "seed": -1, "subseed": -1,
    "subseed_strength": 0, "seed_resize_from_h": -1, "seed_resize_from_w": -1, "sampler_name": "Euler a",
    "scheduler": "Automatic", "batch_size": 1, "n_iter": 1, "steps": 4, "cfg_scale": 7, "width": 64, "height": 64,
    "restore_faces": False, "tiling": False, "do_not_save_samples": False, "do_not_save_grid": False, "eta": None,
    "denoising_strength": 0, "s_min_uncond": 0, "s_churn": 0, "s_tmax": None, "s_tmin": 0, "s_noise": 1,
    "override_settings": {}, "override_settings_restore_afterwards": True, "refiner_checkpoint": None,
    "disable_extra_networks": False, "comments": {}, "enable_hr": False, "hr_scale": 2, "hr_upscaler": "Latent",
    "hr_second_pass_steps": 0, "hr_resize_x": 0, "hr_resize_y": 0, "sampler_index": "Euler", "script_name": None,
    "script_args": [], "send_images": True, "save_images": False, "alwayson_scripts": {},
}


def sdapi(server, route: str, body: dict, timeout: float = 120) -> httpx.Response:
    return httpx.post(f"{server.url}/sdapi/v1/{route}", json=body, timeout=timeout)


def test_txt2img_with_a_full_a1111_body(server):
    response = sdapi(server, "txt2img", {**A1111_DEFAULTS, "seed": 5, "batch_size": 2,
                                         "sampler_name": "DPM++ 2M", "scheduler": "Karras"})
    assert response.status_code == 200, response.text[:500]
    answer = response.json()
    images = [Image.open(io.BytesIO(base64.b64decode(b64))) for b64 in answer["images"]]
    assert [image.size for image in images] == [(64, 64), (64, 64)]
    info = json.loads(answer["info"])
    assert info["all_seeds"] == [5, 6] and info["sampler_name"] == "DPM++ 2M Karras" and info["steps"] == 4
    assert answer["parameters"]["prompt"] == "a misty forest"
    again = sdapi(server, "txt2img", {**A1111_DEFAULTS, "seed": 5, "batch_size": 2,
                                      "sampler_name": "DPM++ 2M", "scheduler": "Karras"}).json()
    assert pixels(base64.b64decode(again["images"][0])) == pixels(base64.b64decode(answer["images"][0]))


def test_random_seed_model_override_and_sampler_aliases(server):
    answer = sdapi(server, "txt2img", {**A1111_DEFAULTS, "sampler_name": "k_euler",
                                       "override_settings": {"sd_model_checkpoint": "sdxl-realism [abc123]"}}).json()
    info = json.loads(answer["info"])
    assert 0 <= info["seed"] <= 2**32 - 1 and info["sd_model_name"] == "tiny-sdxl" and info["sampler_name"] == "Euler"


def test_img2img(server):
    image = base64.b64encode(png_bytes(96, 64)).decode()
    body = {**A1111_DEFAULTS, "init_images": [image], "steps": 10, "seed": 2, "width": 96, "height": 64}
    light = sdapi(server, "img2img", {**body, "denoising_strength": 0.3})
    heavy = sdapi(server, "img2img", {**body, "denoising_strength": 0.9})
    assert light.status_code == heavy.status_code == 200, light.text[:500]
    assert Image.open(io.BytesIO(base64.b64decode(light.json()["images"][0]))).size == (96, 64)
    assert light.json()["images"][0] != heavy.json()["images"][0]
    assert json.loads(light.json()["info"])["denoising_strength"] == 0.3


@pytest.mark.parametrize(("route", "change", "param"), [
    ("txt2img", {"enable_hr": True}, "enable_hr"),
    ("txt2img", {"restore_faces": True}, "restore_faces"),
    ("txt2img", {"alwayson_scripts": {"controlnet": {"args": []}}}, "alwayson_scripts"),
    ("txt2img", {"n_iter": 2}, "n_iter"),
    ("txt2img", {"sampler_name": "Warp Drive"}, "sampler_name"),
    ("txt2img", {"override_settings": {"CLIP_stop_at_last_layers": 2}}, "override_settings"),
    ("txt2img", {"init_images": [base64.b64encode(png_bytes()).decode()]}, "init_images"),
    ("txt2img", {"width": 100}, "width"),
    ("img2img", {}, "init_images"),
    ("img2img", {"init_images": [base64.b64encode(png_bytes()).decode()]}, "denoising_strength"),
    ("img2img", {"init_images": ["%%%"]}, "init_images.0"),
])
def test_options_that_are_on_are_refused_by_name(server, route, change, param):
    response = sdapi(server, route, {**A1111_DEFAULTS, **change})
    assert response.status_code == 400, response.text[:500]
    assert response.json()["error"]["param"] == param


def test_models_samplers_options(server):
    models = httpx.get(f"{server.url}/sdapi/v1/sd-models", timeout=300).json()
    assert [m["title"] for m in models] == ["tiny-sdxl"]
    samplers = {s["name"]: s["aliases"] for s in httpx.get(f"{server.url}/sdapi/v1/samplers", timeout=300).json()}
    assert samplers["Euler a"] == ["euler_a"] and "DPM++ SDE Karras" in samplers
    assert httpx.get(f"{server.url}/sdapi/v1/options", timeout=300).json() == {"sd_model_checkpoint": "tiny-sdxl"}


def test_progress_and_interrupt(server):
    idle = httpx.get(f"{server.url}/sdapi/v1/progress", timeout=300).json()
    assert idle["progress"] == 0.0 and idle["state"]["job_count"] == 0
    answers = []
    worker = threading.Thread(target=lambda: answers.append(sdapi(server, "txt2img", {
        **A1111_DEFAULTS, "width": 1024, "height": 1024, "steps": 30})))
    worker.start()
    deadline, seen = time.monotonic() + 30, None
    while time.monotonic() < deadline:
        seen = httpx.get(f"{server.url}/sdapi/v1/progress?skip_current_image=true", timeout=300).json()
        if seen["state"]["sampling_step"] >= 3:
            break
        time.sleep(0.05)
    assert seen["state"]["sampling_steps"] == 30 and 0 < seen["progress"] < 1 and seen["eta_relative"] > 0
    assert httpx.post(f"{server.url}/sdapi/v1/interrupt", timeout=300).status_code == 200
    worker.join(30)
    assert answers[0].status_code == 409 and answers[0].json()["error"]["type"] == "cancelled"
    assert sdapi(server, "txt2img", A1111_DEFAULTS).status_code == 200  # the next one runs
