"""The native API through a real `bentoml serve` process answering HTTP on 127.0.0.1."""

from __future__ import annotations

import base64
import io

import httpx
import pytest
from PIL import Image

from tests.conftest import pixels, png_bytes


def post(server, route: str, body, **kwargs) -> httpx.Response:
    return httpx.post(f"{server.url}{route}", json=body, timeout=300, **kwargs)


def decode(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def test_txt2img_json(server):
    response = post(server, "/v1/txt2img", {"prompt": "a lighthouse", "seed": 11, "n": 2, "width": 128, "height": 96})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == "tiny-sdxl"
    assert [image["seed"] for image in body["images"]] == [11, 12]
    assert decode(body["images"][0]["b64_json"]).size == (128, 96)
    assert body["parameters"]["steps"] == 4 and body["parameters"]["scheduler"] == "euler"
    assert set(body["timings"]) == {"load_s", "lora_load_s", "inference_s", "encode_s"}
    assert body["prompt_reading"] == {
        "prompt": {"tokens": len("alighthouse"), "chunks": 1},  # (a token a letter)
        "negative_prompt": {"tokens": 0, "chunks": 1},
    }
    assert response.headers["x-seed"] == "11,12"
    assert float(response.headers["x-inference-time"]) > 0
    # (0.000 when the model was loaded already: the warm-up loads it at start)
    assert response.headers["x-model-load-time"] == f"{body['timings']['load_s']:.3f}"


def test_txt2img_raw_image_for_curl(server):
    response = post(
        server,
        "/v1/txt2img",
        {"prompt": "a lighthouse", "seed": 11, "output_format": "webp"},
        headers={"Accept": "image/webp"},
    )
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/webp"
    assert Image.open(io.BytesIO(response.content)).format == "WEBP"
    assert response.headers["x-seed"] == "11"


def test_same_seed_same_pixels_over_http(server):
    body = {"prompt": "a lighthouse", "seed": 5}
    first = post(server, "/v1/txt2img", body, headers={"Accept": "image/png"}).content
    second = post(server, "/v1/txt2img", body, headers={"Accept": "image/png"}).content
    other = post(server, "/v1/txt2img", {**body, "seed": 6}, headers={"Accept": "image/png"}).content
    assert pixels(first) == pixels(second) != pixels(other)


def test_real_client_size_1024_with_30_steps(server):
    response = post(
        server,
        "/v1/txt2img",
        {"prompt": "x", "width": 1024, "height": 1024, "steps": 30, "seed": 1},
        headers={"Accept": "image/png"},
    )
    assert response.status_code == 200
    assert Image.open(io.BytesIO(response.content)).size == (1024, 1024)


def test_img2img_with_base64_and_data_url(server):
    encoded = base64.b64encode(png_bytes(96, 64)).decode()
    light = post(server, "/v1/img2img", {"prompt": "p", "image": encoded, "strength": 0.3, "steps": 10, "seed": 2})
    heavy = post(
        server,
        "/v1/img2img",
        {"prompt": "p", "image": "data:image/png;base64," + encoded, "strength": 0.9, "steps": 10, "seed": 2},
    )
    assert light.status_code == heavy.status_code == 200, light.text
    light_image = decode(light.json()["images"][0]["b64_json"])
    assert light_image.size == (96, 64)
    assert light_image.tobytes() != decode(heavy.json()["images"][0]["b64_json"]).tobytes()


def test_models_and_schedulers(server):
    models = httpx.get(f"{server.url}/v1/models", timeout=300).json()["models"]
    assert [m["id"] for m in models] == ["tiny-sdxl", "sdxl-realism"]
    assert models[0]["default"] is True and models[0]["version"] and "alias_of" not in models[0]
    assert models[1]["alias_of"] == "tiny-sdxl" and models[1]["version"] == models[0]["version"]
    names = httpx.get(f"{server.url}/v1/schedulers", timeout=300).json()["schedulers"]
    assert {"euler", "euler_a", "dpmpp_2m_karras", "dpmpp_sde_karras", "lcm"} <= set(names)


def test_bentoml_endpoints_stay_on(server):
    for route in ("/livez", "/readyz", "/metrics", "/"):
        assert httpx.get(f"{server.url}{route}", timeout=300).status_code == 200, route
    spec = httpx.get(f"{server.url}/docs.json", timeout=300).json()
    assert "/v1/txt2img" in spec["paths"] and "/v1/img2img" in spec["paths"]


TRUNCATED_PNG = base64.b64encode(png_bytes(256, 256)[:300]).decode()


def _huge_png_header() -> str:
    buffer = io.BytesIO()
    Image.new("1", (10000, 10000)).save(buffer, format="PNG")  # 100 megapixels in a few kB
    return base64.b64encode(buffer.getvalue()).decode()


@pytest.mark.parametrize(
    ("route", "body", "status", "param"),
    [
        ("/v1/txt2img", b'{"prompt": "x",', 400, None),
        ("/v1/txt2img", {}, 400, "prompt"),
        ("/v1/txt2img", {"prompt": ""}, 400, "prompt"),
        ("/v1/txt2img", {"prompt": "x", "width": "wide"}, 400, "width"),
        ("/v1/txt2img", {"prompt": "x", "steps": 2.5}, 400, "steps"),
        ("/v1/txt2img", {"prompt": "x", "width": 100}, 400, "width"),
        ("/v1/txt2img", {"prompt": "x", "width": 2048, "height": 4096}, 400, "height"),
        ("/v1/txt2img", {"prompt": "x", "n": 11}, 400, "n"),
        ("/v1/txt2img", {"prompt": "x", "steps": 1000}, 400, "steps"),
        ("/v1/txt2img", {"prompt": "x", "seed": -1}, 400, "seed"),
        ("/v1/txt2img", {"prompt": "x", "scheduler": "warp"}, 400, "scheduler"),
        ("/v1/txt2img", {"prompt": "x", "output_format": "gif"}, 400, "output_format"),
        ("/v1/txt2img", {"prompt": "x", "colour": "red"}, 400, "colour"),
        ("/v1/txt2img", {"prompt": "x", "image": TRUNCATED_PNG}, 400, "image"),
        ("/v1/txt2img", {"prompt": "x", "model": "sdxl-base"}, 404, "model"),
        ("/v1/img2img", {"prompt": "x"}, 400, "image"),
        ("/v1/img2img", {"prompt": "x", "image": "%%%"}, 400, "image"),
        ("/v1/img2img", {"prompt": "x", "image": base64.b64encode(b"hello").decode()}, 422, "image"),
        ("/v1/img2img", {"prompt": "x", "image": TRUNCATED_PNG}, 422, "image"),
        ("/v1/img2img", {"prompt": "x", "image": _huge_png_header()}, 413, "image"),
        ("/v1/img2img", {"prompt": "x", "image": TRUNCATED_PNG, "strength": 0}, 400, "strength"),
    ],
)
def test_bad_input_gets_4xx_naming_the_field(server, route, body, status, param):
    if isinstance(body, bytes):
        response = httpx.post(
            f"{server.url}{route}", content=body, headers={"Content-Type": "application/json"}, timeout=300
        )
    else:
        response = post(server, route, body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param
    assert error["message"] and (param is None or param in error["message"])


def test_unknown_model_names_the_available_ones(server):
    error = post(server, "/v1/txt2img", {"prompt": "x", "model": "sdxl-base"}).json()["error"]
    assert error["message"] == "model 'sdxl-base' is not available; available models: sdxl-realism, tiny-sdxl"


def test_raw_answer_takes_one_image(server):
    response = post(server, "/v1/txt2img", {"prompt": "x", "n": 2}, headers={"Accept": "image/png"})
    assert response.status_code == 400 and response.json()["error"]["param"] == "n"


def test_server_keeps_serving_after_errors(server):
    for body, status in (
        ({"prompt": "x", "width": 7}, 400),
        ({"prompt": "x", "model": "nope"}, 404),
        ({"prompt": 3}, 400),
        ({"prompt": "x", "width": 0}, 400),
        ({"prompt": "x", "height": 0}, 400),
    ):
        assert post(server, "/v1/txt2img", body).status_code == status, body
    assert post(server, "/v1/txt2img", {"prompt": "still here"}).status_code == 200


@pytest.mark.parametrize(
    ("route", "body"),
    [
        ("/v1/txt2img", {"prompt": "x", "width": 0}),
        ("/v1/img2img", {"prompt": "x", "height": 0, "image": base64.b64encode(png_bytes()).decode()}),
        ("/v1/generate", {"prompt": "x", "size": "0x0"}),
        ("/v1/images/generations", {"prompt": "x", "width": 0, "height": 0}),
        ("/v1/jobs", {"prompt": "x", "width": 0}),
        ("/sdapi/v1/txt2img", {"prompt": "x", "width": 0}),
        ("/sdapi/v1/img2img", {"prompt": "x", "height": 0, "init_images": [base64.b64encode(png_bytes()).decode()]}),
    ],
)
def test_a_zero_size_is_refused_on_every_generation_route(server, route, body):
    response = post(server, route, body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] in ("width", "height")


def test_the_fleet_of_one_server_is_itself_its_queue_and_its_last_minutes(server):
    body = {"prompt": "a fleet of one", "width": 64, "height": 64, "steps": 3, "seed": 2}
    assert httpx.post(f"{server.url}/v1/txt2img", json=body, timeout=300).status_code == 200
    fleet = httpx.get(f"{server.url}/v1/system/fleet", timeout=300).json()
    [replica] = fleet["replicas"]
    status = httpx.get(f"{server.url}/v1/system/status", timeout=300).json()
    assert replica["here"] and replica["devices"][0]["name"] == status["devices"][0]["name"]  # (whatever device)
    device = replica["devices"][0]
    assert "tiny-sdxl" in [model["id"] for model in device["loaded"]]
    assert 0 < device["memory"]["used"] < device["memory"]["total"] and device["memory"]["budget"] > 0
    assert fleet["queue"]["length"] == 0 and fleet["queue"]["by_key"] == {}
    assert len(fleet["minutes"]["finished"]) == 10 and fleet["minutes"]["finished"][-1] >= 1
    assert fleet["minutes"]["seconds_per_step"][-1] > 0
    assert "a fleet of one" not in str(fleet)
    page = httpx.get(f"{server.url}/ui/fleet", timeout=300)
    assert page.status_code == 200 and "connect-src 'self'" in page.headers["content-security-policy"]
